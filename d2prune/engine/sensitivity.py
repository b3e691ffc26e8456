"""How much the detector's training loss rises when one channel group alone is cut: the weights
with which PRUNE.COST_WEIGHTING "sensitivity" compares one group's scores with another's.

Criterion scores are normalised within each group, so on their own they say which channels of a
group matter least, not whether the FPN's output channel (read by every head) matters more than
a channel inside one residual block. Mode "cost" then removes whatever saves the most cost per
normalised score, which cuts the most-shared widths first. Measuring, for every eligible group,
the loss with its lowest-scored channels removed (`budget.probe_keeps`) gives each group a
scale in the loss's own units (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017,
sensitivity analysis; HALP's knapsack weighs a loss-based saliency the same way).
"""

import copy
import logging
import time
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from detectron2.utils.events import EventStorage
from torch import nn

from ..errors import UserError
from ..pruning import prune
from ..utils.seeding import mix, seeded

__all__ = ["loss_sensitivity"]

logger = logging.getLogger(__name__)


def _training_loss(model: nn.Module, batches: Sequence[List[dict]], seed: int) -> float:
    """The detector's summed training losses over `batches`, without gradients, in training mode
    throughout: BatchNorm normalises with the batch's statistics, as the fine-tune it is measured
    for does (the statistics collector, which wants activations independent of the batch, keeps
    BN in eval mode instead), so `model` must be a copy, whose running statistics this moves.
    Proposal sampling draws from generators seeded by (`seed`, batch index), so two models
    compared on the same batches see the same draws wherever their proposals agree."""
    total = 0.0
    model.train()
    device = next(model.parameters()).device
    cuda = [device] if device.type == "cuda" else []
    with torch.no_grad():
        for index, batch in enumerate(batches):
            # A throwaway EventStorage: the heads log training metrics that are not the trainer's.
            with seeded(seed, index), torch.random.fork_rng(devices=cuda), EventStorage():
                if cuda:
                    torch.cuda.manual_seed(mix(seed, index))
                losses = model(batch)
            total += float(sum(losses.values()))
    return total / max(1, len(batches))


def loss_sensitivity(
    model: nn.Module,
    probes: Mapping[str, Tuple[int, List[int]]],
    batches: Sequence[List[dict]],
    seed: int = 0,
) -> Dict[str, Tuple[int, float]]:
    """Per probed group (name: (units removed, keep set), from `budget.probe_keeps`): the units
    removed and the rise of the mean training loss over `batches` when only that group is cut to
    its keep set. On several processes the rises are averaged over the ranks (each scores its own
    shard of images), so that every rank selects the same channels."""
    from detectron2.utils import comm

    if not batches:
        raise UserError(
            "PRUNE.COST_WEIGHTING 'sensitivity' measures the training loss: it needs scoring batches "
            "(PRUNE.SCORE_BATCHES > 0)."
        )
    start = time.perf_counter()
    base = _training_loss(copy.deepcopy(model), batches, seed)
    rises: Dict[str, Tuple[int, float]] = {}
    for k, (name, (units, keep)) in enumerate(probes.items(), 1):
        probe = copy.deepcopy(model)
        with torch.no_grad():
            prune(probe, {name: keep})
        rises[name] = (units, _training_loss(probe, batches, seed) - base)
        del probe
        if k == len(probes) or k % max(1, len(probes) // 5) == 0:
            logger.info("loss sensitivity: %d/%d groups probed (%.0f s)", k, len(probes), time.perf_counter() - start)
    if comm.get_world_size() > 1:
        gathered = comm.all_gather(rises)
        rises = {n: (units, sum(r[n][1] for r in gathered) / len(gathered)) for n, (units, _) in rises.items()}
    ranked = sorted(rises.items(), key=lambda item: -item[1][1])
    logger.info(
        "loss sensitivity of %d groups on %d batches in %.1f s (loss %.4f unpruned); largest rises: %s",
        len(rises), len(batches), time.perf_counter() - start, base,
        ", ".join(f"{n} +{r:.4f}" for n, (_, r) in ranked[:5]),
    )  # fmt: skip
    return rises
