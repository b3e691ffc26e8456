"""Channel importance criteria, in one registry: `build("l1")` gives a ready `Criterion`.

Adding a criterion is a class decorated with `@register("name")`; surgery never changes for it.
"""

import difflib
import inspect
from typing import Callable, Dict, List, Type

from ..errors import UserError
from .base import DATA_NEEDS, Criterion

__all__ = ["Criterion", "register", "available", "build"]

_REGISTRY: Dict[str, Type[Criterion]] = {}


def register(name: str) -> Callable[[Type[Criterion]], Type[Criterion]]:
    """Class decorator: make a `Criterion` subclass buildable as `build(name, **options)`."""

    def add(cls: Type[Criterion]) -> Type[Criterion]:
        if name in _REGISTRY:
            raise ValueError(f"criterion '{name}' is registered twice")
        if cls.data not in DATA_NEEDS:
            raise ValueError(f"criterion '{name}': data must be one of {DATA_NEEDS}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def available() -> List[str]:
    """Names of all registered criteria, sorted."""
    return sorted(_REGISTRY)


def build(name: str, **options) -> Criterion:
    """The criterion registered as `name`, constructed with `options` (e.g. `seed=1`)."""
    cls = _REGISTRY.get(name)
    if cls is None:
        close = difflib.get_close_matches(str(name), available(), n=3, cutoff=0.4)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UserError(
            f"unknown pruning criterion '{name}'; {hint}available: {', '.join(available())}."
        )
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) if accepted else "none"
        raise UserError(
            f"criterion '{name}' has no option {', '.join(unknown)}; its options: {allowed}."
        )
    return cls(**options)


# The families register themselves on import; they need `register` defined above.
from . import activation, information, magnitude, rank, relevance, taylor  # noqa: E402, F401
