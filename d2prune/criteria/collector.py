"""One statistics collector for every data-driven criterion: hooks on each group's producers,
fed with training batches, gather what the criterion's `Accumulator`s ask for as running sums.
"""

import contextlib
from typing import ContextManager, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from ..errors import UserError
from ..pruning.groups import ChannelGroup
from ..utils.modules import unwrap
from .base import Criterion, combine

__all__ = ["Accumulator", "StatisticsCriterion", "collect_statistics", "samples"]


def samples(a: torch.Tensor) -> torch.Tensor:
    """An activation as (samples, channels, positions): (N, C, H, W) -> (N, C, H*W) for a conv;
    (rows, C) -> (rows, C, 1) for a Linear, whose rows (proposals) are its samples."""
    return a.flatten(2) if a.dim() > 2 else a[:, :, None]


class Accumulator:
    """Running statistics of one producer's `size` output channels, for one criterion.

    Everything that must be summed across ranks lives in `self.sums` (float64 tensors created in
    `__init__`, so every rank holds the same shapes); `result()` turns the sums into one score
    per channel. The collector calls `update` on every forward call of the producer (with
    dL/da when `wants_grad`) and `end_batch` after every batch, with dL/dp for `parameters`.
    """

    wants_grad = False

    def __init__(self, module: nn.Module, size: int):
        self.module = module
        self.size = size
        self.device = next(module.parameters()).device
        self.sums: Dict[str, torch.Tensor] = {}
        self.parameters: Sequence[torch.Tensor] = ()

    def zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=torch.float64, device=self.device)

    def begin_batch(self, batch: List[dict], padded_size: Tuple[int, int]) -> None:
        """Open a batch: the detectron2 inputs (with their `instances` when the criterion asks for
        targets) and the (height, width) of the padded image tensor the backbone sees, so that a
        feature map of height h has stride padded_size[0] / h. Ground-truth boxes are in the
        coordinates of `batch[i]["image"]`, which padding does not move."""

    def update(self, a: torch.Tensor, grad: Optional[torch.Tensor] = None) -> None:
        """Fold in one activation `a` of the producer (detached), and dL/da if `wants_grad`."""

    def end_batch(self, grads: Sequence[torch.Tensor] = ()) -> None:
        """Close a batch; `grads` are dL/dp for `self.parameters`, in order."""

    def result(self) -> torch.Tensor:
        raise NotImplementedError


class StatisticsCriterion(Criterion):
    """A criterion scored from collected statistics: one `Accumulator` per producer.

    `collect_statistics` asks `accumulator(module, group)` for each producer and returns them by
    producer name; a group's score combines its producers' `result()`s.
    """

    data = "images"

    def prepare(self, detector: nn.Module) -> None:
        """Called once before any `accumulator`: read what the accumulators need to size their
        sums from the detector (e.g. its number of classes). By default: nothing."""

    def accumulator(self, module: nn.Module, group: ChannelGroup) -> Accumulator:
        raise NotImplementedError

    def objective(self, detector: nn.Module, batch: List[dict]) -> torch.Tensor:
        """The scalar whose gradients reach accumulators that want them: by default the
        detector's summed training losses. Criteria that explain a class score (lrp, gradcam)
        return that score instead; producers run by this forward are the ones recorded."""
        return sum(detector(batch).values())

    def instrument(self, detector: nn.Module) -> ContextManager:
        """A context active while statistics are collected, in which the criterion instruments
        the detector: hooks of its own (LRP's modified backward rules), entered before the
        collector's so that they run first and the collector records their outputs, or
        observers (mi records the classes of the sampled proposals). By default: nothing."""
        return contextlib.nullcontext()

    def score_group(
        self, group: ChannelGroup, modules: Mapping[str, nn.Module], stats: Optional[Mapping]
    ) -> torch.Tensor:
        missing = [name for name in group.producers if name not in stats]
        if missing:
            raise UserError(
                f"criterion '{self.name}': no statistics for {', '.join(missing)}; collect them "
                "with collect_statistics for the same groups as are scored."
            )
        return combine([stats[name].result() for name in group.producers])


