#!/usr/bin/env python
"""Draw an unpruned and a pruned detector's detections side by side, beside the ground truth.

    python tools/visualize.py --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml \
        --unpruned models/faster_rcnn_R18_FPN_source.pth \
        --pruned output/synthetic/oneshot/l1_50/model_pruned.pth \
        --split synthetic_target_val --images 8 --output output/visualize/l1_50

For each of the first N images of the split, one PNG shows the ground truth, the unpruned model's
detections and the pruned model's (scores of --threshold or more); OUTPUT/index.html shows them
all with the counts of detections and how many of the pruned model's match the unpruned model's.
Both checkpoints load with the one config (a pruned one carries its architecture). Trailing
KEY VALUE pairs override any config key.
"""

import argparse
import logging
import os
import sys

from detectron2.utils.logger import setup_logger

from d2prune.config import separate_overrides, setup_cfg, strip_separator
from d2prune.data import add_dataset_argument, register_datasets, validate_datasets
from d2prune.engine.checkpoint import load_model
from d2prune.errors import UserError, exit_on_user_error

# The experiments and reports in projects/ sit on top of the library, beside this folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from projects.visualize import Model, write_visualization  # noqa: E402


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--unpruned", required=True, metavar="WEIGHTS", help="the unpruned model's checkpoint")
    parser.add_argument("--pruned", required=True, metavar="WEIGHTS", help="the pruned model's checkpoint")
    parser.add_argument("--output", required=True, metavar="DIR", help="where index.html and images/ go")
    parser.add_argument("--split", metavar="NAME", help="registered dataset to draw (default: DATASETS.TEST[0])")
    add_dataset_argument(parser, "pick it with --split")
    parser.add_argument("--images", type=int, default=8, help="how many images, the split's first")
    parser.add_argument("--threshold", type=float, default=0.5, help="lowest score of a detection drawn")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def main(args):
    if args.images < 1:
        raise UserError(f"--images {args.images}: draw at least one image.")
    if not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold {args.threshold}: a score threshold lies in [0, 1].")
    cfg = setup_cfg(args.config_file, args.opts, args.dataset)
    cfg.freeze()
    register_datasets(cfg)
    split = args.split or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    if split is None:
        raise UserError("no dataset to draw: give --split NAME (registered, or added with --dataset) or set DATASETS.TEST.")
    validate_datasets(cfg, [split])
    unpruned = Model("unpruned", args.unpruned, load_model(cfg, args.unpruned))
    pruned = Model("pruned", args.pruned, load_model(cfg, args.pruned))
    page = write_visualization(cfg, split, unpruned, pruned, args.output, args.images, args.threshold)
    print(f"Wrote {page}")
    return page


if __name__ == "__main__":
    setup_logger(name="d2prune")
    logging.getLogger("fvcore").setLevel(logging.WARNING)
    args = argument_parser().parse_args(separate_overrides(sys.argv[1:]))
    args.opts = strip_separator(args.opts)
    exit_on_user_error(main, args)
