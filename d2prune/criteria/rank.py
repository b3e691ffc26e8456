"""Rank criteria: how much information a channel's feature maps carry (HRank) and how much of
it no other channel carries (CHIP), from singular values of maps on a few training images.
"""

import torch
from torch import nn

from ..errors import UserError
from ..pruning.groups import ChannelGroup
from . import register
from .activation import ChannelMean
from .collector import Accumulator, StatisticsCriterion

__all__ = ["HRank", "CHIP", "channel_independence"]

# CHIP's bisection: elements of the (channels x d x d) terms evaluated at once (float64:
# 64 MiB), and steps, each halving the interval of every singular value: 32 leave 2e-10 of it.
_CHUNK_ELEMENTS = 2**23
_BISECTIONS = 32


def _count(criterion: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"criterion '{criterion}': {key} must be a positive integer, got {value!r}.")
    return value


def channel_independence(A: torch.Tensor) -> torch.Tensor:
    """CI_c = ||A||_* - ||M_c (.) A||_* for every row c of A, with row c zeroed by the mask M_c.

    ||A||_* = sum_i sqrt(lambda_i) over the eigenvalues of the smaller Gram matrix. Zeroing row
    c subtracts a_c a_c^T from A^T A, which in its eigenbasis is diag(lambda) - z z^T: the
    eigenvalues mu_j of that interlace, lambda_{j-1} <= mu_j <= lambda_j, and solve the secular
    equation sum_i z_i^2 / (lambda_i - mu) = 1. Bisection finds them for every c at once, so a
    matrix costs one eigendecomposition instead of one per channel.
    """
    C, P = A.shape
    if C <= P:
        lam, Q = torch.linalg.eigh(A @ A.T)
        z = Q * lam.clamp(min=0).sqrt()  # V^T a_c, with V = A^T Q / sqrt(lambda)
    else:
        lam, V = torch.linalg.eigh(A.T @ A)
        z = A @ V
    lam = lam.clamp(min=0)
    w = z**2
    step = max(1, _CHUNK_ELEMENTS // lam.numel() ** 2)
    sigma = torch.cat([_downdated(lam, w[c : c + step]) for c in range(0, C, step)])
    return (lam.sqrt() - sigma).sum(1)


def _downdated(lam: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Square roots of the eigenvalues of diag(lam) - z z^T for each row of w = z^2 (lam
    ascending), from above."""
    # mu_1 >= lambda_1 - ||z||^2, and >= 0 as the eigenvalue of a Gram matrix.
    lo = torch.cat([(lam[:1] - w.sum(1, keepdim=True)).clamp(min=0), lam[:-1].expand(len(w), -1)], 1)
    # Bisecting sqrt(mu) rather than mu makes the error a fixed share of the gaps between
    # singular values, which is what the nuclear norm sums.
    lo, hi = lo.sqrt(), lam.sqrt().expand_as(w).clone()
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2
        # 1 - sum_i w_i / (lambda_i - mu) falls from +inf to -inf across each interval.
        below_root = 1 - (w[:, None, :] / (lam - mid[:, :, None] ** 2)).sum(-1) > 0
        lo = torch.where(below_root, mid, lo)
        hi = torch.where(below_root, hi, mid)
    # The upper end: exactly sqrt(lambda_j) where z_j = 0 (a zero channel loses nothing).
    return hi


class _Bounded(Accumulator):
    """Statistics from at most `images` samples (images, or pyramid levels of an image)."""

    def __init__(self, module: nn.Module, size: int, images: int):
        super().__init__(module, size)
        self.left = images
        self.sums.update(total=self.zeros(size), count=self.zeros(1))

    def take(self, maps: torch.Tensor) -> torch.Tensor:
        maps = maps[: self.left]
        self.left -= len(maps)
        return maps.float()

    def result(self):
        return self.sums["total"] / self.sums["count"].clamp(min=1)


class _AverageRank(_Bounded):
    def update(self, a, grad=None):
        maps = self.take(a)  # (images, C, H, W)
        self.sums["total"] += torch.linalg.matrix_rank(maps).sum(0)
        self.sums["count"] += len(maps)


class _ChannelIndependence(_Bounded):
    def __init__(self, module: nn.Module, size: int, images: int, positions: int, seed: int):
        super().__init__(module, size, images)
        self.positions = positions
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, a, grad=None):
        # One (channels x positions) matrix per image; a Linear's proposals are its positions.
        matrices = self.take(a.flatten(2) if a.dim() > 2 else a.t()[None])
        for A in matrices:
            if A.shape[1] > self.positions:
                keep = torch.randperm(A.shape[1], generator=self.generator)[: self.positions]
                A = A[:, keep.to(A.device)]
            self.sums["total"] += channel_independence(A.double())
            self.sums["count"] += 1


@register("hrank")
class HRank(StatisticsCriterion):
    """Lin et al. 2020, "HRank: Filter Pruning using High-Rank Feature Map":
    s_c = 1/N sum_i rank(O_c(I_i)), the rank of channel c's H x W map, averaged over images.

    Maps are the producer's output (before the block's ReLU), one per image and pyramid level,
    from the first `images` of them. A Linear producer's "map" for one proposal is a single
    number, whose rank only says whether it is zero; box head fc layers are scored by their mean
    |a_c| instead (`mean_activation`).
    """

    def __init__(self, images: int = 32):
        self.images = _count("hrank", "images", images)

    def accumulator(self, module: nn.Module, group: ChannelGroup) -> Accumulator:
        if isinstance(module, nn.Linear):
            return ChannelMean(module, group.size, torch.abs)
        return _AverageRank(module, group.size, self.images)


@register("chip")
class CHIP(StatisticsCriterion):
    """Sui et al. 2021, "CHIP: CHannel Independence-based Pruning for Compact Neural Networks":
    CI_c = ||A||_* - ||M_c (.) A||_*, averaged over images.

    A is the (channels x positions) matrix of one image's map (one per image and pyramid level,
    the first `images` of them), M_c zeroes its row c. A channel that the others can reproduce
    (a duplicate, or zero) adds little to the nuclear norm and scores low. Positions are a
    random subset of at most `positions` per map, drawn from a generator seeded with `seed`. A
    box head Linear's matrix is (channels x proposals) of one batch, proposals as positions.
    """

    def __init__(self, images: int = 32, positions: int = 256, seed: int = 0):
        self.images = _count("chip", "images", images)
        self.positions = _count("chip", "positions", positions)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"criterion 'chip': seed must be an integer, got {seed!r}.")
        self.seed = seed

    def accumulator(self, module: nn.Module, group: ChannelGroup) -> Accumulator:
        return _ChannelIndependence(module, group.size, self.images, self.positions, self.seed)
