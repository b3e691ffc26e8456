"""d2prune's configuration keys, added to a Detectron2 config before a file is merged.

Every key is documented where it is defined; `tools/train_net.py` calls `add_prune_config` first.
"""

import ast
import difflib
import logging
import os
import re
from typing import Iterator, Optional, Sequence

import torch
import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from . import criteria
from .errors import UserError
from .pruning.kinds import KINDS

logger = logging.getLogger(__name__)


def add_prune_config(cfg: CN) -> CN:
    """Add the `PRUNE` section and d2prune's dataset keys to `cfg` (in place) and return it.

    The budget keys, KINDS to ROUND_TO, are read in one place: `Budget.from_config`
    (d2prune/pruning/budget.py); `check_prune_config` names the key at fault before that.
    """
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
    # When > 0, ignore RATIO and remove channels until the detector's time on this machine, as
    # predicted by a latency model timed here (MODEL.DEVICE, LATENCY_DTYPE), falls by this
    # share, in (0, 1). Kept widths then also snap to the width step the device runs fastest.
    cfg.PRUNE.LATENCY_REDUCTION = 0.0
    # Precision the latency model times in: "float32", or "float16" (autocast, CUDA only).
    cfg.PRUNE.LATENCY_DTYPE = "float32"
    # Folder of the latency models' timing tables, one file per device, dtype and architecture
    # ("" = $D2PRUNE_CACHE/latency, or ~/.cache/d2prune/latency).
    cfg.PRUNE.LATENCY_CACHE = ""
    # With a latency target: time each chosen cut that should save at least 10 % of the current
    # time against the model as it is (one image, on the run's device) and, when it runs more
    # than 2 % slower than the latency model predicted, choose again once toward a target
    # tightened by that much. Off by default: on a shared CPU one image's time is noisier than
    # the model's error (docs/whole_detector.md); for a dedicated device.
    cfg.PRUNE.LATENCY_CHECK = False
    # "local": every eligible group loses RATIO of its channels. "global": channels compete
    # across groups on group-normalised scores; no group loses more than MAX_RATIO. "cost"
    # (with FLOPS_REDUCTION or LATENCY_REDUCTION): global, on score per FLOP or per ms saved.
    cfg.PRUNE.MODE = "local"
    # How mode "cost" compares the scores of different groups (other modes ignore it):
    # "sensitivity" (each group's normalised scores scaled by the training loss's measured rise
    # when that group alone loses its lowest-scored channels, on the scoring batches: a channel
    # that every head reads then weighs what it is worth; one extra forward pass per group and
    # batch; 1.5 AP better than "uniform" at -40 % latency in docs/whole_detector.md) or
    # "uniform" (each group's scores divided by their mean, no data needed).
    cfg.PRUNE.COST_WEIGHTING = "sensitivity"
    # Most any one group may lose, in (0, 1].
    cfg.PRUNE.MAX_RATIO = 0.9
    # Fewest channels a group keeps. A group narrower than this is left whole; when that leaves
    # every eligible group whole, nothing could be pruned and the run stops with an error.
    cfg.PRUNE.MIN_CHANNELS = 8
    # Kept widths are rounded up to a multiple of this (8 suits vectorised CPU/GPU kernels), and
    # of the GroupNorm group size in GN-normalised groups (whole GN groups go, see docs/design.md).
    cfg.PRUNE.ROUND_TO = 1
    # Options of the criterion, as [key, value] pairs (e.g. [["seed", 1]]); string values are
    # read as Python literals when they parse as one.
    cfg.PRUNE.CRITERION_OPTIONS = []
    # When training prunes: "oneshot" (one event at START_ITER) or "iterative" (NUM_EVENTS
    # events spread evenly from START_ITER to END_ITER, each a step toward RATIO/FLOPS_REDUCTION).
    cfg.PRUNE.SCHEDULE = "oneshot"
    # Iteration after which the (first) pruning event happens.
    cfg.PRUNE.START_ITER = 0
    # Iteration after which the last iterative event happens.
    cfg.PRUNE.END_ITER = 0
    # Number of iterative pruning events.
    cfg.PRUNE.NUM_EVENTS = 3
    # How the removed share grows over iterative events, always relative to the unpruned model:
    # "linear", or "cubic" (Zhu & Gupta 2017: r_k = r * (1 - (1 - k / NUM_EVENTS)^3), large
    # steps first while the network has most redundancy).
    cfg.PRUNE.CURVE = "linear"
    # Training batches fed to data-driven criteria (activations, gradients) at each event.
    cfg.PRUNE.SCORE_BATCHES = 8
    # Evaluate on DATASETS.TEST right before and right after each pruning event.
    cfg.PRUNE.EVAL_AT_EVENTS = False
    return cfg


