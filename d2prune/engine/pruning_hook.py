"""The training hook that prunes on the PRUNE schedule: score, choose, cut, keep training.

Each event runs on every rank in `after_step`, on any detectron2 trainer (d2prune's `Trainer`,
or a `SimpleTrainer`/`AMPTrainer` loop configured from a LazyConfig, see `engine/lazy.py`); the
optimizer, LR scheduler and DDP wrapper then move to the new tensors (`install_optimizer`),
and a pruned checkpoint records the new shape.
"""

import copy
import hashlib
import json
import logging
import time
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
from detectron2.engine import HookBase, hooks
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter
from torch import nn

from .. import compat
from ..complexity import count_flops, count_params, measure_latency
from ..pruning import channel_spec, find_groups, prune
from ..pruning.budget import Budget
from ..pruning.schedule import PruningSchedule
from ..utils.modules import unwrap
from .scoring import ScoringBatches
from .selection import (
    build_criterion,
    build_latency_model,
    check_budget,
    choose_keep,
    needs_batches,
    sample_inputs,
)

__all__ = ["PruningHook", "cut", "install_optimizer", "sliced_optimizer_state"]

logger = logging.getLogger(__name__)


class PruningHook(HookBase):
    """Prunes the trainer's model at the iterations of the PRUNE schedule.

    At event k it removes channels until the share of the unpruned model's channels (or FLOPs)
    given by the schedule is gone, slices the optimizer's momentum to the kept channels, moves
    the trainer onto the new optimizer, LR scheduler position and DDP wrapper (`cut`,
    `install_optimizer`), logs sizes to the event storage under `pruning/`, and saves
    `model_pruned_<iter>.pth` last. Its state (events done, the unpruned widths and FLOPs) travels in the
    checkpoints.

    `cfg` is a yacs config with the PRUNE section (for a LazyConfig: `lazy.prune_config`). The
    keyword arguments are what the event needs from the training loop; their defaults are
    d2prune's `Trainer`'s:
        build_optimizer(model): an optimizer for the model's current parameters
            (default: the trainer's `build_optimizer(cfg, model)`);
        checkpointer: the `PrunedCheckpointer` that saves the pruned checkpoints (the trainer's);
        evaluate(model): evaluation results, for PRUNE.EVAL_AT_EVENTS (the trainer's `test`);
        scoring: `ScoringBatches` for data-driven criteria (from DATASETS.TRAIN with the default
            `DatasetMapper`; never built for a weight-only criterion);
        ddp: keyword arguments of `create_ddp_model` for the new wrapper (broadcast_buffers=False,
            as DefaultTrainer).
    """

    def __init__(
        self,
        cfg,
        *,
        build_optimizer: Optional[Callable[[nn.Module], torch.optim.Optimizer]] = None,
        checkpointer=None,
        evaluate: Optional[Callable[[nn.Module], dict]] = None,
        scoring: Optional[ScoringBatches] = None,
        ddp: Optional[dict] = None,
    ):
        p = cfg.PRUNE
        self.cfg = cfg
        budget = Budget.from_config(cfg)
        self._flops_mode = budget.target == "flops"
        self._latency_mode = budget.target == "latency"
        self.latency_model = None  # built (or read from its cache) before training
        self.schedule = PruningSchedule.build(
            p.SCHEDULE, budget.amount, p.START_ITER, p.END_ITER, p.NUM_EVENTS, p.CURVE
        )
        self.criterion = build_criterion(cfg)
        self._reads_batches = needs_batches(cfg, self.criterion)
        if scoring is None and self._reads_batches:
            scoring = ScoringBatches.from_config(cfg)
        self.scoring = scoring
        self._build_optimizer = build_optimizer
        self._checkpointer = checkpointer
        self._evaluate_fn = evaluate
        self.ddp = {"broadcast_buffers": False} if ddp is None else dict(ddp)
        self.events_done = 0
        self.original_spec = None  # widths before the first event
        self.original_flops = None  # detector FLOPs at test size then, for FLOPS_REDUCTION

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if self._build_optimizer is not None:
            return self._build_optimizer(model)
        return self.trainer.build_optimizer(self.cfg, model)

    @property
    def checkpointer(self):
        return self._checkpointer if self._checkpointer is not None else self.trainer.checkpointer

    def before_train(self):
        model = unwrap(self.trainer.model)
        if self.original_spec is None:
            self.original_spec = channel_spec(model)
        if self._flops_mode and self.original_flops is None:
            inputs, _ = sample_inputs(self.cfg, model)
            self.original_flops = count_flops(model, inputs)["total"]
        if self._latency_mode and self.latency_model is None and self.events_done < len(self.schedule.iters):
            self.latency_model = build_latency_model(self.cfg, model, self.original_spec)

    def check_budget(self) -> None:
        """Fail now, rather than at the next event, when the PRUNE budget cannot remove any
        channel from the trainer's model (see `d2prune.engine.selection.check_budget`)."""
        if self.events_done < len(self.schedule.iters):
            check_budget(self.cfg, unwrap(self.trainer.model), self.original_spec)

    def after_step(self):
        iters = self.schedule.iters
        # `>=` rather than `==`: a run resumed past an event it had not reached still gets it.
        if self.events_done < len(iters) and self.trainer.iter >= iters[self.events_done]:
            self.prune_event()

    def prune_event(self) -> None:
        trainer, cfg = self.trainer, self.cfg
        index, total = self.events_done + 1, len(self.schedule.iters)
        iteration = trainer.iter
        comm.synchronize()
        if cfg.PRUNE.EVAL_AT_EVENTS:
            self._evaluate("before")

        model = unwrap(trainer.model)
        start = time.perf_counter()
        # Data-driven criteria score on batches of their own, chosen by the event's index: the
        # same on a resumed run, and the training stream is not moved on. Weight-only criteria
        # build none (unless mode "cost" weighs groups by their loss sensitivity).
        batches = self.scoring(self.events_done) if self._reads_batches else None
        keep = choose_keep(
            cfg, model, self.criterion, batches,
            amount=self.schedule.targets[self.events_done],
            original=self.original_spec, original_flops=self.original_flops,
            cost_model=self.latency_model,
        )
        score_seconds = time.perf_counter() - start
        if batches is not None:
            logger.info("scoring batches of event %d: dataset and sampler built in %.3f s", index, self.scoring.build_seconds)
        check_same_on_all_ranks(keep)

        before, params_before = channel_spec(model), count_params(model)
        install_optimizer(trainer, cut(model, trainer.optimizer, keep, self.build_optimizer), **self.ddp)
        self.events_done += 1
        comm.synchronize()

        self._log(index, total, iteration, model, before, params_before, score_seconds)
        if cfg.PRUNE.EVAL_AT_EVENTS:
            self._evaluate("after")
        if comm.is_main_process():
            self._flush_writers()
        # Last: a run killed before this save redoes the event when resumed (its log line and
        # metrics come again), one killed after it has them already.
        self.checkpointer.save(f"model_pruned_{iteration:07d}", iteration=iteration)

    def _log(self, index, total, iteration, model, before, params_before, score_seconds) -> None:
        """One line per event in the log (the change of each pruned kind of group and of the
        parameter count), and the sizes in the event storage under `pruning/`."""
        after = channel_spec(model)
        kinds = {g.name: g.kind for g in find_groups(model)}
        storage = self.trainer.storage
        widths = {}
        for name, kind in kinds.items():
            w = widths.setdefault(kind, [0, 0, 0])  # unpruned, before this event, after it
            w[0] += self.original_spec[name]
            w[1] += before[name]
            w[2] += after[name]
        changes = []
        for kind, (original, old, new) in widths.items():
            if kind in self.cfg.PRUNE.KINDS:
                changes.append(
                    f"{kind} {old} -> {new} channels ({100 * (new - old) / old:+.1f} %, "
                    f"{100 * new / original:.0f} % of the unpruned {original})"
                )
            storage.put_scalar(f"pruning/width/{kind}", new, smoothing_hint=False)
        params = count_params(model)
        logger.info(
            "pruning event %d/%d at iter %d: %s; params %.2f M -> %.2f M; scored in %.1f s",
            index, total, iteration, ", ".join(changes) or "no channel group of PRUNE.KINDS",
            params_before / 1e6, params / 1e6, score_seconds,
        )
        if self.latency_model is not None:
            # The model's prediction beside a measurement, so that its error is in the log.
            predicted = self.latency_model.predict(after)
            inputs, _ = sample_inputs(self.cfg, model)
            measured = measure_latency(model, inputs, warmup=2, repeats=5)["min_ms"]
            unpruned = self.latency_model.predict(self.original_spec)
            logger.info(
                "latency after event %d: predicted %.1f ms (%.0f %% of the unpruned %.1f ms), measured %.1f ms",
                index, predicted, 100 * predicted / unpruned, unpruned, measured,
            )  # fmt: skip
            storage.put_scalars(smoothing_hint=False, **{
                "pruning/latency_predicted_ms": predicted, "pruning/latency_measured_ms": measured,
            })  # fmt: skip
        _, tensor = sample_inputs(self.cfg, model)
        storage.put_scalars(
            smoothing_hint=False,
            **{
                "pruning/event": index,
                "pruning/params": params,
                "pruning/backbone_flops": count_flops(model.backbone, tensor)["total"],
                "pruning/score_seconds": score_seconds,
            },
        )

    def _evaluate(self, when: str) -> None:
        if self._evaluate_fn is not None:
            results = self._evaluate_fn(self.trainer.model)
        else:
            results = self.trainer.test(self.cfg, self.trainer.model)
        if comm.is_main_process():
            flat = flatten_results_dict(results)
            self.trainer.storage.put_scalars(
                smoothing_hint=False, **{f"pruning/{when}/{k}": float(v) for k, v in flat.items()}
            )

    def _flush_writers(self) -> None:
        # Writers keep only the latest value of each key: without writing now, an event
        # followed by another before the next periodic write would be missing from the curve.
        for hook in compat.trainer_hooks(self.trainer):
            if isinstance(hook, hooks.PeriodicWriter):
                for writer in compat.periodic_writers(hook):
                    if not isinstance(writer, CommonMetricPrinter):
                        writer.write()

    def state_dict(self):
        return {
            "events_done": self.events_done,
            "original_spec": self.original_spec,
            "original_flops": self.original_flops,
        }

    def load_state_dict(self, state_dict):
        self.events_done = state_dict["events_done"]
        self.original_spec = state_dict["original_spec"]
        self.original_flops = state_dict["original_flops"]
        # A SimpleTrainer loads its hooks' state before its optimizer's: an optimizer built for
        # the model as first built must first follow the model that a pruned checkpoint cut.
        # (d2prune's Trainer has done so already.)
        model = unwrap(self.trainer.model)
        held = {id(p) for group in self.trainer.optimizer.param_groups for p in group["params"]}
        if held != {id(p) for p in model.parameters() if p.requires_grad}:
            optimizer = carry_over(self.trainer.optimizer, self.build_optimizer(model), model)
            install_optimizer(self.trainer, optimizer, **self.ddp)


