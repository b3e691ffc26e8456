#!/usr/bin/env python
"""Explain what pruning removes from a detector: an HTML report with figures.

    python tools/explain_net.py --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml \
        --split synthetic_target_val --criterion l1 --ratio 0.5 --output output/explain/demo \
        MODEL.WEIGHTS models/faster_rcnn_R18_FPN_source.pth

For an unpruned checkpoint it explains the cut that the criterion makes at the ratio; for a
pruned one (written by prune_net.py or train_net.py) it compares its widths with the config's and
explains a further cut. Writes OUTPUT/report.html (self-contained) and its figures as PNGs.
Trailing KEY VALUE pairs override any config key (PRUNE.KINDS, PRUNE.MODE, ...).
"""

import argparse
import logging
import os
import sys

from detectron2.utils.logger import setup_logger

from d2prune.config import check_weights, setup_cfg
from d2prune.data import add_dataset_argument, register_datasets, validate_datasets
from d2prune.errors import exit_on_user_error
from d2prune.explain import explain_checkpoint

# The experiments and reports in projects/ sit on top of the library, beside this folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from projects.explain.report import write_report  # noqa: E402


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, metavar="DIR", help="where report.html and the figures go")
    parser.add_argument("--criterion", help="filter-selection criterion (PRUNE.CRITERION)")
    parser.add_argument("--ratio", type=float, help="share of eligible channels the cut removes (PRUNE.RATIO)")
    parser.add_argument("--layer", metavar="GROUP_OR_MODULE", help="layer whose filters are shown (default: a mid-depth block)")
    parser.add_argument("--split", metavar="NAME", help="registered dataset to explain on (default: DATASETS.TEST[0])")
    add_dataset_argument(parser, "pick it with --split")
    parser.add_argument("--images", type=int, default=32, help="annotated images to collect statistics on")
    parser.add_argument("--filters", type=int, default=4, help="most and least important filters shown")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def main(args):
    overrides = []
    if args.criterion is not None:
        overrides += ["PRUNE.CRITERION", args.criterion]
    if args.ratio is not None:
        overrides += ["PRUNE.RATIO", str(args.ratio)]
    cfg = setup_cfg(args.config_file, overrides + args.opts, args.dataset)
    cfg.freeze()
    register_datasets(cfg)
    split = args.split or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    validate_datasets(cfg, [split] if split else [])
    check_weights(cfg)
    explanation = explain_checkpoint(cfg, split, args.images, args.layer, args.filters)
    print(f"Wrote {write_report(explanation, args.output)}")


if __name__ == "__main__":
    setup_logger(name="d2prune")
    logging.getLogger("fvcore").setLevel(logging.WARNING)
    exit_on_user_error(main, argument_parser().parse_args())
