"""Choosing the channels to keep: criterion from the config, statistics, scores, budget.

The one selection path of d2prune: one-shot pruning (`tools/prune_net.py`) and every pruning
event during training (`PruningHook`) call `choose_keep`.
"""

import logging
import time
from typing import Dict, Iterable, List, Mapping, Optional

from torch import nn

from .. import criteria
from ..complexity import count_flops, dummy_inputs, dummy_tensor
from ..config import criterion_options
from ..criteria.collector import collect_statistics
from ..errors import UserError
from ..pruning import find_groups
from ..pruning.budget import select_channels, select_for_flops
from ..utils.modules import unwrap

__all__ = ["build_criterion", "choose_keep", "sample_inputs"]

logger = logging.getLogger(__name__)


def build_criterion(cfg) -> criteria.Criterion:
    """The criterion PRUNE.CRITERION names, built with PRUNE.CRITERION_OPTIONS."""
    return criteria.build(cfg.PRUNE.CRITERION, **criterion_options(cfg))


def sample_inputs(cfg, model):
    """Random inputs at the config's test resolution: a detectron2 batch of one square image,
    and the normalised tensor the backbone alone takes (side padded to FPN's multiple of 32)."""
    side = cfg.INPUT.MIN_SIZE_TEST
    device = next(model.parameters()).device
    batch = [{**x, "image": x["image"].to(device)} for x in dummy_inputs(side)]
    return batch, dummy_tensor(-(-side // 32) * 32).to(device)


def choose_keep(
    cfg,
    model: nn.Module,
    criterion: criteria.Criterion,
    batches: Optional[Iterable[List[dict]]] = None,
    *,
    target: Optional[float] = None,
    original: Optional[Mapping[str, int]] = None,
    original_flops: Optional[float] = None,
) -> Dict[str, List[int]]:
    """Keep sets for `prune(model, keep)` under the PRUNE budget.

    Data-driven criteria first gather statistics on `batches` (detectron2 training batches);
    weight-only ones never touch them. `target` is the share to have removed once this step is
    done: of the channels, or of the FLOPs when PRUNE.FLOPS_REDUCTION is set (default: the
    config's RATIO or FLOPS_REDUCTION). It refers to `original` widths and `original_flops`,
    those of the model before an earlier step pruned it (default: the model as it is).
    """
    p = cfg.PRUNE
    model = unwrap(model)
    flops_mode = p.FLOPS_REDUCTION > 0
    if target is None:
        target = p.FLOPS_REDUCTION if flops_mode else p.RATIO
    start = time.perf_counter()
    groups = find_groups(model)
    stats = None
    if criterion.data != "none":
        if batches is None:
            raise UserError(f"PRUNE.CRITERION '{p.CRITERION}' needs training batches to score channels.")
        stats = collect_statistics(model, groups, criterion, batches)
    scores = criterion.score(model, groups, stats)
    options = dict(
        kinds=list(p.KINDS), exclude=list(p.EXCLUDE), max_ratio=p.MAX_RATIO,
        min_channels=p.MIN_CHANNELS, round_to=p.ROUND_TO, original=original,
    )
    if flops_mode:
        inputs, _ = sample_inputs(cfg, model)
        keep = select_for_flops(
            model, groups, scores, flops_reduction=target, baseline=original_flops,
            measure=lambda m: count_flops(m, inputs)["total"], **options,
        )
    else:
        keep = select_channels(groups, scores, ratio=target, mode=p.MODE, **options)
    logger.info("Scored and selected channels with %s in %.2f s", p.CRITERION, time.perf_counter() - start)
    return keep
