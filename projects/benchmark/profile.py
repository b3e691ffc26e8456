"""Where an unpruned and a pruned detector spend their time, op by op (`tools/profile_net.py`).

torch.profiler on one thread, each operator's time grouped by what it does in a detectron2
R-CNN (backbone convs by kind, the memory-bound element-wise ops, FPN, RPN, ROIAlign, box
head, NMS) beside the FLOPs of each conv; each conv's time under each of PyTorch's CPU conv
kernels; and the one-thread CPU latency cut set against the FLOPs cut for the model as built,
with norms folded, with channels-last weights, and both (`d2prune.fuse`).
"""

import copy
import statistics
from collections import defaultdict
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.resnet import BasicStem, CNNBlockBase
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator.rpn import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import ROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from tabulate import tabulate
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from d2prune.api import prune_model
from d2prune.complexity import clock, interleaved_latency
from d2prune.errors import UserError
from d2prune.fuse import fold_norms, prepare_for_inference

__all__ = [
    "CATEGORIES",
    "VARIANTS",
    "module_roles",
    "profile_models",
    "category_rows",
    "conv_rows",
    "width_rows",
    "conv_backends",
    "latency_rows",
    "flops_pruned",
    "dataset_batches",
]

# In the order the tables list them. A conv's kernel time goes to its kind; the element-wise
# ops of the backbone and FPN (each reads and writes a whole feature map for next to no
# arithmetic: memory-bound) to their op; everything else to the part of the detector it runs in.
CONV_CATEGORIES = ("stem conv", "block convs", "shortcut convs", "FPN convs")
ELEMENTWISE = (
    "norms (BN / FrozenBN)",
    "relu",
    "residual add",
    "max pool",
    "FPN top-down (interpolate, add)",
)
CATEGORIES = CONV_CATEGORIES + ELEMENTWISE + (
    "RPN head",
    "anchor generation",
    "proposals (decode, top-k, NMS)",
    "ROIAlign (box pooler)",
    "box head fc",
    "box predictor + postprocess NMS",
    "pre/postprocess (normalise, pad, rescale)",
    "Python between ops",
    "other",
)  # fmt: skip

# The role of a module: that of the first class here it is an instance of. Submodules without
# a role of their own take their closest ancestor's (see `module_roles`).
_ROLES: Sequence[Tuple[type, str]] = (
    (BasicStem, "stem"),
    (CNNBlockBase, "block"),
    (ResNet, "resnet"),
    (FPN, "fpn"),
    (StandardRPNHead, "rpn_head"),
    (DefaultAnchorGenerator, "anchors"),
    (RPN, "rpn"),
    (ROIPooler, "pooler"),
    (FastRCNNOutputLayers, "box_predictor"),
    (ROIHeads, "roi_heads"),
    (GeneralizedRCNN, "detector"),
)
_CONV_KIND = {"stem": "stem conv", "block": "block convs", "shortcut": "shortcut convs", "fpn": "FPN convs"}
_ROLE_CATEGORY = {
    "rpn_head": "RPN head",
    "anchors": "anchor generation",
    "rpn": "proposals (decode, top-k, NMS)",
    "pooler": "ROIAlign (box pooler)",
    "box_head": "box head fc",
    "box_predictor": "box predictor + postprocess NMS",
    # StandardROIHeads calls box_predictor.inference (scores, boxes, per-class NMS) itself.
    "roi_heads": "box predictor + postprocess NMS",
    "detector": "pre/postprocess (normalise, pad, rescale)",
}
CHOICE = "PyTorch's choice"
_CONV_OPS = ("aten::conv2d", "aten::convolution", "aten::_convolution")
_SCOPE = "module::"

# The inference variants every latency table compares (`d2prune.fuse`).
VARIANTS: Dict[str, Callable[[nn.Module], nn.Module]] = {
    "as built": lambda m: m,
    "fold_norms": fold_norms,
    "channels_last": lambda m: m.to(memory_format=torch.channels_last),
    "fold_norms + channels_last": lambda m: prepare_for_inference(m, channels_last=True),
}

Result = Dict[str, Dict]

# -- profiling -----------------------------------------------------------------------------------


