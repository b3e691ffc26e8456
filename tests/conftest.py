"""Shared fixtures: a small hand-written COCO dataset and the repository paths."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(2)


def write_coco(folder: Path, data: dict, with_images: bool = True) -> tuple:
    """Write `data` as `folder/ann.json` (and its images as solid PNGs); return (json, root)."""
    root = folder / "images"
    root.mkdir(parents=True, exist_ok=True)
    if with_images:
        for img in data["images"]:
            Image.fromarray(np.full((img["height"], img["width"], 3), 127, np.uint8)).save(
                root / img["file_name"]
            )
    json_file = folder / "ann.json"
    json_file.write_text(json.dumps(data))
    return str(json_file), str(root)


@pytest.fixture
def coco_dict():
    """Valid COCO detection data with non-contiguous category ids and an image without boxes."""
    return {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 11, "file_name": "b.png", "width": 64, "height": 48},
            {"id": 12, "file_name": "empty.png", "width": 64, "height": 48},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [4, 4, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [30, 20, 30, 25], "area": 750, "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 7, "bbox": [0, 0, 64, 48], "area": 3072, "iscrowd": 0},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Tests write outputs relative to the working directory: keep them out of the repository."""
    monkeypatch.chdir(tmp_path)
    yield
    assert Path(os.getcwd()) == tmp_path
