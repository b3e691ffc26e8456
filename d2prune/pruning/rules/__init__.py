"""Per-module-type rules of channel coupling and surgery, and the registry `find_groups` walks.

A new detectron2 module type needs one `Rule` subclass, decorated with `register_rule(Type)`.
"""

from . import backbone, heads  # noqa: F401  (registers the built-in rules)
from .base import Rule, register_rule, rule_for, unregister_rule

__all__ = ["Rule", "register_rule", "unregister_rule", "rule_for"]
