"""The engine benchmark's measurements on a small model: structure and FLOPs, never timings."""

import pytest

from d2prune.analysis.benchmark import backbone_speedup, surgery_seconds

from . import models


def test_backbone_speedup_reaches_the_flops_target():
    model = models.build("faster_rcnn_R18_FPN")
    result = backbone_speedup(model, side=64, flops_reduction=0.3, round_to=8, repeats=1)
    assert result["flops_reduction"] >= 0.3
    assert result["after"]["backbone_params"] < result["before"]["backbone_params"]
    assert result["before"]["backbone_latency_ms"] > 0 and result["after"]["backbone_latency_ms"] > 0
    assert result["latency_over_flops"] == pytest.approx(result["latency_reduction"] / result["flops_reduction"])


def test_surgery_seconds_counts_block_groups():
    model = models.build("faster_rcnn_R18_FPN")
    result = surgery_seconds(model, repeats=1)
    assert result["groups_pruned"] == 8  # R18: two BasicBlocks in each of four stages
    assert result["median_s"] > 0
