"""Channel importance criteria, in one registry: `build("l1")` gives a ready `Criterion`.

Adding a criterion is one module in this package with a class decorated `@register("name")`:
every module here is imported below, so nothing else changes (surgery least of all).
"""

import difflib
import importlib
import inspect
import pkgutil
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


def _import_families() -> None:
    """Import every module of this package: each registers its criteria on import."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


# After `register` is defined, which the families use as they are imported.
_import_families()
