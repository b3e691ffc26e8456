"""A few training iterations on generated data, then a real COCO evaluation; and the command-line
tool's behaviour on a pruned-free checkpoint and on a corrupt dataset file."""

import json
import math
import os
import subprocess
import sys

import pytest

from d2prune.config import setup_cfg
from d2prune.data import register_datasets, validate_datasets
from d2prune.data.synthetic import generate
from d2prune.engine.trainer import Trainer

from .conftest import REPO

CONFIG = str(REPO / "configs/synthetic/faster_rcnn_R18_FPN_source.yaml")


def tiny_opts(root, out, iters=3):
    return [
        "DATASETS.SYNTHETIC_ROOT", str(root), "OUTPUT_DIR", str(out),
        "SOLVER.MAX_ITER", str(iters), "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.CHECKPOINT_PERIOD", "1000",
        # A 3-iteration model scores every box low: keep them all so COCOeval has work to do.
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    out = tmp_path_factory.mktemp("out")
    generate(root, "source", "train", 8, image_size=96, workers=1)
    generate(root, "source", "val", 6, image_size=96, workers=1)
    cfg = setup_cfg(CONFIG, tiny_opts(root, out))
    register_datasets(cfg)
    validate_datasets(cfg)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    return root, out, results


def test_train_then_coco_evaluation(trained):
    _, out, results = trained
    bbox = results["bbox"]
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert key in bbox
    assert 0.0 <= bbox["AP50"] <= 100.0 and not math.isnan(bbox["AP"])
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["iterations"] == 3 and summary["max_iter"] == 3
    assert summary["results"]["bbox"]["AP50"] == pytest.approx(bbox["AP50"])
    assert (out / "model_final.pth").is_file()
    assert (out / "inference" / "synthetic_source_val" / "coco_instances_results.json").is_file()


def run_tool(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(REPO / "tools/train_net.py"), *args],
        capture_output=True, text=True, env=env, timeout=300,
    )


def test_eval_only_reproduces_training_evaluation(trained):
    root, out, results = trained
    proc = run_tool(
        "--config-file", CONFIG, "--eval-only",
        *tiny_opts(root, out / "eval"), "MODEL.WEIGHTS", str(out / "model_final.pth"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Detectron2 logs "copypaste: AP,AP50,..." then "copypaste: <values>" for the bbox task.
    values = [ln.split("copypaste: ", 1)[1] for ln in proc.stdout.splitlines() if "copypaste: " in ln]
    ap = float(next(v for v in values if v[:1].isdigit() or v.startswith("nan")).split(",")[0])
    assert ap == pytest.approx(results["bbox"]["AP"], abs=1e-3)


def test_corrupt_dataset_is_one_line_error(tmp_path, trained):
    root, _, _ = trained
    (tmp_path / "bad.json").write_text('{"images": [], "annotations": [], "categories": [}')
    proc = run_tool(
        "--config-file", CONFIG, "--dataset", "broken_train", str(tmp_path / "bad.json"), str(tmp_path),
        *tiny_opts(root, tmp_path / "out"), "DATASETS.TRAIN", "('broken_train',)",
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'bad.json'}: invalid JSON at line 1, column 50: Expecting value."]


def test_missing_weights_is_one_line_error(tmp_path, trained):
    root, _, _ = trained
    proc = run_tool("--config-file", CONFIG, "--eval-only", *tiny_opts(root, tmp_path), "MODEL.WEIGHTS", "missing.pth")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: MODEL.WEIGHTS missing.pth: file not found." in proc.stderr
