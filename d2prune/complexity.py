"""Size and speed of a detector: parameters, FLOPs (per part), latency, group widths.

What the reports compare before and after pruning; backbone-only variants are here too, since
the backbone is where filter pruning shows most directly.
"""

import math
import statistics
import time
import warnings
from collections import Counter
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from detectron2.structures import Boxes, Instances
from fvcore.nn import FlopCountAnalysis
from torch import nn

from .errors import UserError
from .utils.modules import unwrap

__all__ = [
    "count_params",
    "count_flops",
    "CLOCKS",
    "clock",
    "interleaved_latency",
    "measure_latency",
    "output_tensors",
    "synchronize",
    "dummy_inputs",
    "dummy_tensor",
    "width_table",
]

Inputs = Union[torch.Tensor, List[dict]]

# Element-wise and bookkeeping ops that detectron2's FlopCountAnalysis counts as free: silenced
# rather than reported as unsupported.
_FREE_OPS = (
    "aten::add", "aten::add_", "aten::argmax", "aten::argsort", "aten::batch_norm",
    "aten::constant_pad_nd", "aten::div", "aten::div_", "aten::exp", "aten::log2",
    "aten::max_pool2d", "aten::meshgrid", "aten::mul", "aten::mul_", "aten::neg",
    "aten::nonzero_numpy", "aten::reciprocal", "aten::rsub", "aten::sigmoid", "aten::sigmoid_",
    "aten::softmax", "aten::sort", "aten::sqrt", "aten::sub", "torchvision::nms",
)  # fmt: skip


def count_params(model: nn.Module) -> int:
    """Number of parameters (FrozenBatchNorm2d's buffers are not parameters)."""
    return sum(p.numel() for p in unwrap(model).parameters())


def count_flops(model: nn.Module, inputs: Inputs) -> Dict[str, int]:
    """FLOPs of one forward pass in eval mode: `{"total": n, <top-level part>: n, ...}`.

    Counted by fvcore as in Detectron2's `tools/analyze_model.py`: one multiply-add is one
    flop, element-wise ops are free. `inputs` is either a detectron2 batch (`list[dict]`, see
    `dummy_inputs`; parts are e.g. backbone / proposal_generator / roi_heads, or head) or a
    tensor for a plain module such as `model.backbone` (parts are its children). A detector's
    head FLOPs depend on how many proposals survive NMS, hence on the image and the weights.
    """
    model = unwrap(model)
    if isinstance(inputs, torch.Tensor):
        traced, args, prefix = model, (inputs,), ""
    else:
        traced, args, prefix = _Detector(model), tuple(x["image"] for x in inputs), "model."
    analysis = FlopCountAnalysis(traced, args)
    # A handle of None would not override fvcore's own batch_norm handle: count zero instead.
    analysis.set_op_handle(**{op: _free for op in _FREE_OPS})
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # jit tracing is deprecated in recent torch; fvcore has no other way to count yet.
            warnings.simplefilter("ignore")
            by_module = analysis.by_module()
    finally:
        model.train(was_training)
    flops = {"total": int(by_module[""])}
    for name, _ in model.named_children():
        if by_module.get(prefix + name, 0):
            flops[name] = int(by_module[prefix + name])
    return flops


def _free(inputs, outputs) -> Counter:
    return Counter()


