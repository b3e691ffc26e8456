"""Benchmarks: what pruning buys (latency per FLOPs), what it costs (surgery, scoring, memory),
and how d2prune compares with Torch-Pruning and `torch.nn.utils.prune` on the same channels.

Figures, not pass/fail: `tools/benchmark.py` and `tools/benchmark_peers.py` print them and write
them to docs/. Timings share the machine with whatever else runs, so every comparison is made
between runs of one process, interleaved.
"""

import copy
import ctypes
import functools
import os
import platform
import resource
import statistics
import sys
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import detectron2
import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.solver import build_optimizer
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import prune as torch_prune

from d2prune import criteria
from d2prune.complexity import clock as clock_of
from d2prune.complexity import (
    count_flops,
    count_params,
    dummy_inputs,
    dummy_tensor,
    interleaved_latency,
    output_tensors,
    synchronize,
)
from d2prune.criteria.collector import collect_statistics
from d2prune.engine.pruning_hook import cut
from d2prune.engine.selection import choose_keep
from d2prune.errors import UserError
from d2prune.pruning import find_groups, prune
from d2prune.pruning.budget import Budget, select_channels, select_for_flops
from d2prune.utils.modules import unwrap

__all__ = [
    "fixed_proposals",
    "block_keep",
    "pruned_copy",
    "surgery_seconds",
    "speedup",
    "random_batches",
    "parse_criterion",
    "training_seconds",
    "scoring_seconds",
    "scoring_overhead",
    "machine_description",
    "peak_rss",
    "fix_mmap_threshold",
    "pruning_event_memory",
    "compare_with_torch_pruning",
    "masking_comparison",
    "torch_pruning_limits",
]

Keep = Dict[str, List[int]]

# -- what pruning buys: FLOPs and latency ---------------------------------------------------------


def fixed_proposals(model: nn.Module) -> nn.Module:
    """Make a randomly initialised R-CNN send the same proposals to its box head before and
    after pruning, in place: the RPN's objectness and box-delta layers are zeroed (every anchor
    scores alike, so each model picks the same anchors, unmoved) and its NMS is switched off
    (all POST_NMS_TOPK_TEST of them survive). Random backbones otherwise drive the deltas off
    the image (the unpruned R50 keeps a handful of proposals, a pruned one a thousand) and pick
    different anchors, whose sizes set ROIAlign's sampling cost: head FLOPs and time would
    compare nothing. Models without an RPN are returned as they are."""
    rpn = getattr(unwrap(model), "proposal_generator", None)
    if rpn is not None and hasattr(rpn, "rpn_head"):
        with torch.no_grad():
            for layer in (rpn.rpn_head.objectness_logits, rpn.rpn_head.anchor_deltas):
                layer.weight.zero_()
                layer.bias.zero_()
        rpn.nms_thresh = 1.0
    return model


def block_keep(
    model: nn.Module,
    ratio: Optional[float] = None,
    *,
    flops_reduction: Optional[float] = None,
    side: int = 224,
    round_to: int = 1,
) -> Keep:
    """l1 keep sets for the `block` groups (inside each residual block): `ratio` of every
    group's channels removed (local), or, with `flops_reduction`, as many as cut the ResNet's
    FLOPs (`backbone.bottom_up` on a `side` x `side` image) by that share (global order)."""
    groups = find_groups(model)
    scores = criteria.build("l1").score(model, groups)
    if flops_reduction is None:
        return select_channels(groups, scores, Budget("channels", ratio, min_channels=1, round_to=round_to))
    image = dummy_tensor(side)
    return select_for_flops(
        model, groups, scores, Budget("flops", flops_reduction, round_to=round_to),
        measure=lambda m: count_flops(unwrap(m).backbone.bottom_up, image)["total"],
    )


