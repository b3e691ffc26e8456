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

from .utils.modules import unwrap

__all__ = [
    "count_params",
    "count_flops",
    "measure_latency",
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
        outputs = self.model([{"image": image} for image in images])
        flat = []
        for output in outputs:
            for value in output.values():
                fields = value.get_fields().values() if isinstance(value, Instances) else [value]
                flat += [f.tensor if isinstance(f, Boxes) else f for f in fields]
        return tuple(f for f in flat if isinstance(f, torch.Tensor))


def measure_latency(
    module_or_fn: Union[nn.Module, Callable], inputs: Inputs, warmup: int = 3, repeats: int = 10
) -> Dict[str, float]:
    """Wall-clock time of `module_or_fn(inputs)` without gradients: median, p90, mean, min (ms).

    A module runs in eval mode (its mode is restored afterwards). The first `warmup` calls
    (allocator, lazy initialisation) are not counted. Timings share the machine with whatever
    else runs: compare medians measured in the same process, never assert on them.
    """
    module = module_or_fn if isinstance(module_or_fn, nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    times = []
    try:
        with torch.no_grad():
            for i in range(warmup + repeats):
                _synchronize()
                start = time.perf_counter()
                module_or_fn(inputs)
                _synchronize()
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1000)
    finally:
        if module is not None:
            module.train(was_training)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)],
        "mean_ms": statistics.fmean(times),
        "min_ms": times[0],
        "repeats": repeats,
    }


def _synchronize() -> None:
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
