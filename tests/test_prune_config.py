"""PRUNE keys: every invalid value is a one-line UserError naming the key and what is allowed."""

import re

import pytest

from d2prune.config import check_prune_config, criterion_options, setup_cfg
from d2prune.engine.selection import build_criterion
from d2prune.errors import UserError

from .conftest import CONFIG

ITERATIVE = ["PRUNE.SCHEDULE", "iterative", "SOLVER.MAX_ITER", "100"]


@pytest.mark.parametrize(
    "opts, message",
    [
        (["PRUNE.SCHEDULE", "gradual"], "PRUNE.SCHEDULE must be 'oneshot' or 'iterative', got 'gradual'."),
        (["PRUNE.CURVE", "quadratic"], "PRUNE.CURVE must be 'linear' or 'cubic', got 'quadratic'."),
        (["PRUNE.START_ITER", "400", "SOLVER.MAX_ITER", "400"], "PRUNE.START_ITER must be an iteration from 0 to SOLVER.MAX_ITER - 1 = 399, got 400."),
        ([*ITERATIVE, "PRUNE.START_ITER", "10", "PRUNE.END_ITER", "11"], "PRUNE.END_ITER must be an iteration from START_ITER + NUM_EVENTS - 1 = 12 to SOLVER.MAX_ITER - 1 = 99, got 11."),
        ([*ITERATIVE, "PRUNE.END_ITER", "100"], "PRUNE.END_ITER must be an iteration from START_ITER + NUM_EVENTS - 1 = 2 to"),
        (["PRUNE.NUM_EVENTS", "0"], "PRUNE.NUM_EVENTS must be a positive integer, got 0."),
        (["PRUNE.SCORE_BATCHES", "-2"], "PRUNE.SCORE_BATCHES must be a positive integer, got -2."),
        (["PRUNE.RATIO", "1.0"], "PRUNE.RATIO must be a number in [0, 1), got 1.0."),
        (["PRUNE.FLOPS_REDUCTION", "1.5"], "PRUNE.FLOPS_REDUCTION must be 0 (off) or a number in (0, 1)"),
        (["PRUNE.MODE", "layer"], "PRUNE.MODE must be 'local', 'global' or 'cost', got 'layer'."),
        (["PRUNE.MODE", "cost"], "PRUNE.MODE 'cost' weighs scores against FLOPs or time saved: set PRUNE.FLOPS_REDUCTION or PRUNE.LATENCY_REDUCTION."),
        (["PRUNE.LATENCY_REDUCTION", "1.0"], "PRUNE.LATENCY_REDUCTION must be 0 (off) or a number in (0, 1), got 1.0."),
        (["PRUNE.LATENCY_REDUCTION", "0.3", "PRUNE.FLOPS_REDUCTION", "0.3"], "PRUNE.FLOPS_REDUCTION and PRUNE.LATENCY_REDUCTION are both set"),
        (["PRUNE.LATENCY_DTYPE", "bfloat16"], "PRUNE.LATENCY_DTYPE must be 'float32' or 'float16', got 'bfloat16'."),
        (["PRUNE.KINDS", "['blocks']"], "PRUNE.KINDS must be a non-empty list of stem, block, stage, fpn, head, got"),
        (["PRUNE.EXCLUDE", "['res[2']"], "PRUNE.EXCLUDE pattern 'res[2' is not a valid regular expression."),
        (["PRUNE.EVAL_AT_EVENTS", "True", "DATASETS.TEST", "()"], "PRUNE.EVAL_AT_EVENTS is True but DATASETS.TEST is empty"),
        (["PRUNE.CRITERION", "l3"], "PRUNE.CRITERION: unknown pruning criterion 'l3'; did you mean"),
        (["PRUNE.CRITERION", "random", "PRUNE.CRITERION_OPTIONS", "[['sed', 1]]"], "PRUNE.CRITERION: criterion 'random' has no option sed; its options: seed."),
        (["PRUNE.CRITERION_OPTIONS", "[['seed']]"], "PRUNE.CRITERION_OPTIONS must be a list of [key, value] pairs, got ['seed'] in it."),
    ],
)
def test_invalid_prune_keys_are_one_line_user_errors(opts, message):
    cfg = setup_cfg(CONFIG, opts)  # loading accepts any value: a criterion may come from a plug-in
    with pytest.raises(UserError, match=re.escape(message)) as error:
        check_prune_config(cfg)
    assert "\n" not in str(error.value)


def test_valid_schedules_and_criterion_options():
    check_prune_config(setup_cfg(CONFIG))
    cfg = setup_cfg(CONFIG, [*ITERATIVE, "PRUNE.START_ITER", "10", "PRUNE.END_ITER", "12", "PRUNE.CURVE", "cubic"])
    check_prune_config(cfg)
    cfg = setup_cfg(CONFIG, ["PRUNE.CRITERION", "random", "PRUNE.CRITERION_OPTIONS", "[['seed', '3']]"])
    assert criterion_options(cfg) == {"seed": 3}  # strings are read as literals
    assert build_criterion(cfg).seed == 3