def pruned_copy(model: nn.Module, keep: Mapping[str, Sequence[int]]) -> nn.Module:
    """A deep copy of `model` with `prune(copy, keep)` applied; `model` is untouched."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        prune(pruned, keep)
    return pruned


def surgery_seconds(
    model: nn.Module, ratio: float = 0.5, kinds=("block",), repeats: int = 5, clock: str = "wall"
) -> Dict:
    """Median seconds of `prune` (group discovery included) removing `ratio` of every group of
    `kinds` (l1 scores), each run on a fresh copy of `model`."""
    groups = find_groups(model)
    budget = Budget("channels", ratio, kinds=kinds, min_channels=1)
    keep = select_channels(groups, criteria.build("l1").score(model, groups), budget)
    now = clock_of(clock)
    times = []
    for _ in range(repeats):
        victim = copy.deepcopy(model)
        start = now()
        with torch.no_grad():
            prune(victim, keep)
        times.append(now() - start)
    return {"median_s": statistics.median(times), "groups_pruned": len(keep), "repeats": repeats}


def speedup(
    model: nn.Module,
    side: int,
    levels: Sequence[float] = (0.25, 0.5, 0.75),
    *,
    target: str = "channels",
    round_to: int = 1,
    detector: bool = True,
    repeats: int = 5,
    rounds: int = 3,
    clock: str = "wall",
) -> List[Dict]:
    """Prune `block` groups (l1) at each level and measure what it buys on one `side` px image:
    FLOPs, parameters and CPU latency of the ResNet (`backbone.bottom_up`, where block groups
    live) and, with `detector`, of the whole detector.

    `target="channels"`: each level is the share of every block group's channels removed;
    `target="flops"`: the share of the ResNet's FLOPs to remove (see `block_keep`). Returns one
    row per level (the unpruned model first, level 0) with `<part>_flops`, `<part>_params`,
    `<part>_latency_ms` and `<part>_latency_min_ms` (see `interleaved_latency`, on `clock`, see
    `CLOCKS`), and for pruned rows `<part>_flops_cut`, `<part>_latency_cut` and
    `<part>_latency_over_flops` (1.0: the FLOPs cut turned fully into time), each latency
    figure also from the minima (`<part>_latency_cut_min`, `<part>_latency_over_flops_min`).
    """
    if target not in ("channels", "flops"):
        raise UserError(f"benchmark: target must be 'channels' or 'flops', got {target!r}.")
    image, batch = dummy_tensor(side), dummy_inputs(side)
    models = [model]
    for level in levels:
        option = {"ratio": level} if target == "channels" else {"flops_reduction": level, "side": side}
        models.append(pruned_copy(model, block_keep(model, round_to=round_to, **option)))
    parts = {"backbone": (lambda m: unwrap(m).backbone.bottom_up, image)}
    if detector:
        parts["detector"] = (unwrap, batch)
    rows = [{"level": level} for level in (0.0, *levels)]
    for part, (get, inputs) in parts.items():
        latencies = interleaved_latency(
            [get(m) for m in models], inputs, warmup=1, repeats=repeats, rounds=rounds, clock_name=clock
        )
        for row, m, latency in zip(rows, models, latencies):
            row[f"{part}_flops"] = count_flops(get(m), inputs)["total"]
            row[f"{part}_params"] = count_params(get(m))
            row[f"{part}_latency_ms"] = latency["median_ms"]
            row[f"{part}_latency_min_ms"] = latency["min_ms"]
        base = rows[0]
        for row in rows[1:]:
            flops_cut = 1 - row[f"{part}_flops"] / base[f"{part}_flops"]
            row[f"{part}_flops_cut"] = flops_cut
            for suffix in ("", "_min"):
                latency_cut = 1 - row[f"{part}_latency{suffix}_ms"] / base[f"{part}_latency{suffix}_ms"]
                row[f"{part}_latency_cut{suffix}"] = latency_cut
                row[f"{part}_latency_over_flops{suffix}"] = latency_cut / flops_cut if flops_cut else float("nan")
    return rows


# -- what pruning costs: scoring time and memory --------------------------------------------------


def random_batches(n: int, batch_size: int, size: int, num_classes: int, seed: int = 0) -> List[List[dict]]:
    """`n` detectron2 training batches of random `size` px images with three random boxes each:
    timings and memory, not scores, are what these are for."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        batch = []
        for _ in range(batch_size):
            xy = torch.rand(3, 2, generator=generator) * 0.6 * size
            wh = (torch.rand(3, 2, generator=generator) * 0.25 + 0.15) * size
            instances = Instances((size, size))
            instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
            instances.gt_classes = torch.randint(num_classes, (3,), generator=generator)
            image = torch.rand(3, size, size, generator=generator) * 255
            batch.append({"image": image, "height": size, "width": size, "instances": instances})
        batches.append(batch)
    return batches


def parse_criterion(text: str) -> Tuple[str, Dict]:
    """'chip:images=8,positions=128' -> ('chip', {'images': 8, 'positions': 128})."""
    name, _, options = text.partition(":")
    pairs = (item.split("=", 1) for item in options.split(",") if item)
    return name, {key: int(value) if value.isdigit() else value for key, value in pairs}


