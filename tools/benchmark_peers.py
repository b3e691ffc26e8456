#!/usr/bin/env python
"""Compare d2prune with its peers on a Detectron2 detector: Torch-Pruning (same block channels
by L1 norm: keep sets, params, FLOPs, time, and what it cannot do as is) and
torch.nn.utils.prune (the same channels masked: counted sparsity and latency).

    python tools/benchmark_peers.py --side 320 --output docs/benchmark_peers.md

Random weights, CPU. Needs torch-pruning (in d2prune's `test` extra).
"""

import argparse
import os
import sys

from d2prune.errors import exit_on_user_error

# The experiments and reports in projects/ sit on top of the library, beside this folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from projects.benchmark.run_peers import main  # noqa: E402


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default="configs/examples/faster_rcnn_R50_FPN_finetune.yaml", metavar="FILE")
    parser.add_argument("--side", type=int, default=320, help="image side for FLOPs and latency")
    parser.add_argument("--ratio", type=float, default=0.5, help="share of every block group removed")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per latency round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    parser.add_argument("--probe-side", type=int, default=128, help="image side for the limit probes")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="elapsed time, or this process's CPU time (steadier on a shared machine "
                             "with --threads 1)")
    parser.add_argument("--output", metavar="FILE", help="also write the results as Markdown here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


if __name__ == "__main__":
    exit_on_user_error(main, argument_parser().parse_args())
