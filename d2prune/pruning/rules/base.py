"""The rule interface and its registry: one rule per module type, found by the module's class.

A rule tells `find_groups` which channel spaces a module creates and couples, and tells `prune`
how to refresh the widths detectron2 caches on that module once its layers have been sliced.
"""

from typing import TYPE_CHECKING, Dict, Optional, Tuple, TypeVar

from torch import nn

if TYPE_CHECKING:
    from ..groups import GroupBuilder

__all__ = ["Rule", "register_rule", "unregister_rule", "rule_for", "by_type"]

T = TypeVar("T")


class Rule:
    """How d2prune traces and resizes one type of module; see `register_rule`.

    `trace(graph, module, *spaces)` receives the channel spaces (ints from `graph.space`) the
    module reads, declares the conv/linear layers that write or read each space
    (`graph.produce`/`graph.consume`), ties spaces that are added together (`graph.merge`), hands
    submodules to their own rules (`graph.trace`) and returns the spaces it outputs. Rules with
    `reads_features` are the entry points: `find_groups` calls `trace(graph, module, features)`
    on every such module of the model, with the backbone's output spaces by feature name.
    `sync(module)` runs after surgery, children first. `class_layers` names the module's child
    layers whose output width is set by the number of classes (a classifier): a checkpoint moving
    to a task with other classes re-initialises them.
    """

    reads_features = False
    class_layers: Tuple[str, ...] = ()

    def trace(self, graph: "GroupBuilder", module: nn.Module, *spaces):
        raise NotImplementedError

    def sync(self, module: nn.Module) -> None:
        """Make widths cached on `module` (not on its layers) agree with its layers again."""


_RULES: Dict[type, Rule] = {}


def register_rule(*module_types: type):
    """Class decorator: modules of these types (and their subclasses) follow this `Rule`.

    A subclass may get a rule of its own, which then wins over its base class's.
    """

    def decorator(cls):
        taken = [t.__name__ for t in module_types if t in _RULES]
        if taken:
            raise ValueError(f"a pruning rule is already registered for {', '.join(taken)}")
        for module_type in module_types:
            _RULES[module_type] = cls()
        return cls

    return decorator


def unregister_rule(*module_types: type) -> None:
    """Forget the rules of these types (tests that register their own clean up with this)."""
    for module_type in module_types:
        del _RULES[module_type]


def by_type(table: Dict[type, T], module: nn.Module) -> Optional[T]:
    """The entry of the closest class of `module` in `table`, or None."""
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    return None


def rule_for(module: nn.Module) -> Optional[Rule]:
    """The rule of `module`'s type, or None if d2prune does not know it."""
    return by_type(_RULES, module)
