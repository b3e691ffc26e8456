"""In-place removal of channels from a Detectron2 detector, group by group.

The one surgery path of d2prune: pruning mid-training, one-shot pruning and rebuilding a pruned
architecture from a checkpoint's channel spec all end in `prune`.
"""

import operator
from typing import Dict, List, Mapping, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..utils.modules import unwrap
from .groups import ChannelGroup, find_groups
from .rules import rule_for
from .rules.layers import slice_inputs, slice_norm, slice_outputs

__all__ = ["prune"]


def prune(model: nn.Module, keep: Mapping[str, Sequence[int]]) -> None:
    """Keep only the listed channels of each named group of `model`, in place.

    `keep` maps group names (from `find_groups`) to sorted, unique channel indices; groups not
    named are untouched. Every tensor that writes or reads a group is sliced, and the widths
    detectron2 caches (block channels, `output_shape()`, box head output size) follow, each set
    by its module's rule. New parameters keep their `requires_grad`, device and dtype;
    optimizers holding the old ones must be rebuilt by the caller.
    """
    model = unwrap(model)
    groups = {g.name: g for g in find_groups(model)}
    # Validate everything first so that a bad request leaves the model untouched.
    plan = {name: _checked_keep(groups, name, indices) for name, indices in keep.items()}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, indices in plan.items():
            group = groups[name]
            if len(indices) == group.size:
                continue
            for producer in group.producers:
                slice_outputs(modules[producer], indices)
            for norm in group.norms:
                slice_norm(modules[norm], indices)
            for consumer in group.consumers:
                slice_inputs(modules[consumer], indices, group.size)
    # Reversed pre-order visits blocks before the ResNet that reads their widths.
    for module in reversed(list(model.modules())):
        rule = rule_for(module)
        if rule is not None:
            rule.sync(module)


def _checked_keep(groups: Dict[str, ChannelGroup], name: str, indices: Sequence[int]) -> List[int]:
    group = groups.get(name)
    if group is None:
        raise UserError(f"prune: the model has no channel group '{name}' (see find_groups).")
    try:
        kept = [operator.index(i) for i in indices]
    except TypeError:
        raise UserError(f"prune: channels to keep in '{name}' must be integers.") from None
    if not kept:
        raise UserError(f"prune: keeping no channel of '{name}' would cut the network.")
    if any(a >= b for a, b in zip(kept, kept[1:])):
        raise UserError(f"prune: channels to keep in '{name}' must be sorted and unique.")
    if kept[0] < 0 or kept[-1] >= group.size:
        raise UserError(
            f"prune: channel {kept[0] if kept[0] < 0 else kept[-1]} is out of range for "
            f"'{name}', which has {group.size} channels."
        )
    if group.unit > 1:
        # GroupNorm statistics and grouped convs span `unit` consecutive channels: only whole
        # units can go without changing what the remaining channels compute.
        per_unit = [0] * (group.size // group.unit)
        for i in kept:
            per_unit[i // group.unit] += 1
        if any(n not in (0, group.unit) for n in per_unit):
            raise UserError(
                f"prune: '{name}' is normalised or convolved in groups of {group.unit} channels; "
                f"keep whole groups (channels {group.unit}*k to {group.unit}*k+{group.unit - 1})."
            )
    return kept
