"""The study's own config keys (`STUDY.*`): the validation split a run evaluates while it trains,
for its validation curve and its early-stopped checkpoint.
"""

from typing import Sequence, Tuple

from detectron2.config import CfgNode as CN

from d2prune.config import setup_cfg
from d2prune.errors import UserError

__all__ = ["add_study_config", "setup_study_cfg"]


def add_study_config(cfg: CN) -> CN:
    """Add the STUDY keys to `cfg`, with their defaults: no validation split, as the first study."""
    cfg.STUDY = CN()
    # A registered dataset the run evaluates every VAL_PERIOD iterations and after the last one:
    # its bbox AP against the iteration is the validation curve, and the weights of its best
    # evaluation (model_best.pth) the early-stopped model. "" = none; DATASETS.TEST is then the
    # split the run reports on, evaluated once at the end, and never used to choose anything.
    cfg.STUDY.VAL_DATASET = ""
    # Iterations between two validation evaluations.
    cfg.STUDY.VAL_PERIOD = 100
    return cfg


def _split(opts: Sequence[str]) -> Tuple[list, list]:
    """`opts` (KEY VALUE pairs) as (the STUDY pairs, the others)."""
    pairs = list(zip(opts[0::2], opts[1::2]))
    ours = [p for p in pairs if p[0].startswith("STUDY.")]
    return [x for p in ours for x in p], [x for p in pairs if p not in ours for x in p] + list(opts[len(pairs) * 2:])


def setup_study_cfg(config_file: str, opts: Sequence[str] = (), datasets: Sequence[Sequence[str]] = ()) -> CN:
    """`d2prune.config.setup_cfg` with the STUDY keys, which only `opts` can set: setup_cfg
    merges the file before a project can add keys, so a file that sets STUDY keys is refused."""
    study_opts, opts = _split(list(opts))
    cfg = setup_cfg(config_file, opts, datasets)
    add_study_config(cfg)
    for key, value in zip(study_opts[0::2], study_opts[1::2]):
        try:
            cfg.merge_from_list([key, value])
        except (KeyError, ValueError, TypeError, AssertionError) as e:
            raise UserError(f"command-line override {key} {value}: {e}; the STUDY keys are "
                            f"{', '.join('STUDY.' + k for k in cfg.STUDY)}.") from None
    if cfg.STUDY.VAL_DATASET and cfg.STUDY.VAL_DATASET in cfg.DATASETS.TEST:
        raise UserError(f"STUDY.VAL_DATASET {cfg.STUDY.VAL_DATASET} is also in DATASETS.TEST: the split that picks "
                        "the early-stopped checkpoint must not be the one it is reported on.")
    if not isinstance(cfg.STUDY.VAL_PERIOD, int) or cfg.STUDY.VAL_PERIOD < 1:
        raise UserError(f"STUDY.VAL_PERIOD must be a positive number of iterations, got {cfg.STUDY.VAL_PERIOD!r}.")
    return cfg
