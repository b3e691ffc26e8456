#!/usr/bin/env python
"""Generate the synthetic source and target COCO datasets (skips splits that are up to date).

Example: python tools/make_synthetic.py --root datasets/synthetic --workers 2
"""

import argparse

from d2prune.data.synthetic import generate_all
from d2prune.errors import exit_on_user_error


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="datasets/synthetic", help="output folder")
    parser.add_argument("--source-train", type=int, default=2000, help="source train images")
    parser.add_argument("--source-val", type=int, default=300, help="source val images")
    parser.add_argument("--target-train", type=int, default=40, help="target train images")
    parser.add_argument("--target-val", type=int, default=300, help="target val images")
    parser.add_argument("--image-size", type=int, default=192, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    return parser.parse_args(argv)


def main(args):
    results = generate_all(
        root=args.root,
        source_train=args.source_train,
        source_val=args.source_val,
        target_train=args.target_train,
        target_val=args.target_val,
        image_size=args.image_size,
        seed=args.seed,
        workers=args.workers,
    )
    for name, info in results.items():
        status = "generated" if info.generated else "up to date"
        print(
            f"{name:24s} {info.num_images:6d} images {info.num_annotations:7d} annotations  "
            f"{info.json_file}  {status}"
        )


if __name__ == "__main__":
    exit_on_user_error(main, parse_args())
