"""Detectron2 training machinery for pruning: checkpoints that carry the pruned architecture.

Wires `d2prune.pruning` into Detectron2's trainer; the pruning code itself knows nothing of training.
"""

from .checkpoint import PrunedCheckpointer

__all__ = ["PrunedCheckpointer"]
