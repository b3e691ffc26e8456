"""Channel group discovery: names, kinds, sizes and couplings on Detectron2's detectors.

Exactness of pruning these groups is tested in test_surgery_exact.py; here, what is coupled.
"""

import pytest
import torch
from torch import nn

from d2prune.errors import UserError
from d2prune.pruning import find_groups, prune

from . import models

torch.set_num_threads(2)

R18_GROUPS = [
    # The stem feeds res2 block0, which has an identity shortcut: one stream with res2.
    ("backbone.bottom_up.res2", "stage", 64),
    ("backbone.bottom_up.res2.0.conv1", "block", 64),
    ("backbone.bottom_up.res2.1.conv1", "block", 64),
    ("backbone.bottom_up.res3", "stage", 128),
    ("backbone.bottom_up.res3.0.conv1", "block", 128),
    ("backbone.bottom_up.res3.1.conv1", "block", 128),
    ("backbone.bottom_up.res4", "stage", 256),
    ("backbone.bottom_up.res4.0.conv1", "block", 256),
    ("backbone.bottom_up.res4.1.conv1", "block", 256),
    ("backbone.bottom_up.res5", "stage", 512),
    ("backbone.bottom_up.res5.0.conv1", "block", 512),
    ("backbone.bottom_up.res5.1.conv1", "block", 512),
    ("backbone.fpn", "fpn", 256),
    ("proposal_generator.rpn_head.conv", "head", 256),
    ("roi_heads.box_head.fc1", "head", 1024),
    ("roi_heads.box_head.fc2", "head", 1024),
]


def _by_name(model):
    return {g.name: g for g in find_groups(model)}


def test_r18_fpn_groups():
    groups = find_groups(models.build("faster_rcnn_R18_FPN"))
    assert [(g.name, g.kind, g.size) for g in groups] == R18_GROUPS
    res2 = groups[0]
    assert "backbone.bottom_up.stem.conv1" in res2.producers
    assert set(res2.consumers) >= {
        "backbone.bottom_up.res2.0.conv1",
        "backbone.bottom_up.res2.1.conv1",
        "backbone.bottom_up.res3.0.conv1",
        "backbone.bottom_up.res3.0.shortcut",
        "backbone.fpn_lateral2",
    }


def test_r50_fpn_groups():
    model = models.build("faster_rcnn_R50_FPN")
    groups = _by_name(model)
    kinds = [g.kind for g in groups.values()]
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "stem": 1, "block": 32, "stage": 4, "fpn": 1, "head": 3,
    }  # fmt: skip
    stem = groups["backbone.bottom_up.stem"]
    assert stem.consumers == [
        "backbone.bottom_up.res2.0.conv1",
        "backbone.bottom_up.res2.0.shortcut",
    ]
    block = groups["backbone.bottom_up.res3.1.conv2"]
    assert (block.producers, block.consumers) == (
        ["backbone.bottom_up.res3.1.conv2"],
        ["backbone.bottom_up.res3.1.conv3"],
    )
    res5 = groups["backbone.bottom_up.res5"]
    assert set(res5.producers) == {
        "backbone.bottom_up.res5.0.conv3",
        "backbone.bottom_up.res5.0.shortcut",
        "backbone.bottom_up.res5.1.conv3",
        "backbone.bottom_up.res5.2.conv3",
    }
    fpn = groups["backbone.fpn"]
    assert set(fpn.consumers) >= {"proposal_generator.rpn_head.conv", "roi_heads.box_head.fc1"}
    assert groups["roi_heads.box_head.fc2"].consumers == [
        "roi_heads.box_predictor.cls_score",
        "roi_heads.box_predictor.bbox_pred",
    ]
    # Every conv and linear module is a producer or consumer of some group.
    members = {m for g in groups.values() for m in g.producers + g.consumers}
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert layers == members


