#!/usr/bin/env python
"""Export a (pruned) detector to TorchScript and/or ONNX and check the exports against it.

    python tools/export_model.py --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml \
        --format torchscript --format onnx --output output/export/l1_50 \
        MODEL.WEIGHTS output/synthetic/oneshot/l1_50/model_pruned.pth

Writes OUTPUT/model.ts and/or OUTPUT/model.onnx and OUTPUT/export.json (file sizes, largest
differences from the eager model, CPU latencies, parameters) and prints them as a table. The
exported models take one image tensor resized to the test size and return boxes in its pixels
(see d2prune/export.py). Exits with status 1 when an export's outputs differ from the eager
model's. Trailing KEY VALUE pairs override any config key.
"""

import argparse
import logging
import sys

import torch
from detectron2.utils.logger import setup_logger

from d2prune.config import check_weights, setup_cfg
from d2prune.data import add_dataset_argument, register_datasets
from d2prune.errors import UserError, exit_on_user_error
from d2prune.export import (
    CLOCKS,
    FORMATS,
    check_formats,
    check_output_dir,
    check_test_dataset,
    export_model,
    format_table,
    parity_failures,
)


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument(
        "--format", required=True, action="append", metavar="FORMAT",
        help=f"{' or '.join(FORMATS)}; repeat the flag to export both",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="where the exported models go")
    parser.add_argument(
        "--sample-image", metavar="PATH",
        help="image to trace on (default: the first of DATASETS.TEST, else a random one)",
    )
    parser.add_argument(
        "--parity-images", type=int, default=3,
        help="images besides the sample on which exported and eager outputs are compared",
    )
    parser.add_argument("--latency-repeats", type=int, default=20, help="timed runs per latency figure")
    parser.add_argument(
        "--threads", type=int,
        help="CPU threads of torch and ONNX Runtime (default: torch's, one per core)",
    )
    parser.add_argument(
        "--clock", choices=CLOCKS, default="wall",
        help="time latency as elapsed time (wall) or as this process's CPU time (cpu, with "
        "--threads 1: unaffected by other load on a shared machine)",
    )
    parser.add_argument(
        "--no-fold-norms", dest="fold", action="store_false",
        help="export the norms as they are (default: fold FrozenBN and eval BN into their convs first)",
    )
    add_dataset_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def main(args):
    formats = check_formats(args.format)
    check_output_dir(args.output)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be a positive integer, got {args.threads}.")
        torch.set_num_threads(args.threads)
    cfg = setup_cfg(args.config_file, args.opts, args.dataset)
    cfg.freeze()
    check_weights(cfg)
    register_datasets(cfg)
    check_test_dataset(cfg)
    report = export_model(
        cfg, formats, args.output, args.sample_image, args.parity_images, args.latency_repeats,
        args.clock, args.fold,
    )
    print(format_table(report))
    failures = parity_failures(report)
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    setup_logger(name="d2prune")
    setup_logger(name="detectron2", abbrev_name="d2")
    logging.getLogger("fvcore").setLevel(logging.WARNING)
    sys.exit(exit_on_user_error(main, argument_parser().parse_args()))