def check_same_on_all_ranks(keep: Mapping[str, Sequence[int]]) -> None:
    """Fail when the ranks chose different channels: their models would no longer match."""
    text = json.dumps(sorted((name, list(map(int, idx))) for name, idx in keep.items()))
    digests = comm.all_gather(hashlib.sha1(text.encode()).hexdigest())
    if len(set(digests)) > 1:
        raise RuntimeError(f"pruning: the ranks chose different channels to keep ({digests})")


def cut(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    keep: Mapping[str, Sequence[int]],
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
) -> torch.optim.Optimizer:
    """The surgery of one pruning event: `prune(model, keep)` and the optimizer that replaces
    `optimizer`, built by `build_optimizer(model)` around the new parameters, holding the old
    one's hyperparameters (learning rates, as the scheduler left them) and its state (e.g. SGD
    momentum) sliced to the kept channels. `optimizer` must not be used afterwards."""
    model = unwrap(model)
    state = sliced_optimizer_state(model, optimizer, keep)
    with torch.no_grad():
        prune(model, keep)
    return carry_over(optimizer, build_optimizer(model), model, state)


def install_optimizer(trainer, optimizer: torch.optim.Optimizer, **ddp_kwargs) -> None:
    """Make a detectron2 trainer (a DefaultTrainer, SimpleTrainer or AMPTrainer) train on with
    `optimizer` (see `cut`), which holds the model's current parameters after surgery replaced
    some of them: its LR schedulers drive the new optimizer from where they were, a new DDP
    wrapper (`create_ddp_model(model, **ddp_kwargs)`) holds the new parameters, and the hooks
    that cached the old optimizer or model get the new ones. The AMP grad scaler and the data
    stay as they are.

    Call it after the scheduler has stepped at least once (a pruning event does, in
    `after_step`): torch warns when a scheduler's first step drives an optimizer it was not
    built with.
    """
    model = unwrap(trainer.model)
    schedulers = [getattr(trainer, "scheduler", None)]
    schedulers += [h.scheduler for h in compat.trainer_hooks(trainer) if isinstance(h, hooks.LRScheduler)]
    # `carry_over` kept the parameter groups in order with their learning rates, so the same
    # scheduler, pointed at the new optimizer, goes on as if nothing happened. (A LazyConfig's
    # LRScheduler hook holds a ParamScheduler until `before_train` wraps it with the optimizer.)
    for scheduler in {id(s): s for s in schedulers if isinstance(s, torch.optim.lr_scheduler.LRScheduler)}.values():
        scheduler.optimizer = optimizer
    # The old DDP wrapper's reducer still points at the replaced parameters: without a new
    # one, their successors' gradients would silently stay unsynchronised across ranks.
    compat.replace_optimizer_and_model(trainer, optimizer, compat.create_ddp_model(model, **ddp_kwargs))