def test_retinanet_groups():
    groups = _by_name(models.build("retinanet_R50_FPN"))
    assert "backbone.top_block.p6" in groups["backbone.bottom_up.res5"].consumers
    fpn = groups["backbone.fpn"]
    assert {"backbone.top_block.p6", "backbone.top_block.p7"} <= set(fpn.producers)
    assert {"head.cls_subnet.0", "head.bbox_subnet.0"} <= set(fpn.consumers)
    assert groups["head.cls_subnet.6"].consumers == ["head.cls_score"]
    assert groups["head.bbox_subnet.6"].consumers == ["head.bbox_pred"]


def test_mask_rcnn_groups():
    groups = _by_name(models.build("mask_rcnn_R50_FPN"))
    assert "roi_heads.mask_head.mask_fcn1" in groups["backbone.fpn"].consumers
    heads = [name for name, g in groups.items() if name.startswith("roi_heads.mask_head")]
    assert heads == [f"roi_heads.mask_head.mask_fcn{i}" for i in range(1, 5)] + [
        "roi_heads.mask_head.deconv"
    ]
    assert groups["roi_heads.mask_head.deconv"].consumers == ["roi_heads.mask_head.predictor"]


def test_c4_groups():
    groups = _by_name(models.build("mask_rcnn_R50_C4"))
    assert set(groups["backbone.res4"].consumers) >= {
        "proposal_generator.rpn_head.conv",
        "roi_heads.res5.0.conv1",
        "roi_heads.res5.0.shortcut",
    }
    res5 = groups["roi_heads.res5"]
    assert res5.kind == "stage"
    assert set(res5.consumers) >= {
        "roi_heads.box_predictor.cls_score",
        "roi_heads.box_predictor.bbox_pred",
        "roi_heads.mask_head.deconv",
    }


def test_groupnorm_and_grouped_conv_units():
    groups = _by_name(models.build("faster_rcnn_R50_FPN_GN_BN"))
    assert groups["backbone.fpn"].unit == 8  # GN(32, 256)
    assert groups["roi_heads.box_head.conv1"].unit == 8
    assert groups["backbone.bottom_up.res2"].unit == 1  # BatchNorm

    model = models.build("faster_rcnn_X50_FPN")
    groups = _by_name(model)
    # ResNeXt conv2 reads and writes per conv group: conv1's output, conv2 and conv3's input
    # form one group, kept or removed in whole conv groups.
    block = groups["backbone.bottom_up.res3.0.conv1"]
    assert (block.size, block.unit) == (256, 8)
    assert "backbone.bottom_up.res3.0.conv2" in block.producers
    assert "backbone.bottom_up.res3.0.conv2" not in groups
    prune(model, {block.name: list(range(64, 256))})
    conv2 = model.backbone.bottom_up.res3[0].conv2
    assert (conv2.in_channels, conv2.out_channels, conv2.groups) == (192, 192, 24)
    assert tuple(conv2.weight.shape) == (192, 8, 3, 3)


def test_shortcut_stays_when_widths_become_equal():
    model = models.build("faster_rcnn_R50_FPN")
    names = [g.name for g in find_groups(model)]
    prune(model, {"backbone.bottom_up.res2": list(range(64))})  # the stem's width
    block = model.backbone.bottom_up.res2[0]
    assert block.shortcut is not None and block.in_channels == block.out_channels == 64
    assert [g.name for g in find_groups(model)] == names
    with torch.no_grad():
        model(models.images(1))


def test_wrapped_model_has_the_same_groups():
    model = models.build("faster_rcnn_R18_FPN")
    assert [g.name for g in find_groups(nn.DataParallel(model))] == [n for n, _, _ in R18_GROUPS]


def test_unsupported_layers_are_named():
    model = models.build("faster_rcnn_R18_FPN")
    model.extra = nn.Conv2d(3, 8, 1)
    with pytest.raises(UserError, match=r"'extra' \(Conv2d\)"):
        find_groups(model)
    # Keypoint and Cascade heads have rules (tests/test_unprunable.py); a semantic head has not.
    panoptic = models.build_fresh("faster_rcnn_R18_FPN", opts=["MODEL.META_ARCHITECTURE", "PanopticFPN"])
    with pytest.raises(UserError, match=r"'sem_seg_head\."):
        find_groups(panoptic)
