"""Pack a training checkpoint into a shippable weights file: the model alone (no optimizer or
trainer state), floating-point tensors stored as float16, with its channel spec and a record of
where it came from. Loading casts the tensors back to the model's float32.
"""

import os
from typing import Mapping

import torch

from ..errors import UserError
from ..utils.io import atomic_open

__all__ = ["pack_checkpoint"]


def pack_checkpoint(source: str, destination: str, meta: Mapping) -> dict:
    """Write `destination` from the checkpoint `source`; return the packed object's metadata."""
    if not os.path.isfile(source):
        raise UserError(f"{source}: checkpoint not found.")
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise UserError(f"{source}: not a detectron2 checkpoint (no 'model' entry).")
    model = {
        k: v.half() if torch.is_floating_point(v) else v for k, v in checkpoint["model"].items()
    }
    packed = {"model": model, "meta": dict(meta, iteration=checkpoint.get("iteration"))}
    if "d2prune" in checkpoint:
        packed["d2prune"] = checkpoint["d2prune"]
    with atomic_open(destination, "wb") as f:
        torch.save(packed, f)
    return packed["meta"]
