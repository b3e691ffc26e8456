"""The benchmark's measurements on small models: structure, FLOPs, memory; never timings."""

import json
import os
import subprocess
import sys

import pytest
import torch

from projects.benchmark.benchmark import (
    block_keep,
    fixed_proposals,
    peak_rss,
    pruned_copy,
    random_batches,
    scoring_overhead,
    speedup,
    surgery_seconds,
)

from . import models
from .conftest import REPO


def _proposals(model):
    images = model.preprocess_image(models.images(1))
    with torch.no_grad():
        features = model.backbone(images.tensor)
        return model.proposal_generator(images, features)[0][0], features


def test_fixed_proposals_are_the_same_anchors_before_and_after_pruning():
    model = fixed_proposals(models.build("faster_rcnn_R18_FPN"))
    rpn = model.proposal_generator
    rpn.post_nms_topk = {True: 10**6, False: 10**6}  # so that only NMS could drop candidates
    proposals, features = _proposals(model)
    candidates = sum(
        min(rpn.pre_nms_topk[False], features[f].shape[-2] * features[f].shape[-1] * n)
        for f, n in zip(rpn.in_features, rpn.anchor_generator.num_cell_anchors)
    )
    assert len(proposals) == candidates
    pruned, _ = _proposals(pruned_copy(model, block_keep(model, 0.5)))
    assert torch.equal(pruned.proposal_boxes.tensor, proposals.proposal_boxes.tensor)


@pytest.mark.slow
def test_speedup_reaches_the_flops_target_on_the_resnet():
    model = fixed_proposals(models.build("faster_rcnn_R18_FPN"))
    base, row = speedup(model, side=64, levels=(0.3,), target="flops", repeats=1, rounds=1)
    assert base["level"] == 0 and row["level"] == 0.3
    # select_for_flops stops within its 1 % tolerance above the target.
    assert 0.3 <= row["backbone_flops_cut"] <= 0.3 * 1.05
    assert row["backbone_params"] < base["backbone_params"]
    # The detector's FPN and heads keep their FLOPs: the same cut is a smaller share of more.
    assert 0 < row["detector_flops_cut"] < row["backbone_flops_cut"]
    assert base["detector_params"] - row["detector_params"] == base["backbone_params"] - row["backbone_params"]
    for part in ("backbone", "detector"):
        for suffix in ("", "_min"):
            assert 0 < row[f"{part}_latency{suffix}_ms"] and 0 < base[f"{part}_latency{suffix}_ms"]
            assert row[f"{part}_latency_over_flops{suffix}"] == pytest.approx(
                row[f"{part}_latency_cut{suffix}"] / row[f"{part}_flops_cut"]
            )
        assert row[f"{part}_latency_min_ms"] <= row[f"{part}_latency_ms"]


def test_surgery_seconds_counts_block_groups():
    model = models.build("faster_rcnn_R18_FPN")
    result = surgery_seconds(model, repeats=1)
    assert result["groups_pruned"] == 8  # R18: two BasicBlocks in each of four stages
    assert result["median_s"] > 0


def test_scoring_overhead_covers_each_criterion_and_reports_failures():
    model = models.build("faster_rcnn_R18_FPN")
    batches = random_batches(1, 1, 64, num_classes=3)
    result = scoring_overhead(models.faster_rcnn_cfg(18), model, ["l1", "apoz", "l3"], batches, event_batches=4)
    assert result["iteration_s"] > 0 and result["event_batches"] == 4
    l1, apoz, unknown = result["criteria"]
    assert (l1["criterion"], l1["data"], l1["collect_s"]) == ("l1", "none", 0)
    assert (apoz["criterion"], apoz["data"]) == ("apoz", "images") and apoz["collect_s"] > 0
    for row in (l1, apoz):
        assert row["score_s"] > 0
        assert row["event_s"] == pytest.approx(4 * row["collect_s"] + row["score_s"])
        assert row["iterations"] == pytest.approx(row["event_s"] / result["iteration_s"])
    assert "unknown pruning criterion 'l3'" in unknown["error"] and "event_s" not in unknown


