"""The criterion interface: turn channel groups into one importance score per channel.

A criterion decides *what* to remove and knows nothing of *how* (`d2prune.pruning.prune`); the
budget in `d2prune.pruning.budget` turns its scores into keep sets.
"""

from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..pruning.groups import ChannelGroup
from ..utils.modules import unwrap

__all__ = ["Criterion", "combine"]

# What a criterion needs besides the weights, for the trainer to decide what to collect.
DATA_NEEDS = ("none", "images", "targets")

_EPS = 1e-12


class Criterion:
    """Scores every channel of every group; higher means more important, so more likely kept.

    Subclasses set `data` to what they need besides the weights ("none": weights only;
    "images": activations on input images; "targets": images with ground truth, for gradients
    and detection-aware scores) and implement `score_producer` (or `score_group` when a group is
    not scored producer by producer). Data-driven criteria receive what the shared statistics
    collector gathered as `stats`; weight-only criteria ignore it.
    """

    name = ""  # set by `d2prune.criteria.register`
    data = "none"

    def score(
        self, model: nn.Module, groups: Sequence[ChannelGroup], stats: Optional[Mapping] = None
    ) -> Dict[str, torch.Tensor]:
        """Group name -> float32 CPU tensor of `group.size` scores, for each group in `groups`."""
        if self.data != "none" and stats is None:
            needs = "images" if self.data == "images" else "images with ground-truth boxes"
            raise UserError(f"criterion '{self.name}' needs {needs} to score channels.")
        modules = dict(unwrap(model).named_modules())
        with torch.no_grad():
            return {
                group.name: self.score_group(group, modules, stats).detach().float().cpu()
                for group in groups
            }

    def score_group(
        self, group: ChannelGroup, modules: Mapping[str, nn.Module], stats: Optional[Mapping]
    ) -> torch.Tensor:
        """One group's scores: its producers' scores, combined by `combine`."""
        return combine([self.score_producer(modules[name], group) for name in group.producers])

    def score_producer(self, module: nn.Module, group: ChannelGroup) -> torch.Tensor:
        """Scores of the `group.size` output channels of one producer (a conv or linear layer)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def combine(member_scores: List[torch.Tensor]) -> torch.Tensor:
    """Average member scores after dividing each by its mean magnitude.

    The members of a group (a residual stream's convs and shortcut, the FPN's laterals and
    outputs) have weights of different scales; normalising first lets each vote equally.
    """
    normalised = [s.float() / (s.float().abs().mean() + _EPS) for s in member_scores]
    return torch.stack(normalised).mean(0)