def module_roles(model: nn.Module) -> Dict[str, str]:
    """Module name -> role, for the modules that start one: stem, block, shortcut (a block's
    projection), resnet, fpn, rpn_head, anchors, rpn, pooler, box_head, box_predictor,
    roi_heads, detector. Names are relative to `model`."""
    roles = {}
    for name, module in model.named_modules():
        for cls, role in _ROLES:
            if isinstance(module, cls):
                roles[name] = role
                break
        if isinstance(module, CNNBlockBase) and getattr(module, "shortcut", None) is not None:
            roles[_join(name, "shortcut")] = "shortcut"
        if isinstance(module, ROIHeads) and hasattr(module, "box_head"):
            roles[_join(name, "box_head")] = "box_head"
    return roles


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _role(name: str, roles: Mapping[str, str]) -> str:
    while name not in roles:
        if not name:
            return "other"
        name = name.rpartition(".")[0]
    return roles[name]


def _category(role: str, op: str) -> str:
    """The category of operator `op` (the outermost one of a call) run by a module of `role`."""
    if role not in ("stem", "block", "shortcut", "resnet", "fpn"):
        return _ROLE_CATEGORY.get(role, "other")
    if op in _CONV_OPS:
        return _CONV_KIND.get(role, "other")
    if op == "aten::batch_norm":
        return "norms (BN / FrozenBN)"
    if op.startswith("aten::relu"):
        return "relu"
    if op.startswith("aten::max_pool2d"):
        return "max pool"
    if role == "fpn":
        return "FPN top-down (interpolate, add)"
    if op.startswith("aten::add") and role == "block":
        return "residual add"
    return "other"


