"""A study run's validation curve and early-stopped checkpoint: `ValidationHook` evaluates
STUDY.VAL_DATASET while the run trains and keeps the weights of its best evaluation.
"""

import os
from typing import Dict, List, Optional

from detectron2.engine import HookBase, hooks
from detectron2.evaluation import inference_on_dataset
from detectron2.utils import comm

from d2prune import compat
from d2prune.engine.checkpoint import PrunedCheckpointer
from d2prune.engine.oneshot import bbox_metrics
from d2prune.engine.pruning_hook import PruningHook
from d2prune.engine.trainer import PruningTrainer, Trainer
from d2prune.utils.modules import unwrap

__all__ = ["BEST", "ValidationHook", "StudyTrainer", "StudyPruningTrainer", "trainer_class"]

# The early-stopped model: the weights of the run's best validation evaluation (no optimizer).
BEST = "model_best"


class _BestCheckpointer(PrunedCheckpointer):
    """Saves the model (with its channel spec) without naming the file in `last_checkpoint`: a
    resumed run must go on from its last periodic checkpoint, not from its best one."""

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        pass


class ValidationHook(HookBase):
    """Every `period` iterations and after the last one, the bbox AP on `dataset` (written to the
    event storage as `validation/AP`, `validation/AP50`, so metrics.json holds the curve beside
    the losses); the weights of the best evaluation so far go to `model_best.pth`.

    Early stopping without stopping: the run trains to the end of its schedule (its final
    weights are the unstopped model) and its best checkpoint is the model a patience-based stop
    would have kept. Only evaluations after the last pruning event may be best, so a pruned
    run's early-stopped model has the pruned architecture.

    Placed before the PeriodicCheckpointer, so a checkpoint of the same iteration holds the
    evaluation in this hook's state (`history`, `best`) and a resumed run neither loses nor
    repeats one.
    """

    def __init__(self, dataset: str, period: int, output_dir: str):
        self.dataset, self.period, self.output_dir = dataset, period, output_dir
        self.history: List[List[float]] = []  # [iterations done, AP, AP50]
        self.best: Optional[Dict[str, float]] = None  # {"iter", "AP", "AP50"} of model_best.pth

    def after_step(self):
        done = self.trainer.iter + 1
        if done % self.period == 0 or done == self.trainer.max_iter:
            self.evaluate(done)

    def evaluate(self, done: int) -> None:
        trainer = self.trainer
        model = unwrap(trainer.model)
        loader = trainer.build_test_loader(trainer.cfg, self.dataset)
        evaluator = trainer.build_evaluator(trainer.cfg, self.dataset, os.path.join(self.output_dir, "inference", "validation"))
        metrics = bbox_metrics(inference_on_dataset(trainer.model, loader, evaluator))
        ap, ap50 = metrics["bbox_AP"], metrics["bbox_AP50"]
        self.history.append([done, ap, ap50])
        trainer.storage.put_scalars(**{"validation/AP": ap, "validation/AP50": ap50}, smoothing_hint=False)
        # The first of equal evaluations stays best: a stop with any patience would keep it.
        if self._eligible() and (self.best is None or ap > self.best["AP"]):
            self.best = {"iter": done, "AP": ap, "AP50": ap50}
            if comm.is_main_process():
                saver = _BestCheckpointer(model, self.output_dir)
                saver.unpruned_spec = trainer.checkpointer.unpruned_spec
                saver.records_spec = trainer.checkpointer.records_spec
                saver.save(BEST, iteration=done - 1)
        comm.synchronize()

    def _eligible(self) -> bool:
        """Whether the model now has its final architecture (every pruning event done)."""
        pruning = [h for h in compat.trainer_hooks(self.trainer) if isinstance(h, PruningHook)]
        return all(h.events_done == len(h.schedule.iters) for h in pruning)

    def state_dict(self):
        return {"history": self.history, "best": self.best}

    def load_state_dict(self, state_dict):
        self.history = [list(h) for h in state_dict["history"]]
        self.best = state_dict["best"]


class _Validating:
    """Adds a `ValidationHook` right before the PeriodicCheckpointer when STUDY.VAL_DATASET is set."""

    def build_hooks(self):
        ret = super().build_hooks()
        cfg = self.cfg
        if cfg.STUDY.VAL_DATASET:
            at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicCheckpointer))
            ret.insert(at, ValidationHook(cfg.STUDY.VAL_DATASET, cfg.STUDY.VAL_PERIOD, cfg.OUTPUT_DIR))
        return ret

    @property
    def validation(self) -> Optional[ValidationHook]:
        return next((h for h in compat.trainer_hooks(self) if isinstance(h, ValidationHook)), None)


class StudyTrainer(_Validating, Trainer):
    """d2prune's Trainer with the study's validation hook."""


class StudyPruningTrainer(_Validating, PruningTrainer):
    """d2prune's PruningTrainer with the study's validation hook."""


def trainer_class(cfg):
    return StudyPruningTrainer if cfg.PRUNE.ENABLED else StudyTrainer
