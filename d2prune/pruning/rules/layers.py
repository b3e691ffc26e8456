"""Leaf layers that carry channels (conv, linear, norm) and how to slice each, by type.

`find_groups` accepts exactly these as producers, consumers and norms; `prune` slices them.
"""

from typing import Callable, List, NamedTuple

import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.layers.batch_norm import CycleBatchNormList
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ... import compat
from .base import by_type

__all__ = ["is_layer", "is_norm", "slice_outputs", "slice_inputs", "slice_norm"]


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


def _outputs(weight_dim: int, width: str) -> Callable[[nn.Module, List[int]], None]:
    """Slicer of a layer's output channels: its weight along `weight_dim`, its bias, and its
    width attribute `width`."""

    def slice_outputs(layer: nn.Module, indices: List[int]) -> None:
        _select(layer, "weight", weight_dim, indices)
        _select(layer, "bias", 0, indices)
        setattr(layer, width, len(indices))

    return slice_outputs


def _conv_inputs(conv: nn.Conv2d, indices: List[int], size: int) -> None:
    if conv.groups > 1:
        # Its own output rows are already sliced by whole conv groups (the same group is both
        # its input and its output); each filter's per-group input slice is unchanged.
        conv.groups = len(indices) // (conv.in_channels // conv.groups)
    else:
        _select(conv, "weight", 1, indices)
    conv.in_channels = len(indices)


def _deconv_inputs(deconv: nn.ConvTranspose2d, indices: List[int], size: int) -> None:
    _select(deconv, "weight", 0, indices)
    deconv.in_channels = len(indices)


def _linear_inputs(linear: nn.Linear, indices: List[int], size: int) -> None:
    # A linear layer after a flatten reads each channel as `factor` consecutive inputs.
    factor = linear.in_features // size
    weight = linear.weight.view(linear.out_features, size, factor)
    index = torch.as_tensor(indices, device=weight.device)
    weight = weight.index_select(1, index).reshape(linear.out_features, -1)
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    linear.in_features = len(indices) * factor


def _batch_norm(norm: nn.Module, indices: List[int]) -> None:
    # FrozenBatchNorm2d keeps all four as buffers, BatchNorm the first two as parameters.
    norm.num_features = len(indices)
    for name in ("weight", "bias", "running_mean", "running_var"):
        _select(norm, name, 0, indices)


def _group_norm(norm: nn.GroupNorm, indices: List[int]) -> None:
    norm.num_groups = len(indices) // (norm.num_channels // norm.num_groups)
    norm.num_channels = len(indices)
    for name in ("weight", "bias"):
        _select(norm, name, 0, indices)


def _cycle_batch_norm(norm: CycleBatchNormList, indices: List[int]) -> None:
    for bn in norm:
        slice_norm(bn, indices)
    if compat.cycle_bn_affine(norm):
        for name in ("weight", "bias"):
            _select(norm, name, 0, indices)


class _Slicers(NamedTuple):
    outputs: Callable[[nn.Module, List[int]], None]
    inputs: Callable[[nn.Module, List[int], int], None]


# ConvTranspose2d stores its weight as (in, out, kh, kw), the transpose of Conv2d's.
_LAYERS = {
    nn.Conv2d: _Slicers(_outputs(0, "out_channels"), _conv_inputs),
    nn.ConvTranspose2d: _Slicers(_outputs(1, "out_channels"), _deconv_inputs),
    nn.Linear: _Slicers(_outputs(0, "out_features"), _linear_inputs),
}
_NORMS = {
    FrozenBatchNorm2d: _batch_norm,
    _BatchNorm: _batch_norm,
    nn.GroupNorm: _group_norm,
    CycleBatchNormList: _cycle_batch_norm,
}


def is_layer(module: nn.Module) -> bool:
    """Whether `module` is a conv or linear layer that `prune` can slice."""
    return by_type(_LAYERS, module) is not None


def is_norm(module: nn.Module) -> bool:
    """Whether `module` is a norm layer that `prune` can slice."""
    return by_type(_NORMS, module) is not None


def slice_outputs(layer: nn.Module, indices: List[int]) -> None:
    """Keep the output channels `indices` of a conv/linear layer, and of its own `.norm`."""
    by_type(_LAYERS, layer).outputs(layer, indices)
    norm = getattr(layer, "norm", None)  # detectron2's Conv2d normalises its own output
    if norm is not None:
        slice_norm(norm, indices)


def slice_inputs(layer: nn.Module, indices: List[int], size: int) -> None:
    """Keep the input channels `indices` (of `size`) of a conv/linear layer."""
    by_type(_LAYERS, layer).inputs(layer, indices, size)


def slice_norm(norm: nn.Module, indices: List[int]) -> None:
    """Keep the channels `indices` of a norm layer."""
    by_type(_NORMS, norm)(norm, indices)
