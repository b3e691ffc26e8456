"""d2prune's DefaultTrainer: checkpoints that carry the pruned architecture, COCO evaluation
with or without detectron2's C++ ops, and a run summary written next to the checkpoints.
"""

import json
import os
import time

from detectron2.engine import DefaultTrainer, HookBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from ..compat import coco_eval_use_fast_impl
from ..utils.io import atomic_write_text
from .checkpoint import PrunedCheckpointer


def build_coco_evaluator(cfg, dataset_name: str, output_folder: str = None) -> COCOEvaluator:
    """A COCOEvaluator that falls back to pycocotools when the C++ evaluator is not compiled."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=coco_eval_use_fast_impl())


class RunSummary(HookBase):
    """Writes `OUTPUT_DIR/run_summary.json` at the end of training: iterations run, training
    wall time and the last evaluation results, so tools and reports need not parse logs."""

    def __init__(self, output_dir: str):
        self._path = os.path.join(output_dir, "run_summary.json")

    def before_train(self):
        self._start_time = time.perf_counter()
        self._start_iter = self.trainer.start_iter

    def after_train(self):
        if not comm.is_main_process():
            return
        summary = {
            "start_iter": self._start_iter,
            "max_iter": self.trainer.max_iter,
            # TrainerBase leaves `iter == max_iter` after a completed loop.
            "iterations": self.trainer.iter - self._start_iter,
            "train_seconds": round(time.perf_counter() - self._start_time, 1),
            "results": getattr(self.trainer, "_last_eval_results", None) or {},
        }
        atomic_write_text(self._path, json.dumps(summary, indent=2, default=float))


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer with d2prune's checkpointer, evaluator and run summary.

    Its checkpoints carry the channel spec, so a pruned model resumes, evaluates and
    fine-tunes from them without any flag.
    """

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_coco_evaluator(cfg, dataset_name, output_folder)

    def build_hooks(self):
        # DefaultTrainer.__init__ made a DetectionCheckpointer just before calling this; the
        # PeriodicCheckpointer built below must hold the pruning-aware one instead.
        self.checkpointer = PrunedCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, **self.checkpointer.checkpointables
        )
        # After EvalHook, so that the final evaluation is in the summary.
        return super().build_hooks() + [RunSummary(self.cfg.OUTPUT_DIR)]

    def train(self):
        """Train, then return the final evaluation results (v0.6 returns them only when
        TEST.EXPECTED_RESULTS is set)."""
        super().train()
        return getattr(self, "_last_eval_results", None)
