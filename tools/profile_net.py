#!/usr/bin/env python
"""Profile an unpruned and a pruned detector layer by layer on one CPU thread: where the time
goes, what shrinks with the channels and what does not, and what folding norms and
channels-last weights (`d2prune.fuse`) change.

    python tools/profile_net.py --part resnet --ratio 0.5 --side 320 --backends
    python tools/profile_net.py --part detector \
        --config-file configs/synthetic/faster_rcnn_R18_FPN_source.yaml \
        --weights models/faster_rcnn_R18_FPN_source.pth --dataset synthetic_target_val \
        --flops-reduction 0.5 --kinds block stage fpn head --round-to 1 16

--part resnet: the ResNet (`backbone.bottom_up`) alone on one random --side px image, --ratio of
every block group's channels removed (l1, local). --part detector: the whole detector on the
first --images images of --dataset, pruned (l1, global order over --kinds) until its FLOPs fall
by --flops-reduction. Each --round-to value makes one pruned model; the first is profiled.
Trailing KEY VALUE pairs override the config.
"""

import argparse
import os
import sys

from d2prune.errors import exit_on_user_error

# The experiments and reports in projects/ sit on top of the library, beside this folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from projects.benchmark.profile import VARIANTS, main  # noqa: E402


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["resnet", "detector"], default="resnet")
    parser.add_argument("--config-file", default="configs/examples/faster_rcnn_R50_FPN_finetune.yaml", metavar="FILE")
    parser.add_argument("--weights", metavar="FILE",
                        help="checkpoint to load (default: MODEL.WEIGHTS for a detector, random for a ResNet)")
    parser.add_argument("--side", type=int, default=320, help="image side for --part resnet")
    parser.add_argument("--ratio", type=float, help="share of every block group's channels to remove (resnet)")
    parser.add_argument("--dataset", default="synthetic_target_val", help="images for --part detector")
    parser.add_argument("--images", type=int, default=4, help="how many of its images")
    parser.add_argument("--flops-reduction", type=float, help="remove channels until the FLOPs fall by this (detector)")
    parser.add_argument("--kinds", nargs="+", default=["block", "stage", "fpn", "head"], help="group kinds pruned (detector)")
    parser.add_argument("--fixed-proposals", action="store_true",
                        help="send the same anchors to every model's box head (`fixed_proposals`)")
    parser.add_argument("--round-to", type=int, nargs="+", default=[1], help="kept widths are multiples of this")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=5, help="profiled runs per model")
    parser.add_argument("--profile-variants", nargs="+", choices=list(VARIANTS),
                        default=["as built", "fold_norms + channels_last"], help="variants profiled op by op")
    parser.add_argument("--latency-repeats", type=int, default=3, help="timed runs per model and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    parser.add_argument("--convs", action="store_true", help="also print the per-conv table")
    parser.add_argument("--backends", action="store_true", help="also time each conv under each CPU kernel")
    parser.add_argument("--fix-mmap-threshold", action="store_true",
                        help="serve allocations of 64 KiB or more by mmap, as tools/benchmark.py does")
    parser.add_argument("--output", metavar="FILE", help="also write the results as Markdown here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


if __name__ == "__main__":
    exit_on_user_error(main, argument_parser().parse_args())