def check_prune_config(cfg: CN) -> None:
    """Raise a one-line `UserError` naming the first PRUNE key outside its allowed values.

    Called before training or one-shot pruning starts, not when a config is loaded, so that a
    config may name a criterion that another installed package registers.
    """
    p = cfg.PRUNE

    def fail(key: str, allowed: str) -> None:
        raise UserError(f"PRUNE.{key} must be {allowed}, got {p[key]!r}.")

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not is_number(p.RATIO) or not 0 <= p.RATIO < 1:
        fail("RATIO", "a number in [0, 1)")
    if not is_number(p.FLOPS_REDUCTION) or not (p.FLOPS_REDUCTION == 0 or 0 < p.FLOPS_REDUCTION < 1):
        fail("FLOPS_REDUCTION", "0 (off) or a number in (0, 1)")
    latency = p.get("LATENCY_REDUCTION", 0.0)
    if not is_number(latency) or not (latency == 0 or 0 < latency < 1):
        fail("LATENCY_REDUCTION", "0 (off) or a number in (0, 1)")
    if latency > 0 and p.FLOPS_REDUCTION > 0:
        raise UserError("PRUNE.FLOPS_REDUCTION and PRUNE.LATENCY_REDUCTION are both set: a budget has one target; set the other to 0.")
    if p.get("LATENCY_DTYPE", "float32") not in ("float32", "float16"):
        fail("LATENCY_DTYPE", "'float32' or 'float16'")
    if p.MODE not in ("local", "global", "cost"):
        fail("MODE", "'local', 'global' or 'cost'")
    if p.get("COST_WEIGHTING", "uniform") not in ("uniform", "sensitivity"):
        fail("COST_WEIGHTING", "'uniform' or 'sensitivity'")
    if p.MODE == "cost" and not (latency > 0 or p.FLOPS_REDUCTION > 0):
        raise UserError("PRUNE.MODE 'cost' weighs scores against FLOPs or time saved: set PRUNE.FLOPS_REDUCTION or PRUNE.LATENCY_REDUCTION.")
    if isinstance(p.KINDS, str) or not p.KINDS or any(k not in KINDS for k in p.KINDS):
        unknown = [k for k in p.KINDS if k not in KINDS] if not isinstance(p.KINDS, str) else []
        which = f" ({', '.join(map(repr, unknown))} is not a kind)" if unknown else ""
        raise UserError(f"PRUNE.KINDS must be a non-empty list of {', '.join(KINDS)}, got {p.KINDS!r}{which}.")
    for pattern in p.EXCLUDE:
        try:
            re.compile(pattern)
        except (re.error, TypeError):
            raise UserError(f"PRUNE.EXCLUDE pattern {pattern!r} is not a valid regular expression.") from None
    if not is_number(p.MAX_RATIO) or not 0 < p.MAX_RATIO <= 1:
        fail("MAX_RATIO", "a number in (0, 1]")
    for key in ("MIN_CHANNELS", "ROUND_TO", "NUM_EVENTS", "SCORE_BATCHES"):
        if not is_int(p[key]) or p[key] < 1:
            fail(key, "a positive integer")
    if p.SCHEDULE not in ("oneshot", "iterative"):
        fail("SCHEDULE", "'oneshot' or 'iterative'")
    if p.CURVE not in ("linear", "cubic"):
        fail("CURVE", "'linear' or 'cubic'")
    max_iter = cfg.SOLVER.MAX_ITER
    if not is_int(p.START_ITER) or not 0 <= p.START_ITER < max_iter:
        fail("START_ITER", f"an iteration from 0 to SOLVER.MAX_ITER - 1 = {max_iter - 1}")
    if p.SCHEDULE == "iterative":
        first = p.START_ITER + p.NUM_EVENTS - 1  # one iteration per event at least
        if not is_int(p.END_ITER) or not first <= p.END_ITER < max_iter:
            fail("END_ITER", f"an iteration from START_ITER + NUM_EVENTS - 1 = {first} to SOLVER.MAX_ITER - 1 = {max_iter - 1}")
    if not isinstance(p.EVAL_AT_EVENTS, bool):
        fail("EVAL_AT_EVENTS", "True or False")
    if not isinstance(p.get("LATENCY_CHECK", False), bool):
        fail("LATENCY_CHECK", "True or False")
    if p.EVAL_AT_EVENTS and not cfg.DATASETS.TEST:
        raise UserError("PRUNE.EVAL_AT_EVENTS is True but DATASETS.TEST is empty: name a dataset to evaluate on.")
    options = criterion_options(cfg)
    try:
        criteria.build(p.CRITERION, **options)
    except UserError as e:
        raise UserError(f"PRUNE.CRITERION: {e}") from None


