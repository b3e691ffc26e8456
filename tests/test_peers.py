"""d2prune beside Torch-Pruning and torch.nn.utils.prune on the same channels: identical keep
sets and sizes, masks that zero exactly what surgery removes."""

import pytest

from projects.benchmark.benchmark import compare_with_torch_pruning, masking_comparison

from . import models

pytest.importorskip("torch_pruning")


@pytest.mark.parametrize(
    "name, ratio, groups, reductions",
    # R18: one block group per BasicBlock; R50: two per bottleneck, conv2 reads one, writes the other.
    [("faster_rcnn_R18_FPN", 0.5, 8, ("first", "mean")), ("faster_rcnn_R50_FPN", 0.25, 32, ("first",))],
)
def test_torch_pruning_removes_the_same_block_channels(name, ratio, groups, reductions):
    result = compare_with_torch_pruning(models.build(name), ratio, side=64, reductions=reductions)
    assert result["groups"] == groups
    same = result["torch_pruning_first"]
    assert same["groups"] == groups and same["same_keep"] == groups and same["kept_overlap"] == 1
    assert same["params"] == result["d2prune"]["params"] < result["params_before"]
    assert same["flops"] == result["d2prune"]["flops"] < result["flops_before"]
    assert same["max_feature_difference"] < 1e-5
    if "mean" in reductions:
        # Torch-Pruning's default group reduction adds the consumers' weights: another ranking.
        other = result["torch_pruning_mean"]
        assert other["params"] == result["d2prune"]["params"]
        assert other["same_keep"] < groups and other["kept_overlap"] < 1


@pytest.mark.parametrize("name", ["faster_rcnn_R18_FPN", "faster_rcnn_R50_FPN_GN_BN"])
def test_masks_zero_what_surgery_removes(name):
    result = masking_comparison(models.build(name), 0.5, side=64, repeats=1, rounds=1)
    assert result["same_channels"]
    assert result["masked"]["zero_share"] == pytest.approx(result["d2prune"]["removed_share"], rel=1e-12)
    assert result["d2prune"]["removed_share"] > 0.3
    assert result["masked"]["params"] == result["dense"]["params"]
    assert result["masked"]["flops"] == result["dense"]["flops"] > result["d2prune"]["flops"]
    assert result["max_output_difference"] < 1e-4
