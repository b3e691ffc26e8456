"""Pruning while training from a LazyConfig: the `prune` section, the `PruningHook` of a
`SimpleTrainer`/`AMPTrainer` loop, and that loop as `tools/lazyconfig_train_net.py` runs it.

A LazyConfig prunes with `prune = dict(enabled=True, criterion="l1", ratio=0.5, ...)`: PRUNE's
keys in lower case (`d2prune.config.add_prune_config` documents each); `criterion_options` may
be a dict. The event code is `PruningHook`'s, as for `tools/train_net.py`.
"""

import logging
import os
import re
from typing import Mapping, Sequence

import torch
from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import DictConfig, ListConfig, OmegaConf

from .. import compat
from ..config import add_prune_config, check_prune_config
from ..data import register_datasets
from ..errors import UserError
from ..pruning import channel_spec
from .checkpoint import PrunedCheckpointer
from .pruning_hook import PruningHook
from .scoring import ScoringBatches
from .selection import build_criterion

__all__ = [
    "build_pruning_hook", "do_eval", "do_test", "do_train", "load_lazy_config", "prune_config",
    "pruning_enabled", "register_lazy_datasets",
]  # fmt: skip

logger = logging.getLogger(__name__)


def load_lazy_config(config_file: str, opts: Sequence[str] = (), datasets: Sequence[Sequence[str]] = ()):
    """A LazyConfig as `tools/lazyconfig_train_net.py` reads it: the file, `key=value`
    overrides, `[name, json_file, image_root]` datasets added to `datasets.coco`; a `cuda`
    device falls back to the CPU on a machine without CUDA."""
    if not os.path.isfile(config_file):
        raise UserError(f"{config_file}: config file not found.")
    cfg = LazyConfig.load(config_file)
    try:
        cfg = LazyConfig.apply_overrides(cfg, list(opts))
    except Exception as e:  # hydra's parser and omegaconf raise many types, all about the text
        raise UserError(f"command-line overrides {' '.join(opts)}: {' '.join(str(e).split())}") from None
    if datasets:
        if "datasets" not in cfg:
            cfg.datasets = {"coco": []}
        cfg.datasets.coco = list(cfg.datasets.get("coco", [])) + [list(entry) for entry in datasets]
    if str(cfg.train.get("device", "cuda")).startswith("cuda") and not torch.cuda.is_available():
        logger.info("CUDA is not available: train.device %s -> cpu", cfg.train.get("device", "cuda"))
        cfg.train.device = "cpu"
    return cfg


def pruning_enabled(cfg) -> bool:
    """Whether the LazyConfig has a `prune` section with `enabled=True`."""
    return bool(_plain(cfg.get("prune", None) or {}).get("enabled", False))


def prune_config(cfg) -> CfgNode:
    """The yacs config that `PruningHook` reads, made from a LazyConfig: its `prune` section as
    PRUNE, `train.max_iter`, `train.seed`, the training batch size, and the test resolution
    (the short edge of `dataloader.test`'s ResizeShortestEdge, else 800) at which FLOPs are
    measured. Checked like a yacs config, with errors naming the LazyConfig's keys."""
    prune = _plain(cfg.get("prune", None) or {})
    ycfg = add_prune_config(get_cfg())
    allowed = [key.lower() for key in ycfg.PRUNE]
    for key, value in prune.items():
        if key not in allowed:
            raise UserError(f"prune.{key} is not a pruning key; the keys are {', '.join(allowed)}.")
        if key == "criterion_options" and isinstance(value, Mapping):
            value = [[k, v] for k, v in value.items()]
        ycfg.PRUNE[key.upper()] = list(value) if isinstance(value, tuple) else value
    ycfg.SOLVER.MAX_ITER = cfg.train.max_iter
    ycfg.SOLVER.IMS_PER_BATCH = cfg.dataloader.train.total_batch_size
    ycfg.SEED = cfg.train.get("seed", -1)
    ycfg.INPUT.MIN_SIZE_TEST = _test_size(cfg)
    ycfg.DATASETS.TEST = ("dataloader.test",) if "test" in cfg.dataloader else ()
    try:
        check_prune_config(ycfg)
    except UserError as e:
        raise UserError(_lazy_names(str(e), allowed)) from None
    ycfg.freeze()
    return ycfg


def build_pruning_hook(cfg, checkpointer: PrunedCheckpointer) -> PruningHook:
    """The `PruningHook` for a `SimpleTrainer`/`AMPTrainer` trained from the LazyConfig `cfg`:
    it rebuilds `cfg.optimizer` for the pruned model, saves with `checkpointer`, evaluates with
    `do_test`, re-wraps DDP with `train.ddp`, and scores data-driven criteria on
    `dataloader.train`'s dataset and mapper. Register it right after the LRScheduler hook."""
    ycfg = prune_config(cfg)
    scoring = None
    if build_criterion(ycfg).data != "none":
        train = cfg.dataloader.train
        scoring = ScoringBatches(
            lambda: instantiate(train.dataset), instantiate(train.mapper), train.total_batch_size,
            ycfg.PRUNE.SCORE_BATCHES, ycfg.SEED,
        )  # fmt: skip

    def build_optimizer(model):
        cfg.optimizer.params.model = model
        return instantiate(cfg.optimizer)

    return PruningHook(
        ycfg, build_optimizer=build_optimizer, checkpointer=checkpointer,
        evaluate=lambda model: do_test(cfg, model), scoring=scoring, ddp=_plain(cfg.train.get("ddp", None) or {}),
    )  # fmt: skip


