"""A detectron2 model made faster for inference without changing what it computes: norms
folded into their convs (`fold_norms`), conv weights in channels-last memory format.

The result is the same detectron2 class and runs `model(inputs)` as before; it is for inference
only (see `fold_norms`). docs/latency.md ("Why the latency cut trails the FLOPs cut") has
the measurements behind each step.
"""

from typing import List, Optional

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn

from .errors import UserError
from .utils.modules import unwrap

__all__ = ["fold_norms", "foldable", "folded_convs", "prepare_for_inference"]


def foldable(conv: nn.Module) -> bool:
    """Whether `conv` is a detectron2 `Conv2d` whose `norm` is a fixed affine map per channel:
    a `FrozenBatchNorm2d`, or a BatchNorm (BN, SyncBN, NaiveSyncBN) in eval mode that keeps
    running statistics. GroupNorm and LayerNorm depend on the input and never fold."""
    if not isinstance(conv, Conv2d):
        return False
    norm = conv.norm
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    return (
        isinstance(norm, nn.modules.batchnorm._BatchNorm)
        and not norm.training
        and norm.track_running_stats
        and norm.running_mean is not None
    )


def fold_norms(model: nn.Module) -> nn.Module:
    """Fold, in place, the norm of every detectron2 `Conv2d` for which `foldable` holds into
    its weight and bias, set `conv.norm = None`, and return `model`.

    y = gamma * (W x + b - mu) / sqrt(var + eps) + beta becomes W' x + b' with
    s = gamma / sqrt(var + eps), W' = s W and b' = s (b - mu) + beta (computed in float64, then
    cast back). The result is still the same detectron2 class (`GeneralizedRCNN`, `RetinaNet`,
    ...) and `model(inputs)` gives the same detections up to rounding; norms of other types
    stay as they are. The model must be in eval mode (a `UserError` otherwise): a folded model
    has no norm left to train or to update statistics in, and its state dict (conv biases, no
    norm buffers) no longer matches the config's architecture, so it is for inference only:
    keep the unfolded checkpoint, and fold after loading it. Pruning (`find_groups`, `prune`)
    still works on a folded model. Deep-copy first to keep the unfolded model.
    """
    detector = unwrap(model)
    if detector.training:
        raise UserError(
            "fold_norms: the model is in training mode; call model.eval() first (a folded model "
            "is for inference only)."
        )
    with torch.no_grad():
        for conv in folded_convs(detector):
            _fold(conv)
    return model


def folded_convs(model: nn.Module) -> List[Conv2d]:
    """The convs of `model` whose norms `fold_norms` folds."""
    return [m for m in model.modules() if foldable(m)]


def _fold(conv: Conv2d) -> None:
    norm = conv.norm
    dtype = conv.weight.dtype
    n = conv.out_channels
    mean = norm.running_mean.double()
    var = norm.running_var.double()
    gamma = norm.weight.double() if norm.weight is not None else torch.ones_like(mean)
    beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(mean)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    scale = gamma * (var + norm.eps).rsqrt()
    weight = conv.weight.double() * scale.view(n, *([1] * (conv.weight.dim() - 1)))
    conv.weight = nn.Parameter(weight.to(dtype), requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(((bias - mean) * scale + beta).to(dtype), requires_grad=conv.weight.requires_grad)
    conv.norm = None


def prepare_for_inference(model: nn.Module, *, channels_last: Optional[bool] = None) -> nn.Module:
    """`fold_norms(model)` and, with `channels_last` (default: when the model is on the CPU),
    its 4-D weights in channels-last memory format, in place; returns `model`.

    Channels-last weights make every conv write channels-last feature maps, which the rest of a
    ResNet-FPN R-CNN keeps, so oneDNN's CPU convolutions skip reordering each input and output
    to and from their blocked layout, and max pooling and upsampling run vectorised. On one CPU
    thread the two took 13-15 % off the unpruned R18-FPN detector and R50 ResNet and 18-22 % off
    their pruned copies, whose odd widths suffer most from the reordering (docs/latency.md); on
    a GPU they are not measured, hence no channels-last there by default. Same rules as
    `fold_norms`: eval mode only, inference only.
    """
    fold_norms(model)
    if channels_last is None:
        parameter = next(unwrap(model).parameters(), None)
        channels_last = parameter is not None and parameter.device.type == "cpu"
    if channels_last:
        unwrap(model).to(memory_format=torch.channels_last)
    return model