def _seconds_per_batch(fn: Callable, batches: List, clock: str) -> float:
    now = clock_of(clock)
    fn(batches[:1])  # warm-up: allocator, kernels, lazy initialisation
    synchronize()
    start = now()
    fn(batches)
    synchronize()
    return (now() - start) / len(batches)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: List) -> None:
    """Training iterations as the trainer runs them: forward with losses, backward, step."""
    model.train()
    with EventStorage():
        for batch in batches:
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def _warmup_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The config's optimizer at the learning rate of the first warm-up iteration: iterations
    cost the same at any rate, and random weights on random boxes diverge at the full one."""
    optimizer = build_optimizer(cfg, model)
    for group in optimizer.param_groups:
        group["lr"] *= cfg.SOLVER.WARMUP_FACTOR
    return optimizer


def training_seconds(cfg, model: nn.Module, batches: List, clock: str = "wall") -> float:
    """Seconds per training iteration (forward, backward, optimizer step) on `batches`.

    Trains a deep copy, so `model` keeps its weights for what is measured after it."""
    model = copy.deepcopy(model)
    optimizer = _warmup_optimizer(cfg, model)
    return _seconds_per_batch(functools.partial(_train, model, optimizer), batches, clock)


def scoring_seconds(
    model: nn.Module, criterion: criteria.Criterion, batches: List, clock: str = "wall"
) -> Dict[str, float]:
    """What a criterion costs: `collect_s`, seconds per batch of statistics gathered through
    the detector (0 for weight-only criteria), and `score_s`, seconds to turn the statistics
    (or the weights) into scores once, which some criteria (chip) spend most of their time on."""
    now = clock_of(clock)
    groups = find_groups(model)
    stats, collect = None, 0.0
    if criterion.data != "none":
        collect_statistics(model, groups, criterion, batches[:1])  # warm-up
        synchronize()
        start = now()
        stats = collect_statistics(model, groups, criterion, batches)
        synchronize()
        collect = (now() - start) / len(batches)
    else:
        criterion.score(model, groups)  # warm-up
    start = now()
    criterion.score(model, groups, stats)
    synchronize()
    return {"collect_s": collect, "score_s": now() - start}


def scoring_overhead(
    cfg,
    model: nn.Module,
    names: Sequence[str],
    batches: List,
    event_batches: int = 8,
    clock: str = "wall",
) -> Dict:
    """Seconds of one training iteration, and what each criterion `names` gives (`name` or
    `name:key=value,...`, see `parse_criterion`) costs, alone and for one pruning event.

    Returns `iteration_s` and one row per criterion: `criterion`, `data`, `collect_s` and
    `score_s` (see `scoring_seconds`), `event_s` = `event_batches` x `collect_s` + `score_s`
    (a pruning event's scoring on PRUNE.SCORE_BATCHES batches) and `iterations`, `event_s` in
    training iterations. A criterion that fails to build or score gets its `error` instead, so
    that one broken entry of the registry does not hide the others.
    """
    iteration = training_seconds(cfg, model, batches, clock)
    rows = []
    for text in names:
        name, options = parse_criterion(text)
        row = {"criterion": text}
        try:
            criterion = criteria.build(name, **options)
            row["data"] = criterion.data
            row.update(scoring_seconds(model, criterion, batches, clock))
        except Exception as e:  # reported in the table; the other criteria still run
            row["error"] = _error_text(e)
        else:
            row["event_s"] = event_batches * row["collect_s"] + row["score_s"]
            row["iterations"] = row["event_s"] / iteration
        rows.append(row)
    return {"iteration_s": iteration, "event_batches": event_batches, "criteria": rows}


def machine_description() -> str:
    """CPU model, cores, torch threads and versions: the context every timing needs."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch threads: {torch.get_num_threads()}; "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, detectron2 {detectron2.__version__}"
    )


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _release_freed_memory() -> None:
    """Hand memory that the C allocator keeps after `free` back to the system (glibc only), so
    that a measurement starts from what is actually in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# glibc's mallopt parameter number for the mmap threshold (malloc.h).
_M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(size: int = 64 * 1024) -> bool:
    """Serve every allocation of `size` bytes or more with its own mmap, for the rest of the
    process (glibc only; returns whether it was set).

    glibc raises its mmap threshold each time a large mmapped block is freed, after which large
    blocks come from the heap, whose pages depend on what earlier work freed: a peak measured by
    `peak_rss` then depends on the process's history, either way. In the test suite's process a
    pruning event measured 78.5 MiB although it holds an 86.9 MiB copy of the model (lower:
    freed pages reused, we think); in tools/benchmark.py, after its scoring section, the same
    kind of event measured 87 MiB (l1) and 221 MiB (taylor) with the default allocator against
    74 and 141 MiB with a fixed threshold (higher: heap slack), the fixed figures the same in
    two runs. With a fixed threshold, tensors are mapped when
    allocated and unmapped when freed, so RSS follows what is in use. Call it once, first thing,
    in a process that measures memory.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, size))
    except (OSError, AttributeError):
        return False


