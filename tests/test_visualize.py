"""tools/visualize.py on the tiny trained model and a pruned copy of it: one PNG of three panels per
image and a page that shows every PNG with the right counts; detections are matched one-to-one."""

import json
import re

import pytest
import torch
from detectron2.structures import Boxes, Instances
from PIL import Image

from d2prune.data.synthetic import split_paths
from projects.visualize import GAP, PANEL, TITLE, matched

from .conftest import CONFIG, own_split, run_tool, tiny_opts


@pytest.mark.subprocess
def test_a_png_per_image_and_a_page_that_shows_them(checkpoints, tmp_path):
    root, unpruned, pruned = checkpoints
    json_file = split_paths(root, "source", "val")[0]  # the ground truth the page must show
    dest = tmp_path / "vis"
    proc = run_tool(
        "visualize.py", "--config-file", CONFIG, "--unpruned", unpruned, "--pruned", pruned, *own_split(root),
        "--images", 3, "--threshold", 0.0, "--output", dest, *tiny_opts(root, tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith(str(dest / "index.html"))

    pngs = sorted(p.name for p in (dest / "images").glob("*.png"))
    assert len(pngs) == 3
    for name in pngs:  # 96 px images: three panels of PANEL px under the titles
        assert Image.open(dest / "images" / name).size == (3 * PANEL + 2 * GAP, PANEL + TITLE)
    page = (dest / "index.html").read_text()
    assert re.findall(r'<img src="([^"]+)"', page) == [f"images/{name}" for name in pngs]

    data = json.loads(json_file.read_text())
    first = data["images"][:3]
    boxes = [sum(a["image_id"] == img["id"] for a in data["annotations"]) for img in first]
    captions = re.findall(r"<figcaption>([^:]+): ground truth (\d+), unpruned (\d+), pruned (\d+) \((\d+) matching", page)
    assert [(c[0], int(c[1])) for c in captions] == [(img["file_name"], n) for img, n in zip(first, boxes)]
    assert all(int(m) <= min(int(u), int(p)) for _, _, u, p, m in captions)
    params = [int(n.replace(",", "")) for n in re.findall(r"<td>([\d,]+)</td><td>\d+</td></tr>", page)]
    assert len(params) == 2 and params[1] < params[0]


@pytest.mark.subprocess
def test_a_missing_checkpoint_is_one_line(checkpoints, tmp_path):
    root, unpruned, _ = checkpoints
    proc = run_tool(
        "visualize.py", "--config-file", CONFIG, "--unpruned", unpruned, "--pruned", tmp_path / "nope.pth",
        "--split", "synthetic_source_val", "--output", tmp_path / "vis", *tiny_opts(root, tmp_path),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nope.pth: checkpoint file not found." in proc.stderr


def _detections(boxes, classes, scores) -> Instances:
    instances = Instances((100, 100))
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
    instances.scores = torch.tensor(scores, dtype=torch.float32)
    return instances


def test_detections_are_matched_one_to_one_by_class_and_iou():
    reference = _detections([[0, 0, 10, 10], [50, 50, 70, 70], [0, 0, 10, 10]], [0, 1, 2], [0.9, 0.8, 0.7])
    other = _detections(
        [[0, 0, 10, 11], [1, 0, 10, 10], [50, 50, 60, 70], [0, 0, 10, 10]],
        [0, 0, 1, 1],  # two on the first box (one is left over); the third's IoU is 0.5; a class 1 on a class 2 box
        [0.5, 0.9, 0.6, 0.4],
    )
    assert matched(reference, other) == 2
    assert matched(reference, other, iou=0.51) == 1
    assert matched(reference, reference) == 3
    assert matched(reference, other[:0]) == 0 and matched(other[:0], reference) == 0
