"""First-order Taylor criteria: the change of the detector's training loss when a channel is
removed, estimated from gradients of its own losses on images with ground truth.
"""

from typing import Dict, List

import torch
from torch import nn

from ..errors import UserError
from ..pruning.groups import ChannelGroup
from . import register
from .collector import Accumulator, StatisticsCriterion, samples

__all__ = ["Taylor"]

_EPS = 1e-12


class _ActivationTaylor(Accumulator):
    """Theta_c = | 1/M sum_m a_c,m dL/da_c,m | per sample, averaged over samples."""

    wants_grad = True

    def __init__(self, module: nn.Module, size: int):
        super().__init__(module, size)
        self.sums.update(total=self.zeros(size), count=self.zeros(1))
        # This batch's sum over positions of a * dL/da, per sample, and the positions M. Calls
        # with the same number of samples are the pyramid levels of the same images (the RPN and
        # RetinaNet heads), so each image's M positions span all its levels.
        self.batch: Dict[int, List] = {}

    def update(self, a, grad=None):
        products = samples(a * grad)
        entry = self.batch.setdefault(products.shape[0], [0.0, 0])
        entry[0] = entry[0] + products.sum(2, dtype=torch.float64)
        entry[1] += products.shape[2]

    def end_batch(self, grads=()):
        for products, positions in self.batch.values():
            self.sums["total"] += (products / positions).abs().sum(0)
            self.sums["count"] += products.shape[0]
        self.batch.clear()

    def result(self):
        theta = self.sums["total"] / self.sums["count"].clamp(min=1)
        return theta / (theta.norm() + _EPS)


class _WeightTaylor(Accumulator):
    """I_c = (sum over the parameters s of channel c of w_s dL/dw_s)^2, averaged over batches."""

    def __init__(self, module: nn.Module, size: int):
        super().__init__(module, size)
        norm = getattr(module, "norm", None)
        tensors = [module.weight, module.bias]
        if norm is not None:
            tensors += [getattr(norm, "weight", None), getattr(norm, "bias", None)]
        # FrozenBatchNorm2d keeps its scale and shift as buffers: no gradient, not included.
        self.parameters = [t for t in tensors if isinstance(t, nn.Parameter)]
        self.sums.update(total=self.zeros(size), count=self.zeros(1))

    def end_batch(self, grads=()):
        contribution = self.zeros(self.size)
        for w, g in zip(self.parameters, grads):
            wg = w * g
            if w is self.module.weight and isinstance(self.module, nn.ConvTranspose2d):
                wg = wg.transpose(0, 1)  # stored as (in, out, kh, kw)
            contribution += wg.flatten(1).sum(1) if wg.dim() > 1 else wg
        self.sums["total"] += contribution**2
        self.sums["count"] += 1

    def result(self):
        return self.sums["total"] / self.sums["count"].clamp(min=1)


@register("taylor")
class Taylor(StatisticsCriterion):
    """Molchanov et al. 2017, "Pruning Convolutional Neural Networks for Resource Efficient
    Inference": Theta_c = | 1/M sum_m a_c,m * dL/da_c,m |.

    The first-order change of the loss L (the detector's summed training losses) when channel
    c's activation a_c is set to zero, over the M positions of one image's map (all pyramid
    levels of a head shared across levels; one proposal is one sample of a box head Linear),
    taken per image, averaged over images and divided by the producer's L2 norm of Theta.

    `variant="2019"`: Molchanov et al. 2019, "Importance Estimation for Neural Network
    Pruning": I_c = (sum_s w_s * dL/dw_s)^2 over the parameters s that belong to channel c
    alone, averaged over batches. Those are the filter W_c, its bias, and gamma_c and beta_c of
    the producer's own BatchNorm/GroupNorm, so the paper's weight and BN variants are summed
    into one first-order estimate of removing the whole channel. FrozenBatchNorm2d holds its
    gamma and beta as buffers, which have no gradient; norms that are separate modules
    (RetinaNet subnets with per-level BN) are left out.
    """

    data = "targets"

    def __init__(self, variant: str = "2017"):
        if str(variant) not in ("2017", "2019"):
            raise UserError(f"criterion 'taylor': variant must be '2017' or '2019', got {variant!r}.")
        self.variant = str(variant)

    def accumulator(self, module: nn.Module, group: ChannelGroup) -> Accumulator:
        taylor = _ActivationTaylor if self.variant == "2017" else _WeightTaylor
        return taylor(module, group.size)
