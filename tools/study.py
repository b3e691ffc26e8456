#!/usr/bin/env python
"""The transfer study: does pruning during fine-tuning help on a small target set, and which
criterion wins?

    python tools/study.py --config-file configs/synthetic/study/faster_rcnn_R18_FPN_study.yaml \
        --criteria l1 taylor --ratios 0.3 0.5 0.7 --seeds 0 1 2 --train-sizes 20 40 100 \
        --jobs 2 --output output/study --report docs/results.md

Fine-tunes the config's MODEL.WEIGHTS (the source model) on the first N images of the
synthetic target train split, unpruned (the baseline) and pruned by each criterion at each
ratio, for each seed; each run is its own process, or with `--launcher slurm` its own Slurm job
(submitted through submitit, requeued and resumed when preempted or out of time). Finished runs
go to OUTPUT/results.jsonl as they end and a rerun skips them, so a killed study resumes where it
stopped; `--status` lists the runs pending, running, finished and failed. Then it writes
OUTPUT/results.{csv,json}, OUTPUT/results.md (or --report) and the plots.

With `--val-size N` each run also evaluates a validation split of N target images every
`--val-period` iterations (its validation curve, and its early-stopped model: the checkpoint of
its best validation AP) and is reported on a separate test split; `--freeze-at` adds unpruned
arms with a frozen backbone, and `--kinds`, `--flops-reduction`/`--latency-reduction` and
`--mode` prune the whole detector to a FLOPs or latency target (see README, "Where fine-tuning
can overfit").
"""

import argparse
import logging
import os
import sys

from detectron2.utils.logger import setup_logger

from d2prune.config import separate_overrides, strip_separator
from d2prune.errors import exit_on_user_error

# The experiments and reports in projects/ sit on top of the library, beside this folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from projects.cluster import add_launcher_arguments  # noqa: E402
from projects.study.run import WORKER, main  # noqa: E402
from projects.study.runner import worker_main  # noqa: E402


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the fine-tuning config (PRUNE schedule included)")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--criteria", nargs="+", default=None, help="default: every registered criterion")
    parser.add_argument("--baselines-only", action="store_true", help="only the unpruned fine-tunes (e.g. to check a schedule)")
    parser.add_argument("--ratios", nargs="+", type=float, default=None,
                        help="shares of the eligible channels each criterion removes (PRUNE.RATIO; default 0.5)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--flops-reduction", nargs="+", type=float, default=None, metavar="X",
                        help="instead of --ratios: shares of the detector's FLOPs to remove (PRUNE.FLOPS_REDUCTION)")
    target.add_argument("--latency-reduction", nargs="+", type=float, default=None, metavar="X",
                        help="instead of --ratios: shares of its latency here to remove (PRUNE.LATENCY_REDUCTION)")
    parser.add_argument("--kinds", nargs="+", default=None, metavar="KIND",
                        help="PRUNE.KINDS of every pruned run, e.g. stem block stage fpn head: the whole detector")
    parser.add_argument("--mode", choices=["local", "global", "cost"], default=None,
                        help="PRUNE.MODE of every pruned run (cost: with --flops-reduction or --latency-reduction)")
    parser.add_argument("--cost-weighting", nargs="+", default=["uniform"], choices=["uniform", "sensitivity"],
                        help="with --mode cost: PRUNE.COST_WEIGHTING of the pruned arms, one arm per value")
    parser.add_argument("--freeze-at", nargs="+", type=int, default=[], metavar="K",
                        help="baseline arms with less to train: unpruned with MODEL.BACKBONE.FREEZE_AT K")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--train-sizes", nargs="+", type=int, default=[40], help="target train images")
    parser.add_argument("--main-size", type=int, default=None, help="the size every criterion runs at (default: 40 if listed, else the first)")
    parser.add_argument("--size-criteria", nargs="*", default=[], help="criteria also run at the other sizes")
    parser.add_argument("--size-ratio", type=float, default=0.5, help="their ratio at the other sizes")
    parser.add_argument("--every-size", action="store_true", help="every criterion and ratio at every train size")
    parser.add_argument("--val-size", type=int, default=0,
                        help="a validation split of this many target images, evaluated every --val-period "
                             "iterations: validation curves and early-stopped models (default 0: none)")
    parser.add_argument("--test-size", type=int, default=200,
                        help="with --val-size: the test split the runs are reported on (disjoint from it)")
    parser.add_argument("--val-period", type=int, default=100, help="iterations between validation evaluations")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (threads split between them)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of each local run (default: the CPU cores shared between --jobs)")
    parser.add_argument("--data-root", default="datasets/synthetic_study", help="where the target train subsets go")
    parser.add_argument("--image-size", type=int, default=192, help="side of the generated target images")
    parser.add_argument("--report", default=None, metavar="MD", help="markdown report (default: OUTPUT/results.md)")
    parser.add_argument("--latency-repeats", type=int, default=2,
                        help="passes per round when each architecture is timed after the runs (3 rounds)")
    parser.add_argument("--notes", default=None, metavar="MD", help="a hand-written reading of the results, put in the report")
    parser.add_argument("--title", default="Transfer study", help="the report's title")
    parser.add_argument("--report-all", action="store_true",
                        help="report every finished run in OUTPUT, also those of earlier commands with other "
                             "targets, kinds or criteria (default: this command's runs only)")
    parser.add_argument("--report-only", action="store_true", help="start no run: report the finished ones")
    parser.add_argument("--status", action="store_true",
                        help="start no run: list the planned runs pending, running, finished and failed (with their logs)")
    add_launcher_arguments(parser, timeout_min=120)
    parser.add_argument("--max-parallel", type=int, default=None,
                        help="submitit launchers: runs at once (on Slurm the job array's limit); default: --jobs")
    parser.add_argument("--gpus-per-run", type=int, default=1, help="submitit launchers: GPUs of one run")
    parser.add_argument("--cpus-per-run", type=int, default=None,
                        help="submitit launchers: CPU cores of one run, its torch threads (default: 4 on Slurm; "
                             "on this machine its cores shared between the runs at once)")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="KEY VALUE config overrides for every run, last (they may follow a list option)")
    return parser


if __name__ == "__main__":
    setup_logger(name="d2prune")
    logging.getLogger("fvcore").setLevel(logging.WARNING)
    if sys.argv[1:2] == [WORKER]:  # one run, started by run_study (a submitit job calls worker_main itself)
        exit_on_user_error(worker_main, sys.argv[2:])
    else:
        args = argument_parser().parse_args(separate_overrides(sys.argv[1:]))
        args.opts = strip_separator(args.opts)
        exit_on_user_error(main, args)