def peak_rss(fn: Callable[[], object]) -> Tuple[object, Dict]:
    """Run `fn()` and measure the peak resident set size (RSS) of this process during it.

    On Linux the kernel's high-water mark (`VmHWM` in /proc/self/status) is reset just before
    (`echo 5 > /proc/self/clear_refs`), so the peak is that of `fn` alone. Elsewhere it falls
    back to `resource.getrusage().ru_maxrss`, the peak since the process started, which only
    shows `fn`'s peak when it is the highest so far. Returns fn's result and a dict with the
    RSS before, the peak, the peak above the RSS before (`extra_mib`) and the `method`.
    (tracemalloc would miss tensors: it sees Python's allocator, not torch's.) Peaks are only
    trustworthy in a process that called `fix_mmap_threshold` before allocating.
    """
    _release_freed_memory()
    try:
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        result = fn()
        peak, method = _status_kib("VmHWM"), "VmHWM after clear_refs"
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = fn()
        # ru_maxrss is in KiB on Linux and in bytes on macOS.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
        method = "ru_maxrss (peak since start)"
    return result, {
        "before_mib": before / 1024,
        "peak_mib": peak / 1024,
        "extra_mib": (peak - before) / 1024,
        "method": method,
    }


def pruning_event_memory(
    cfg, model: nn.Module, criterion: criteria.Criterion, batches: List, ratio: float = 0.5
) -> Dict:
    """Peak memory of one pruning event as `PruningHook` runs it, beside one training iteration.

    On a deep copy of `model`: one training iteration gives the optimizer its momentum (and is
    measured); then the event: statistics on `batches` for a data-driven criterion, scores,
    the budget (cfg.PRUNE with `ratio`), and the hook's own surgery (`cut`: the optimizer state
    sliced to the kept channels, `prune`, a new optimizer holding that state). Returns `peak_rss` figures for both
    (`train`, `event`), the channel groups cut and the model's parameter size in MiB.
    """
    model = copy.deepcopy(model)
    optimizer = _warmup_optimizer(cfg, model)
    _train(model, optimizer, batches[:1])  # momentum buffers exist from the first step on
    _, train = peak_rss(lambda: _train(model, optimizer, batches[:1]))

    def event():
        keep = choose_keep(cfg, model, criterion, iter(batches), amount=ratio)
        cut(model, optimizer, keep, lambda m: build_optimizer(cfg, m))
        return keep

    keep, memory = peak_rss(event)
    params_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"train": train, "event": memory, "groups_pruned": len(keep), "params_mib_after": params_mib}


# -- peers: Torch-Pruning ------------------------------------------------------------------------


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise UserError(
            "the peer comparison needs Torch-Pruning: pip install torch-pruning "
            "(it is in d2prune's `test` extra)."
        ) from None
    return torch_pruning


def _block_producers(model: nn.Module) -> Dict[str, str]:
    """Producer module name -> block group name (a block group has exactly one producer)."""
    return {g.producers[0]: g.name for g in find_groups(model) if g.kind == "block"}


def _slice_norm_like_conv(norm: nn.Module, removed: Sequence[int]) -> None:
    """The part Torch-Pruning leaves out: slice the norm a detectron2 `Conv2d` applies to its
    own output (`FrozenBatchNorm2d` or `BatchNorm2d`) after the conv lost `removed` channels."""
    if not isinstance(norm, (FrozenBatchNorm2d, _BatchNorm)):
        raise UserError(f"benchmark: no norm slicing for {type(norm).__name__} beside Torch-Pruning.")
    kept = torch.tensor(sorted(set(range(norm.num_features)) - set(map(int, removed))))
    for name in ("weight", "bias", "running_mean", "running_var"):
        old = getattr(norm, name)
        new = old.detach().index_select(0, kept.to(old.device))
        setattr(norm, name, nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new)
    norm.num_features = len(kept)


