#!/usr/bin/env python
"""Time dataset validation on many small images: image headers (size, EXIF orientation) included.

    python tools/benchmark_data.py                       # 10,000 images in /tmp/d2prune_bench_data
    python tools/benchmark_data.py --images 2000 --threads 1 4 8 16

Writes the images once (kept for later runs), then prints the best of --repeats timings of the
whole `validate_coco_json` and of the header check alone per thread count, with the load average.
"""

import argparse
import os
import sys
import time
from pathlib import Path

from tabulate import tabulate

# The experiments and reports in projects/ sit on top of the library, beside this folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from projects.benchmark.benchmark import machine_description  # noqa: E402
from projects.benchmark.data import load_average, time_validation, write_dataset  # noqa: E402


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/d2prune_bench_data", metavar="DIR")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--side", type=int, default=96, help="about this many px a side")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    return parser


def main(args):
    root = Path(args.root) / f"{args.images}x{args.side}"
    start = time.perf_counter()
    json_file = write_dataset(root, args.images, args.side)
    print(f"dataset: {json_file} ({args.images} images, written or found in {time.perf_counter() - start:.1f} s)")
    rows = time_validation(json_file, str(root / "images"), args.threads, args.repeats)
    print(tabulate(
        [[r["what"], r["threads"], f"{r['seconds']:.2f}", f"{r['images_per_s']:,.0f}"] for r in rows],
        headers=["", "threads", f"seconds (best of {args.repeats})", "images/s"],
    ))
    print(f"machine: {machine_description()}; load average {load_average()}")
    return rows


if __name__ == "__main__":
    main(argument_parser().parse_args())
