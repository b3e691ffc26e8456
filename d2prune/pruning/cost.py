"""What a detector costs as a function of its channel groups' widths: FLOPs counted layer by
layer, or time predicted from layers timed on the device, and the cost-aware selection that
weighs each channel's score against what removing it saves.

Every conv and linear layer of the detector reads one group (or a fixed width) and writes one
group (or a fixed width). Its cost is a function of those two widths:
- FLOPs: exactly proportional to in x out (one multiply-add per weight per output position);
- time (`LatencyModel`): measured on the device by running the layer alone, with its norm and
  activation, on its real input size at a grid of widths, and interpolated between them.
The rest of the detector (element-wise ops, ROIAlign, NMS, the Python around them) is a fixed
cost: for time, the measured whole-detector time minus the layers' predicted times at full width.
So `CostModel.predict(widths)` is cheap enough to ask thousands of times while selecting.

`select_by_cost` is the cost-aware global ranking: it removes, one step at a time, the channels
whose (group-normalised) score is lowest per unit of cost their removal saves, until the
predicted cost is down by the budget's amount. This is the greedy solution of HALP's knapsack
(Shen et al., "Structural Pruning via Latency-Saliency Knapsack", NeurIPS 2022), with
NetAdapt's measured per-layer tables (Yang et al., ECCV 2018) and Torch-Pruning's per-group score
normalisation (Fang et al., "DepGraph", CVPR 2023).
"""

import contextlib
import hashlib
import heapq
import json
import logging
import math
import os
import platform
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .groups import ChannelGroup

__all__ = ["GRID", "Layer", "CostModel", "trace_layers", "flops_model", "LatencyModel", "latency_model", "snap_step", "select_by_cost"]

logger = logging.getLogger(__name__)

_EPS = 1e-12


@dataclass
class Layer:
    """One conv or linear layer as the cost model sees it: what it reads and writes, and the
    input sizes of its calls (a head shared by the pyramid levels is called once per level)."""

    name: str
    type: str  # "conv", "deconv" (transposed conv), "linear"
    in_width: int  # at full (unpruned) width
    out_width: int
    in_group: Optional[str]  # None: the width does not change
    out_group: Optional[str]
    calls: List[Tuple[int, ...]]  # per call: conv (N, H, W) of the input; linear (rows,)
    kernel: Tuple[int, int] = (1, 1)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    conv_groups: int = 1
    bias: bool = False
    norm: bool = False  # followed by a per-channel affine norm (FrozenBN and the like)
    relu: bool = False
    repeat: int = 1  # reads a flattened C x H x W map: in_width counts channels, each `repeat` times

    def flops(self, in_width: float, out_width: float) -> float:
        """Multiply-adds of all calls at these widths."""
        groups = self.conv_groups
        if groups > 1 and self.in_group is not None:
            # Grouped (and depthwise) convs lose whole groups: their count follows the width.
            groups = groups * in_width / self.in_width
        per = in_width * self.repeat * out_width / groups
        if self.type == "conv":
            kh, kw = self.kernel
            return sum(per * kh * kw * n * _out_size((h, w), self) for n, h, w in self.calls)
        if self.type == "deconv":  # every input position spreads over a kernel window
            kh, kw = self.kernel
            return sum(per * kh * kw * n * h * w for n, h, w in self.calls)
        return sum(per * rows for (rows,) in self.calls)


def _out_size(hw: Tuple[int, int], layer: Layer) -> int:
    size = 1
    for i in range(2):
        span = layer.dilation[i] * (layer.kernel[i] - 1) + 1
        size *= (hw[i] + 2 * layer.padding[i] - span) // layer.stride[i] + 1
    return size


