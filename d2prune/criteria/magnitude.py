"""Weight-only criteria: filter norms, distance to the geometric median, norm scales, random.

They need no data, so they can score a model at any moment; `random` is the baseline every
informed criterion has to beat.
"""

import zlib
from typing import Mapping, Optional

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from ..errors import UserError
from ..pruning.groups import ChannelGroup
from . import register
from .base import Criterion, combine

__all__ = ["L1", "L2", "FPGM", "BNScale", "Random"]


def filters(module: nn.Module) -> torch.Tensor:
    """The layer's weights as one row per output channel: W_c, flattened."""
    weight = module.weight
    if isinstance(module, nn.ConvTranspose2d):  # stored as (in, out / groups, kh, kw)
        weight = weight.transpose(0, 1)
    return weight.flatten(1)


@register("l1")
class L1(Criterion):
    """Li et al. 2017, "Pruning Filters for Efficient ConvNets": s_c = sum_i |W_c,i|.

    The absolute sum of the weights of output filter c (for a Linear layer, of its row c).
    """

    def score_producer(self, module: nn.Module, group: ChannelGroup) -> torch.Tensor:
        return filters(module).abs().sum(1)


@register("l2")
class L2(Criterion):
    """Li et al. 2017, "Pruning Filters for Efficient ConvNets", with the L2 norm: s_c = ||W_c||_2."""

    def score_producer(self, module: nn.Module, group: ChannelGroup) -> torch.Tensor:
        return filters(module).norm(dim=1)


@register("fpgm")
class FPGM(Criterion):
    """He et al. 2019, "Filter Pruning via Geometric Median": s_c = sum_j ||W_c - W_j||_2.

    Summed over the other filters j of the same layer. The filter that minimises it is the
    layer's geometric median; filters close to it are what the others already represent
    together, so they are the most replaceable and score lowest.
    """

    def score_producer(self, module: nn.Module, group: ChannelGroup) -> torch.Tensor:
        w = filters(module).float()[None]
        return torch.cdist(w, w)[0].sum(1)


@register("bn_scale")
class BNScale(Criterion):
    """Liu et al. 2017, "Network Slimming": s_c = |gamma_c| of the norm that scales channel c.

    For BatchNorm and GroupNorm gamma is the affine weight. FrozenBatchNorm2d computes
    y = x * weight / sqrt(running_var + eps) + ..., so its effective scale
    |weight_c / sqrt(running_var_c + eps)| is used. Norms are the producers' own `.norm` and
    the group's separate norm layers; a group with no norm at all (FPN convs, box head fc
    layers) falls back to the L1 norm of its producers' filters (Li et al. 2017).
    """

    def score_group(
        self, group: ChannelGroup, modules: Mapping[str, nn.Module], stats: Optional[Mapping]
    ) -> torch.Tensor:
        producers = [modules[name] for name in group.producers]
        norms = [getattr(m, "norm", None) for m in producers] + [modules[n] for n in group.norms]
        norms = [n for n in norms if n is not None]
        if not norms:
            return combine([filters(m).abs().sum(1) for m in producers])
        return combine([self.scale(norm, group.size) for norm in norms])

    @staticmethod
    def scale(norm: nn.Module, size: int) -> torch.Tensor:
        weight = getattr(norm, "weight", None)
        gamma = torch.ones(size) if weight is None else weight
        if isinstance(norm, FrozenBatchNorm2d):
            gamma = gamma / torch.sqrt(norm.running_var + norm.eps)
        return gamma.abs()


@register("random")
class Random(Criterion):
    """Uniform random scores: the baseline. Reproducible across processes and ranks.

    Each group draws from a generator seeded with `seed` and the group's name (CRC-32, which,
    unlike Python's `hash`, is the same in every process).
    """

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"criterion 'random': seed must be an integer, got {seed!r}.")
        self.seed = seed

    def score_group(
        self, group: ChannelGroup, modules: Mapping[str, nn.Module], stats: Optional[Mapping]
    ) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{group.name}".encode()))
        return torch.rand(group.size, generator=generator)
