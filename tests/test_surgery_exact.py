"""Surgery is exact: removing channels whose producers output zero changes no output.

For every group kind of every test detector, channels are first silenced in all their producers,
the outputs recorded, the channels removed with `prune`, and the outputs compared.
"""

import random

import pytest
import torch
from detectron2.modeling.roi_heads import FastRCNNConvFCHead
from detectron2.utils.events import EventStorage
from torch import nn

from d2prune.errors import UserError
from d2prune.pruning import find_groups, prune

from . import models
from .exactness import prune_silenced, removed_channels

torch.set_num_threads(2)

ALL_KINDS = ("stem", "block", "stage", "fpn", "head")
MODELS = [
    "faster_rcnn_R50_FPN",
    "faster_rcnn_R18_FPN",
    "retinanet_R50_FPN",
    "mask_rcnn_R50_FPN",
    "faster_rcnn_R50_FPN_GN_BN",
    "faster_rcnn_X50_FPN",
    "mask_rcnn_R50_C4",
]
# Few kinds at a time for the two main detectors; the others prune every listed kind at once.
EXACT_CASES = [
    ("faster_rcnn_R50_FPN", ("stem", "stage")),
    ("faster_rcnn_R50_FPN", ("block",)),
    ("faster_rcnn_R50_FPN", ("fpn", "head")),
    # R18's res2 block0 has an identity shortcut: the stem output is part of the res2 stream.
    *[("faster_rcnn_R18_FPN", (kind,)) for kind in ("block", "stage", "fpn", "head")],
    ("retinanet_R50_FPN", ALL_KINDS),
    ("retinanet_R50_FPN_headBN", ("head",)),
    ("mask_rcnn_R50_FPN", ALL_KINDS),
    ("faster_rcnn_R50_FPN_GN_BN", ("block", "stage", "fpn", "head")),
    ("faster_rcnn_X50_FPN", ("block", "stage")),
    ("mask_rcnn_R50_C4", ("stem", "block", "stage", "head")),
]


@pytest.mark.parametrize(
    "model_name,kinds", EXACT_CASES, ids=[f"{m}-{'+'.join(k)}" for m, k in EXACT_CASES]
)
def test_prune_is_exact(model_name, kinds):
    model = models.build(model_name)
    groups = [g for g in find_groups(model) if g.kind in kinds]
    assert {g.kind for g in groups} == set(kinds)
    prune_silenced(model, groups, random.Random(f"{model_name}/{kinds}"))


def _random_half(model: nn.Module, seed: int = 0) -> dict:
    rng = random.Random(seed)
    keep = {}
    for group in find_groups(model):
        removed = set(removed_channels(group, rng, 0.5))
        keep[group.name] = [c for c in range(group.size) if c not in removed]
    return keep


@pytest.mark.parametrize("model_name", MODELS)
def test_pruned_model_trains_and_reports_its_shapes(model_name):
    model = models.build(model_name)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    prune(model, _random_half(model))

    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    features = {}
    hook = model.backbone.register_forward_hook(lambda m, args, output: features.update(output))
    with torch.no_grad():
        assert all(len(out["instances"]) > 0 for out in model(models.images(1)))
    hook.remove()
    shapes = model.backbone.output_shape()
    assert {f: t.shape[1] for f, t in features.items()} == {
        f: s.channels for f, s in shapes.items()
    }
    box_head = getattr(getattr(model, "roi_heads", None), "box_head", None)
    if isinstance(box_head, FastRCNNConvFCHead):
        assert box_head.output_shape.channels == model.roi_heads.box_predictor.cls_score.in_features

    model.train()
    with EventStorage():
        losses = model(models.with_targets(models.images(1)))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.shape == param.shape, name


@pytest.fixture(scope="module")
def r18():
    return models.build("faster_rcnn_R18_FPN")


@pytest.mark.parametrize(
    "keep,message",
    [
        ({"backbone.fpn": []}, "keeping no channel"),
        ({"backbone.fpn": [0, 256]}, "out of range"),
        ({"backbone.fpn": [-1, 3]}, "out of range"),
        ({"backbone.fpn": [3, 1]}, "sorted and unique"),
        ({"backbone.fpn": [1, 1]}, "sorted and unique"),
        ({"backbone.fpn": [0.5]}, "integers"),
        ({"backbone.bottom_up.res9": [0]}, "no channel group"),
    ],
)
def test_prune_refuses_bad_keep_sets_and_leaves_the_model_alone(r18, keep, message):
    before = {k: v.shape for k, v in r18.state_dict().items()}
    with pytest.raises(UserError, match=message):
        prune(r18, {"roi_heads.box_head.fc1": [0, 1], **keep})
    assert {k: v.shape for k, v in r18.state_dict().items()} == before


def test_prune_keeps_whole_groupnorm_groups():
    model = models.build("faster_rcnn_R50_FPN_GN_BN")
    fpn = next(g for g in find_groups(model) if g.kind == "fpn")
    assert fpn.unit == 8  # GN(32, 256)
    with pytest.raises(UserError, match="groups of 8 channels"):
        prune(model, {fpn.name: list(range(4, 256))})
    prune(model, {fpn.name: list(range(8, 256))})
    norm = model.backbone.fpn_output2.norm
    assert (norm.num_groups, norm.num_channels, norm.weight.shape[0]) == (31, 248, 248)