def collect_statistics(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    criterion: StatisticsCriterion,
    batches: Iterable[List[dict]],
    seed: int = 0,
) -> Dict[str, Accumulator]:
    """Run `batches` (detectron2 training batches) through the detector's own losses and gather
    `criterion`'s statistics for every producer of `groups`: producer name -> `Accumulator`.

    A producer's activation is its module output: for a detectron2 `Conv2d` after its own norm
    (and its own activation, which the box and mask head convs have), before the ReLU that a
    ResNet block applies; for a `Linear`, (rows x channels).

    The detector runs in training mode, so heads see the proposals the losses are computed on,
    but with every BatchNorm in eval mode, so running statistics stay as they are and an image's
    activations do not depend on the others in its batch. Gradients are taken with
    `torch.autograd.grad` from the summed losses, so no parameter's `.grad` is touched. The
    torch random state is forked and seeded with `seed` (proposal sampling draws from it), so
    scoring is repeatable and the training run's random stream is not disturbed. Train/eval
    modes, `requires_grad` flags and hooks are restored even when a batch fails. With several
    processes, the sums are all-reduced so that every rank scores identically.
    """
    detector = unwrap(model)
    modules = dict(detector.named_modules())
    criterion.prepare(detector)
    stats = {
        name: criterion.accumulator(modules[name], group)
        for group in groups
        for name in group.producers
    }
    wants_grad = any(acc.wants_grad or acc.parameters for acc in stats.values())
    if wants_grad and criterion.data != "targets":
        raise ValueError(f"criterion '{criterion.name}' asks for gradients but declares data='images'")

    modes = {m: m.training for m in detector.modules()}
    # Gradients must reach every producer, frozen ones (FREEZE_AT) included.
    frozen = []
    if wants_grad:
        frozen = [p for name in stats for p in modules[name].parameters() if not p.requires_grad]
    recorded: List[Tuple[Accumulator, torch.Tensor]] = []

    def hook(acc: Accumulator):
        def forward_hook(module, inputs, output):
            if not acc.wants_grad:
                acc.update(output.detach())
                return None
            recorded.append((acc, output))
            # The block's in-place ReLU would overwrite `output` and move its place in the graph;
            # hand the model a copy so that dL/da is the gradient at the producer's output.
            return output.clone()

        return forward_hook

    device = next(detector.parameters()).device
    rng_devices = [device] if device.type == "cuda" else []
    divisibility = max(getattr(detector.backbone, "size_divisibility", 0), 1)
    seen = 0
    handles = []
    try:
        with criterion.instrument(detector):
            handles = [modules[name].register_forward_hook(hook(acc)) for name, acc in stats.items()]
            detector.train()
            for m in detector.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
            for p in frozen:
                p.requires_grad_(True)
            with torch.random.fork_rng(devices=rng_devices), EventStorage():
                # A throwaway EventStorage: the heads log training metrics that are not the trainer's.
                torch.manual_seed(seed)
                for batch in tqdm(
                    batches, desc=f"{criterion.name} statistics", leave=False,
                    disable=not comm.is_main_process(),
                ):
                    padded = _padded_size(batch, divisibility)
                    for acc in stats.values():
                        acc.begin_batch(batch, padded)
                    _run_batch(criterion, detector, batch, stats, recorded, wants_grad)
                    seen += 1
    finally:
        recorded.clear()
        for handle in handles:
            handle.remove()
        for p in frozen:
            p.requires_grad_(False)
        for m, training in modes.items():
            m.training = training
    if seen == 0:
        raise UserError(f"criterion '{criterion.name}' needs at least one batch of training data.")
    _all_reduce(stats, device)
    return stats


def _padded_size(batch: List[dict], divisibility: int) -> Tuple[int, int]:
    """(height, width) of the tensor `ImageList.from_tensors` pads `batch`'s images into."""
    height = max(x["image"].shape[-2] for x in batch)
    width = max(x["image"].shape[-1] for x in batch)
    return -(-height // divisibility) * divisibility, -(-width // divisibility) * divisibility


def _run_batch(criterion, detector, batch, stats, recorded, wants_grad) -> None:
    if not wants_grad:
        with torch.no_grad():
            detector(batch)
        for acc in stats.values():
            acc.end_batch()
        return
    with torch.enable_grad():
        loss = criterion.objective(detector, batch)
        params = [p for acc in stats.values() for p in acc.parameters]
        outputs = [a for _, a in recorded]
        grads = torch.autograd.grad(loss, outputs + params, materialize_grads=True)
    with torch.no_grad():
        for (acc, a), g in zip(recorded, grads):
            acc.update(a.detach(), g)
        recorded.clear()
        param_grads = iter(grads[len(outputs):])
        for acc in stats.values():
            acc.end_batch([next(param_grads) for _ in acc.parameters])


def _all_reduce(stats: Mapping[str, Accumulator], device: torch.device) -> None:
    """Sum every accumulator's sums over the processes, in one collective."""
    if comm.get_world_size() == 1:
        return
    tensors = [t for acc in stats.values() for _, t in sorted(acc.sums.items())]
    flat = torch.cat([t.reshape(-1).to(device) for t in tensors])
    torch.distributed.all_reduce(flat)
    for t, total in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(total.view_as(t))
