"""Shared fixtures: a small hand-written COCO dataset and the repository paths."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.utils.env import seed_all_rng
from PIL import Image

from d2prune.config import setup_cfg
from d2prune.data import register_datasets, validate_datasets
from d2prune.data.synthetic import generate, split_paths
from d2prune.engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/synthetic/faster_rcnn_R18_FPN_source.yaml")
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


def tiny_opts(root, out, iters=3):
    """Overrides that shrink the synthetic config to seconds: 96 px, batch 2, `iters` steps."""
    return [
        "DATASETS.SYNTHETIC_ROOT", str(root), "OUTPUT_DIR", str(out),
        "SOLVER.MAX_ITER", str(iters), "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.CHECKPOINT_PERIOD", "1000",
        # A 3-iteration model scores every box low: keep them all so COCOeval has work to do.
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    ]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A 3-iteration source model on a tiny generated set: (data root, output dir, results)."""
    root = tmp_path_factory.mktemp("synthetic")
    out = tmp_path_factory.mktemp("out")
    generate(root, "source", "train", 8, image_size=96, workers=1)
    generate(root, "source", "val", 6, image_size=96, workers=1)
    cfg = setup_cfg(CONFIG, tiny_opts(root, out))
    register_datasets(cfg)
    validate_datasets(cfg)
    # The model's random init must not depend on what earlier tests drew from the global RNGs:
    # with some draws the 3-iteration model detected nothing and AP was nan.
    seed_all_rng(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    return root, out, results


@pytest.fixture(scope="session")
def checkpoints(trained, tmp_path_factory):
    """(data root, the trained model's checkpoint, one with the first half of each block group kept)."""
    from d2prune.engine.checkpoint import PrunedCheckpointer, load_model
    from d2prune.pruning import find_groups, prune

    root, out, _ = trained
    dest = tmp_path_factory.mktemp("pruned_checkpoint")
    model = load_model(setup_cfg(CONFIG, tiny_opts(root, dest)), str(out / "model_final.pth"))
    prune(model, {g.name: list(range(g.size // 2)) for g in find_groups(model) if g.kind == "block"})
    PrunedCheckpointer(model, str(dest)).save("model_pruned")
    return root, out / "model_final.pth", dest / "model_pruned.pth"


def own_split(root) -> list:
    """The tools' arguments that register the tiny source val set as a dataset of one's own
    (`--dataset mine_val JSON IMAGE_ROOT`) and pick it (`--split mine_val`)."""
    json_file, image_root = split_paths(root, "source", "val")
    return ["--dataset", "mine_val", json_file, image_root, "--split", "mine_val"]


def run_tool(tool: str, *args) -> subprocess.CompletedProcess:
    """Run `tools/<tool>` in a fresh interpreter, as a user would."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / tool), *map(str, args)],
        capture_output=True, text=True, env=env, timeout=600,
    )


def eval_only_ap(root, out, weights) -> float:
    """The bbox AP that `train_net.py --eval-only` prints for `weights` on the tiny set."""
    proc = run_tool("train_net.py", "--config-file", CONFIG, "--eval-only", *tiny_opts(root, out), "MODEL.WEIGHTS", weights)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return copypaste_ap(proc.stdout)


def copypaste_ap(stdout: str) -> float:
    """The bbox AP that Detectron2 logs as "copypaste: AP,AP50,..." then "copypaste: <values>"."""
    values = [ln.split("copypaste: ", 1)[1] for ln in stdout.splitlines() if "copypaste: " in ln]
    return float(next(v for v in values if v[:1].isdigit() or v.startswith("nan")).split(",")[0])
