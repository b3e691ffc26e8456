#!/usr/bin/env python
"""Time each data-driven criterion: seconds to collect and score one batch, against one training
iteration (forward, backward, optimizer step) of the same detector on the same batches.

    python tools/benchmark_scoring.py --batches 5
    python tools/benchmark_scoring.py --criteria taylor chip:positions=128 MODEL.DEVICE cuda

Random initialisation and random images with a few random boxes: timings, not scores, matter.
"""

import argparse
import functools
import time

import torch
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from d2prune.config import setup_cfg
from d2prune.criteria import available, build
from d2prune.criteria.collector import collect_statistics
from d2prune.errors import exit_on_user_error
from d2prune.pruning import find_groups

CONFIG = "configs/synthetic/faster_rcnn_R18_FPN_source.yaml"


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", default=CONFIG, metavar="FILE")
    parser.add_argument("--batches", type=int, default=5, help="timed batches per figure")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument(
        "--criteria", nargs="+", metavar="NAME[:KEY=VALUE,...]",
        help="criteria with options (default: every data-driven one, and taylor:variant=2019)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def parse_criterion(text):
    """'chip:images=8,positions=128' -> ('chip', {'images': 8, 'positions': 128})."""
    name, _, options = text.partition(":")
    pairs = (item.split("=", 1) for item in options.split(",") if item)
    return name, {key: int(value) if value.isdigit() else value for key, value in pairs}


def random_batches(n, batch_size, size, num_classes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        batch = []
        for _ in range(batch_size):
            xy = torch.rand(3, 2, generator=generator) * 0.6 * size
            wh = (torch.rand(3, 2, generator=generator) * 0.25 + 0.15) * size
            instances = Instances((size, size))
            instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
            instances.gt_classes = torch.randint(num_classes, (3,), generator=generator)
            image = torch.rand(3, size, size, generator=generator) * 255
            batch.append({"image": image, "height": size, "width": size, "instances": instances})
        batches.append(batch)
    return batches


def seconds_per_batch(fn, batches, device):
    fn(batches[:1])  # warm-up: allocator, kernels, lazy initialisation
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(batches)


def score(model, groups, criterion, batches):
    criterion.score(model, groups, collect_statistics(model, groups, criterion, batches))


def main(args):
    opts = ["INPUT.MIN_SIZE_TRAIN", f"({args.size},)", "INPUT.MAX_SIZE_TRAIN", str(args.size)]
    cfg = setup_cfg(args.config_file, opts + list(args.opts))
    model = build_model(cfg)
    device = next(model.parameters()).device
    batches = random_batches(args.batches, args.batch_size, args.size, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    groups = find_groups(model)
    optimizer = build_optimizer(cfg, model)

    def train(batches):
        model.train()
        with EventStorage():
            for batch in batches:
                loss = sum(model(batch).values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    iteration = seconds_per_batch(train, batches, device)
    print(f"{cfg.MODEL.DEVICE}, {torch.get_num_threads()} threads, batch {args.batch_size} "
          f"at {args.size} px, {len(groups)} groups, {args.batches} timed batches")
    print(f"{'criterion':<28} {'s / batch':>10} {'x train iter':>13}")
    print(f"{'training iteration':<28} {iteration:>10.3f} {1:>13.2f}")

    names = args.criteria or [n for n in available() if build(n).data != "none"] + ["taylor:variant=2019"]
    for text in names:
        name, options = parse_criterion(text)
        criterion = build(name, **options)
        seconds = seconds_per_batch(functools.partial(score, model, groups, criterion), batches, device)
        print(f"{text:<28} {seconds:>10.3f} {seconds / iteration:>13.2f}")


if __name__ == "__main__":
    exit_on_user_error(main, argument_parser().parse_args())
