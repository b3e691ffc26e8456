#!/usr/bin/env python
"""Prune a trained detector once: evaluate, score, prune, evaluate, optionally fine-tune, report.

    python tools/prune_net.py --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml \
        --criterion l1 --ratio 0.5 --output output/pruned_l1_50 \
        MODEL.WEIGHTS models/faster_rcnn_R18_FPN_source.pth

Writes OUTPUT/model_pruned.pth (loadable by train_net.py --eval-only as is), report.json and
report.md. Flags override the config's PRUNE keys; trailing KEY VALUE pairs override any key.
"""

import argparse
import logging
import os
import sys

from detectron2.utils.logger import setup_logger

from d2prune.config import check_weights, separate_overrides, setup_cfg, strip_separator
from d2prune.data import add_dataset_argument, register_datasets, validate_datasets
from d2prune.engine.oneshot import prune_oneshot
from d2prune.errors import exit_on_user_error

# The experiments and reports in projects/ sit on top of the library, beside this folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from projects.prune_report import write_prune_report  # noqa: E402

# flag -> PRUNE key it overrides
FLAGS = {
    "criterion": "CRITERION",
    "ratio": "RATIO",
    "flops_reduction": "FLOPS_REDUCTION",
    "latency_reduction": "LATENCY_REDUCTION",
    "mode": "MODE",
    "kinds": "KINDS",
    "exclude": "EXCLUDE",
    "max_ratio": "MAX_RATIO",
    "min_channels": "MIN_CHANNELS",
    "round_to": "ROUND_TO",
}


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, metavar="DIR", help="where the pruned model and reports go")
    parser.add_argument("--criterion", help="filter-selection criterion (PRUNE.CRITERION)")
    parser.add_argument("--ratio", type=float, help="share of eligible channels to remove (PRUNE.RATIO)")
    parser.add_argument("--flops-reduction", type=float, help="remove until FLOPs fall by this share")
    parser.add_argument("--latency-reduction", type=float,
                        help="remove until the time predicted on this device falls by this share")
    parser.add_argument("--mode", choices=["local", "global", "cost"],
                        help="cost: rank channels by score per FLOP or ms saved (with a FLOPs or latency target)")
    parser.add_argument("--kinds", nargs="+", help="group kinds that may lose channels (PRUNE.KINDS)")
    parser.add_argument("--exclude", nargs="+", help="regexes of group names never pruned")
    parser.add_argument("--max-ratio", type=float)
    parser.add_argument("--min-channels", type=int)
    parser.add_argument("--round-to", type=int)
    parser.add_argument("--finetune-iters", type=int, default=0, help="fine-tune the pruned model this long")
    parser.add_argument("--latency-repeats", type=int, default=10, help="timed runs per latency figure")
    add_dataset_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def main(args):
    overrides = []
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides += [f"PRUNE.{key}", str(value) if not isinstance(value, list) else repr(value)]
    cfg = setup_cfg(args.config_file, overrides + args.opts, args.dataset)
    cfg.OUTPUT_DIR = args.output
    cfg.freeze()
    register_datasets(cfg)
    validate_datasets(cfg, list(cfg.DATASETS.TEST[:1]) + list(cfg.DATASETS.TRAIN))
    check_weights(cfg)
    report = prune_oneshot(cfg, args.output, args.finetune_iters, args.latency_repeats)
    print(write_prune_report(args.output, report))
    return report


if __name__ == "__main__":
    setup_logger(name="d2prune")
    setup_logger(name="detectron2", abbrev_name="d2")
    logging.getLogger("fvcore").setLevel(logging.WARNING)
    # `--kinds block fpn SOLVER.MAX_ITER 10` would give all five words to --kinds.
    args = argument_parser().parse_args(separate_overrides(sys.argv[1:]))
    args.opts = strip_separator(args.opts)
    exit_on_user_error(main, args)
