"""Folding norms into convs for inference changes no detection (d2prune/fuse.py)."""

import copy

import pytest
import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import GeneralizedRCNN, RetinaNet
from torch import nn

from d2prune.errors import UserError
from d2prune.fuse import fold_norms, folded_convs, prepare_for_inference
from d2prune.pruning import find_groups, prune
from projects.benchmark.benchmark import block_keep

from . import models
from .exactness import run

torch.set_num_threads(2)


def _norms(model: nn.Module) -> list:
    return [m.norm for m in model.modules() if isinstance(m, Conv2d) and m.norm is not None]


def _assert_close(before: dict, after: dict) -> None:
    """Every recorded output equal within 1e-4 of its scale (max(|x|, 1)), as after exact
    pruning, and backbone features within 1e-5: folding changes only float32 rounding (a
    product and a sum in another order), about 1e-6 of the features. Scores get 2e-4: the
    softmax of the random-weight R18 box head turns logits equal within 5e-5 of their scale
    into scores 1.1e-4 apart on one of the test images."""
    assert before.keys() == after.keys()
    for key, a in before.items():
        b = after[key]
        assert a.shape == b.shape, f"{key}: {tuple(a.shape)} before, {tuple(b.shape)} after"
        tolerance = 1e-5 if key.startswith("backbone") else 2e-4 if key.endswith(":scores") else 1e-4
        if a.numel():
            scale = a.abs().max().clamp(min=1)
            diff = (a - b).abs().max()
            assert diff <= tolerance * scale, f"{key} changed by {diff:.3g} (scale {scale:.3g})"


def _assert_folds_exactly(model: nn.Module, prepare=fold_norms) -> nn.Module:
    inputs = models.images(2)
    before = run(model, inputs)
    count = len(folded_convs(model))
    assert count > 0
    folded = prepare(copy.deepcopy(model))
    assert type(folded) is type(model)
    assert not folded_convs(folded)
    assert len(_norms(folded)) == len(_norms(model)) - count
    after = run(folded, inputs)
    _assert_close(before, after)
    assert all(len(after[f"instances{i}:boxes"]) for i in range(2))
    return folded


@pytest.mark.parametrize("name", ["faster_rcnn_R18_FPN", "faster_rcnn_R50_FPN"])
def test_folding_frozen_bn_leaves_every_output_unchanged(name):
    model = models.build(name)
    assert isinstance(model, GeneralizedRCNN)
    assert all(isinstance(n, FrozenBatchNorm2d) for n in _norms(model))
    folded = _assert_folds_exactly(model)
    # FrozenBN was the only norm: none is left, and every conv that had one now has a bias.
    assert not _norms(folded)
    convs = {n: m for n, m in folded.named_modules() if isinstance(m, Conv2d)}
    assert convs["backbone.bottom_up.res2.0.conv1"].bias is not None


@pytest.mark.slow
def test_eval_mode_batchnorm_folds_and_groupnorm_stays():
    model = models.build("faster_rcnn_R50_FPN_GN_BN")  # BN backbone, GN in the FPN and box head
    assert {type(n) for n in _norms(model)} == {FrozenBatchNorm2d, nn.BatchNorm2d, nn.GroupNorm}
    folded = _assert_folds_exactly(model)
    left = {type(n) for n in _norms(folded)}
    assert left == {nn.GroupNorm}


@pytest.mark.slow
def test_retinanet_with_separate_head_norms_still_runs_after_folding():
    model = models.build("retinanet_R50_FPN_headBN")
    folded = _assert_folds_exactly(model)
    assert isinstance(folded, RetinaNet)


@pytest.mark.parametrize("name", ["faster_rcnn_R18_FPN", "faster_rcnn_R50_FPN"])
def test_a_pruned_model_folds_too(name):
    model = models.build(name)
    with torch.no_grad():
        prune(model, block_keep(model, 0.5))
    _assert_folds_exactly(model)


def test_a_folded_model_can_still_be_pruned():
    model = fold_norms(models.build("faster_rcnn_R18_FPN"))
    keep = block_keep(model, 0.5)
    with torch.no_grad():
        prune(model, keep)
    sizes = {g.name: g.size for g in find_groups(model)}
    assert all(sizes[name] == len(kept) for name, kept in keep.items())
    run(model, models.images(1))


def test_prepare_for_inference_puts_conv_weights_channels_last_and_changes_no_output():
    model = models.build("faster_rcnn_R18_FPN")
    prepared = _assert_folds_exactly(model, prepare_for_inference)
    conv = prepared.backbone.bottom_up.res2[0].conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    kept = prepare_for_inference(models.build("faster_rcnn_R18_FPN"), channels_last=False)
    assert kept.backbone.bottom_up.res2[0].conv1.weight.is_contiguous()


def test_folding_a_model_in_training_mode_is_refused():
    model = models.build("faster_rcnn_R18_FPN").train()
    with pytest.raises(UserError, match="training mode.*model.eval"):
        fold_norms(model)
    assert _norms(model)  # untouched


def test_a_batchnorm_in_training_mode_is_left_alone():
    model = models.build("faster_rcnn_R50_FPN_GN_BN")
    block = model.backbone.bottom_up.res3[0]  # BN (res2 and the stem are frozen: FrozenBN)
    norm = block.conv1.norm
    assert isinstance(norm, nn.BatchNorm2d)
    norm.train()
    fold_norms(model)
    assert block.conv1.norm is norm
    assert block.conv2.norm is None


def test_a_folded_model_is_for_inference_only_its_weights_do_not_load_into_the_config_model():
    folded = fold_norms(models.build("faster_rcnn_R18_FPN"))
    fresh = models.build("faster_rcnn_R18_FPN")
    result = fresh.load_state_dict(folded.state_dict(), strict=False)
    assert any(k.endswith("conv1.bias") for k in result.unexpected_keys)
    assert any(k.endswith("conv1.norm.weight") for k in result.missing_keys)