class _Detector(nn.Module):
    """A detectron2 model as a function of image tensors to tensors, so that jit can trace it.

    detectron2 v0.6's own `TracingAdapter` sits in `detectron2.export`, which imports caffe2
    and so fails beside current torch; this is the part of it that FLOP counting needs.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *images: torch.Tensor):
        return tuple(output_tensors(self.model([{"image": image} for image in images])))


def output_tensors(outputs: List[dict]) -> List[torch.Tensor]:
    """The tensors of a detectron2 eval-mode output (a list of dicts of `Instances`), flat:
    what tracing sees, and what two runs compare."""
    flat = []
    for output in outputs:
        for value in output.values():
            fields = value.get_fields().values() if isinstance(value, Instances) else [value]
            flat += [f.tensor if isinstance(f, Boxes) else f for f in fields]
    return [f for f in flat if isinstance(f, torch.Tensor)]


# `wall`: elapsed time. `cpu`: CPU time of this process, which with one torch thread is the
# work a call costs, whatever else runs on the machine (on a shared machine, waits for the
# other threads of a parallel region inflate wall time several-fold); CPU only.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def clock(name: str) -> Callable[[], float]:
    """The timer `name` of `CLOCKS`; a `UserError` naming the allowed ones otherwise."""
    if name not in CLOCKS:
        raise UserError(f"clock must be one of {', '.join(CLOCKS)}, got {name!r}.")
    return CLOCKS[name]


def interleaved_latency(
    runners: Sequence[Union[nn.Module, Callable]],
    inputs,
    *,
    warmup: int = 3,
    repeats: int = 10,
    rounds: int = 1,
    clock_name: str = "wall",
) -> List[Dict[str, float]]:
    """Time of each of `runners` on `inputs` without gradients, in ms: median, p90, mean, min.

    Each runner is called `warmup` times untimed (allocator, lazy initialisation), then
    `rounds` rounds each time every runner in turn `repeats` times, so that load from other
    processes on a shared machine falls on all of them alike. Modules run in eval mode (their
    mode is restored). Compare figures measured in one call; never assert on them. On a shared
    machine the minimum is the steadier estimate: other jobs only ever add time.
    """
    now = clock(clock_name)
    modules = [r for r in runners if isinstance(r, nn.Module)]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    runs: List[List[float]] = [[] for _ in runners]
    try:
        with torch.no_grad():
            for run in runners:
                for _ in range(warmup):
                    run(inputs)
            for _ in range(rounds):
                for times, run in zip(runs, runners):
                    for _ in range(repeats):
                        synchronize()
                        start = now()
                        run(inputs)
                        synchronize()
                        times.append((now() - start) * 1000)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return [_summary(sorted(times)) for times in runs]


def measure_latency(
    module_or_fn: Union[nn.Module, Callable],
    inputs: Inputs,
    warmup: int = 3,
    repeats: int = 10,
    clock_name: str = "wall",
) -> Dict[str, float]:
    """`interleaved_latency` of one module or function: median, p90, mean, min (ms), repeats."""
    return interleaved_latency(
        [module_or_fn], inputs, warmup=warmup, repeats=repeats, clock_name=clock_name
    )[0]


def _summary(times: List[float]) -> Dict[str, float]:
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)],
        "mean_ms": statistics.fmean(times),
        "min_ms": times[0],
        "repeats": len(times),
    }


def synchronize() -> None:
    """Wait for queued CUDA work, so that a timer read after it counts that work."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def dummy_inputs(
    height: int, width: Optional[int] = None, batch: int = 1, seed: int = 0
) -> List[dict]:
    """A detectron2 batch of random uint8-range images of `height` x `width` (default square)."""
    width = width or height
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.rand(3, height, width, generator=generator) * 255,
            "height": height,
            "width": width,
        }
        for _ in range(batch)
    ]


def dummy_tensor(
    height: int, width: Optional[int] = None, batch: int = 1, seed: int = 0
) -> torch.Tensor:
    """A normalised-image batch `(batch, 3, height, width)` for `model.backbone` alone.

    Detectron2 backbones expect sides divisible by their `size_divisibility` (32 for FPN).
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width or height, generator=generator)


def width_table(
    before: Mapping[str, int], after: Mapping[str, int], groups: Sequence
) -> Dict[str, list]:
    """Widths before and after pruning, per group and summed per kind, as plain data.

    `before`/`after` are channel specs (`channel_spec`); `groups` (`find_groups`) give each
    group's kind.
    """
    rows = [
        {"group": g.name, "kind": g.kind, "before": before[g.name], "after": after[g.name]}
        for g in groups
    ]
    kinds: Dict[str, Dict[str, int]] = {}
    for row in rows:
        total = kinds.setdefault(row["kind"], {"kind": row["kind"], "before": 0, "after": 0})
        total["before"] += row["before"]
        total["after"] += row["after"]
    return {"groups": rows, "kinds": list(kinds.values())}
