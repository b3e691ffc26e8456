"""Choosing the channels to keep: criterion from the config, statistics, scores, budget.

The one selection path of d2prune: one-shot pruning (`tools/prune_net.py`) and every pruning
event during training (`PruningHook`) call `choose_keep`, after `check_budget`.
"""

import functools
import logging
import time
from typing import Dict, Iterable, List, Mapping, Optional

import torch
from torch import nn

from .. import criteria
from ..complexity import count_flops, dummy_inputs, dummy_tensor
from ..config import criterion_options
from ..criteria.collector import collect_statistics
from ..errors import UserError
from ..pruning import find_groups
from ..pruning.budget import Budget, select, select_channels
from ..utils.modules import unwrap

__all__ = ["build_criterion", "check_budget", "choose_keep", "keep_sets", "sample_inputs"]

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
) -> Dict[str, List[int]]:
    """Keep sets for `prune(model, keep)` under the PRUNE budget (`Budget.from_config`).

    Data-driven criteria first gather statistics on `batches` (detectron2 training batches);
    weight-only ones never touch them. `amount` is the share to have removed once this step is
    done, of the channels or of the FLOPs as the budget's target says (default: the config's).
    It refers to `original` widths and `original_flops`, those of the model before an earlier
    step pruned it (default: the model as it is).
    """
    budget = Budget.from_config(cfg)
    if amount is not None:
        budget = budget.with_amount(amount)
    start = time.perf_counter()
    keep = keep_sets(
        model, criterion, budget, batches, original=original, original_flops=original_flops,
        image_size=cfg.INPUT.MIN_SIZE_TEST,
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
) -> Dict[str, List[int]]:
    """`choose_keep` without a config: groups, statistics on `batches` (data-driven criteria
    only), scores, then `budget`. A FLOPs target measures the detector on one square image of
    `image_size` pixels."""
    model = unwrap(model)
    groups = find_groups(model)
    stats = None
    if criterion.data != "none":
        if batches is None:
            raise UserError(f"criterion '{criterion.name}' needs training batches to score channels.")
        stats = collect_statistics(model, groups, criterion, batches)
    scores = criterion.score(model, groups, stats)
    # Made only if a FLOPs target measures the model.
    inputs = functools.cache(lambda: _dummy_batch(model, image_size))
    return select(
        model, groups, scores, budget, measure=lambda m: count_flops(m, inputs())["total"],
        original=original, baseline=original_flops,
    )  # fmt: skip
