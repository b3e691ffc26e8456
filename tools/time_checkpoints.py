#!/usr/bin/env python
"""Time trained checkpoints (pruned or not) against each other on real images: one CPU thread,
CPU time of the process, every model prepared for inference, all interleaved in one loop.

    python tools/time_checkpoints.py --config-file configs/synthetic/study/faster_rcnn_R18_FPN_study.yaml \
        --split synthetic_target_val --weights output/study/runs/baseline_n40_s0/model_final.pth \
        output/study/runs/l1_r0.5_n40_s0/model_final.pth

The first checkpoint is the reference of the cuts. Each is loaded with the one config (a pruned
checkpoint is cut to its spec first), prepared as `d2prune.Predictor` prepares it
(`d2prune.fuse.prepare_for_inference`: norms folded, channels-last on the CPU) unless
--as-built, and run on the first --images images of --split at the config's test size, one
image per call, with the models' own proposals. Times: ms per image, median and minimum over
--rounds rounds in which every model runs --repeats times in turn (other load on a shared
machine falls on all of them alike; the minimum is the steadier figure). FLOPs: fvcore's count,
mean over the first three images. Trailing KEY VALUE pairs override the config.
"""

import argparse
import os
import statistics
import sys

from d2prune.complexity import count_flops, count_params
from d2prune.config import setup_cfg
from d2prune.data import add_dataset_argument, register_datasets
from d2prune.engine.checkpoint import load_model
from d2prune.errors import UserError, exit_on_user_error
from d2prune.utils.io import atomic_write_text

# The experiments and reports in projects/ sit on top of the library, beside this folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from projects.benchmark.detector import real_images, time_deployed  # noqa: E402


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the config every checkpoint loads with")
    parser.add_argument("--weights", dest="checkpoints", nargs="+", required=True, metavar="CHECKPOINT",
                        help="the checkpoints to time; the first is the reference")
    parser.add_argument("--labels", nargs="+", help="a name per checkpoint (default: its path)")
    parser.add_argument("--split", default="synthetic_target_val", help="registered dataset whose images are timed")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--as-built", action="store_true", help="time the models as loaded (no norm folding, NCHW)")
    parser.add_argument("--output", metavar="MD", help="also write the table here")
    add_dataset_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def main(args) -> str:
    from tabulate import tabulate

    labels = args.labels or args.checkpoints
    if len(labels) != len(args.checkpoints):
        raise UserError(f"--labels: {len(labels)} names for {len(args.checkpoints)} checkpoints.")
    for name, value in (("images", args.images), ("rounds", args.rounds), ("repeats", args.repeats)):
        if value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}.")
    for path in args.checkpoints:
        if not os.path.isfile(path):
            raise UserError(f"{path}: checkpoint file not found.")
    cfg = setup_cfg(args.config_file, ["MODEL.DEVICE", "cpu", *args.opts], args.dataset)
    register_datasets(cfg)
    inputs = real_images(cfg, args.split, args.images)
    models = [load_model(cfg, path) for path in args.checkpoints]
    counted = inputs[: min(3, len(inputs))]
    flops = [statistics.fmean(count_flops(m, [x])["total"] for x in counted) for m in models]
    times = time_deployed(models, inputs, rounds=args.rounds, repeats=args.repeats, prepared=not args.as_built)
    base_ms, base_flops = times[0]["min_ms"], flops[0]
    rows = []
    for label, model, f, t in zip(labels, models, flops, times):
        median, least = t["median_ms"], t["min_ms"]
        rows.append([label, f"{count_params(model) / 1e6:.2f}", f"{f / 1e9:.3f}", f"{1 - f / base_flops:.1%}",
                     f"{median:.1f} / {least:.1f}", f"{1 - least / base_ms:.1%}",
                     f"{(1 - least / base_ms) / (1 - f / base_flops):.2f}" if f < base_flops else "–"])  # fmt: skip
    table = tabulate(rows, headers=["checkpoint", "params (M)", "GFLOPs", "FLOPs cut", "ms (median / min)",
                                    "latency cut (min)", "cut ratio"], tablefmt="github")  # fmt: skip
    setting = (
        f"ms per image on the first {len(inputs)} images of `{args.split}`, one thread, CPU time, "
        f"{args.rounds} interleaved rounds of {args.repeats}; "
        f"{'as built' if args.as_built else 'prepared for inference (norms folded, channels-last)'}."
    )
    text = f"{setting}\n\n{table}\n"
    if args.output:
        atomic_write_text(args.output, text)
    return text


if __name__ == "__main__":
    print(exit_on_user_error(main, argument_parser().parse_args()))