def register_lazy_datasets(cfg) -> list:
    """Register `datasets.coco` ([name, json_file, image_root] entries) and the synthetic splits
    under `datasets.synthetic_root`, as DATASETS.COCO and DATASETS.SYNTHETIC_ROOT do."""
    datasets = _plain(cfg.get("datasets", None) or {})
    ycfg = add_prune_config(get_cfg())
    ycfg.DATASETS.SYNTHETIC_ROOT = datasets.get("synthetic_root", ycfg.DATASETS.SYNTHETIC_ROOT)
    ycfg.DATASETS.COCO = [list(entry) for entry in datasets.get("coco", [])]
    return register_datasets(ycfg)


def do_test(cfg, model) -> dict:
    """Evaluate `model` with `dataloader.test` and `dataloader.evaluator` (detectron2's)."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


def do_eval(cfg) -> dict:
    """Evaluate `train.init_checkpoint`, pruned or not: a pruned checkpoint first cuts the
    freshly built model to its channel spec (`PrunedCheckpointer`)."""
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    PrunedCheckpointer(model).load(cfg.train.init_checkpoint)
    # Wrapped after loading: the wrapper must hold the parameters of the pruned model.
    return do_test(cfg, compat.create_ddp_model(model))


def do_train(cfg, resume: bool = False) -> dict:
    """Train the LazyConfig `cfg` as detectron2's `tools/lazyconfig_train_net.py` does, pruning
    on the `prune` schedule, with checkpoints that carry the pruned architecture; returns the
    last evaluation's results.

    The weights load before the optimizer is built, so that the optimizer holds the parameters
    of the model as loaded: a pruned checkpoint (to resume, or as `train.init_checkpoint`)
    first cuts the model to its channel spec.
    """
    pruning = pruning_enabled(cfg)
    if pruning:
        prune_config(cfg)  # faults in `prune` before any slow work
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    checkpointer = PrunedCheckpointer(model, cfg.train.output_dir)
    if pruning:
        checkpointer.unpruned_spec = channel_spec(model)  # the model as its config builds it
    else:
        checkpointer.records_spec = False  # as d2prune's Trainer: no channel groups needed
    loaded = checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = compat.create_ddp_model(model, **_plain(cfg.train.get("ddp", None) or {}))
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer.checkpointables["trainer"] = trainer

    last_results = {}

    def evaluate():
        last_results.clear()
        last_results.update(do_test(cfg, trainer.model))
        return last_results

    pruning_hook = build_pruning_hook(cfg, checkpointer) if pruning else None
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            # Right after the LR scheduler's step, so the checkpoint, evaluation and writers
            # that follow in the same iteration see the pruned model and its new optimizer.
            pruning_hook,
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
            hooks.EvalHook(cfg.train.eval_period, evaluate),
            hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
            if comm.is_main_process() else None,
        ]
    )  # fmt: skip
    start_iter = 0
    if resume and checkpointer.has_checkpoint() and "trainer" in loaded:
        trainer.load_state_dict(loaded["trainer"])  # iteration, hooks' state (PruningHook's), optimizer
        start_iter = trainer.iter + 1
    if pruning_hook is not None:
        pruning_hook.check_budget()
    trainer.train(start_iter, cfg.train.max_iter)
    return last_results


def _plain(node):
    """A LazyConfig node as plain Python containers."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _test_size(cfg) -> int:
    test = cfg.dataloader.get("test", None)
    augmentations = test.get("mapper", {}).get("augmentations", []) if test is not None else []
    for aug in augmentations:
        target = aug.get("_target_", "") if hasattr(aug, "get") else type(aug)
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if name.rsplit(".", 1)[-1] == "ResizeShortestEdge":
            size = aug.get("short_edge_length") if hasattr(aug, "get") else aug.short_edge_length
            return int(size if isinstance(size, int) else list(size)[0])
    return 800


def _lazy_names(message: str, keys) -> str:
    """A yacs check's message with the LazyConfig's names for its keys."""
    message = re.sub(r"\bPRUNE\.([A-Z_]+)", lambda m: "prune." + m[1].lower(), message)
    message = message.replace("SOLVER.MAX_ITER", "train.max_iter").replace("DATASETS.TEST", "dataloader.test")
    upper = "|".join(key.upper() for key in keys)
    return re.sub(rf"\b({upper})\b", lambda m: "prune." + m[1].lower(), message)
