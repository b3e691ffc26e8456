"""Parameters, FLOPs and latency: counts that agree with hand computation, timings that run.

No timing is asserted; the FLOPs of a pruned ResNet-18 are checked against the conv formula.
"""

import pytest
import torch
from fvcore.nn import parameter_count

from d2prune.complexity import (
    count_flops,
    count_params,
    dummy_inputs,
    dummy_tensor,
    measure_latency,
    width_table,
)
from d2prune.pruning import channel_spec, find_groups, prune

from . import models

torch.set_num_threads(2)

SIDE = 128  # input side; divisible by the FPN's 32


@pytest.fixture(scope="module")
def halved():
    """The R18-FPN test model before and after keeping every other channel of each block group."""
    model = models.build("faster_rcnn_R18_FPN")
    groups = find_groups(model)
    pruned = models.build("faster_rcnn_R18_FPN")
    prune(pruned, {g.name: range(0, g.size, 2) for g in groups if g.kind == "block"})
    return model, pruned, groups


def test_params_are_the_sum_of_parameter_sizes(halved):
    model, pruned, _ = halved
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    assert count_params(model) == parameter_count(model)[""]
    assert count_params(pruned) < count_params(model)


def _block_conv_flops(resnet, side):
    """Multiply-adds of conv1 and conv2 of every BasicBlock: H_out * W_out * k^2 * C_in * C_out."""
    total, spatial = 0, side // 4  # after the stem's stride-2 conv and max pool
    for stage in resnet.stages:
        for block in stage:
            for conv in (block.conv1, block.conv2):
                out = spatial // conv.stride[0]
                total += out * out * 9 * conv.in_channels * conv.out_channels
                spatial = out
    return total


def test_halving_block_groups_halves_the_block_flops(halved):
    model, pruned, _ = halved
    x = dummy_tensor(SIDE)
    before, after = count_flops(model.backbone, x), count_flops(pruned.backbone, x)
    # conv1 loses half its outputs and conv2 half its inputs: each block's conv FLOPs halve,
    # and nothing else in the backbone changes.
    blocks = _block_conv_flops(model.backbone.bottom_up, SIDE)
    assert after["total"] == before["total"] - blocks // 2
    assert after["bottom_up"] == before["bottom_up"] - blocks // 2
    # Block convs are most of ResNet-18 (the stem and shortcuts the rest); FPN's 3x3 output
    # convs dominate the whole backbone at 256 channels.
    assert 0.40 < 1 - after["bottom_up"] / before["bottom_up"] < 0.48
    assert 0.15 < 1 - after["total"] / before["total"] < 0.25


def test_detector_flops_by_part(halved):
    model, pruned, _ = halved
    inputs = dummy_inputs(SIDE)
    before, after = count_flops(model, inputs), count_flops(pruned, inputs)
    assert set(before) == {"total", "backbone", "proposal_generator", "roi_heads"}
    assert before["total"] == sum(v for k, v in before.items() if k != "total")
    assert before["backbone"] == count_flops(model.backbone, dummy_tensor(SIDE))["total"]
    assert after["backbone"] < before["backbone"] and after["total"] < before["total"]
    assert not model.training  # counting leaves the mode as it was
    model.train()
    assert count_flops(model, inputs)["total"] == before["total"]
    assert model.training
    model.eval()


def test_latency_runs_and_reports_positive_times(halved):
    model, _, _ = halved
    model.train()
    result = measure_latency(model.backbone, dummy_tensor(64), warmup=1, repeats=3)
    assert model.backbone.training
    model.eval()
    assert result["repeats"] == 3
    assert 0 < result["min_ms"] <= result["median_ms"] <= result["p90_ms"]
    assert result["mean_ms"] > 0
    result = measure_latency(lambda inputs: model(inputs), dummy_inputs(64), warmup=1, repeats=2)
    assert result["median_ms"] > 0


def test_width_table(halved):
    model, pruned, groups = halved
    table = width_table(channel_spec(model), channel_spec(pruned), groups)
    kinds = {row["kind"]: row for row in table["kinds"]}
    assert kinds["block"] == {"kind": "block", "before": 1920, "after": 960}
    assert kinds["stage"]["before"] == kinds["stage"]["after"] == 960
    assert len(table["groups"]) == len(groups)
    assert {row["group"] for row in table["groups"]} == {g.name for g in groups}