def carry_over(
    old: torch.optim.Optimizer,
    new: torch.optim.Optimizer,
    model: nn.Module,
    state: Optional[Mapping[str, Dict]] = None,
) -> torch.optim.Optimizer:
    """`new` (built for `model`'s current parameters) with `old`'s group hyperparameters and
    `state` (parameter name -> optimizer state) as its state; returns `new`."""
    # Same module structure, so the same parameter groups in the same order; only shapes differ.
    assert len(old.param_groups) == len(new.param_groups)
    for old_group, group in zip(old.param_groups, new.param_groups):
        group.update({k: v for k, v in old_group.items() if k != "params"})
    if state:
        names = {id(p): name for name, p in unwrap(model).named_parameters()}
        for group in new.param_groups:
            for p in group["params"]:
                if names[id(p)] in state:
                    new.state[p] = dict(state[names[id(p)]])
    return new


def sliced_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, keep: Mapping[str, Sequence[int]]
) -> Dict[str, Dict]:
    """The optimizer's state (e.g. SGD momentum) cut as `prune(model, keep)` will cut the
    parameters, by parameter name; call it before pruning.

    Each state tensor shaped like its parameter is written into a deep copy of the model in
    place of the parameter, the copy goes through the same `prune`, and the slices are read
    back: one surgery path for weights and optimizer state. Other state entries (step
    counters) are kept; parameters without state get none.
    """
    model = unwrap(model)
    params = dict(model.named_parameters())
    by_id = {id(p): name for name, p in params.items()}
    states = {by_id[id(p)]: s for p, s in optimizer.state.items() if id(p) in by_id and s}
    sliced = {name: dict(s) for name, s in states.items()}
    keys = {
        key for name, s in states.items() for key, value in s.items()
        if torch.is_tensor(value) and value.shape == params[name].shape
    }
    for key in sorted(keys):
        shadow = copy.deepcopy(model)
        shadow_params = dict(shadow.named_parameters())
        with torch.no_grad():
            for name, s in states.items():
                if key in s and s[key].shape == params[name].shape:
                    shadow_params[name].copy_(s[key])
            prune(shadow, keep)
        shadow_params = dict(shadow.named_parameters())
        for name, s in states.items():
            if key in s and s[key].shape == params[name].shape:
                sliced[name][key] = shadow_params[name].detach().to(s[key].dtype).clone()
    return sliced
