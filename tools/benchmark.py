#!/usr/bin/env python
"""Benchmark what pruning buys and costs: realised speed-up per FLOPs cut, surgery time,
scoring overhead of every criterion, and peak memory of a pruning event (random weights, CPU).

    python tools/benchmark.py --output docs/benchmark.md
    python tools/benchmark.py --sections scoring --criteria l1 taylor chip:positions=128
    python tools/benchmark.py --sections speedup --side 512 --target flops
    python tools/benchmark.py --sections detector --output docs/benchmark_detector.md

Speed-up and surgery use --speedup-config (R50-FPN) on one --side px image; scoring and
memory use --config-file (the CPU-sized synthetic R18-FPN) on random --size px batches with
boxes. Trailing KEY VALUE pairs override --config-file (e.g. MODEL.DEVICE cuda). The detector
section (not run by default: it evaluates and fine-tunes) prunes the trained --detector-weights
block-only and with every kind, by FLOPs and by latency, and writes a plot beside --output.
"""

import argparse
import os
import sys

from d2prune.errors import exit_on_user_error

# The experiments and reports in projects/ sit on top of the library, beside this folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from projects.benchmark.detector import ARMS  # noqa: E402
from projects.benchmark.run import DEFAULT_SECTIONS, SECTIONS, main  # noqa: E402


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS),
                        help=f"default: {' '.join(DEFAULT_SECTIONS)}")
    parser.add_argument("--output", metavar="FILE", help="also write the results as Markdown here")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="elapsed time, or this process's CPU time (steadier on a shared machine "
                             "with --threads 1)")
    group = parser.add_argument_group("speed-up and surgery")
    group.add_argument("--speedup-config", default="configs/examples/faster_rcnn_R50_FPN_finetune.yaml", metavar="FILE")
    group.add_argument("--side", type=int, default=320, help="image side for FLOPs and latency")
    group.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    group.add_argument("--target", choices=["channels", "flops"], default="channels",
                       help="levels are shares of block channels, or of the ResNet's FLOPs")
    group.add_argument("--round-to", type=int, default=1, help="kept widths are multiples of this")
    group.add_argument("--repeats", type=int, default=5, help="timed runs per latency round")
    group.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    group = parser.add_argument_group("scoring and memory")
    group.add_argument("--config-file", default="configs/synthetic/faster_rcnn_R18_FPN_source.yaml", metavar="FILE")
    group.add_argument("--size", type=int, default=128, help="image side of the scoring batches")
    group.add_argument("--batch-size", type=int, default=8)
    group.add_argument("--batches", type=int, default=3, help="timed batches per figure")
    group.add_argument("--criteria", nargs="+", metavar="NAME[:KEY=VALUE,...]",
                       help="criteria with options (default: every registered one)")
    group.add_argument("--memory-criteria", nargs="+", default=["l1", "taylor"], metavar="NAME")
    group.add_argument("--memory-ratio", type=float, default=0.5, help="share of block channels an event removes")
    group = parser.add_argument_group("detector (also uses --levels, --rounds, --repeats)")
    group.add_argument("--detector-config", default="configs/synthetic/faster_rcnn_R18_FPN_source.yaml", metavar="FILE")
    group.add_argument("--detector-weights", default="models/faster_rcnn_R18_FPN_source.pth", metavar="FILE")
    group.add_argument("--latency-dataset", default="synthetic_target_val", help="real images to time on")
    group.add_argument("--detector-criterion", default="l1")
    group.add_argument("--finetune-iters", type=int, default=100)
    group.add_argument("--finetune-lr", type=float, help="base LR of that fine-tune (default: the config's)")
    group.add_argument("--detector-arms", nargs="+", choices=list(ARMS), metavar="ARM",
                       help=f"arms to run (default: all): {'; '.join(ARMS)}")
    group.add_argument("--images", type=int, default=8, help="images timed per model")
    group.add_argument("--detector-output", default="output/benchmark_detector", metavar="DIR")
    group.add_argument("--detector-rows", metavar="JSON",
                       help="render DIR/rows.json of an earlier (or interrupted) run instead of measuring")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of --config-file")
    return parser


if __name__ == "__main__":
    exit_on_user_error(main, argument_parser().parse_args())
