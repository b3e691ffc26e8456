"""The package's import graph goes one way: base, pruning, criteria, engine, then projects/.

Each layer is imported in a fresh interpreter, and no module of a higher layer may have been
loaded by it (docs/design.md, "Layers").
"""

import json
import pkgutil
import subprocess
import sys

import pytest

import d2prune

from .conftest import REPO

# Lowest layer first; a module belongs to the first layer with a matching prefix.
LAYERS = [
    (
        "base",
        [
            "d2prune.errors", "d2prune.utils", "d2prune.compat", "d2prune.complexity",
            "d2prune.data",
        ],
    ),
    ("pruning", ["d2prune.pruning"]),
    ("criteria", ["d2prune.criteria"]),
    ("engine", ["d2prune.config", "d2prune.engine", "d2prune.export", "d2prune.explain", "d2prune.api", "d2prune.fuse"]),
    ("projects", ["projects"]),
]  # fmt: skip


def _layer(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and docs/design.md")


def _modules(package: str, path) -> list:
    return [m.name for m in pkgutil.walk_packages(path, package + ".")]


LIBRARY = _modules("d2prune", d2prune.__path__)


def test_every_library_module_has_a_layer_below_projects():
    for module in LIBRARY:
        assert _layer(module) < len(LAYERS) - 1, module


@pytest.mark.subprocess
@pytest.mark.parametrize("index", range(len(LAYERS) - 1), ids=[name for name, _ in LAYERS[:-1]])
def test_a_layer_loads_nothing_above_it(index):
    own = [m for m in LIBRARY if _layer(m) == index]
    code = (
        "import importlib, json, sys\n"
        f"for m in {own!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('d2prune', 'projects'))))"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    above = [m for m in loaded if m != "d2prune" and _layer(m) > index]
    assert not above, f"layer {LAYERS[index][0]} loads {above}"
    assert own, f"layer {LAYERS[index][0]} has no module"
