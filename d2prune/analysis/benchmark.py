"""Benchmarks of the pruning engine: surgery time, and how much of a FLOPs cut turns into
measured latency. Figures, not pass/fail: they are printed and written to docs/.
"""

import copy
import statistics
import time
from typing import Dict

import torch
from torch import nn

from .. import criteria
from ..pruning import find_groups, prune
from ..pruning.budget import select_channels, select_for_flops
from .complexity import count_flops, count_params, dummy_tensor, measure_latency


def surgery_seconds(model: nn.Module, ratio: float = 0.5, kinds=("block",), repeats: int = 5) -> Dict:
    """Median seconds of `prune` (group discovery included) removing `ratio` of every group of
    `kinds` (l1 scores), each run on a fresh copy of `model`."""
    groups = find_groups(model)
    keep = select_channels(groups, criteria.build("l1").score(model, groups), ratio=ratio, kinds=kinds, min_channels=1)
    times = []
    for _ in range(repeats):
        victim = copy.deepcopy(model)
        start = time.perf_counter()
        with torch.no_grad():
            prune(victim, keep)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "groups_pruned": len(keep), "repeats": repeats}


def backbone_speedup(
    model: nn.Module, side: int, flops_reduction: float = 0.5, round_to: int = 1, repeats: int = 10
) -> Dict:
    """Prune `block` groups until the ResNet's FLOPs (`backbone.bottom_up`, the part block
    groups live in) fall by `flops_reduction`, then measure its CPU latency before and after on
    one `side` x `side` image.

    Returns FLOPs, params and median latencies, and `latency_over_flops`: the measured latency
    reduction divided by the FLOPs reduction (1.0 means FLOPs turned fully into time).
    """
    image = dummy_tensor(side)
    groups = find_groups(model)
    scores = criteria.build("l1").score(model, groups)
    keep = select_for_flops(
        model, groups, scores, flops_reduction=flops_reduction, kinds=("block",),
        round_to=round_to, measure=lambda m: count_flops(m.backbone.bottom_up, image)["total"],
    )
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        prune(pruned, keep)
    rows = {}
    for label, m in (("before", model), ("after", pruned)):
        rows[label] = {
            "backbone_flops": count_flops(m.backbone.bottom_up, image)["total"],
            "backbone_params": count_params(m.backbone.bottom_up),
        }
    # Interleave the two models' timing runs so that load on the machine hits both alike.
    latencies = {"before": [], "after": []}
    for _ in range(3):
        for label, m in (("before", model.backbone.bottom_up), ("after", pruned.backbone.bottom_up)):
            latencies[label].append(measure_latency(m, image, warmup=2, repeats=repeats)["median_ms"])
    for label in rows:
        rows[label]["backbone_latency_ms"] = statistics.median(latencies[label])
    flops_cut = 1 - rows["after"]["backbone_flops"] / rows["before"]["backbone_flops"]
    latency_cut = 1 - rows["after"]["backbone_latency_ms"] / rows["before"]["backbone_latency_ms"]
    return {
        **rows,
        "side": side,
        "round_to": round_to,
        "flops_reduction": flops_cut,
        "latency_reduction": latency_cut,
        "latency_over_flops": latency_cut / flops_cut,
    }
