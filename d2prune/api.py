"""d2prune in one call for people with their own training loop: score, select and prune a
Detectron2 model in place, and get its new channel spec back.

    from d2prune.api import prune_model
    spec = prune_model(model, "taylor", budget={"target": "channels", "amount": 0.3}, batches=batches)

It is the selection and surgery of `tools/train_net.py`'s pruning events (`engine.selection`,
`pruning.prune`), without a config or a trainer.
"""

import dataclasses
from typing import Dict, Iterable, List, Mapping, Optional, Union

import torch
from torch import nn

from . import criteria
from .engine.selection import keep_sets
from .errors import UserError
from .pruning import channel_spec, prune
from .pruning.budget import Budget
from .utils.modules import unwrap

__all__ = ["prune_model"]


def prune_model(
    model: nn.Module,
    criterion: Union[str, criteria.Criterion] = "l1",
    *,
    budget: Union[Budget, Mapping],
    batches: Optional[Iterable[List[dict]]] = None,
    original: Optional[Mapping[str, int]] = None,
    original_flops: Optional[float] = None,
    image_size: int = 800,
) -> Dict[str, int]:
    """Prune `model` (a Detectron2 detector, or its DDP wrapper) in place; return its channel
    spec ({group name: width}), which `PrunedCheckpointer` saves and `apply_spec` rebuilds.

    criterion: a name from `d2prune.criteria.available()` ("l1", "fpgm", "taylor", ...) or a
        built `Criterion` (`d2prune.criteria.build(name, **options)`).
    budget: a `Budget`, or its fields as a dict, e.g. {"target": "channels", "amount": 0.5,
        "mode": "global", "kinds": ["block", "fpn"]}; see `d2prune.pruning.budget.Budget`.
    batches: detectron2 training batches (lists of dataset-mapper dicts with `instances`), the
        statistics of data-driven criteria; weight-only criteria never read them.
    original, original_flops: the spec and FLOPs of the model before any pruning, to make
        `budget.amount` relative to the unpruned model on a second call.
    image_size: side of the square image a FLOPs target is measured on.

    Parameters of the pruned layers are new tensors: rebuild the optimizer afterwards, or prune
    with `d2prune.engine.pruning_hook.cut`, which also carries the optimizer's state over.
    """
    if isinstance(criterion, str):
        criterion = criteria.build(criterion)
    if isinstance(budget, Mapping):
        fields = [f.name for f in dataclasses.fields(Budget)]
        unknown = [key for key in budget if key not in fields]
        if unknown:
            raise UserError(f"budget: {unknown[0]!r} is not a Budget field; the fields are {', '.join(fields)}.")
        if "target" not in budget or "amount" not in budget:
            raise UserError("budget: give at least 'target' ('channels' or 'flops') and 'amount' (in [0, 1)).")
        budget = Budget(**budget)
    model = unwrap(model)
    keep = keep_sets(
        model, criterion, budget, batches, original=original, original_flops=original_flops,
        image_size=image_size,
    )  # fmt: skip
    with torch.no_grad():
        prune(model, keep)
    return channel_spec(model)
