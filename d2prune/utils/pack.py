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
    # A pruned checkpoint keeps its weights in its d2prune entry (see PrunedCheckpointer.save).
    pruned = dict(checkpoint.get("d2prune", {})) if isinstance(checkpoint, dict) else {}
    weights = checkpoint.get("model", pruned.get("model")) if isinstance(checkpoint, dict) else None
    if weights is None:
        raise UserError(f"{source}: not a detectron2 checkpoint (no 'model' entry).")
    model = {k: v.half() if torch.is_floating_point(v) else v for k, v in weights.items()}
    packed = {"d2prune": pruned} if pruned else {}  # first: what Detectron2 names in its refusal
    if "model" in pruned:
        pruned["model"] = model
    else:
        packed["model"] = model
    packed["meta"] = dict(meta, iteration=checkpoint.get("iteration"))
    with atomic_open(destination, "wb") as f:
        torch.save(packed, f)
    return packed["meta"]