def _train_mode_losses(model: nn.Module, batch: List[dict]) -> torch.Tensor:
    """The detector's summed training losses, BatchNorm statistics untouched: what Torch-Pruning
    traces the whole detector through (its eval-mode output holds no tensors it can follow)."""
    model.train()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
    with EventStorage():
        return sum(model(batch).values())


def torch_pruning_blocks(
    model: nn.Module,
    ratio: float,
    example,
    *,
    reduction: str = "first",
    detector: bool = False,
    clock: str = "wall",
) -> Tuple[nn.Module, Keep, Dict]:
    """Torch-Pruning's `MetaPruner` on a deep copy of `model`, pruning `ratio` of every block
    group locally with `GroupMagnitudeImportance(p=1, group_reduction=reduction)`.

    `reduction="first"` (normalizer None) scores a channel by the L1 norm of the group's first
    layer's filter, the producing conv: Li et al.'s l1, as d2prune scores it; `"mean"` (TP's
    default normaliser "mean") averages that with the L1 norm of the consumer's input slice.
    Every other conv and linear layer is in `ignored_layers`, so only block groups are cut.

    With `detector=False` the ResNet (`backbone.bottom_up`) is traced on the image tensor
    `example`, else the whole detector on the training batch `example` through its losses.
    Two workarounds make it run on Detectron2 (see `torch_pruning_limits`): the traced input
    requires grad, so frozen layers are in the graph, and each detectron2 `Conv2d`'s own norm
    is sliced after Torch-Pruning cut the conv.

    Returns the pruned copy, keep sets by d2prune group name, and seconds (`trace`: building
    the dependency graph; `prune`: importance, selection and surgery).
    """
    tp = _torch_pruning()
    model = copy.deepcopy(model)
    producers = _block_producers(model)
    root = unwrap(model).backbone.bottom_up if not detector else unwrap(model)
    prefix = "backbone.bottom_up." if not detector else ""
    names = {m: prefix + n for n, m in root.named_modules()}
    ignored = [
        m for m, name in names.items()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name not in producers
    ]  # fmt: skip
    if detector:
        example = [{**x, "image": x["image"].clone().requires_grad_()} for x in example]
        forward = {"forward_fn": _train_mode_losses}
    else:
        example = example.clone().requires_grad_()
        forward = {}
    importance = tp.importance.GroupMagnitudeImportance(
        p=1, group_reduction=reduction, normalizer=None if reduction == "first" else "mean"
    )
    now = clock_of(clock)
    start = now()
    pruner = tp.pruner.MetaPruner(
        root, example, importance=importance, pruning_ratio=ratio, ignored_layers=ignored, **forward
    )
    traced = now()
    keep = {}
    for group in pruner.step(interactive=True):
        producer = group[0].dep.target.module
        removed = [int(i) for i in group[0].idxs]
        keep[producers[names[producer]]] = sorted(set(range(producer.out_channels)) - set(removed))
        group.prune()
        for dep, idxs in group:
            norm = getattr(dep.target.module, "norm", None)
            if norm is not None and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                _slice_norm_like_conv(norm, idxs)
    done = now()
    root.eval()
    return model, keep, {"trace_s": traced - start, "prune_s": done - traced}