def trace_layers(model: nn.Module, groups: Sequence[ChannelGroup], inputs, full: Optional[Mapping[str, int]] = None) -> List[Layer]:
    """The conv and linear layers `model(inputs)` runs in eval mode, with the input size of each
    call and the groups they read and write. `full` holds the unpruned widths (default: the
    groups' current sizes); a pruned model is described at its unpruned widths."""
    full = {g.name: g.size for g in groups} if full is None else dict(full)
    reads = {name: g for g in groups for name in g.consumers}
    writes = {name: g for g in groups for name in g.producers}
    layers: Dict[str, Layer] = {}
    handles = []

    def hook(name):
        def record(module, args, output):
            x = args[0]
            if name not in layers:
                layers[name] = _describe(name, module, reads.get(name), writes.get(name), full)
            if isinstance(module, nn.Linear):
                layers[name].calls.append((x.numel() // x.shape[-1],))
            else:
                layers[name].calls.append((x.numel() // (x.shape[-3] * x.shape[-2] * x.shape[-1]), *x.shape[-2:]))

        return record

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return list(layers.values())


def _describe(name: str, module: nn.Module, read: Optional[ChannelGroup], write: Optional[ChannelGroup], full: Mapping[str, int]) -> Layer:
    if isinstance(module, nn.Linear):
        in_now, out_now = module.in_features, module.out_features
        repeat = in_now // read.size if read is not None else 1
        in_full = full[read.name] if read is not None else in_now
        out_full = full[write.name] if write is not None else out_now
        return Layer(name, "linear", in_full, out_full, read and read.name, write and write.name, [],
                     bias=module.bias is not None, repeat=repeat)  # fmt: skip
    norm = getattr(module, "norm", None)
    activation = getattr(module, "activation", None)
    in_full = full[read.name] if read is not None else module.in_channels
    out_full = full[write.name] if write is not None else module.out_channels
    # The number of groups at full width (a pruned grouped conv has lost whole groups).
    groups = module.groups * in_full // module.in_channels
    return Layer(
        name, "deconv" if isinstance(module, nn.ConvTranspose2d) else "conv", in_full, out_full,
        read and read.name, write and write.name, [],
        kernel=tuple(module.kernel_size), stride=tuple(module.stride), padding=tuple(module.padding),
        dilation=tuple(module.dilation), conv_groups=groups, bias=module.bias is not None,
        norm=norm is not None, relu=activation is not None,
    )  # fmt: skip


Table = Callable[[float, float], float]


@dataclass
class CostModel:
    """The cost of a detector as a function of its groups' widths.

    `layers` each have `cost[name](in_width, out_width)`, multiplied by `scale`; `fixed` is
    what no width changes. `unit` names what a cost is counted in ("FLOPs", "ms").
    """

    layers: List[Layer]
    cost: Dict[str, Table]  # layer name -> cost(in, out)
    fixed: float
    unit: str
    full: Dict[str, int]  # unpruned widths of the groups the layers read or write
    meta: Dict = field(default_factory=dict)
    scale: float = 1.0

    def layer_cost(self, layer: Layer, widths: Mapping[str, int]) -> float:
        i = widths.get(layer.in_group, layer.in_width) if layer.in_group else layer.in_width
        o = widths.get(layer.out_group, layer.out_width) if layer.out_group else layer.out_width
        return self.scale * self.cost[layer.name](i, o)

    def predict(self, widths: Mapping[str, int]) -> float:
        """The whole detector's cost at `widths` (groups absent keep their full width)."""
        return self.fixed + sum(self.layer_cost(layer, widths) for layer in self.layers)

    def by_group(self) -> Dict[str, List[Layer]]:
        """The layers each group's width enters."""
        found: Dict[str, List[Layer]] = {}
        for layer in self.layers:
            for g in {layer.in_group, layer.out_group} - {None}:
                found.setdefault(g, []).append(layer)
        return found


def flops_model(layers: Sequence[Layer], full: Mapping[str, int], total: Optional[float] = None) -> CostModel:
    """FLOPs as the layers count them; `total` (e.g. fvcore's count of the whole detector) puts
    the difference (ops the layers do not cover) in the fixed part."""
    model = CostModel(list(layers), {layer.name: layer.flops for layer in layers}, 0.0, "FLOPs", dict(full))
    if total is not None:
        model.fixed = max(float(total) - model.predict({}), 0.0)
    return model


# --- time measured on the device ---------------------------------------------------------------

GRID = (0.125, 0.25, 0.5, 0.75, 1.0)


def _standalone(layer: Layer, in_width: int, out_width: int, device) -> Tuple[nn.Module, List[torch.Tensor]]:
    """The layer alone at these widths, with its norm (as a per-channel affine) and ReLU, and
    inputs shaped as its calls'."""
    if layer.type == "linear":
        body: List[nn.Module] = [nn.Linear(in_width * layer.repeat, out_width, bias=layer.bias)]
        inputs = [torch.randn(rows, in_width * layer.repeat) for (rows,) in layer.calls]
    else:
        groups = layer.conv_groups if layer.conv_groups == 1 else math.gcd(layer.conv_groups, math.gcd(in_width, out_width))
        kind = nn.ConvTranspose2d if layer.type == "deconv" else nn.Conv2d
        body = [kind(in_width, out_width, layer.kernel, layer.stride, layer.padding, dilation=layer.dilation,
                     groups=groups, bias=layer.bias)]  # fmt: skip
        if layer.norm:
            body.append(_Affine(out_width))
        inputs = [torch.randn(n, in_width, h, w) for n, h, w in layer.calls]
    if layer.relu:
        body.append(nn.ReLU(inplace=True))
    module = nn.Sequential(*body).to(device=device).eval()
    return module, [x.to(device) for x in inputs]


class _Affine(nn.Module):
    """What a frozen norm costs at inference: one multiply and one add per element."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(1, width, 1, 1))
        self.register_buffer("shift", torch.zeros(1, width, 1, 1))

    def forward(self, x):
        return x * self.scale + self.shift


@contextlib.contextmanager
def _precision(device, dtype):
    """No gradients, and autocast to `dtype` unless it is float32."""
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32), torch.no_grad():
        yield


def _time_layer(layer: Layer, in_width: int, out_width: int, timer, device) -> float:
    """`timer`'s figure for the layer alone at these widths (the caller sets the precision)."""
    module, inputs = _standalone(layer, max(in_width, 1), max(out_width, 1), device)

    def run():
        for x in inputs:
            module(x)

    return timer(run)


class LatencyModel:
    """Builds a time `CostModel` for a detector on the device it runs on.

    Each layer is timed alone at the grid of width fractions `grid` x `grid` (of its input and
    output width; only the side that a group sets varies), and its time at other widths is
    interpolated bilinearly (`table_cost`).
    `timer(fn)` returns one figure in ms for calling `fn` (e.g. a median of repeats). `fixed` is
    the whole detector's measured time at full width minus the layers' times there.
    """

    def __init__(self, timer: Callable[[Callable[[], None]], float], grid: Sequence[float] = GRID, device="cpu", dtype=torch.float32):
        self.timer, self.grid, self.device, self.dtype = timer, tuple(sorted(grid)), device, dtype

    def tables(self, layers: Sequence[Layer], progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, Dict]:
        """Per layer: {"in": widths, "out": widths, "ms": [[t(in_i, out_j)]]}."""
        found = {}
        for k, layer in enumerate(layers):
            ins = _grid_widths(layer.in_width, self.grid) if layer.in_group else [layer.in_width]
            outs = _grid_widths(layer.out_width, self.grid) if layer.out_group else [layer.out_width]
            with _precision(self.device, self.dtype):
                ms = [[_time_layer(layer, i, o, self.timer, self.device) for o in outs] for i in ins]
            found[layer.name] = {"in": ins, "out": outs, "ms": ms}
            if progress:
                progress(k + 1, len(layers))
        return found


def _grid_widths(width: int, grid: Sequence[float]) -> List[int]:
    return sorted({max(1, round(width * f)) for f in grid})


def _interpolate(xs: Sequence[int], value: float) -> Tuple[int, int, float]:
    """Indices (a, b) of the grid segment for `value` and its weight toward b."""
    if len(xs) == 1:
        return 0, 0, 0.0
    b = next((i for i in range(1, len(xs)) if value <= xs[i]), len(xs) - 1)
    a = b - 1
    return a, b, (value - xs[a]) / (xs[b] - xs[a])


def table_cost(table: Mapping) -> Table:
    """cost(in, out) from a layer's timing table: bilinear inside it; a width outside the
    table's range costs what the nearest end does (below the narrowest width timed, a call's
    fixed overheads dominate: assuming it costs less would promise savings the device does not
    give)."""
    ins, outs, ms = table["in"], table["out"], table["ms"]

    def cost(i: float, o: float) -> float:
        i = min(max(i, ins[0]), ins[-1])
        o = min(max(o, outs[0]), outs[-1])
        a, b, u = _interpolate(ins, i)
        c, d, v = _interpolate(outs, o)
        top = ms[a][c] + (ms[a][d] - ms[a][c]) * v
        bottom = ms[b][c] + (ms[b][d] - ms[b][c]) * v
        return max(top + (bottom - top) * u, 0.0)

    return cost


def latency_model(
    layers: Sequence[Layer], full: Mapping[str, int], tables: Mapping[str, Mapping],
    measured: Sequence[Tuple[Mapping[str, int], float]], meta: Optional[Dict] = None,
) -> CostModel:
    """The time `CostModel` from the layers' timing `tables`, calibrated on the whole detector's
    `measured` times: (widths, ms) at two or more widths.

    Inside the detector the layers cost more than alone (the element-wise ops around them,
    caches), and the rest (ROIAlign, NMS, Python) costs what no width changes: the model is
    `fixed + scale * sum(layer tables)`, with `fixed` and `scale` fitted by least squares to
    the measurements (one measurement: scale 1). Both are kept non-negative."""
    model = CostModel(list(layers), {n: table_cost(t) for n, t in tables.items()}, 0.0, "ms", dict(full), dict(meta or {}))
    xs = [model.predict(dict(w)) for w, _ in measured]
    ys = [float(t) for _, t in measured]
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    spread = sum((x - mean_x) ** 2 for x in xs)
    scale = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if n > 1 and spread > 0 else 1.0
    if scale <= 0:
        scale = 1.0
    fixed = mean_y - scale * mean_x
    if fixed < 0:  # the layers account for all of it: no fixed part, scale through the mean
        fixed, scale = 0.0, mean_y / max(mean_x, _EPS)
    model.scale, model.fixed = scale, fixed
    return model


def device_name(device) -> str:
    """What the timings are specific to: the CPU model or GPU name, and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"cpu:{cpu}:threads={torch.get_num_threads()}"


def cache_key(layers: Sequence[Layer], device, dtype, grid: Sequence[float]) -> str:
    """A digest of what the tables depend on: the layers' shapes and calls, the device, the
    dtype, the grid and torch's version."""
    described = json.dumps(
        [[layer.name, layer.type, layer.in_width, layer.out_width, bool(layer.in_group), bool(layer.out_group),
          layer.calls, layer.kernel, layer.stride, layer.padding, layer.dilation, layer.conv_groups,
          layer.bias, layer.norm, layer.relu, layer.repeat] for layer in layers]
        + [device_name(device), str(dtype), list(grid), torch.__version__],
        sort_keys=True,
    )  # fmt: skip
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def cached_tables(path: str, build: Callable[[], Dict]) -> Tuple[Dict, bool]:
    """The tables stored at `path`, or `build()`'s, stored there (atomically); (tables, reused)."""
    from ..utils.io import write_json

    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f), True
        except (OSError, ValueError) as e:
            logger.warning("latency cache %s unreadable (%s): measuring again", path, e)
    tables = build()
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_json(path, tables)
    except OSError as e:
        logger.warning("latency cache %s not written: %s", path, e)
    return tables, False


def snap_step(times: Mapping[int, float], steps: Sequence[int] = (2, 4, 8, 16, 32), free: float = 0.5) -> int:
    """The widest step s at which rounding kept widths up to a multiple of s is mostly free, from
    `times` (ms by width, measured on one layer over consecutive widths): the time it adds is at
    most `free` of what it would add if time were proportional to width. A device whose time
    falls in stairs (vector units, tensor cores) gives its stair width; one whose time is
    proportional to the width gives 1."""
    widths = sorted(times)
    best = 1
    for s in steps:
        measured, proportional = [], []
        for w in widths:
            up = -(-w // s) * s
            if up in times and up != w:
                measured.append(times[up] / max(times[w], _EPS) - 1)
                proportional.append(up / w - 1)
        if len(measured) >= 4 and sum(measured) <= free * sum(proportional):
            best = s
    return best


def step_times(layer: Layer, timer, device="cpu", dtype=torch.float32, span: int = 32) -> Dict[int, float]:
    """`layer`'s time at `span` consecutive output widths ending at a multiple of 32 near half its
    width (at full input width): the staircase `snap_step` reads."""
    top = max(32, (layer.out_width // 2 // 32) * 32 + 32)
    widths = range(max(1, top - span + 1), top + 1)
    with _precision(device, dtype):
        return {w: _time_layer(layer, layer.in_width, w, timer, device) for w in widths}


# --- the cost-aware global ranking -------------------------------------------------------------


def select_by_cost(
    groups: Sequence[ChannelGroup],
    unit_scores: Mapping[str, torch.Tensor],
    floors: Mapping[str, int],
    steps: Mapping[str, int],
    model: CostModel,
    target: float,
    widths: Optional[Mapping[str, int]] = None,
    *,
    sensitivity: Optional[Mapping[str, Tuple[int, float]]] = None,
) -> Dict[str, int]:
    """Widths of the eligible `groups` after removing, step by step, the channels whose
    normalised score is lowest per unit of cost saved, until `model.predict` is at most `target`
    (or nothing more can go). A group loses `steps[name]` channels at a time (whole units and
    `round_to`), never below `floors[name]`. `widths` holds the current widths of every group
    (other groups may be narrower than the model's full widths); default: the groups' sizes.

    Unit scores are divided by their group's mean magnitude (groups of different scale compare)
    and shifted so that the lowest is 0; a step's importance is the sum of its channels'
    scores, its saving the drop in predicted cost over the layers the group enters. Savings
    change as neighbouring groups narrow, so those of the touched group and of the groups it
    shares a layer with are recomputed after each step.

    `sensitivity` (name: (units removed, loss rise)) rescales each group so that the importance
    of its lowest `units` equals the rise of the training loss measured when exactly those were
    cut: groups then compare on what their channels are worth to the loss, not on their rank
    within the group alone (a layer-wise sensitivity analysis, Li et al., "Pruning Filters for
    Efficient ConvNets", ICLR 2017, used as HALP uses its loss-based saliency). A rise at or
    below zero is raised to a thousandth of the largest one, so that the group still ranks its
    own channels. Groups missing from `sensitivity` (already at their floor) keep weight 1.
    """
    by_name = {g.name: g for g in groups}
    widths = {**({g.name: g.size for g in groups} if widths is None else widths)}
    layers_of = model.by_group()
    neighbours = {
        n: {m for layer in layers_of.get(n, []) for m in (layer.in_group, layer.out_group) if m in by_name} - {n}
        for n in by_name
    }
    normalised = {n: unit_scores[n] / (unit_scores[n].abs().mean() + _EPS) for n in by_name}
    lowest = min(min(float(v.min()), 0.0) for v in normalised.values()) if normalised else 0.0
    # Per group, the cumulative importance of its units in removal order (lowest first): the
    # importance of the next step is a difference of two entries.
    prefix = {}
    for n, g in by_name.items():
        sums = [0.0]
        for value in sorted((normalised[n] - lowest).tolist()):
            sums.append(sums[-1] + value * g.unit)
        prefix[n] = sums
    if sensitivity:
        rises = {n: rise for n, (_, rise) in sensitivity.items() if n in by_name}
        least = 1e-3 * max([r for r in rises.values() if r > 0], default=1.0)
        for n, rise in rises.items():
            units = sensitivity[n][0]
            weight = max(rise, least) / max(prefix[n][units], 1e-3 * units)
            prefix[n] = [value * weight for value in prefix[n]]

    def group_cost(n: str, at: Mapping[str, int]) -> float:
        return sum(model.layer_cost(layer, at) for layer in layers_of.get(n, []))

    def ratio(n: str) -> Optional[float]:
        g, step = by_name[n], steps[n]
        if widths[n] - step < floors[n]:
            return None
        done = (g.size - widths[n]) // g.unit
        sums = prefix[n]
        importance = sums[done + step // g.unit] - sums[done]
        saving = group_cost(n, widths) - group_cost(n, {**widths, n: widths[n] - step})
        return importance / saving if saving > 0 else None

    current = model.predict(widths)
    version = dict.fromkeys(by_name, 0)
    heap = [(r, 0, n) for n in by_name if (r := ratio(n)) is not None]
    heapq.heapify(heap)
    while current > target and heap:
        _, v, n = heapq.heappop(heap)
        if v != version[n]:
            continue  # stale: the group or a neighbour changed since
        before = group_cost(n, widths)
        widths[n] -= steps[n]
        current -= before - group_cost(n, widths)
        for m in {n} | neighbours[n]:
            version[m] += 1
            if (r := ratio(m)) is not None:
                heapq.heappush(heap, (r, version[m], m))
    return {n: widths[n] for n in by_name}
