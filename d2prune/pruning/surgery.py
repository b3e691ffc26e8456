"""In-place removal of channels from a Detectron2 detector, group by group.

The one surgery path of d2prune: pruning mid-training, one-shot pruning and rebuilding a pruned
architecture from a checkpoint's channel spec all end in `prune`.
"""

import operator
from typing import Dict, List, Mapping, Sequence

import torch
from detectron2.layers.batch_norm import CycleBatchNormList
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from detectron2.modeling.roi_heads import FastRCNNConvFCHead
from torch import nn

from ..errors import UserError
from ..utils.modules import unwrap
from .groups import ChannelGroup, find_groups

__all__ = ["prune"]


def prune(model: nn.Module, keep: Mapping[str, Sequence[int]]) -> None:
    """Keep only the listed channels of each named group of `model`, in place.

    `keep` maps group names (from `find_groups`) to sorted, unique channel indices; groups not
    named are untouched. Every tensor that writes or reads a group is sliced, and the widths
    detectron2 caches (block channels, `output_shape()`, box head output size) follow. New
    parameters keep their `requires_grad`, device and dtype; optimizers holding the old ones
    must be rebuilt by the caller.
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
                _slice_outputs(modules[producer], indices)
            for norm in group.norms:
                _slice_norm(modules[norm], indices)
            for consumer in group.consumers:
                _slice_inputs(modules[consumer], indices, group.size)
    _sync_widths(model)


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


def _select(module: nn.Module, name: str, dim: int, indices: List[int]) -> None:
    """Replace tensor `module.<name>` by its slice along `dim`, as a parameter if it was one."""
    old = getattr(module, name)
    if old is None:
        return
    new = old.index_select(dim, torch.as_tensor(indices, device=old.device))
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(module, name, new)


def _slice_outputs(module: nn.Module, indices: List[int]) -> None:
    if isinstance(module, nn.Linear):
        _select(module, "weight", 0, indices)
        module.out_features = len(indices)
    else:
        # ConvTranspose2d stores (in, out, kh, kw); Conv2d stores (out, in / groups, kh, kw).
        _select(module, "weight", 1 if isinstance(module, nn.ConvTranspose2d) else 0, indices)
        module.out_channels = len(indices)
    _select(module, "bias", 0, indices)
    norm = getattr(module, "norm", None)  # detectron2's Conv2d normalises its own output
    if norm is not None:
        _slice_norm(norm, indices)


def _slice_inputs(module: nn.Module, indices: List[int], size: int) -> None:
    if isinstance(module, nn.Linear):
        # A linear layer after a flatten reads each channel as `factor` consecutive inputs.
        factor = module.in_features // size
        weight = module.weight.view(module.out_features, size, factor)
        index = torch.as_tensor(indices, device=weight.device)
        weight = weight.index_select(1, index).reshape(module.out_features, -1)
        module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
        module.in_features = len(indices) * factor
        return
    if isinstance(module, nn.ConvTranspose2d):
        _select(module, "weight", 0, indices)
    elif module.groups > 1:
        # Its own output rows are already sliced by whole conv groups (the same group is both
        # its input and its output); each filter's per-group input slice is unchanged.
        module.groups = len(indices) // (module.in_channels // module.groups)
    else:
        _select(module, "weight", 1, indices)
    module.in_channels = len(indices)


def _slice_norm(norm: nn.Module, indices: List[int]) -> None:
    if isinstance(norm, nn.GroupNorm):
        norm.num_groups = len(indices) // (norm.num_channels // norm.num_groups)
        norm.num_channels = len(indices)
        names = ["weight", "bias"]
    elif isinstance(norm, CycleBatchNormList):
        for bn in norm:
            _slice_norm(bn, indices)
        names = ["weight", "bias"] if norm._affine else []
    else:  # FrozenBatchNorm2d keeps all four as buffers, BatchNorm the first two as parameters
        norm.num_features = len(indices)
        names = ["weight", "bias", "running_mean", "running_var"]
    for name in names:
        _select(norm, name, 0, indices)


def _sync_widths(model: nn.Module) -> None:
    """Make the widths detectron2 caches on modules agree with their tensors again."""
    # Reversed pre-order visits blocks before the ResNet that reads their widths.
    for module in reversed(list(model.modules())):
        if isinstance(module, BasicStem):
            module.out_channels = module.conv1.out_channels
        elif isinstance(module, (BottleneckBlock, BasicBlock)):
            last = module.conv3 if isinstance(module, BottleneckBlock) else module.conv2
            module.in_channels = module.conv1.in_channels
            module.out_channels = last.out_channels
        elif isinstance(module, ResNet):
            channels = module._out_feature_channels
            channels["stem"] = module.stem.conv1.out_channels
            for name, stage in zip(module.stage_names, module.stages):
                channels[name] = stage[-1].out_channels
        elif isinstance(module, FPN):
            width = module.output_convs[0].out_channels
            module._out_feature_channels = {k: width for k in module._out_feature_channels}
        elif isinstance(module, FastRCNNConvFCHead):
            if module.fcs:
                module._output_size = module.fcs[-1].out_features
            else:
                _, height, width = module._output_size
                module._output_size = (module.conv_norm_relus[-1].out_channels, height, width)