def _max_difference(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def compare_with_torch_pruning(
    model: nn.Module,
    ratio: float,
    side: int,
    *,
    detector: bool = False,
    reductions: Sequence[str] = ("first", "mean"),
    clock: str = "wall",
) -> Dict:
    """d2prune and Torch-Pruning removing `ratio` of every block group by L1 filter norm.

    d2prune: `find_groups`, `l1` scores, `select_channels` (local) and `prune`, timed together.
    Torch-Pruning: `torch_pruning_blocks` with each of `reductions`: "first" is the same
    criterion, "mean" Torch-Pruning's default reduction. Returns per-tool seconds, params and FLOPs after (of the
    ResNet, or of the whole detector with `detector`), the number of block groups whose keep
    sets agree, and the largest difference between the two pruned models' backbone features.
    """
    image = dummy_tensor(side)
    if detector:
        num_classes = _num_classes(unwrap(model))
        example = random_batches(1, 1, side, num_classes)[0]
        part, flops_inputs = unwrap, dummy_inputs(side)
    else:
        example, part, flops_inputs = image, lambda m: unwrap(m).backbone.bottom_up, image

    now = clock_of(clock)
    victim = copy.deepcopy(model)
    start = now()
    groups = find_groups(victim)
    keep = select_channels(
        groups, criteria.build("l1").score(victim, groups), Budget("channels", ratio, min_channels=1)
    )
    with torch.no_grad():
        prune(victim, keep)
    d2prune_s = now() - start

    result = {
        "ratio": ratio,
        "part": "detector" if detector else "backbone.bottom_up",
        "groups": len(keep),
        "params_before": count_params(part(model)),
        "flops_before": count_flops(part(model), flops_inputs)["total"],
        "d2prune": {
            "seconds": d2prune_s,
            "params": count_params(part(victim)),
            "flops": count_flops(part(victim), flops_inputs)["total"],
        },
    }
    with torch.no_grad():
        reference = unwrap(victim).backbone(image)
    for reduction in reductions:
        pruned, tp_keep, seconds = torch_pruning_blocks(
            model, ratio, example, reduction=reduction, detector=detector, clock=clock
        )
        with torch.no_grad():
            features = unwrap(pruned).backbone(image)
        same = [name for name in keep if tp_keep.get(name) == keep[name]]
        result[f"torch_pruning_{reduction}"] = {
            "seconds": seconds["trace_s"] + seconds["prune_s"],
            **seconds,
            "params": count_params(part(pruned)),
            "flops": count_flops(part(pruned), flops_inputs)["total"],
            "groups": len(tp_keep),
            "same_keep": len(same),
            "kept_overlap": _overlap(keep, tp_keep),
            "max_feature_difference": _max_difference(reference, features) if len(same) == len(keep) else None,
        }
    return result


def _overlap(a: Keep, b: Keep) -> float:
    """Share of the channels kept by `a` that `b` keeps too, over all groups of `a`."""
    kept = sum(len(v) for v in a.values())
    return sum(len(set(v) & set(b.get(k, ()))) for k, v in a.items()) / kept


def _num_classes(model: nn.Module) -> int:
    roi_heads = getattr(model, "roi_heads", None)
    return roi_heads.num_classes if roi_heads is not None else model.num_classes


# -- peers: torch.nn.utils.prune (masks) ---------------------------------------------------------


def masked_copy(model: nn.Module, keep: Mapping[str, Sequence[int]]) -> Tuple[nn.Module, Keep]:
    """A deep copy of `model` in which `torch.nn.utils.prune` masks the channels that `keep`
    removes from block groups, instead of removing them.

    `ln_structured(n=1, dim=0)` picks, in each group's producer, the filters with the smallest
    L1 norm (the same count `keep` removes); then `custom_from_mask` applies the channel mask it
    chose to the consumers' input weights and to norm parameters (BatchNorm weight and bias;
    FrozenBatchNorm2d holds buffers, which it cannot mask). All producers are ranked before
    any consumer is masked: `ln_structured` ranks a layer's weights as currently masked, and
    d2prune's l1 scores every group on the unpruned model. Returns the copy and the channels
    the masks keep, by group name, to check they are those of `keep`.
    """
    masked = copy.deepcopy(model)
    modules = dict(unwrap(masked).named_modules())
    groups = {g.name: g for g in find_groups(masked)}
    channel_masks = {}
    for name, indices in keep.items():
        group = groups[name]
        if group.kind != "block":
            raise UserError(f"benchmark: masking covers block groups only, not '{name}' ({group.kind}).")
        producer = modules[group.producers[0]]
        torch_prune.ln_structured(producer, "weight", amount=group.size - len(indices), n=1, dim=0)
        channel_masks[name] = producer.weight_mask.flatten(1)[:, 0].clone()
    for name, channel_mask in channel_masks.items():
        group = groups[name]
        norm = getattr(modules[group.producers[0]], "norm", None)
        if isinstance(norm, _BatchNorm) and norm.affine:
            for param in ("weight", "bias"):
                torch_prune.custom_from_mask(norm, param, channel_mask)
        for consumer in group.consumers:
            weight = modules[consumer].weight
            mask = channel_mask.view(1, -1, *([1] * (weight.dim() - 2))).expand_as(weight)
            torch_prune.custom_from_mask(modules[consumer], "weight", mask)
    chosen = {name: mask.nonzero().flatten().tolist() for name, mask in channel_masks.items()}
    return masked, chosen


def masked_share(module: nn.Module) -> float:
    """Share of `module`'s parameters that `torch.nn.utils.prune` masks hold at zero."""
    zeros = sum(int((buffer == 0).sum()) for name, buffer in module.named_buffers() if name.endswith("_mask"))
    total = sum(p.numel() for p in module.parameters())
    return zeros / total


def masking_comparison(
    model: nn.Module, ratio: float, side: int, repeats: int = 5, rounds: int = 3, clock: str = "wall"
) -> Dict:
    """The same block channels (l1, `ratio` of every block group) masked with
    `torch.nn.utils.prune` and removed with d2prune, on the ResNet (`backbone.bottom_up`).

    Returns, for the dense, masked and d2prune models: parameters (stored; for the masked one
    also the share held at zero by masks), fvcore FLOPs and the median and minimum latency on
    one `side` px image (`interleaved_latency`); whether the masks chose d2prune's channels, and the largest difference
    between the masked and the pruned ResNet's outputs (the masks zero the consumers' inputs,
    so the two compute the same function).
    """
    keep = block_keep(model, ratio)
    pruned = pruned_copy(model, keep)
    masked, chosen = masked_copy(model, keep)
    image = dummy_tensor(side)
    resnets = [unwrap(m).backbone.bottom_up for m in (model, masked, pruned)]
    latencies = interleaved_latency(resnets, image, warmup=1, repeats=repeats, rounds=rounds, clock_name=clock)
    with torch.no_grad():
        difference = _max_difference(resnets[1].eval()(image), resnets[2].eval()(image))
    dense_params = count_params(resnets[0])
    rows = {}
    for label, resnet, latency in zip(("dense", "masked", "d2prune"), resnets, latencies):
        rows[label] = {
            "params": count_params(resnet),  # a masked layer's parameter is its dense `_orig`
            "flops": count_flops(resnet, image)["total"],
            "latency_ms": latency["median_ms"],
            "latency_min_ms": latency["min_ms"],
        }
    rows["masked"]["zero_share"] = masked_share(resnets[1])
    rows["d2prune"]["removed_share"] = 1 - rows["d2prune"]["params"] / dense_params
    return {
        "ratio": ratio,
        "side": side,
        **rows,
        "same_channels": chosen == {k: list(v) for k, v in keep.items()},
        "max_output_difference": difference,
    }


# -- peers: what Torch-Pruning does with a Detectron2 detector as it is ----------------------------


def _error_text(error: Exception, limit: int = 220) -> str:
    """`Type: message` on one line, the middle of a long message (module reprs) elided."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else f"{text[: limit // 2]} ... {text[-limit // 2:]}"


def torch_pruning_limits(model: nn.Module, side: int = 128) -> List[Dict]:
    """Try Torch-Pruning on the detector the way its documentation suggests, step by step, and
    record what happens: `{"attempt", "outcome", "works"}` per step, with the exact error;
    `works` is "yes", "no" or "partly" (it runs, but something it should have done is not).

    Each step runs on a fresh deep copy of `model` (a Detectron2 ResNet-FPN detector);
    `torch_pruning_blocks` holds the workarounds that make block pruning work.
    """
    tp = _torch_pruning()
    image = dummy_tensor(side)
    findings = []

    def attempt(label: str, fn: Callable[[List[str]], Optional[str]]) -> None:
        """Run `fn(notes)`: what it notes, then the error it raises, if any, is the outcome;
        it returns its verdict ("yes" when it returns nothing)."""
        notes: List[str] = []
        try:
            works = fn(notes) or "yes"
        except Exception as e:  # the point is to record whatever Torch-Pruning raises
            notes.append(_error_text(e))
            works = "no"
        findings.append({"attempt": label, "outcome": "; ".join(notes), "works": works})

    def resnet():
        detector = copy.deepcopy(unwrap(model))
        return detector, detector.backbone.bottom_up

    def half(conv: nn.Module) -> List[int]:
        return list(range(0, conv.out_channels, 2))

    def frozen(notes):
        _, r = resnet()
        graph = tp.DependencyGraph().build_dependency(r, example_inputs=image)
        convs = [(n, m) for n, m in r.named_modules() if isinstance(m, nn.Conv2d)]
        frozen = [n for n, m in convs if not m.weight.requires_grad]
        missing = [n for n, m in convs if m not in graph.module2node]
        if missing:
            notes.append(
                f"{len(missing)} of {len(convs)} convs are not in the graph ({missing[0]} ... "
                f"{missing[-1]}), {sum(n in frozen for n in missing)} of them frozen "
                f"(of {len(frozen)} frozen convs)"
            )
        if missing:
            notes.append(f"asking for the group of {missing[0]}")
            graph.get_pruning_group(dict(convs)[missing[0]], tp.prune_conv_out_channels, idxs=[0])

    attempt(
        "DependencyGraph on the ResNet (`backbone.bottom_up`), traced on an image that does not "
        "require grad, as in Torch-Pruning's examples",
        frozen,
    )

    def own_pruners(notes):
        _, r = resnet()
        graph = tp.DependencyGraph().build_dependency(r, example_inputs=image.clone().requires_grad_())
        conv = r.res3[0].conv1
        graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=half(conv)).prune()
        notes.append(f"conv1 has {conv.out_channels} filters, its norm {conv.norm.num_features} channels")
        with torch.no_grad():
            r(image)
        notes.append("the ResNet runs")

    attempt(
        "Prune half of `res3.0.conv1`'s output channels (a block group) with Torch-Pruning's own "
        "pruners, then run the ResNet",
        own_pruners,
    )

    class D2ConvPruner(tp.pruner.function.ConvPruner):
        def prune_out_channels(self, layer, idxs):
            super().prune_out_channels(layer, idxs)
            if layer.norm is not None:
                _slice_norm_like_conv(layer.norm, idxs)
            return layer

    def customised(notes):
        detector, r = resnet()
        producers = {n[len("backbone.bottom_up."):] for n in _block_producers(detector)}
        ignored = [m for n, m in r.named_modules() if isinstance(m, nn.Conv2d) and n not in producers]
        pruner = tp.pruner.MetaPruner(
            r, image.clone().requires_grad_(), pruning_ratio=0.5, ignored_layers=ignored,
            importance=tp.importance.GroupMagnitudeImportance(p=1, group_reduction="first", normalizer=None),
            customized_pruners={Conv2d: D2ConvPruner()},
        )  # fmt: skip
        groups = list(pruner.step(interactive=True))
        notes.append(f"MetaPruner yields {len(groups)} of {len(producers)} block groups to prune")
        return "yes" if len(groups) == len(producers) else "no"

    attempt(
        "Register a customised pruner for detectron2's `Conv2d` (conv and its norm), Torch-Pruning's "
        "route for layers it does not know; MetaPruner, 50 % of every block group, L1",
        customised,
    )

    def detector_eval(forward_fn=None, prune_fpn=False, batch=None):
        def run(notes):
            detector = copy.deepcopy(unwrap(model))
            example = batch or dummy_inputs(side)
            options = {} if forward_fn is None else {"forward_fn": forward_fn}
            graph = tp.DependencyGraph().build_dependency(detector, example_inputs=example, **options)
            names = {m: n for n, m in detector.named_modules()}
            layers = [m for m in names if isinstance(m, (nn.Conv2d, nn.Linear))]
            missing = [names[m] for m in layers if m not in graph.module2node]
            heads = [n for n in missing if not n.startswith("backbone.")]
            notes.append(
                f"{len(missing)} of {len(layers)} conv/linear layers are not in the graph "
                f"(heads among them: {', '.join(heads) or 'none'})"
            )
            if not prune_fpn:
                return "partly" if heads else "yes"
            conv = detector.backbone.output_convs[0]
            group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=half(conv))
            members = sorted({names[d.target.module] for d, _ in group if d.target.module in names})
            notes.append(f"the `fpn_output2` group holds {', '.join(members)}")
            group.prune()
            detector.eval()
            with torch.no_grad():
                features = detector.backbone(image)
                detector(dummy_inputs(side))
            stated = {k: v.channels for k, v in detector.backbone.output_shape().items()}
            notes.append(
                f"the detector runs; `backbone.output_shape()` states {stated} while p2 "
                f"has {features['p2'].shape[1]} channels"
            )
            return "yes" if stated["p2"] == features["p2"].shape[1] else "partly"

        return run

    attempt(
        "DependencyGraph on the whole detector in eval mode, default forward (its output is a "
        "list of dicts of `Instances`)",
        detector_eval(),
    )
    attempt(
        "The same with a forward_fn returning the output's tensors; then halve the FPN output "
        "width (`fpn_output2` group) and run the detector",
        detector_eval(lambda m, x: output_tensors(m(x)), prune_fpn=True),
    )
    attempt(
        "The same with a forward_fn that returns the training losses (batch with boxes)",
        detector_eval(
            _train_mode_losses, prune_fpn=True,
            batch=random_batches(1, 1, side, _num_classes(unwrap(model)))[0],
        ),
    )
    return findings
