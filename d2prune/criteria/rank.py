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

# CHIP's quadrature: trapezoid nodes in log s, STEP apart, from MARGIN e-folds below the smallest
# singular value to MARGIN above the largest. The integrand's poles lie pi/2 off the real axis, so
# the rule's error is about exp(-pi^2 / STEP) = 7e-18 of the integral; the ends cut off e^-MARGIN.
_STEP = 0.25
_MARGIN = 36.0
# Gram eigenvalues below this share of the largest are rounding noise of zero (a singular value
# under 1e-6 of the largest): their directions carry no row and are left out.
_ZERO_EIGENVALUE = 1e-12


def _count(criterion: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"criterion '{criterion}': {key} must be a positive integer, got {value!r}.")
    return value


def channel_independence(A: torch.Tensor) -> torch.Tensor:
    """CI_c = ||A||_* - ||M_c (.) A||_* for every row c of A, with row c zeroed by the mask M_c.

    ||A||_* = sum_j sqrt(lambda_j) over the eigenvalues of the Gram matrix. Zeroing row c
    subtracts a_c a_c^T from A^T A, which in its eigenbasis is G_c = diag(lambda) - z z^T. With
    sqrt(mu) = 2/pi int_0^inf mu / (mu + s^2) ds for each eigenvalue mu,

        CI_c = 2/pi int_0^inf s^2 [tr (G_c + s^2)^-1 - tr (diag(lambda) + s^2)^-1] ds
             = 2/pi int_0^inf s^2 N(s) / D(s) ds,   by Sherman-Morrison, with
        N = sum_i w_i / (lambda_i + s^2)^2,   D = 1 - sum_i w_i / (lambda_i + s^2),   w = z^2,

    and D is evaluated as (1 - h) + s^2 sum_i w_i / (lambda_i (lambda_i + s^2)), h = sum_i w_i /
    lambda_i the row's leverage, so that it does not cancel when h = 1 (a row outside the span of
    the others, whose removal drops the rank). In t = log s the integrand is smooth and decays
    exponentially at both ends, where the trapezoid rule converges geometrically: a few hundred
    nodes, and every row's integral is two (rows x eigenvalues) @ (eigenvalues x nodes) products
    after one eigendecomposition, instead of an SVD per channel.
    """
    C, P = A.shape
    if C <= P:
        lam, Q = torch.linalg.eigh(A @ A.T)
        z = Q * lam.clamp(min=0).sqrt()  # V^T a_c, with V = A^T Q / sqrt(lambda)
    else:
        lam, V = torch.linalg.eigh(A.T @ A)
        z = A @ V
    nonzero = lam > _ZERO_EIGENVALUE * lam.max().clamp(min=0)
    if not nonzero.any():
        return A.new_zeros(C)
    lam, w = lam[nonzero], z[:, nonzero] ** 2
    gap = (1 - (w / lam).sum(1, keepdim=True)).clamp(min=0)
    t = torch.arange(lam.min().log() / 2 - _MARGIN, lam.max().log() / 2 + _MARGIN, _STEP,
                     dtype=A.dtype, device=A.device)
    s2 = (2 * t).exp()
    inverse = 1 / (lam[:, None] + s2)  # (eigenvalues, nodes)
    N = w @ inverse**2
    D = gap + s2 * (w @ (inverse / lam[:, None]))
    # ds = s dt; an all-zero row has N = 0 and D = 1.
    integrand = s2 * t.exp() * N / D
    return 2 / torch.pi * _STEP * integrand.sum(1)


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
