"""A few training iterations on generated data, then a real COCO evaluation; and the command-line
tool's behaviour on a checkpoint and on a corrupt dataset file."""

import json
import math

import pytest

from .conftest import CONFIG, eval_only_ap, run_tool, tiny_opts


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


@pytest.mark.subprocess
def test_eval_only_reproduces_training_evaluation(trained):
    root, out, results = trained
    ap = eval_only_ap(root, out / "eval", out / "model_final.pth")
    assert ap == pytest.approx(results["bbox"]["AP"], abs=1e-3)


@pytest.mark.subprocess
def test_corrupt_dataset_is_one_line_error(tmp_path, trained):
    root, _, _ = trained
    (tmp_path / "bad.json").write_text('{"images": [], "annotations": [], "categories": [}')
    proc = run_tool(
        "train_net.py", "--config-file", CONFIG, "--dataset", "broken_train", str(tmp_path / "bad.json"), str(tmp_path),
        *tiny_opts(root, tmp_path / "out"), "DATASETS.TRAIN", "('broken_train',)",
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'bad.json'}: invalid JSON at line 1, column 50: Expecting value."]


@pytest.mark.subprocess
def test_missing_weights_is_one_line_error(tmp_path, trained):
    root, _, _ = trained
    proc = run_tool("train_net.py", "--config-file", CONFIG, "--eval-only", *tiny_opts(root, tmp_path), "MODEL.WEIGHTS", "missing.pth")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: MODEL.WEIGHTS missing.pth: file not found." in proc.stderr
