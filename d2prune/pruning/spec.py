"""Channel specs: the width of every channel group, as plain Python types.

A spec is what a pruned checkpoint stores next to its weights so that a freshly built model can
be cut to the same architecture (by `prune`, keeping the first channels) before loading them.
`class_layers` names the layers whose output width the number of classes sets instead.
"""

from typing import Dict, List, Mapping

from torch import nn

from ..errors import UserError
from ..utils.modules import unwrap
from .groups import find_groups
from .rules import rule_for
from .surgery import prune

__all__ = ["channel_spec", "apply_spec", "class_layers"]


def channel_spec(model: nn.Module) -> Dict[str, int]:
    """Group name -> current number of channels, for every group of `model`."""
    return {group.name: int(group.size) for group in find_groups(model)}


def apply_spec(model: nn.Module, spec: Mapping[str, int]) -> None:
    """Prune `model` in place to the widths in `spec`, keeping the first channels of each group.

    Meant for a freshly built model whose weights are loaded afterwards; groups missing from
    `spec` keep their width, and a group can only shrink.
    """
    sizes = {group.name: group.size for group in find_groups(model)}
    keep = {}
    for name, width in spec.items():
        if name not in sizes:
            raise UserError(f"channel spec names group '{name}', which this model does not have.")
        if not isinstance(width, int) or not 0 < width <= sizes[name]:
            raise UserError(
                f"channel spec gives group '{name}' width {width!r}; allowed are whole numbers "
                f"from 1 to its current width {sizes[name]}."
            )
        if width < sizes[name]:
            keep[name] = range(width)
    prune(model, keep)


def class_layers(model: nn.Module) -> List[str]:
    """Names of the layers whose output width is set by the number of classes (box, mask and
    RetinaNet classifiers, class-specific box regression), as their rules declare them.

    Needs no channel groups, so it also answers for a model that d2prune cannot prune.
    """
    names = []
    for name, module in unwrap(model).named_modules():
        rule = rule_for(module)
        for child in rule.class_layers if rule is not None else ():
            names.append(f"{name}.{child}" if name else child)
    return names
