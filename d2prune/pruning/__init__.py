"""Channel groups of Detectron2 detectors and the surgery that removes them.

Knows nothing about training: `find_groups` says what can be removed together, `prune` removes
it, and `channel_spec`/`apply_spec` carry a pruned architecture across checkpoints. Module types
beyond detectron2's built-ins join through `register_rule` (see `rules/`).
"""

from .groups import ChannelGroup, find_groups
from .rules import Rule, register_rule, unregister_rule
from .spec import apply_spec, channel_spec
from .surgery import prune

__all__ = [
    "ChannelGroup",
    "find_groups",
    "prune",
    "channel_spec",
    "apply_spec",
    "Rule",
    "register_rule",
    "unregister_rule",
]
