"""Export to TorchScript and ONNX: exported pruned detectors give the eager model's detections,
the tool writes what export.json says, and bad input is a one-line error."""

import json

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from d2prune.complexity import count_params
from d2prune.config import setup_cfg
from d2prune.engine import PrunedCheckpointer
from d2prune.export import build_adapter, compare, export_onnx, export_torchscript, output_names
from d2prune.pruning import find_groups, prune

from . import models
from .conftest import CONFIG, run_tool

torch.set_num_threads(2)


def _prune_blocks(model):
    """Keep every other channel of each residual-block group, so the widths are not built ones."""
    keep = {g.name: list(range(0, g.size, 2)) for g in find_groups(model) if g.kind == "block"}
    with torch.no_grad():
        prune(model, keep)
    return model


def _eager(model, image):
    """The eager detections, called as a user would (not through the adapter being exported)."""
    with torch.no_grad():
        if hasattr(model, "roi_heads"):
            return model.inference([{"image": image}], do_postprocess=False)[0]
        return model([{"image": image}])[0]["instances"]


def _max_diffs(model, adapter, runner, image):
    want = _eager(model, image)
    with torch.no_grad():
        got = dict(zip(output_names(adapter), runner(image)))
    assert len(want) > 0 and got["pred_boxes"].shape == (len(want), 4)
    assert torch.equal(got["pred_classes"], want.pred_classes)
    return (
        (got["pred_boxes"] - want.pred_boxes.tensor).abs().max().item(),
        (got["scores"] - want.scores).abs().max().item(),
    )


@pytest.fixture(scope="module")
def pruned_rcnn(tmp_path_factory):
    """A pruned Faster R-CNN R18 and its TorchScript and ONNX exports (traced on image seed 0)."""
    folder = tmp_path_factory.mktemp("export")
    model = _prune_blocks(models.build("faster_rcnn_R18_FPN"))
    adapter = build_adapter(model, models.images(1, seed=0)[0]["image"])
    runners = {
        "torchscript": export_torchscript(adapter, str(folder / "model.ts")),
        "onnx": export_onnx(adapter, str(folder / "model.onnx")),
    }
    return model, adapter, runners


def test_torchscript_matches_eager_on_another_image(pruned_rcnn):
    model, adapter, runners = pruned_rcnn
    image = models.images(1, seed=3)[0]["image"]
    boxes, scores = _max_diffs(model, adapter, runners["torchscript"], image)
    assert boxes < 1e-4 and scores < 1e-4


def test_onnx_matches_eager_on_another_image(pruned_rcnn):
    model, adapter, runners = pruned_rcnn
    image = models.images(1, seed=3)[0]["image"]
    boxes, scores = _max_diffs(model, adapter, runners["onnx"], image)
    # ONNX Runtime's kernels round float32 sums in another order: boxes of a 96 px image
    # agree to 1e-4 of its size.
    assert boxes < 1e-2 and scores < 1e-4


def test_parity_check_reports_what_differs(pruned_rcnn):
    _, adapter, runners = pruned_rcnn
    images = [x["image"] for x in models.images(1, seed=5)]
    exact = compare(adapter, runners["torchscript"], images)
    assert exact["ok"] and exact["detections"] > 0 and exact["images"] == 1
    assert max(exact["max_abs_diff"].values()) < 1e-4

    def shifted(image):  # boxes moved by 0.5 px
        boxes, *rest = runners["torchscript"](image)
        return (boxes + 0.5, *rest)

    def one_fewer(image):  # the last detection lost
        boxes, classes, scores, size = runners["torchscript"](image)
        return boxes[:-1], classes[:-1], scores[:-1], size

    moved = compare(adapter, shifted, images)
    assert not moved["ok"] and moved["max_abs_diff"]["boxes"] == pytest.approx(0.5, abs=1e-4)
    assert moved["max_abs_diff"]["scores"] < 1e-4
    lost = compare(adapter, one_fewer, images)
    assert not lost["ok"] and lost["count_mismatches"] == [0]

    def refuses(image):
        raise RuntimeError("Got invalid dimensions for input: image")

    failing = compare(adapter, refuses, images)
    assert not failing["ok"] and "invalid dimensions" in failing["run_errors"][0]


