"""Differences between the detectron2 builds (and CPU-only machines) d2prune runs on, in one place.

d2prune supports detectron2 v0.6 (with its real C++ ops, or with the stub extension that
`make setup` builds by default) and detectron2 main, with or without CUDA. Everything that
differs between them is decided here, so the rest of the library is version-free.
"""

import contextlib
import functools
import logging
import socket
import sys
from datetime import timedelta
from typing import Callable, Optional
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.engine.launch import launch as d2_launch
from detectron2.utils import comm
from torch import nn

from .errors import UserError

logger = logging.getLogger(__name__)


@functools.cache
def has_fast_coco_eval() -> bool:
    """Whether detectron2's C++ COCO evaluator is compiled into `detectron2._C`."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return hasattr(_C, "COCOevalAccumulate") and hasattr(_C, "COCOevalEvaluateImages")


@functools.cache
def coco_eval_use_fast_impl() -> bool:
    """The `use_fast_impl` to give COCOEvaluator; says once in the log when it must be False."""
    fast = has_fast_coco_eval()
    if not fast:
        logger.info(
            "detectron2 was built without its C++ ops: COCO evaluation uses pycocotools "
            "(use_fast_impl=False); results are the same, only slower."
        )
    return fast


def trainer_saves_optimizer(trainer_cls: type = DefaultTrainer) -> bool:
    """Whether `trainer_cls` checkpoints SimpleTrainer's state (the optimizer) itself.

    detectron2 main does so through DefaultTrainer's own `state_dict`; v0.6's DefaultTrainer
    has none, so d2prune's trainer adds that state when this is False.
    """
    return "state_dict" in vars(trainer_cls)


TRAINER_SAVES_OPTIMIZER = trainer_saves_optimizer()

_d2_create_ddp_model = d2_defaults.create_ddp_model


def create_ddp_model(model: nn.Module, **kwargs) -> nn.Module:
    """detectron2's `create_ddp_model`, which also wraps a model on the CPU (gloo).

    detectron2 (v0.6 and main) passes `device_ids=[local rank]`, which DistributedDataParallel
    refuses for a module whose parameters are on the CPU; such a module needs `device_ids=None`.
    """
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


@contextlib.contextmanager
def ddp_on_cpu():
    """While active, `DefaultTrainer.__init__` wraps its model with `create_ddp_model` above,
    so that multi-process training also starts on machines without CUDA."""
    with mock.patch.object(d2_defaults, "create_ddp_model", create_ddp_model):
        yield


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: tuple = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
):
    """detectron2's `launch`, or, without CUDA, the same processes talking over gloo.

    v0.6's `launch` only knows NCCL and asserts CUDA; here `num_gpus_per_machine` is then the
    number of CPU processes per machine. Each process gets detectron2's local process group, so
    `comm.get_local_rank()` and friends work as under NCCL.

    A process that exits with status 2 has printed a `UserError` (see `d2prune.errors`): the
    launching process then exits with status 2 too, without a traceback of its own.
    """
    world_size = num_machines * num_gpus_per_machine
    try:
        if world_size == 1 or torch.cuda.is_available():
            return d2_launch(
                main_func, num_gpus_per_machine, num_machines=num_machines, machine_rank=machine_rank,
                dist_url=dist_url, args=args, timeout=timeout,
            )
        if dist_url in (None, "auto"):
            if num_machines > 1:
                raise UserError("--dist-url auto works on one machine only; give every machine the same tcp://HOST:PORT.")
            dist_url = f"tcp://127.0.0.1:{_free_port()}"
        mp.spawn(
            _gloo_worker,
            nprocs=num_gpus_per_machine,
            args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
            daemon=False,
        )
    except mp.ProcessExitedException as e:
        if e.exit_code == 2:
            sys.exit(2)
        raise


def launch_from_args(main_func: Callable, args) -> object:
    """`launch(main_func, ...)` with the process layout of detectron2's command-line flags
    (`--num-gpus`, `--num-machines`, `--machine-rank`, `--dist-url`), passing `args` on."""
    return launch(
        main_func, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
        dist_url=args.dist_url, args=(args,),
    )  # fmt: skip


def _gloo_worker(local_rank, main_func, world_size, per_machine, machine_rank, dist_url, args, timeout):
    dist.init_process_group(
        backend="gloo", init_method=dist_url, world_size=world_size,
        rank=machine_rank * per_machine + local_rank, timeout=timeout,
    )
    if hasattr(comm, "create_local_process_group"):  # detectron2 main
        comm.create_local_process_group(per_machine)
    else:  # v0.6 keeps the group in a module variable that only its NCCL launch sets
        for i in range(world_size // per_machine):
            group = dist.new_group(list(range(i * per_machine, (i + 1) * per_machine)))
            if i == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    main_func(*args)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Export: detectron2's TracingAdapter ------------------------------------------------------


@functools.cache
def tracing_adapter_class() -> type:
    """detectron2's `TracingAdapter` (detectron2/export/flatten.py), on v0.6 as on main.

    On main `from detectron2.export import TracingAdapter` works. v0.6's
    `detectron2/export/__init__.py` imports its caffe2 exporter, which current torch no longer
    ships, although `flatten.py` itself needs only torch and detectron2: it is then imported
    under a bare `detectron2.export` package whose `__init__` does not run. The bare package is
    removed again afterwards, so that `import detectron2.export` still fails as before.
    """
    try:
        from detectron2.export import TracingAdapter

        return TracingAdapter
    except ImportError:
        pass
    import importlib
    import os
    import sys
    import types

    import detectron2

    package = types.ModuleType("detectron2.export")
    package.__path__ = [os.path.join(os.path.dirname(detectron2.__file__), "export")]
    sys.modules["detectron2.export"] = package
    try:
        flatten = importlib.import_module("detectron2.export.flatten")
    finally:
        del sys.modules["detectron2.export"]
    return flatten.TracingAdapter


# -- detectron2 internals d2prune reaches into -----------------------------------------------------
# Private attributes of detectron2 (and one of torch) that d2prune reads or replaces. Each has
# one accessor here, checked against v0.6 and main, so a rename upstream is fixed in one place
# and the compat tests cover it.


def trainer_hooks(trainer) -> list:
    """The hooks registered on a detectron2 trainer, in order."""
    return trainer._hooks


def last_eval_results(trainer) -> Optional[dict]:
    """The results of a `DefaultTrainer`'s last evaluation, or None before the first."""
    return getattr(trainer, "_last_eval_results", None)