def criterion_options(cfg: CN) -> dict:
    """PRUNE.CRITERION_OPTIONS as keyword arguments for `d2prune.criteria.build`."""
    options = {}
    for pair in cfg.PRUNE.CRITERION_OPTIONS:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise UserError(
                f"PRUNE.CRITERION_OPTIONS must be a list of [key, value] pairs, got {pair!r} in it."
            )
        key, value = pair
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass  # not a literal: the string itself is the value
        options[key] = value
    return options


def setup_cfg(config_file: str, opts: Sequence[str] = (), datasets: Sequence[Sequence[str]] = ()) -> CN:
    """Build a config the way d2prune's tools do: Detectron2 defaults, d2prune's keys, the file,
    then `KEY VALUE` overrides and `[name, json_file, image_root]` datasets from the command line.

    Faults in the file or the overrides become a one-line `UserError`. On a machine without
    CUDA a `cuda` device falls back to the CPU, so CPU-sized configs run anywhere unchanged.
    """
    cfg = get_cfg()
    add_prune_config(cfg)
    _check_config_file(config_file)
    try:
        cfg.merge_from_file(config_file)
    except (KeyError, ValueError, TypeError, AssertionError, yaml.YAMLError) as e:
        raise UserError(f"{config_file}: {_merge_error(cfg, e)}") from None
    opts = list(opts)
    if len(opts) % 2:
        raise UserError(f"command-line override {opts[-1]} has no value; overrides are KEY VALUE pairs.")
    for key, value in zip(opts[0::2], opts[1::2]):  # one at a time, to name the pair at fault
        try:
            cfg.merge_from_list([key, value])
        except (KeyError, ValueError, TypeError, AssertionError) as e:
            raise UserError(f"command-line override {key} {value}: {_merge_error(cfg, e)}") from None
    for entry in datasets:
        cfg.DATASETS.COCO.append(list(entry))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.info("CUDA is not available: MODEL.DEVICE %s -> cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def check_run(cfg: CN, world_size: int, training: bool = True) -> None:
    """Fail with one sentence on what detectron2 would only assert or trip over later: an
    OUTPUT_DIR that cannot be a directory, and (when `training`) a SOLVER.IMS_PER_BATCH that the
    `world_size` processes cannot share evenly."""
    out = cfg.OUTPUT_DIR
    if out:
        if os.path.exists(out) and not os.path.isdir(out):
            raise UserError(f"OUTPUT_DIR {out}: exists and is not a directory; name a directory (it is created when missing).")
        parent = os.path.dirname(os.path.abspath(out))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise UserError(f"OUTPUT_DIR {out}: {parent} is a file, so no directory can be made under it.")
    if not training:
        return
    batch, reference = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.REFERENCE_WORLD_SIZE
    # With a reference world size, detectron2 rescales the batch by world_size / reference.
    if reference and (batch <= 0 or batch % reference):
        raise UserError(
            f"SOLVER.IMS_PER_BATCH {batch} must be a positive multiple of SOLVER.REFERENCE_WORLD_SIZE "
            f"{reference}, from which detectron2 rescales it to the {world_size} processes."
        )
    if not reference and (batch <= 0 or batch % world_size):
        raise UserError(
            f"SOLVER.IMS_PER_BATCH {batch} must be a positive multiple of the number of processes "
            f"(world size) {world_size}, since it is the total batch over all of them."
        )


def check_weights(cfg: CN) -> None:
    """Fail early, naming the key, when MODEL.WEIGHTS is a local path that does not exist."""
    path = cfg.MODEL.WEIGHTS
    if path and "://" not in path and not os.path.isfile(path):
        raise UserError(f"MODEL.WEIGHTS {path}: file not found.")


def _check_config_file(path: str, child: Optional[str] = None) -> None:
    """Fail with one sentence when a config file (or the `_BASE_` it names) is missing, is not
    YAML text, or does not hold a mapping of config keys; merging then only meets key faults."""
    where = path if child is None else f"{path} (the _BASE_ of {child})"
    if not os.path.isfile(path):
        raise UserError(f"{where}: config file not found.")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise UserError(f"{where}: not a text file; a config is YAML text.") from None
    except OSError as e:
        raise UserError(f"{where}: cannot be read ({e.strerror}).") from None
    try:
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError:
        return  # Python tags, which detectron2's own loader reads
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({e.context})" if e.context else ""
        raise UserError(f"{where}: invalid YAML{at}: {e.problem}{context}.") from None
    except yaml.YAMLError as e:
        raise UserError(f"{where}: invalid YAML: {_one_line(e)}.") from None
    if not isinstance(data, dict):
        got = "nothing" if data is None else f"a {type(data).__name__}"
        raise UserError(f"{where}: must hold a mapping of config keys (MODEL: ..., SOLVER: ...), holds {got}.")
    bases = data.get("_BASE_", [])
    bases = [bases] if isinstance(bases, str) else bases  # detectron2 main also takes a list
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UserError(f"{where}: _BASE_ must be the path of a config file, got {bases!r}.")
    for base in bases:
        base = os.path.expanduser(base)
        if not base.startswith(("/", "http://", "https://")):  # as detectron2 resolves it
            base = os.path.join(os.path.dirname(path), base)
        if "://" not in base:
            _check_config_file(base, path)


def separate_overrides(argv: Sequence[str]) -> list:
    """`argv` with `--` put before its first KEY VALUE config override (a key of the
    d2prune/Detectron2 config, e.g. SOLVER.MAX_ITER), unless a `--` comes earlier: without it a
    list option in front (`--seeds 0 1 2 SOLVER.MAX_ITER 400`) swallows the overrides and
    argparse fails on them. Pair with `strip_separator` on the parsed overrides."""
    argv = list(argv)
    keys = None
    for i, token in enumerate(argv):
        if token == "--":
            return argv
        if re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+", token):
            keys = keys if keys is not None else set(_flat_keys(add_prune_config(get_cfg())))
            if token in keys:
                return argv[:i] + ["--"] + argv[i:]
    return argv


def strip_separator(opts: Sequence[str]) -> list:
    """argparse keeps a `--` at the head of a REMAINDER list; config overrides must not see it."""
    opts = list(opts)
    return opts[1:] if opts[:1] == ["--"] else opts


def _merge_error(cfg: CN, e: Exception) -> str:
    """A merge failure in one line; an unknown key comes with the closest existing ones."""
    text = _one_line(e)
    unknown = re.search(r"Non-existent (?:config )?key: (\S+)", text)
    if unknown is None:
        return text
    key = unknown.group(1)
    close = difflib.get_close_matches(key, list(_flat_keys(cfg)), n=3, cutoff=0.85)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; see add_prune_config and detectron2's defaults for the keys."
    return f"unknown config key {key}{hint}"


def _flat_keys(node: CN, prefix: str = "") -> Iterator[str]:
    for key, value in node.items():
        if isinstance(value, CN):
            yield from _flat_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text.strip("'\"") or type(e).__name__
