"""What `tools/benchmark_data.py` runs: a COCO dataset of many small images written to disk, and
the time `validate_coco_json` takes on it, image headers included, serially and in threads."""

import json
import os
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

from d2prune.data.coco import check_image_headers, validate_coco_json


def write_dataset(root: Path, num_images: int, side: int = 96, seed: int = 0) -> str:
    """`num_images` noise images of about `side` px (JPEG and PNG alternately, sides varying by
    up to a quarter) with one box each, in `root/images`, and `root/ann.json`; returns the json.
    Images already there are kept, so a second run only times."""
    rng = np.random.default_rng(seed)
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        w, h = (int(side * rng.uniform(0.75, 1.25)) for _ in range(2))
        name = f"{i // 1000:02d}/{i:06d}.{'jpg' if i % 2 else 'png'}"
        path = folder / name
        if not path.is_file():
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        annotations.append({"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, w // 2, h // 2], "area": w * h // 4, "iscrowd": 0})
    json_file = root / "ann.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}))
    return str(json_file)


def time_validation(json_file: str, image_root: str, workers: List[int], repeats: int = 3) -> List[Dict]:
    """Best-of-`repeats` seconds of the whole validation, and of the header check alone with each
    number of threads (files in the page cache after the first pass)."""
    images = json.loads(Path(json_file).read_text())["images"]
    rows = []

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    rows.append({"what": "validate_coco_json (json, boxes, files, headers)", "threads": 8,
                 "seconds": best(lambda: validate_coco_json(json_file, image_root))})
    for n in workers:
        rows.append({"what": "image headers only", "threads": n,
                     "seconds": best(lambda n=n: check_image_headers(json_file, image_root, images, workers=n))})
    for row in rows:
        row["images_per_s"] = len(images) / row["seconds"]
    return rows


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"
