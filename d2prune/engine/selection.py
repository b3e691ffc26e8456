"""Choosing the channels to keep: criterion from the config, statistics, scores, budget.

The one selection path of d2prune: one-shot pruning (`tools/prune_net.py`) and every pruning
event during training (`PruningHook`) call `choose_keep`, after `check_budget`.
"""

import copy
import dataclasses
import functools
import logging
import os
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional

import torch
from torch import nn

from .. import criteria
from ..complexity import (
    count_flops,
    dummy_inputs,
    dummy_tensor,
    interleaved_latency,
    measure_latency,
)
from ..config import criterion_options
from ..criteria.collector import collect_statistics
from ..errors import UserError
from ..pruning import find_groups, prune
from ..pruning.budget import Budget, probe_keeps, select, select_channels
from ..pruning.cost import (
    GRID,
    CostModel,
    LatencyModel,
    cache_key,
    cached_tables,
    device_name,
    flops_model,
    latency_model,
    snap_step,
    step_times,
    trace_layers,
)
from ..utils.modules import unwrap
from .sensitivity import loss_sensitivity

__all__ = [
    "build_criterion", "build_latency_model", "check_budget", "choose_keep", "keep_sets", "latency_check",
    "needs_batches", "sample_inputs",
]  # fmt: skip

logger = logging.getLogger(__name__)


def build_criterion(cfg) -> criteria.Criterion:
    """The criterion PRUNE.CRITERION names, built with PRUNE.CRITERION_OPTIONS."""
    return criteria.build(cfg.PRUNE.CRITERION, **criterion_options(cfg))