def test_peak_rss_sees_a_tensor_allocated_inside():
    result, memory = peak_rss(lambda: torch.ones(64, 2**20).sum())  # 256 MiB of float32
    assert result == 64 * 2**20
    assert memory["extra_mib"] >= 200
    assert memory["peak_mib"] >= memory["before_mib"] + memory["extra_mib"] - 1


_EVENT_MEMORY = """
import json
from d2prune import criteria
from projects.benchmark.benchmark import fix_mmap_threshold, pruning_event_memory, random_batches
assert fix_mmap_threshold()
from d2prune.config import add_prune_config
from tests import models
model = models.build("faster_rcnn_R18_FPN")
cfg = add_prune_config(models.faster_rcnn_cfg(18))
result = pruning_event_memory(cfg, model, criteria.build("l1"), random_batches(1, 1, 64, 3), ratio=0.5)
result["params_mib"] = sum(p.numel() * 4 for p in model.parameters()) / 2**20
print(json.dumps(result))
"""


@pytest.mark.subprocess
def test_pruning_event_memory_holds_a_model_copy():
    """In a fresh process with a fixed mmap threshold, as tools/benchmark.py measures: in the
    test process, memory freed by earlier tests (and glibc raising its mmap threshold after
    large frees) let the event reuse heap pages without raising RSS, and the peak came out
    below a model copy."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _EVENT_MEMORY], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["groups_pruned"] == 8
    assert result["params_mib_after"] < result["params_mib"]
    # Slicing the momentum prunes a deep copy of the model while the model itself is alive.
    assert result["event"]["extra_mib"] >= result["params_mib_after"]
    assert result["train"]["extra_mib"] > 0


@pytest.mark.slow
def test_the_detector_section_prunes_each_arm_to_its_target(trained, tmp_path, monkeypatch):
    from d2prune.complexity import count_flops
    from d2prune.engine import selection
    from d2prune.pruning import cost
    from projects.benchmark.detector import detector_rows, detector_table, plot_ap_vs_latency

    # The latency model on work, not on the clock (a loaded machine must not move the targets).
    monkeypatch.setattr(cost, "_time_layer", lambda layer, i, o, *args: layer.flops(i, o) / 1e6)
    monkeypatch.setattr(selection, "interleaved_latency", lambda models, inputs, **kw: [
        {"min_ms": count_flops(m, inputs)["total"] / 1e6 + 1.0} for m in models])  # fmt: skip

    from .conftest import CONFIG, tiny_opts

    root, out, _ = trained
    rows, unreachable = detector_rows(
        CONFIG, str(out / "model_final.pth"), "synthetic_source_val", [0.3, 0.995],
        arms=["block, FLOPs", "all kinds, FLOPs, cost-aware", "all kinds, latency, cost-aware",
              "all kinds, FLOPs, cost-aware, sensitivity"],
        finetune_iters=1, images=2, rounds=1, repeats=1, output_dir=str(tmp_path / "bench"),
        opts=[*tiny_opts(root, tmp_path / "ft"), "PRUNE.LATENCY_CACHE", str(tmp_path / "cache")],
    )  # fmt: skip
    assert rows[0]["arm"] == "unpruned"
    by = {(r["arm"], r["level"]): r for r in rows[1:]}
    for arm in ("block, FLOPs", "all kinds, FLOPs, cost-aware", "all kinds, FLOPs, cost-aware, sensitivity"):
        # FLOPs are counted on the first images of the set, the budget's on a random image: close.
        assert by[arm, 0.3]["flops_cut"] == pytest.approx(0.3, abs=0.06), arm
    latency = by["all kinds, latency, cost-aware", 0.3]
    assert latency["predicted_ms"] <= 0.7 * latency["predicted_unpruned_ms"] * 1.001
    # 99.5 % is out of every arm's reach at max_ratio 0.9: named, not silently skipped.
    assert len(unreachable) == 4 and all("out of reach" in u for u in unreachable)
    for r in rows:
        assert r["ms 1 thread"] > 0 and "oneshot_bbox_AP" in r and "finetuned_bbox_AP" in r
    assert "cost-aware" in detector_table(rows)
    plot_ap_vs_latency(rows, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 1000
