#!/usr/bin/env python
"""Benchmark the pruning engine on Faster R-CNN R50-FPN (random weights, CPU): surgery time,
and the ResNet latency cut that a 50 % ResNet FLOPs cut by `block` pruning buys.

    python tools/benchmark_pruning.py --side 512 --output docs/benchmark_pruning.md
"""

import argparse
import os
import sys

import torch
from detectron2.modeling import build_model
from tabulate import tabulate

from d2prune.analysis.benchmark import backbone_speedup, surgery_seconds
from d2prune.config import setup_cfg
from d2prune.utils.io import atomic_write_text

CONFIG = "configs/examples/faster_rcnn_R50_FPN_finetune.yaml"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=512, help="image side for FLOPs and latency")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per latency figure")
    parser.add_argument("--flops-reduction", type=float, default=0.5)
    parser.add_argument("--output", help="also write the results as Markdown here")
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = setup_cfg(CONFIG, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    model = build_model(cfg).eval()
    surgery = surgery_seconds(model)
    print(f"surgery (prune 50% of every block group, {surgery['groups_pruned']} groups): "
          f"{surgery['median_s'] * 1000:.0f} ms (median of {surgery['repeats']})")
    rows = []
    for round_to in (1, 8):
        r = backbone_speedup(model, args.side, args.flops_reduction, round_to, args.repeats)
        rows.append([
            round_to,
            f"{r['before']['backbone_flops'] / 1e9:.1f} -> {r['after']['backbone_flops'] / 1e9:.1f}",
            f"{r['before']['backbone_params'] / 1e6:.1f} -> {r['after']['backbone_params'] / 1e6:.1f}",
            f"{r['before']['backbone_latency_ms']:.0f} -> {r['after']['backbone_latency_ms']:.0f}",
            f"{r['flops_reduction']:.1%}", f"{r['latency_reduction']:.1%}", f"{r['latency_over_flops']:.2f}",
        ])
        print(tabulate(rows[-1:], tablefmt="plain"), flush=True)
    table = tabulate(
        rows,
        headers=["round_to", "ResNet GFLOPs", "ResNet params (M)", "ResNet CPU ms",
                 "FLOPs cut", "latency cut", "latency cut / FLOPs cut"],
        tablefmt="github",
    )
    print(table)
    if args.output:
        text = "\n".join([
            "# Pruning engine benchmark",
            "",
            f"Faster R-CNN R50-FPN, random weights; the ResNet (`backbone.bottom_up`, where `block` "
            f"groups live) on one {args.side} x {args.side} image, {torch.get_num_threads()} CPU threads; "
            f"`block` groups pruned (l1, global) until its FLOPs fall by {args.flops_reduction:.0%}.",
            "",
            f"Produced by: `python {' '.join(sys.argv)}`",
            "",
            f"- surgery, pruning half of every block group ({surgery['groups_pruned']} groups): "
            f"{surgery['median_s'] * 1000:.0f} ms (median of {surgery['repeats']})",
            "",
            table,
            "",
        ])
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        atomic_write_text(args.output, text)


if __name__ == "__main__":
    main()
