"""Activation criteria: how often and how strongly a channel fires on training images.

Cheap running means over every position of every image; the baselines for the gradient and
rank criteria.
"""

import torch
from torch import nn

from ..pruning.groups import ChannelGroup
from . import register
from .collector import Accumulator, StatisticsCriterion, samples

__all__ = ["APoZ", "MeanActivation", "ChannelMean"]


class ChannelMean(Accumulator):
    """Per-channel mean of `value(a)` over all samples and positions."""

    def __init__(self, module: nn.Module, size: int, value):
        super().__init__(module, size)
        self.value = value
        self.sums.update(total=self.zeros(size), count=self.zeros(1))

    def update(self, a, grad=None):
        a = samples(a)
        self.sums["total"] += self.value(a).sum((0, 2), dtype=torch.float64)
        self.sums["count"] += a.shape[0] * a.shape[2]

    def result(self):
        return self.sums["total"] / self.sums["count"].clamp(min=1)


@register("apoz")
class APoZ(StatisticsCriterion):
    """Hu et al. 2016, "Network Trimming": APoZ_c = mean over images and positions of [a_c <= 0].

    The Average Percentage of Zeros of channel c after the ReLU; the collector sees the
    activation before the ReLU that follows the producer, so a_c <= 0 counts as a zero. Mostly
    silent channels are pruned first: s_c = 1 - APoZ_c. FPN outputs, which no ReLU follows,
    are scored by the same formula (the share of non-positive values).
    """

    def accumulator(self, module: nn.Module, group: ChannelGroup) -> Accumulator:
        return ChannelMean(module, group.size, lambda a: (a > 0).to(torch.float64))


@register("mean_activation")
class MeanActivation(StatisticsCriterion):
    """Molchanov et al. 2017, "Pruning Convolutional Neural Networks for Resource Efficient
    Inference", the mean-activation baseline: s_c = mean over images and positions of |a_c|."""

    def accumulator(self, module: nn.Module, group: ChannelGroup) -> Accumulator:
        return ChannelMean(module, group.size, torch.abs)
