"""d2prune's DefaultTrainer: checkpoints that carry the pruned architecture and the optimizer,
COCO evaluation with or without detectron2's C++ ops, a run summary, and pruning while training.
"""

import logging
import os
import time

import torch
from detectron2.engine import DefaultTrainer, HookBase, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from .. import compat
from ..compat import coco_eval_use_fast_impl
from ..config import check_prune_config
from ..data.stream import TrainStream, build_train_stream
from ..errors import UserError
from ..pruning import channel_spec
from ..utils.io import write_json
from ..utils.modules import unwrap
from ..utils.seeding import seed_all
from .checkpoint import PrunedCheckpointer
from .pruning_hook import PruningHook, carry_over


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
            # TrainerBase adds one to `iter` after the loop, even when a resumed run had no
            # iteration left to do.
            "iterations": min(self.trainer.iter, self.trainer.max_iter) - self._start_iter,
            "train_seconds": round(time.perf_counter() - self._start_time, 1),
            "results": compat.last_eval_results(self.trainer) or {},
        }
        write_json(self._path, summary)


class SeedSteps(HookBase):
    """Seeds the global random generators before every iteration from (run seed, rank,
    iteration). What an iteration draws (detectron2's proposal and anchor sampling use torch's
    global generator) then does not depend on what ran before it: not on a resume, nor on a
    pruning event or an evaluation having drawn numbers in between."""

    def before_step(self):
        seed_all(self.trainer.run_seed, comm.get_rank(), self.trainer.iter)


