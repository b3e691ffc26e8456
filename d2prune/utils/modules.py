"""Helpers on `nn.Module`s that every layer of d2prune needs."""

from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

__all__ = ["unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The detector inside a (Distributed)DataParallel wrapper, or `model` itself."""
    if isinstance(model, (DistributedDataParallel, DataParallel)):
        return model.module
    return model