class _Scopes:
    """Hooks that open a profiler scope named after each module for its forward, so that each
    operator can be traced to the innermost module that ran it; and record each conv's output
    shape, for its FLOPs."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.open: List[record_function] = []
        self.conv_outputs: Dict[str, Tuple[int, ...]] = {}
        self.handles: list = []

    def __enter__(self):
        for name, module in self.model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._exit(name)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        while self.open:
            self.open.pop().__exit__(None, None, None)

    def _enter(self, name: str):
        def hook(module, args):
            scope = record_function(_SCOPE + name)
            scope.__enter__()
            self.open.append(scope)

        return hook

    def _exit(self, name: str):
        def hook(module, args, output):
            self.open.pop().__exit__(None, None, None)
            if isinstance(module, nn.Conv2d) and isinstance(output, torch.Tensor):
                self.conv_outputs[name] = tuple(output.shape)

        return hook


def _attribute(events, roles: Mapping[str, str]) -> Dict[Tuple[str, str], float]:
    """Self time (ms) of profiler `events` by (module, category).

    An operator's self time goes to its innermost module scope and to the category of that
    module's role and of its outermost operator (aten::conv2d for all that a conv call runs); a
    scope's own self time (Python, and the profiler's own bookkeeping, between operators) to
    "Python between ops"."""
    times: Dict[Tuple[str, str], float] = defaultdict(float)
    for event in events:
        ms = event.self_cpu_time_total / 1000
        if event.name.startswith(_SCOPE):
            times[(event.name[len(_SCOPE) :], "Python between ops")] += ms
            continue
        outer, parent = event.name, event.cpu_parent
        while parent is not None and not parent.name.startswith(_SCOPE):
            outer, parent = parent.name, parent.cpu_parent
        if parent is None:
            times[("", "other")] += ms
            continue
        scope = parent.name[len(_SCOPE) :]
        times[(scope, _category(_role(scope, roles), outer))] += ms
    return times


def profile_models(models: Sequence[nn.Module], inputs: Sequence, *, repeats: int = 5, warmup: int = 1) -> List[Result]:
    """Profile each of `models` (each run on every item of `inputs` in turn, in eval mode,
    without gradients) `repeats` times, the models taking turns; the number of threads is the
    caller's (`torch.set_num_threads(1)`).

    Times are the profiler's elapsed time of each operator, net of the operators it calls, per
    input. Each module's time in each category is the minimum over repeats: on a shared
    machine other jobs only add time, to a random part of each run. Per model: `categories`
    (category -> ms, the sum of those minima), `total_ms` (their sum), `totals` and `cpu`
    (each repeat's profiled total, and the CPU time of the process for that run, per input:
    how far the repeats spread, and how much the profiler adds); for each backbone and FPN conv,
    `convs` (name -> kernel ms), `conv_kind` (its category), `conv_flops` (multiply-adds, as
    fvcore counts them) and `conv_shapes` (in and out channels, kernel size, output height and
    width).
    """
    roles = [module_roles(m) for m in models]
    runs: List[List[Dict]] = [[] for _ in models]
    cpu: List[List[float]] = [[] for _ in models]
    outputs: List[Dict] = [{} for _ in models]
    modes = [m.training for m in models]
    now = clock("cpu")
    n = len(inputs)
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            for m in models:
                for _ in range(warmup):
                    for x in inputs:
                        m(x)
            for _ in range(repeats):
                for i, m in enumerate(models):
                    start = now()
                    with _Scopes(m) as scopes, profile(activities=[ProfilerActivity.CPU]) as prof:
                        for x in inputs:
                            m(x)
                    cpu[i].append((now() - start) * 1000 / n)
                    outputs[i] = scopes.conv_outputs
                    runs[i].append(_attribute(prof.events(), roles[i]))
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    results = []
    for m, model_runs, model_cpu, shapes, model_roles in zip(models, runs, cpu, outputs, roles):
        modules = dict(m.named_modules())
        kinds = {k: _category(_role(k, model_roles), "aten::conv2d") for k in shapes}
        convs = {k: kind for k, kind in kinds.items() if kind in CONV_CATEGORIES}
        keys = set().union(*model_runs)
        least = {key: min(r.get(key, 0.0) for r in model_runs) / n for key in keys}
        categories = {c: 0.0 for c in CATEGORIES}
        for (_, category), ms in least.items():
            categories[category] += ms
        results.append({
            "categories": categories,
            "total_ms": sum(categories.values()),
            "totals": [sum(r.values()) / n for r in model_runs],
            "cpu": model_cpu,
            "convs": {k: least.get((k, kind), 0.0) for k, kind in convs.items()},
            "conv_kind": convs,
            "conv_flops": {k: _conv_flops(modules[k], shapes[k]) for k in convs},
            "conv_shapes": {
                k: (modules[k].in_channels, modules[k].out_channels, modules[k].kernel_size[0], *shapes[k][-2:])
                for k in convs
            },
        })  # fmt: skip
    return results


def _conv_flops(conv: nn.Conv2d, output_shape: Sequence[int]) -> float:
    """Multiply-adds of one call (fvcore's count: one per weight per output position)."""
    per_output = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    return float(torch.Size(output_shape).numel() * per_output)


# -- tables --------------------------------------------------------------------------------------


def category_rows(unpruned: Result, pruned: Result) -> List[Dict]:
    """One row per category that takes time: ms unpruned and pruned, the time cut, its share of
    each model's time, and for conv categories the FLOPs cut; then the total."""
    flops = [_flops_by_kind(r) for r in (unpruned, pruned)]
    rows = []
    for category in CATEGORIES:
        before, after = unpruned["categories"][category], pruned["categories"][category]
        if max(before, after) < 0.005:
            continue
        rows.append({
            "category": category,
            "ms_unpruned": before,
            "ms_pruned": after,
            "cut": 1 - after / before if before else None,
            "share_unpruned": before / unpruned["total_ms"],
            "share_pruned": after / pruned["total_ms"],
            "flops_cut": 1 - flops[1][category] / flops[0][category] if flops[0].get(category) else None,
        })  # fmt: skip
    conv_total = [sum(f.values()) for f in flops]
    rows.append({
        "category": "total",
        "ms_unpruned": unpruned["total_ms"],
        "ms_pruned": pruned["total_ms"],
        "cut": 1 - pruned["total_ms"] / unpruned["total_ms"],
        "share_unpruned": 1.0,
        "share_pruned": 1.0,
        "flops_cut": 1 - conv_total[1] / conv_total[0] if conv_total[0] else None,
    })  # fmt: skip
    return rows


def _flops_by_kind(result: Result) -> Dict[str, float]:
    flops: Dict[str, float] = defaultdict(float)
    for name, value in result["conv_flops"].items():
        flops[result["conv_kind"][name]] += value
    return flops


def conv_rows(unpruned: Result, pruned: Result) -> List[Dict]:
    """Per backbone and FPN conv, in forward order: widths, output size, MFLOPs and kernel ms
    before and after, and the time per GFLOP, which shows the widths where a pruned conv pays
    more per FLOP than the unpruned one did."""
    rows = []
    for name, (cin, cout, k, h, w) in unpruned["conv_shapes"].items():
        if name not in pruned["conv_shapes"]:
            continue
        pin, pout = pruned["conv_shapes"][name][:2]
        f0, f1 = unpruned["conv_flops"][name], pruned["conv_flops"][name]
        t0, t1 = unpruned["convs"][name], pruned["convs"][name]
        rows.append({
            "conv": name, "kind": unpruned["conv_kind"][name], "k": k, "output": f"{h}x{w}",
            "in/out unpruned": f"{cin}/{cout}", "in/out pruned": f"{pin}/{pout}",
            "MFLOPs unpruned": f0 / 1e6, "MFLOPs pruned": f1 / 1e6,
            "ms unpruned": t0, "ms pruned": t1,
            "ms/GFLOP unpruned": t0 / f0 * 1e9, "ms/GFLOP pruned": t1 / f1 * 1e9,
        })  # fmt: skip
    return rows


def width_rows(results: Sequence[Result], labels: Sequence[str], multiple: int = 16) -> List[Dict]:
    """Kernel time per GFLOP of the backbone and FPN convs, pooled by output size and by whether
    both widths of a conv are multiples of `multiple` (oneDNN's CPU kernels work on blocks of 16
    floats with AVX-512, 8 with AVX2): one row per model, output size and class."""
    rows = []
    for label, result in zip(labels, results):
        pools: Dict[Tuple[int, str, bool], List[float]] = defaultdict(lambda: [0.0, 0.0, 0])
        for name, (cin, cout, _, h, w) in result["conv_shapes"].items():
            pool = pools[(h * w, f"{h}x{w}", cin % multiple == 0 and cout % multiple == 0)]
            pool[0] += result["convs"][name]
            pool[1] += result["conv_flops"][name]
            pool[2] += 1
        for (_, size, aligned), (ms, flops, count) in sorted(pools.items(), key=lambda kv: (-kv[0][0], not kv[0][2])):
            rows.append({
                "model": label, "output": size, f"both widths % {multiple} == 0": "yes" if aligned else "no",
                "convs": count, "GFLOPs": flops / 1e9, "ms": ms, "ms/GFLOP": ms / flops * 1e9,
            })  # fmt: skip
    return rows


# -- conv kernels --------------------------------------------------------------------------------


def conv_backends(model: nn.Module, inputs: Sequence, *, repeats: int = 10, rounds: int = 3) -> List[Dict]:
    """Each backbone and FPN conv of `model` on the input it gets from the first of `inputs`,
    timed (CPU time of the process, ms, the minimum of `rounds` means of `repeats` calls) under
    PyTorch's own choice of kernel (`F.conv2d`), forced to oneDNN (`aten::mkldnn_convolution`),
    forced to the native im2col + GEMM kernel (`aten::_slow_conv2d_forward`), and on
    channels-last input and weight.

    PyTorch picks the native kernel for a float32 batch of one image on the CPU when the conv
    is 1x1 and unstrided on one thread, or when its input holds at most 20480 values and its
    kernel is at most 3x3 (`use_mkldnn` in ATen's ConvUtils): what it picks changes with the
    widths, so pruning moves convs from one kernel to the other.
    """
    captured: Dict[str, Tuple[nn.Conv2d, torch.Tensor]] = {}
    roles = module_roles(model)
    handles = [
        module.register_forward_hook(lambda mod, args, out, name=name: captured.setdefault(name, (mod, args[0])) and None)
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and _category(_role(name, roles), "aten::conv2d") in CONV_CATEGORIES
    ]  # fmt: skip
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(inputs[0])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    now = clock("cpu")

    def best(fn) -> float:
        times = []
        for _ in range(rounds):
            start = now()
            for _ in range(repeats):
                fn()
            times.append((now() - start) / repeats * 1000)
        return min(times)

    with torch.no_grad():
        return [_time_kernels(name, conv, x, best) for name, (conv, x) in captured.items()]


def _time_kernels(name: str, conv: nn.Conv2d, x: torch.Tensor, best: Callable) -> Dict:
    x, w, b = x.contiguous(), conv.weight.contiguous(), conv.bias
    s, p, d, g = conv.stride, conv.padding, conv.dilation, conv.groups
    xc, wc = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    native = float("nan")
    if g == 1 and d == (1, 1):
        native = best(lambda: torch.ops.aten._slow_conv2d_forward(x, w, conv.kernel_size, b, s, p))
    return {
        "conv": name, "input": "x".join(map(str, x.shape[1:])), "out": conv.out_channels,
        "k": conv.kernel_size[0], "input values": x[0].numel(),
        CHOICE: best(lambda: F.conv2d(x, w, b, s, p, d, g)),
        "oneDNN": best(lambda: torch.ops.aten.mkldnn_convolution(x, w, b, p, s, d, g)),
        "native": native,
        "channels_last": best(lambda: F.conv2d(xc, wc, b, s, p, d, g)),
    }  # fmt: skip


# -- latency -------------------------------------------------------------------------------------


def latency_rows(
    models: Mapping[str, nn.Module],
    inputs: Sequence,
    flops: Mapping[str, float],
    *,
    variants: Sequence[str] = tuple(VARIANTS),
    repeats: int = 3,
    rounds: int = 5,
) -> List[Dict]:
    """CPU time of the process per input (`interleaved_latency`, `cpu` clock) of each of
    `models` (label -> model; the first is the unpruned reference) in each of `variants`
    (`VARIANTS`, applied to deep copies), all taking turns in each of `rounds`.

    Per model and variant: the median and the minimum over rounds of each round's median
    (`spread`: the lowest and highest round median); against the unpruned model in the same
    variant, the FLOPs cut (`flops`: label -> FLOPs), the latency cut and latency cut / FLOPs
    cut, from medians and from minima; and the latency cut against the unpruned model as built.
    """
    labels = list(models)
    runs = [(label, variant, VARIANTS[variant](copy.deepcopy(models[label]))) for variant in variants for label in labels]
    runners = [lambda _, m=m: [m(x) for x in inputs] for _, _, m in runs]
    medians: List[List[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for times, summary in zip(medians, interleaved_latency(runners, None, warmup=1, repeats=repeats, clock_name="cpu")):
            times.append(summary["median_ms"] / len(inputs))
    summary = {
        (label, variant): {"median_ms": statistics.median(t), "min_ms": min(t), "spread": (min(t), max(t))}
        for (label, variant, _), t in zip(runs, medians)
    }
    built = summary[(labels[0], variants[0])]
    rows = []
    for label, variant, _ in runs:
        row = {"model": label, "variant": variant, **summary[(label, variant)]}
        base = summary[(labels[0], variant)]
        if label != labels[0]:
            row["flops_cut"] = flops_cut = 1 - flops[label] / flops[labels[0]]
            for suffix, key in (("", "median_ms"), ("_min", "min_ms")):
                row[f"cut{suffix}"] = 1 - row[key] / base[key]
                row[f"ratio{suffix}"] = row[f"cut{suffix}"] / flops_cut
        row["cut_vs_built"] = 1 - row["min_ms"] / built["min_ms"]
        rows.append(row)
    return rows


# -- models and inputs ---------------------------------------------------------------------------


def flops_pruned(
    model: nn.Module,
    amount: float,
    kinds: Sequence[str] = ("block", "stage", "fpn", "head"),
    image_size: int = 800,
    round_to: int = 1,
) -> nn.Module:
    """A copy of `model` pruned by `l1` in the global order until its FLOPs (the whole
    detector on one square `image_size` image) fall by `amount`: the selection of
    `tools/prune_net.py --flops-reduction AMOUNT --mode global --kinds ... --criterion l1`."""
    pruned = copy.deepcopy(model)
    budget = {"target": "flops", "amount": amount, "mode": "global", "kinds": list(kinds), "round_to": round_to}
    prune_model(pruned, "l1", budget=budget, image_size=image_size)
    return pruned


def dataset_batches(cfg, dataset: str, count: int) -> List[List[dict]]:
    """The first `count` images of the registered `dataset`, each a batch of one, resized to the
    test size as `DefaultPredictor` does."""
    dicts = DatasetCatalog.get(dataset)[:count]
    if not dicts:
        raise UserError(f"dataset '{dataset}' has no images.")
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    batches = []
    for d in dicts:
        image = read_image(d["file_name"], format=cfg.INPUT.FORMAT)
        height, width = image.shape[:2]
        image = resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
        batches.append([{"image": tensor, "height": height, "width": width}])
    return batches


# -- what tools/profile_net.py runs --------------------------------------------------------------


def _pct(x) -> str:
    return "" if x is None else f"{x:.1%}"


def _markdown(rows: Sequence[Mapping], floatfmt: str = ".2f") -> str:
    return tabulate([list(r.values()) for r in rows], headers=list(rows[0]), tablefmt="github", floatfmt=floatfmt)


def category_table(rows: Sequence[Mapping]) -> str:
    return _markdown([
        {
            "category": r["category"], "ms unpruned": f"{r['ms_unpruned']:.2f}", "ms pruned": f"{r['ms_pruned']:.2f}",
            "time cut": _pct(r["cut"]), "FLOPs cut": _pct(r["flops_cut"]),
            "share of unpruned": _pct(r["share_unpruned"]), "share of pruned": _pct(r["share_pruned"]),
        }
        for r in rows
    ])  # fmt: skip


def latency_table(rows: Sequence[Mapping]) -> str:
    return _markdown([
        {
            "model": r["model"], "variant": r["variant"],
            "ms (median / min)": f"{r['median_ms']:.1f} / {r['min_ms']:.1f}",
            "spread of rounds": f"{r['spread'][0]:.1f}-{r['spread'][1]:.1f}",
            "FLOPs cut": _pct(r.get("flops_cut")),
            "latency cut (median / min)": f"{_pct(r['cut'])} / {_pct(r['cut_min'])}" if "cut" in r else "",
            "latency cut / FLOPs cut (median / min)": f"{r['ratio']:.2f} / {r['ratio_min']:.2f}" if "ratio" in r else "",
            "cut vs unpruned as built (min)": _pct(r["cut_vs_built"]) if r["cut_vs_built"] else "",
        }
        for r in rows
    ])  # fmt: skip


def build_part(args):
    """(cfg, unpruned, pruned by round_to, inputs, FLOPs by label, setting) for `args.part`."""
    # Imported here: the benchmark's helpers load criteria and the trainer, needed only now.
    from d2prune import load_model
    from d2prune.complexity import count_flops, dummy_tensor
    from d2prune.config import setup_cfg
    from d2prune.data import register_datasets
    from projects.benchmark.benchmark import block_keep, fixed_proposals, pruned_copy

    weights = args.weights if args.weights is not None else ("" if args.part == "resnet" else None)
    opts = ["MODEL.DEVICE", "cpu"] + (["MODEL.WEIGHTS", weights] if weights is not None else []) + list(args.opts)
    cfg = setup_cfg(args.config_file, opts)
    torch.manual_seed(0)
    model = load_model(cfg) if cfg.MODEL.WEIGHTS else _build(cfg)
    weights_text = f"weights {cfg.MODEL.WEIGHTS}" if cfg.MODEL.WEIGHTS else "random weights"
    pruned = {}
    if args.part == "resnet":
        if args.ratio is None:
            raise UserError("--part resnet prunes --ratio of every block group's channels: give --ratio.")
        x = dummy_tensor(args.side)
        inputs = [x]
        unpruned = model.backbone.bottom_up
        for r in args.round_to:
            pruned[f"pruned, round_to {r}"] = pruned_copy(model, block_keep(model, args.ratio, round_to=r)).backbone.bottom_up
        measure = lambda m: float(count_flops(m, x)["total"])  # noqa: E731
        setting = (
            f"the ResNet (`backbone.bottom_up`) of `{args.config_file}` ({weights_text}) on one "
            f"{args.side} x {args.side} image; pruned: {args.ratio:.0%} of every block group's "
            "channels removed (l1, local)"
        )
    else:
        if args.flops_reduction is None:
            raise UserError("--part detector prunes until the FLOPs fall by --flops-reduction: give it.")
        register_datasets(cfg)
        inputs = dataset_batches(cfg, args.dataset, args.images)
        unpruned = model
        for r in args.round_to:
            pruned[f"pruned, round_to {r}"] = flops_pruned(
                model, args.flops_reduction, args.kinds, image_size=cfg.INPUT.MIN_SIZE_TEST, round_to=r
            )
        if args.fixed_proposals:
            for m in [unpruned, *pruned.values()]:
                fixed_proposals(m)
        measure = lambda m: statistics.fmean(count_flops(m, x)["total"] for x in inputs)  # noqa: E731
        side = inputs[0][0]["image"].shape[1:]
        setting = (
            f"the whole detector of `{args.config_file}` ({weights_text}) on the first {len(inputs)} "
            f"images of `{args.dataset}` at the test size ({side[0]} x {side[1]} px), one image per "
            f"call; pruned: l1 in the global order over kinds {' '.join(args.kinds)} until the FLOPs "
            f"(one {cfg.INPUT.MIN_SIZE_TEST} px square image) fall by {args.flops_reduction:.0%}"
            + (
                "; then, in every model, the RPN's objectness and box-delta layers zeroed and its NMS "
                f"off (`fixed_proposals`): the box head gets the same {cfg.MODEL.RPN.POST_NMS_TOPK_TEST} "
                "anchors in every model"
                if args.fixed_proposals else ""
            )
        )
    models = {"unpruned": unpruned, **pruned}
    for m in models.values():
        m.eval()
    flops = {label: measure(m) for label, m in models.items()}
    return models, inputs, flops, setting


def _build(cfg) -> nn.Module:
    from detectron2.modeling import build_model

    return build_model(cfg).eval()


def main(args) -> str:
    """Profile, time and print; returns the markdown (also written to `args.output`)."""
    from projects.benchmark.benchmark import fix_mmap_threshold, machine_description
    from projects.benchmark.data import load_average

    # As tools/benchmark.py does for its memory section: every allocation of 64 KiB or more is
    # then a fresh mmap, whose pages the kernel zero-fills on first touch, on every call.
    fixed_mmap = args.fix_mmap_threshold and fix_mmap_threshold()
    torch.set_num_threads(args.threads)
    models, inputs, flops, setting = build_part(args)
    labels = list(models)
    parts = [
        f"Setting: {setting}. Machine: {machine_description()}. Load average before: {load_average()}."
        + (" glibc's mmap threshold fixed at 64 KiB, as tools/benchmark.py does." if fixed_mmap else ""), "",
        "FLOPs (fvcore, per input): " + ", ".join(f"{k} {v / 1e9:.3f} G" for k, v in flops.items()), "",
    ]  # fmt: skip
    print(parts[0], parts[2], sep="\n", flush=True)
    for variant in args.profile_variants:
        pair = [VARIANTS[variant](copy.deepcopy(models[label])) for label in labels[:2]]
        results = profile_models(pair, inputs, repeats=args.repeats)
        spreads = "; ".join(
            f"{label} {min(r['totals']):.1f}-{max(r['totals']):.1f} ms (CPU time of those runs "
            f"{min(r['cpu']):.1f}-{max(r['cpu']):.1f} ms)"
            for label, r in zip(labels, results)
        )
        text = [
            f"### Profile, {variant}: {labels[0]} vs {labels[1]}", "",
            "ms per input, one thread: the profiler's elapsed time of each operator, net of those it "
            f"calls; per module and category the minimum over {args.repeats} repeats (models taking "
            f"turns), summed. The repeats' own totals: {spreads}. FLOPs cut: of the convs of that "
            "category (total: of all backbone and FPN convs; the latency table has the whole model's).", "",
            category_table(category_rows(*results)), "",
            f"Kernel time per GFLOP of the backbone and FPN convs ({variant}):", "",
            _markdown(width_rows(results, labels[:2])), "",
        ]  # fmt: skip
        if args.convs:
            text += [f"Per conv ({variant}):", "", _markdown(conv_rows(*results)), ""]
        print("\n".join(text), flush=True)
        parts += text
    if args.backends:
        text = ["### Conv kernels, ms per call (CPU time, one thread)", ""]
        for label in labels[:2]:
            rows = conv_backends(models[label], inputs)
            sums = {k: sum(r[k] for r in rows) for k in (CHOICE, "oneDNN", "channels_last")}
            best = sum(min(r[CHOICE], r["oneDNN"]) for r in rows)
            text += [
                f"{label}: sum of PyTorch's choice {sums[CHOICE]:.2f} ms, "
                f"oneDNN always {sums['oneDNN']:.2f}, the faster of the two per conv {best:.2f}, "
                f"channels_last {sums['channels_last']:.2f}.", "",
                _markdown(rows, ".3f"), "",
            ]  # fmt: skip
        print("\n".join(text), flush=True)
        parts += text
    rows = latency_rows(models, inputs, flops, repeats=args.latency_repeats, rounds=args.rounds)
    text = [
        "### Latency, CPU time of the process per input (one thread)", "",
        f"{args.rounds} rounds, every model and variant in turn {args.latency_repeats} times per round; "
        "median and minimum of the round medians, and their spread. Cut and cut / FLOPs cut against "
        "the unpruned model in the same variant.", "",
        latency_table(rows), "",
        f"Load average after: {load_average()}.",
    ]  # fmt: skip
    print("\n".join(text), flush=True)
    parts += text
    markdown = "\n".join(parts) + "\n"
    if args.output:
        from d2prune.utils.io import atomic_write_text

        atomic_write_text(args.output, markdown)
    return markdown
