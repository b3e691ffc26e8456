"""d2prune: prune Detectron2 detectors while fine-tuning them on small datasets.

Filters are scored during fine-tuning, the least useful are removed physically, and mAP, size and
speed are reported before and after. `d2prune.load_model(cfg, path)` and `d2prune.Predictor(cfg)`
load a pruned checkpoint outside the tools, and `d2prune.prune_model(model, ...)` prunes a model in
your own training loop; they are imported on first use, so `import d2prune` stays light.
"""

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_LAZY = {
    "load_model": "d2prune.engine.checkpoint",
    "Predictor": "d2prune.engine.predictor",
    "prune_model": "d2prune.api",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'd2prune' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