def sample_inputs(cfg, model):
    """Random inputs at the config's test resolution: a detectron2 batch of one square image,
    and the normalised tensor the backbone alone takes (side padded to FPN's multiple of 32)."""
    side = cfg.INPUT.MIN_SIZE_TEST
    return _dummy_batch(model, side), dummy_tensor(-(-side // 32) * 32).to(next(model.parameters()).device)


def _dummy_batch(model: nn.Module, side: int) -> List[dict]:
    device = next(model.parameters()).device
    return [{**x, "image": x["image"].to(device)} for x in dummy_inputs(side)]


def needs_batches(cfg, criterion: criteria.Criterion) -> bool:
    """Whether choosing channels reads training batches: a data-driven criterion, or a budget
    whose groups are weighed by their measured loss sensitivity (PRUNE.COST_WEIGHTING)."""
    return criterion.data != "none" or Budget.from_config(cfg).weighting == "sensitivity"


def check_budget(cfg, model: nn.Module, original: Optional[Mapping[str, int]] = None) -> None:
    """Fail now, before any training or evaluation, when the PRUNE budget can remove nothing
    from `model` (every eligible group at its MIN_CHANNELS / MAX_RATIO floor, no group of
    PRUNE.KINDS left after EXCLUDE) rather than at the first pruning event.

    Tries the budget's deepest cut on equal scores, whatever its target: the floors, not the
    scores or the amount, decide whether anything can go. `original` is as in `select_channels`
    (the widths before a resumed run's earlier events).
    """
    budget = Budget.from_config(cfg)
    if budget.amount == 0:
        return  # removes nothing by request
    groups = find_groups(unwrap(model))
    equal = {g.name: torch.ones(g.size) for g in groups}
    select_channels(groups, equal, budget.deepest(), original)


def choose_keep(
    cfg,
    model: nn.Module,
    criterion: criteria.Criterion,
    batches: Optional[Iterable[List[dict]]] = None,
    *,
    amount: Optional[float] = None,
    original: Optional[Mapping[str, int]] = None,
    original_flops: Optional[float] = None,
    cost_model: Optional[CostModel] = None,
) -> Dict[str, List[int]]:
    """Keep sets for `prune(model, keep)` under the PRUNE budget (`Budget.from_config`).

    Data-driven criteria first gather statistics on `batches` (detectron2 training batches);
    weight-only ones never touch them. `amount` is the share to have removed once this step is
    done, of the channels or of the FLOPs as the budget's target says (default: the config's).
    It refers to `original` widths and `original_flops`, those of the model before an earlier
    step pruned it (default: the model as it is). A latency target uses `cost_model` (a
    `build_latency_model`), built here when not given.
    """
    budget = Budget.from_config(cfg)
    if amount is not None:
        budget = budget.with_amount(amount)
    if budget.target == "latency" and cost_model is None:
        cost_model = build_latency_model(cfg, model, original)
    check = None
    if cost_model is not None and budget.target == "latency":
        budget = with_device_step(budget, cost_model)
        if cfg.PRUNE.get("LATENCY_CHECK", False):
            check = latency_check(model, cost_model, cfg.INPUT.MIN_SIZE_TEST, _latency_dtype(cfg))
    start = time.perf_counter()
    keep = keep_sets(
        model, criterion, budget, batches, original=original, original_flops=original_flops,
        image_size=cfg.INPUT.MIN_SIZE_TEST, cost_model=cost_model, seed=max(cfg.SEED, 0), check=check,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    logger.info("Scored and selected channels with %s in %.2f s", cfg.PRUNE.CRITERION, seconds)
    return keep


def keep_sets(
    model: nn.Module,
    criterion: criteria.Criterion,
    budget: Budget,
    batches: Optional[Iterable[List[dict]]] = None,
    *,
    original: Optional[Mapping[str, int]] = None,
    original_flops: Optional[float] = None,
    image_size: int = 800,
    cost_model: Optional[CostModel] = None,
    seed: int = 0,
    check: Optional[Callable[[Mapping[str, List[int]]], float]] = None,
) -> Dict[str, List[int]]:
    """`choose_keep` without a config: groups, statistics on `batches` (data-driven criteria
    only), scores, then `budget`. A FLOPs target measures the detector on one square image of
    `image_size` pixels (in mode "cost", layer by layer: `flops_model`); a latency target needs
    `cost_model`. Weighting "sensitivity" measures the training loss on `batches` too, with
    proposal sampling seeded by `seed` (`loss_sensitivity`). With a latency target, `check`
    (`latency_check`) may time the chosen cut: when it runs slower than `cost_model` predicted,
    the channels are chosen once more, toward a target tightened by the difference."""
    model = unwrap(model)
    groups = find_groups(model)
    stats = None
    sensitive = budget.weighting == "sensitivity"  # a Budget allows it in mode "cost" only
    if sensitive:
        if batches is None:
            raise UserError("PRUNE.COST_WEIGHTING 'sensitivity' needs training batches to measure the loss on.")
        batches = list(batches)  # read twice: statistics, then the loss
    if criterion.data != "none":
        if batches is None:
            raise UserError(f"criterion '{criterion.name}' needs training batches to score channels.")
        stats = collect_statistics(model, groups, criterion, batches)
    scores = criterion.score(model, groups, stats)
    sensitivity = None
    if sensitive:
        probes = probe_keeps(groups, scores, budget, original)
        sensitivity = loss_sensitivity(model, probes, batches, seed)
    # Made only if a FLOPs target measures the model.
    inputs = functools.cache(lambda: _dummy_batch(model, image_size))
    if budget.target == "flops" and budget.mode == "cost" and cost_model is None:
        layers = trace_layers(model, groups, inputs(), full=original)
        cost_model = flops_model(layers, {**{g.name: g.size for g in groups}, **(original or {})},
                                 total=count_flops(model, inputs())["total"])  # fmt: skip
    def choose(b: Budget) -> Dict[str, List[int]]:
        return select(
            model, groups, scores, b, measure=lambda m: count_flops(m, inputs())["total"],
            original=original, baseline=original_flops, cost_model=cost_model, sensitivity=sensitivity,
        )  # fmt: skip

    keep = choose(budget)
    if check is None or budget.target != "latency" or not keep:
        return keep
    slower = check(keep)  # measured time over predicted time of the cut, relative to now
    if slower <= 1 + LATENCY_CHECK_TOLERANCE:
        return keep
    tighter = budget.with_amount(min(1 - (1 - budget.amount) / slower, 1 - 1e-6))
    try:
        again = choose(tighter)
    except UserError as e:
        logger.warning("latency check: the cut runs %.1f %% slower than predicted, and a tighter target is "
                       "out of reach (%s); keeping the first choice", 100 * (slower - 1), e)  # fmt: skip
        return keep
    logger.info("latency check: the cut runs %.1f %% slower than the latency model predicted; chose again "
                "toward a latency reduction of %.3f instead of %.3f", 100 * (slower - 1), tighter.amount,
                budget.amount)  # fmt: skip
    return again


# A chosen cut measured this much slower than predicted (relative to the model as it is) is
# chosen again; below it, timing noise.
LATENCY_CHECK_TOLERANCE = 0.02
# A cut predicted to save less than this share of the current time is not timed: on a shared
# CPU one image's time moves by a few per cent, and a small cut measured slower than the model
# as it is would tighten the whole target (measured: cuts predicted at 97 % timed at 102-104 %).
LATENCY_CHECK_MIN_CUT = 0.10


def _latency_dtype(cfg) -> torch.dtype:
    return torch.float16 if cfg.PRUNE.LATENCY_DTYPE == "float16" else torch.float32


def latency_check(model: nn.Module, cost_model: CostModel, image_size: int, dtype: torch.dtype = torch.float32,
                  repeats: int = 5) -> Callable[[Mapping[str, List[int]]], float]:
    """A function of keep sets: how much slower a pruned copy of `model` runs than `cost_model`
    predicts, as (measured time of the copy / measured time of `model`) over (predicted / predicted),
    on one square image of `image_size` px in `dtype`, the two interleaved (NetAdapt's "measure,
    then adjust"); 1.0, untimed, for a cut predicted to save less than `LATENCY_CHECK_MIN_CUT`
    of the current time. The main process measures and every rank gets its figure."""

    def check(keep: Mapping[str, List[int]]) -> float:
        from detectron2.utils import comm

        detector = unwrap(model)
        widths = {g.name: g.size for g in find_groups(detector)}
        predicted = cost_model.predict({**widths, **{n: len(k) for n, k in keep.items()}}) / cost_model.predict(widths)
        if predicted > 1 - LATENCY_CHECK_MIN_CUT:
            return 1.0
        slower = None
        if comm.is_main_process():
            pruned = copy.deepcopy(detector)
            prune(pruned, keep)
            inputs = _dummy_batch(detector, image_size)
            device = next(detector.parameters()).device
            with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
                now, after = interleaved_latency([detector, pruned], inputs, warmup=2, repeats=repeats, rounds=2)
            slower = (after["min_ms"] / now["min_ms"]) / predicted
            logger.info("latency check: the cut measured at %.1f %% of the current time, predicted at %.1f %%",
                        100 * after["min_ms"] / now["min_ms"], 100 * predicted)  # fmt: skip
        if comm.get_world_size() > 1:
            slower = comm.all_gather(slower)[0]
        return slower

    return check


def with_device_step(budget: Budget, cost_model: CostModel) -> Budget:
    """`budget` with its `round_to` raised to the width step the latency model measured as the
    device's fastest (kept widths snap to it), when that is larger."""
    step = int(cost_model.meta.get("step", 1))
    if step > budget.round_to:
        return dataclasses.replace(budget, round_to=step)
    return budget


def latency_cache_dir(cfg) -> str:
    """PRUNE.LATENCY_CACHE, or $D2PRUNE_CACHE/latency, or ~/.cache/d2prune/latency."""
    if cfg.PRUNE.LATENCY_CACHE:
        return cfg.PRUNE.LATENCY_CACHE
    root = os.environ.get("D2PRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "d2prune")
    return os.path.join(root, "latency")


def build_latency_model(cfg, model: nn.Module, original: Optional[Mapping[str, int]] = None, *, repeats: int = 5) -> CostModel:
    """The detector's time as a function of its group widths, on the device it is on, at the
    config's test size (one square image of INPUT.MIN_SIZE_TEST px), in PRUNE.LATENCY_DTYPE.

    Every conv and linear layer is timed alone at 5 x 5 width fractions (`LatencyModel`), the
    widest producer of an eligible group at 32 consecutive widths (the device's width step,
    `snap_step`), and the whole detector as it is and with every eligible group at 1/2 and 1/4
    of its width, to which the model's fixed part and scale are fitted (`latency_model`). The tables go to
    `latency_cache_dir(cfg)` under a key of the layers' shapes, the device, the dtype and
    torch's version, so later runs and resumed ones reuse them. With several processes the
    main one measures and the others take its figures, so every rank selects the same channels.
    """
    from detectron2.utils import comm

    model = unwrap(model)
    groups = find_groups(model)
    full = {**{g.name: g.size for g in groups}, **(original or {})}
    budget = Budget.from_config(cfg)
    eligible = {g.name for g in budget.eligible(groups)}
    device = next(model.parameters()).device
    dtype = _latency_dtype(cfg)
    if dtype == torch.float16 and device.type != "cuda":
        raise UserError("PRUNE.LATENCY_DTYPE float16 times on CUDA only; MODEL.DEVICE is cpu.")
    began = time.perf_counter()
    inputs = _dummy_batch(model, cfg.INPUT.MIN_SIZE_TEST)
    layers = trace_layers(model, groups, inputs, full=full)

    def timer(fn) -> float:
        return measure_latency(lambda _: fn(), None, warmup=2, repeats=repeats)["min_ms"]

    def build() -> Dict:
        start = time.perf_counter()

        def progress(k, n):
            if k == n or k % max(1, n // 5) == 0:
                logger.info("latency model: %d/%d layers timed (%.0f s)", k, n, time.perf_counter() - start)

        tables = LatencyModel(timer, device=device, dtype=dtype).tables(layers, progress)
        widest = max(
            (layer for layer in layers if layer.out_group in eligible and layer.type == "conv"),
            key=lambda layer: tables[layer.name]["ms"][-1][-1],
            default=None,
        )
        steps = step_times(widest, timer, device, dtype) if widest is not None else {}
        return {
            "device": device_name(device), "dtype": str(dtype), "tables": tables,
            "step_layer": widest.name if widest is not None else None,
            "step_times": {str(w): t for w, t in steps.items()},
            "seconds": round(time.perf_counter() - start, 1),
        }  # fmt: skip

    path = os.path.join(latency_cache_dir(cfg), cache_key(layers, device, dtype, GRID) + ".json")
    current = {g.name: g.size for g in groups}
    # The calibration: the whole detector now, and with every eligible group at 1/2 and 1/4.
    narrowed = [
        {g.name: list(range(max(1, g.size // d // g.unit) * g.unit)) for g in groups if g.name in eligible}
        for d in (2, 4)
    ]
    payload = None
    if comm.is_main_process():
        payload, reused = cached_tables(path, build)
        copies = [copy.deepcopy(model) for _ in narrowed]
        for narrow, keep in zip(copies, narrowed):
            prune(narrow, keep)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            times = interleaved_latency([model, *copies], inputs, warmup=2, repeats=repeats, rounds=2)
        del copies
        payload = {**payload, "measured_ms": [t["min_ms"] for t in times], "reused": reused}
    if comm.get_world_size() > 1:
        payload = comm.all_gather(payload)[0]
    step = snap_step({int(w): t for w, t in payload["step_times"].items()}) if payload["step_times"] else 1
    at = [current] + [{**current, **{n: len(k) for n, k in keep.items()}} for keep in narrowed]
    measured = list(zip(at, payload["measured_ms"]))
    cost_model = latency_model(layers, full, payload["tables"], measured,
                               meta={"step": step, "path": path, "device": payload["device"]})  # fmt: skip
    logger.info(
        "latency model (%s, %s): %d layers %s; width step %d; %.1f ms fixed + %.2f x the layers' "
        "tables; predicted %.1f ms now (measured %.1f), %.1f ms at 1/2 width (measured %.1f), "
        "%.1f ms at 1/4 (measured %.1f); %.1f ms unpruned; built in %.1f s",
        payload["device"], cfg.PRUNE.LATENCY_DTYPE, len(layers),
        f"from {path}" if payload["reused"] else f"timed in {payload['seconds']} s, saved to {path}",
        step, cost_model.fixed, cost_model.scale, cost_model.predict(measured[0][0]), measured[0][1],
        cost_model.predict(measured[1][0]), measured[1][1], cost_model.predict(measured[2][0]),
        measured[2][1], cost_model.predict(full), time.perf_counter() - began,
    )  # fmt: skip
    return cost_model