class _NoTracebackForUserErrors(logging.Filter):
    """Drops detectron2's "Exception during training" record, traceback and all, when the
    exception is a `UserError`: the tool states it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], UserError))


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer with d2prune's checkpointer, evaluator and run summary.

    Its checkpoints carry the channel spec and the optimizer state, so a pruned model resumes
    (with its momentum), evaluates and fine-tunes from them without any flag. It also trains
    with several processes on machines without CUDA (gloo, see `d2prune.compat.launch`).

    A resumed run repeats the run that was not interrupted: the training data come from a
    `TrainStream` that starts at the resumed iteration with the same batches and augmentations,
    and the global generators are seeded at every iteration (`SeedSteps`) from the run's seed
    (SEED, or one drawn at the start and kept in the checkpoints when SEED is negative).
    """

    def __init__(self, cfg):
        with compat.ddp_on_cpu():
            super().__init__(cfg)
        loader = compat.inner_trainer(self).data_loader
        self._stream = loader if isinstance(loader, TrainStream) else None
        self.run_seed = self._stream.seed if self._stream else (cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed())

    @classmethod
    def build_train_loader(cls, cfg):
        """The resumable training stream (`d2prune.data.stream`), with what detectron2's
        `build_detection_train_loader(cfg)` reads. A subclass that returns another loader still
        trains, but a resumed run then reads its data from the start again."""
        return build_train_stream(cfg, seed=cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed())

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        # MODEL.WEIGHTS may be a pruned checkpoint: loading it cut the model to its spec.
        self._follow_model()
        if self.start_iter:
            if self._stream is not None:
                self._stream.seek(self.start_iter)
            else:
                logging.getLogger(__name__).warning(
                    "build_train_loader returned a %s, not a d2prune TrainStream: the resumed run "
                    "reads its training data from the start again", type(compat.inner_trainer(self).data_loader).__name__,
                )  # fmt: skip

    def state_dict(self):
        ret = super().state_dict()
        ret["seed"] = self.run_seed
        if not compat.TRAINER_SAVES_OPTIMIZER:
            ret["_trainer"] = compat.inner_trainer(self).state_dict()
        return ret

    def load_state_dict(self, state_dict):
        # The checkpointer loads the model (cut to the checkpoint's channel spec) before this
        # state: the optimizer, built for the model as first built, must follow it before its
        # state is loaded into it.
        self._follow_model()
        super().load_state_dict(state_dict)
        if "seed" in state_dict:  # older checkpoints have none: SEED then holds
            self.run_seed = int(state_dict["seed"])
            if self._stream is not None:
                self._stream.seed = self.run_seed
        if not compat.TRAINER_SAVES_OPTIMIZER and "_trainer" in state_dict:
            compat.inner_trainer(self).load_state_dict(state_dict["_trainer"])

    def _follow_model(self) -> None:
        """Rebuild the optimizer when the model's parameters are no longer the ones it holds."""
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        if held != {id(p) for p in unwrap(self.model).parameters() if p.requires_grad}:
            model = unwrap(self.model)
            self.install_optimizer(carry_over(self.optimizer, self.build_optimizer(self.cfg, model), model))

    def install_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Train on with `optimizer` (see `pruning_hook.cut`), which holds the model's current
        parameters after surgery replaced some of them: a new LR scheduler continues at the old
        one's position, and a new DDP wrapper holds the new parameters. The AMP grad scaler and
        the data stay as they are."""
        model = unwrap(self.model)
        scheduler = self.build_lr_scheduler(self.cfg, optimizer)
        scheduler.load_state_dict(self.scheduler.state_dict())

        self.scheduler = scheduler
        # The old DDP wrapper's reducer still points at the replaced parameters: without a new
        # one, their successors' gradients would silently stay unsynchronised across ranks.
        compat.replace_optimizer_and_model(
            self, optimizer, compat.create_ddp_model(model, broadcast_buffers=False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_coco_evaluator(cfg, dataset_name, output_folder)

    def build_hooks(self):
        # DefaultTrainer.__init__ made a DetectionCheckpointer just before calling this; the
        # PeriodicCheckpointer built below must hold the pruning-aware one instead.
        self.checkpointer = PrunedCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, **self.checkpointer.checkpointables
        )
        if self.cfg.PRUNE.ENABLED:
            # The model is as the config builds it until the first load or pruning event.
            self.checkpointer.unpruned_spec = channel_spec(unwrap(self.model))
        else:
            # Training needs no channel groups: a model d2prune cannot prune trains too. Loading
            # a pruned checkpoint makes the checkpointer record its spec again.
            self.checkpointer.records_spec = False
        # SeedSteps first, so every other hook's before_step sees the iteration's generators;
        # RunSummary after EvalHook, so that the final evaluation is in the summary.
        return [SeedSteps()] + super().build_hooks() + [RunSummary(self.cfg.OUTPUT_DIR)]

    def train(self):
        """Train, then return the final evaluation results (v0.6 returns them only when
        TEST.EXPECTED_RESULTS is set)."""
        loop_logger = logging.getLogger("detectron2.engine.train_loop")
        quiet = _NoTracebackForUserErrors()
        loop_logger.addFilter(quiet)
        try:
            super().train()
        finally:
            loop_logger.removeFilter(quiet)
        return compat.last_eval_results(self)


class PruningTrainer(Trainer):
    """The Trainer that prunes while fine-tuning, on the PRUNE schedule (see `PruningHook`).

    `tools/train_net.py` uses it whenever PRUNE.ENABLED is set. Checkpoints written at or after
    a pruning event resume into the pruned architecture, with optimizer, scheduler and the
    schedule's progress.
    """

    def __init__(self, cfg):
        check_prune_config(cfg)
        super().__init__(cfg)

    def build_hooks(self):
        ret = super().build_hooks()
        # Right after the LR scheduler's step, so the checkpoint, evaluation and writers that
        # follow in the same iteration see the pruned model and its rebuilt optimizer.
        at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler)) + 1
        ret.insert(at, PruningHook(self.cfg))
        return ret

    def train(self):
        """Check that the PRUNE budget can remove channels from the model as loaded, then train."""
        next(h for h in compat.trainer_hooks(self) if isinstance(h, PruningHook)).check_budget()
        return super().train()