def replace_optimizer_and_model(trainer, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Make a `DefaultTrainer`, `SimpleTrainer` or `AMPTrainer` train `model` (a new DDP wrapper,
    say) with `optimizer`, including the hooks that cached the old ones in `before_train`
    (LRScheduler, PreciseBN)."""
    from detectron2.engine import hooks

    # DefaultTrainer forwards both attributes to its SimpleTrainer (v0.6 and main).
    trainer.optimizer = optimizer
    trainer.model = model
    for hook in trainer._hooks:
        if isinstance(hook, hooks.LRScheduler):
            hook._optimizer = optimizer
        elif isinstance(hook, hooks.PreciseBN):
            hook._model = model


def inner_trainer(trainer):
    """A `DefaultTrainer`'s SimpleTrainer/AMPTrainer, whose state holds the optimizer."""
    return trainer._trainer


def periodic_writers(hook) -> list:
    """The event writers of a `PeriodicWriter` hook."""
    return hook._writers


def res5_box_features(roi_heads, features: list, boxes: list) -> torch.Tensor:
    """A `Res5ROIHeads`' pooled res5 features of `boxes` (its shared ROI transform)."""
    return roi_heads._shared_roi_transform(features, boxes)


def cycle_bn_active(norm: nn.Module) -> nn.Module:
    """The BatchNorm of a `CycleBatchNormList` that its next call uses."""
    return norm[norm._pos]


def conv_forward(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """`conv` applied with other weights (its stride, padding, dilation and groups kept)."""
    return conv._conv_forward(x, weight, bias)


@contextlib.contextmanager
def observe_proposal_sampling(roi_heads, observer: Callable[[list], None]):
    """Within the context, `observer(proposals)` sees the proposals that
    `roi_heads.label_and_sample_proposals` returns (with their `gt_classes`) in each training
    forward. detectron2 offers no hook there, so the bound method is wrapped on the instance
    and restored on exit."""
    patched = vars(roi_heads).get("label_and_sample_proposals")
    sample = roi_heads.label_and_sample_proposals

    def label_and_sample_proposals(*args, **kwargs):
        proposals = sample(*args, **kwargs)
        observer(proposals)
        return proposals

    roi_heads.label_and_sample_proposals = label_and_sample_proposals
    try:
        yield
    finally:
        if patched is None:
            del roi_heads.label_and_sample_proposals
        else:
            roi_heads.label_and_sample_proposals = patched


def cycle_bn_affine(norm: nn.Module) -> bool:
    """Whether a `CycleBatchNormList` has an affine weight and bias of its own after its BNs."""
    return norm._affine


def backbone_out_features(backbone: nn.Module) -> list:
    """The names of the features a detectron2 `Backbone` returns, in order."""
    return backbone._out_features


def set_out_feature_channels(backbone: nn.Module, channels: dict) -> None:
    """Update the feature widths (name -> channels) a `Backbone`'s `output_shape()` reports."""
    backbone._out_feature_channels.update(channels)


def box_head_output_size(head: nn.Module):
    """A `FastRCNNConvFCHead`'s output size: an int after fcs, (C, H, W) after convs only."""
    return head._output_size


def set_box_head_output_size(head: nn.Module, size) -> None:
    """Set what a `FastRCNNConvFCHead`'s `output_shape` reports (see `box_head_output_size`)."""
    head._output_size = size
