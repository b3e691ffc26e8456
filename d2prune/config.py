"""d2prune's configuration keys, added to a Detectron2 config before a file is merged.

Every key is documented where it is defined; `tools/train_net.py` calls `add_prune_config` first.
"""

import logging
import os
from typing import Sequence

import torch
import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .errors import UserError

logger = logging.getLogger(__name__)


def add_prune_config(cfg: CN) -> CN:
    """Add the `PRUNE` section and d2prune's dataset keys to `cfg` (in place) and return it."""
    # COCO-format datasets to register before training, each [name, json_file, image_root].
    # Registered once per process; a name already registered with other files is an error.
    cfg.DATASETS.COCO = []
    # Where the synthetic source/target domains live (written by tools/make_synthetic.py). Their
    # splits are registered as synthetic_{source,target}_{train,val} whenever their files exist.
    cfg.DATASETS.SYNTHETIC_ROOT = "datasets/synthetic"

    cfg.PRUNE = CN()
    # Prune while training. When False, d2prune trains and evaluates like plain Detectron2.
    cfg.PRUNE.ENABLED = False
    # Filter-selection criterion, a name from d2prune.criteria.available() (l1, l2, fpgm, ...).
    cfg.PRUNE.CRITERION = "l1"
    # Kinds of channel groups that may lose channels: stem, block, stage, fpn, head. `block`
    # (inside residual blocks) is the safe default; the others change widths the heads share.
    cfg.PRUNE.KINDS = ["block"]
    # Regular expressions on group names (re.search); matching groups are never pruned.
    cfg.PRUNE.EXCLUDE = []
    # Share of the eligible channels to remove, in [0, 1).
    cfg.PRUNE.RATIO = 0.5
    # When > 0, ignore RATIO and remove channels (global ranking) until the model's FLOPs fall
    # by this share, in (0, 1).
    cfg.PRUNE.FLOPS_REDUCTION = 0.0
    # "local": every eligible group loses RATIO of its channels. "global": channels compete
    # across groups on group-normalised scores; no group loses more than MAX_RATIO.
    cfg.PRUNE.MODE = "local"
    # Most any one group may lose, in (0, 1].
    cfg.PRUNE.MAX_RATIO = 0.9
    # Fewest channels a group keeps (a narrower group is left whole).
    cfg.PRUNE.MIN_CHANNELS = 8
    # Kept widths are rounded up to a multiple of this (8 suits vectorised CPU/GPU kernels).
    cfg.PRUNE.ROUND_TO = 1
    return cfg


def setup_cfg(config_file: str, opts: Sequence[str] = (), datasets: Sequence[Sequence[str]] = ()) -> CN:
    """Build a config the way d2prune's tools do: Detectron2 defaults, d2prune's keys, the file,
    then `KEY VALUE` overrides and `[name, json_file, image_root]` datasets from the command line.

    Faults in the file or the overrides become a one-line `UserError`. On a machine without
    CUDA a `cuda` device falls back to the CPU, so CPU-sized configs run anywhere unchanged.
    """
    cfg = get_cfg()
    add_prune_config(cfg)
    if not os.path.isfile(config_file):
        raise UserError(f"{config_file}: config file not found.")
    try:
        cfg.merge_from_file(config_file)
    except (KeyError, ValueError, TypeError, AssertionError, yaml.YAMLError) as e:
        raise UserError(f"{config_file}: {_one_line(e)}") from None
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        raise UserError(f"command-line options {' '.join(opts)}: {_one_line(e)}") from None
    for entry in datasets:
        cfg.DATASETS.COCO.append(list(entry))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.info("CUDA is not available: MODEL.DEVICE %s -> cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def check_weights(cfg: CN) -> None:
    """Fail early, naming the key, when MODEL.WEIGHTS is a local path that does not exist."""
    path = cfg.MODEL.WEIGHTS
    if path and "://" not in path and not os.path.isfile(path):
        raise UserError(f"MODEL.WEIGHTS {path}: file not found.")


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text.strip("'\"") or type(e).__name__