def test_retinanet_exports_match_eager(tmp_path):
    torch.manual_seed(0)
    model = _prune_blocks(build_model(models.retinanet_cfg(18)).eval())
    adapter = build_adapter(model, models.images(1, seed=0)[0]["image"])
    image = models.images(1, seed=3)[0]["image"]
    boxes, scores = _max_diffs(model, adapter, export_torchscript(adapter, str(tmp_path / "r.ts")), image)
    assert boxes < 1e-4 and scores < 1e-4
    boxes, scores = _max_diffs(model, adapter, export_onnx(adapter, str(tmp_path / "r.onnx")), image)
    assert boxes < 1e-2 and scores < 1e-4


TINY = [
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96", "DATASETS.TEST", "()",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
]  # fmt: skip


@pytest.mark.subprocess
def test_tool_exports_a_pruned_checkpoint(tmp_path):
    cfg = setup_cfg(CONFIG, [*TINY, "MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    unpruned_params = count_params(model)
    _prune_blocks(model)
    PrunedCheckpointer(model, save_dir=str(tmp_path)).save("model_pruned")
    # An 80 x 120 photo: resized to the 96 px test size within MAX_SIZE_TEST, i.e. 64 x 96.
    pixels = np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "sample.png")
    out = tmp_path / "export"

    proc = run_tool(
        "export_model.py", "--config-file", CONFIG, "--format", "torchscript", "--format", "onnx",
        "--output", out, "--sample-image", tmp_path / "sample.png", "--parity-images", "1",
        "--latency-repeats", "2", *TINY, "MODEL.WEIGHTS", tmp_path / "model_pruned.pth",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "export.json").read_text())
    # The norms were folded into their convs: the export is the pruned model's detections up
    # to the fold's rounding (below).
    assert report["params"] < unpruned_params and report["folded_norms"] > 0
    assert report["input"]["traced_size"] == [64, 96]
    assert [p["source"] for p in report["parity_images"]] == [str(tmp_path / "sample.png"), "random"]
    for fmt, name in (("torchscript", "model.ts"), ("onnx", "model.onnx")):
        entry = report["formats"][fmt]
        assert entry["size_mb"] == pytest.approx((out / name).stat().st_size / 1e6, abs=1e-3)
        assert entry["parity"]["ok"] and entry["parity"]["images"] == 2
        assert entry["parity"]["detections"] > 0 and entry["parity"]["max_abs_diff"]["classes"] == 0
        assert entry["latency_ms"] > 0 and entry["eager_latency_ms"] == report["eager"]["latency_ms"]
    assert max(report["formats"]["torchscript"]["parity"]["max_abs_diff"].values()) < 1e-4
    assert "torchscript (model.ts)" in proc.stdout and "onnx (model.onnx)" in proc.stdout

    # The written file is the pruned model with the checkpoint's weights, not a fresh one.
    traced = torch.jit.load(str(out / "model.ts"))
    image = models.images(1, seed=7)[0]["image"]
    want = _eager(model, image)
    with torch.no_grad():
        boxes, classes, scores, _ = traced(image)
    assert len(want) > 0 and torch.equal(classes, want.pred_classes)
    assert (boxes - want.pred_boxes.tensor).abs().max() < 1e-3
    assert (scores - want.scores).abs().max() < 1e-4


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--format", "torchscript", "MODEL.WEIGHTS", "missing.pth"], ["missing.pth", "not found"]),
        (["--format", "tflite", "MODEL.WEIGHTS", "missing.pth"], ["'tflite'", "torchscript, onnx"]),
    ],
    ids=["missing-weights", "unknown-format"],
)
@pytest.mark.subprocess
def test_bad_input_is_one_line_error(tmp_path, args, expected):
    proc = run_tool("export_model.py", "--config-file", CONFIG, "--output", tmp_path / "out", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert all(text in line for text in expected), line
