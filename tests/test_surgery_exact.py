"""Surgery is exact: removing channels whose producers output zero changes no output.

For every group kind of every test detector, channels are first silenced in all their producers,
the outputs recorded, the channels removed with `prune`, and the outputs compared.
"""

import random

import pytest
import torch
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.resnet import BottleneckBlock
from detectron2.modeling.roi_heads import FastRCNNConvFCHead
from detectron2.utils.events import EventStorage
from torch import nn

from d2prune.errors import UserError
from d2prune.pruning import find_groups, prune

from . import models

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


def _removed(group, rng: random.Random, fraction: float):
    """Indices of about `fraction` of the group's channels, in whole units, never all of them."""
    units = group.size // group.unit
    count = min(max(1, round(units * fraction)), units - 1)
    chosen = rng.sample(range(units), count)
    return sorted(u * group.unit + i for u in chosen for i in range(group.unit))


def _silence(model: nn.Module, group, channels) -> None:
    """Make the group's channels exactly zero wherever they are written."""
    modules = dict(model.named_modules())
    index = torch.tensor(channels)
    with torch.no_grad():
        for name in group.producers:
            module = modules[name]
            dim = 1 if isinstance(module, nn.ConvTranspose2d) else 0
            module.weight.index_fill_(dim, index, 0.0)
            if module.bias is not None:
                module.bias[index] = 0.0
            norm = getattr(module, "norm", None)
            if norm is not None:
                norm.weight[index] = 0.0
                norm.bias[index] = 0.0
        for name in group.norms:
            modules[name].weight[index] = 0.0
            modules[name].bias[index] = 0.0


def _width_groups(model: nn.Module, groups) -> dict:
    """Hooked feature key -> name of the group that is its channel dimension."""
    by_producer = {p: g.name for g in groups for p in g.producers}
    names = {m: n for n, m in model.named_modules()}
    widths = {}
    for path, module in model.named_modules():
        if isinstance(module, ResNet):
            for feature in module._out_features:
                last = getattr(module, feature)[-1]
                conv = last.conv3 if isinstance(last, BottleneckBlock) else last.conv2
                widths[f"{path}:{feature}"] = by_producer[names[conv]]
        elif isinstance(module, FPN):
            for feature in module._out_features:
                widths[f"{path}:{feature}"] = by_producer[names[module.output_convs[0]]]
    return widths


def _run(model: nn.Module, inputs) -> dict:
    """Backbone features, raw head outputs and final detections, keyed by where they come from."""
    records = {}

    def record(path):
        def hook(module, args, output):
            if isinstance(output, dict):
                for feature, tensor in output.items():
                    records[f"{path}:{feature}"] = tensor.clone()
            else:
                for i, tensor in enumerate(_flat(output)):
                    records[f"{path}:{i}"] = tensor.clone()

        return hook

    watched = (
        "backbone",
        "backbone.bottom_up",
        "proposal_generator.rpn_head",
        "roi_heads.box_predictor",
        "roi_heads.mask_head.predictor",
        "head",
    )
    modules = dict(model.named_modules())
    handles = [modules[p].register_forward_hook(record(p)) for p in watched if p in modules]
    try:
        with torch.no_grad():
            outputs = model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    for i, output in enumerate(outputs):
        instances = output["instances"]
        records[f"instances{i}:boxes"] = instances.pred_boxes.tensor
        records[f"instances{i}:scores"] = instances.scores
        records[f"instances{i}:classes"] = instances.pred_classes.float()
    return records


def _flat(output):
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for item in output for t in _flat(item)]


def _assert_same(before: dict, after: dict, keep: dict, widths: dict) -> None:
    assert before.keys() == after.keys()
    for key, a in before.items():
        b = after[key]
        if a.shape != b.shape and key in widths and widths[key] in keep:
            a = a[:, keep[widths[key]]]
        assert a.shape == b.shape, f"{key}: {tuple(a.shape)} before, {tuple(b.shape)} after"
        if a.numel():
            scale = a.abs().max().clamp(min=1)
            diff = (a - b).abs().max()
            assert diff <= 1e-4 * scale, f"{key} changed by {diff:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize(
    "model_name,kinds", EXACT_CASES, ids=[f"{m}-{'+'.join(k)}" for m, k in EXACT_CASES]
)
def test_prune_is_exact(model_name, kinds):
    model = models.build(model_name)
    groups = [g for g in find_groups(model) if g.kind in kinds]
    assert {g.kind for g in groups} == set(kinds)
    rng = random.Random(f"{model_name}/{kinds}")
    keep = {}
    for group in groups:
        removed = _removed(group, rng, 0.25)
        _silence(model, group, removed)
        keep[group.name] = sorted(set(range(group.size)) - set(removed))
    inputs = models.images(1)
    widths = _width_groups(model, find_groups(model))
    before = _run(model, inputs)

    prune(model, keep)

    sizes = {g.name: g.size for g in find_groups(model)}
    assert all(sizes[name] == len(kept) for name, kept in keep.items())
    _assert_same(before, _run(model, inputs), keep, widths)


def _random_half(model: nn.Module, seed: int = 0) -> dict:
    rng = random.Random(seed)
    keep = {}
    for group in find_groups(model):
        removed = set(_removed(group, rng, 0.5))
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
