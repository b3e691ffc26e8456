"""Detectron2 training machinery for pruning: the trainer and hook that prune while fine-tuning,
and checkpoints that carry the pruned architecture.

Wires `d2prune.pruning` into Detectron2's trainer; the pruning code itself knows nothing of training.
"""

from .checkpoint import PrunedCheckpointer
from .pruning_hook import PruningHook
from .trainer import PruningTrainer, Trainer

__all__ = ["PrunedCheckpointer", "PruningHook", "PruningTrainer", "Trainer"]
