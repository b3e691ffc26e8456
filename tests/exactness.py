"""Exactness checks shared by the surgery tests: silence channels in every producer, record
the detector's outputs, prune, and compare (docs/design.md: removing a channel whose producers
output zero changes no output)."""

import random

import torch
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.resnet import BottleneckBlock
from torch import nn

from d2prune.pruning import find_groups, prune

from . import models


def removed_channels(group, rng: random.Random, fraction: float):
    """Indices of about `fraction` of the group's channels, in whole units, never all of them."""
    units = group.size // group.unit
    count = min(max(1, round(units * fraction)), units - 1)
    chosen = rng.sample(range(units), count)
    return sorted(u * group.unit + i for u in chosen for i in range(group.unit))


def silence(model: nn.Module, group, channels) -> None:
    """Make the group's channels exactly zero wherever they are written."""
    modules = dict(model.named_modules())
    index = torch.tensor(channels, device=next(model.parameters()).device)
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


def width_groups(model: nn.Module, groups) -> dict:
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


def run(model: nn.Module, inputs) -> dict:
    """Backbone features, raw head outputs and final detections, keyed by where they come from."""
    records = {}

    def record(path):
        def hook(module, args, output):
            if isinstance(output, dict):
                for feature, tensor in output.items():
                    records[f"{path}:{feature}"] = tensor.clone()
            else:
                for i, tensor in enumerate(flat(output)):
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


def flat(output):
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for item in output for t in flat(item)]


def assert_same(before: dict, after: dict, keep: dict, widths: dict) -> None:
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


def prune_silenced(model: nn.Module, groups, rng: random.Random, fraction: float = 0.25) -> dict:
    """Silence about `fraction` of each of `groups`' channels, prune them, and assert that every
    output of the detector is unchanged; returns the keep sets."""
    keep = {}
    for group in groups:
        removed = removed_channels(group, rng, fraction)
        silence(model, group, removed)
        keep[group.name] = sorted(set(range(group.size)) - set(removed))
    inputs = models.images(1)
    widths = width_groups(model, find_groups(model))
    before = run(model, inputs)

    prune(model, keep)

    sizes = {g.name: g.size for g in find_groups(model)}
    assert all(sizes[name] == len(kept) for name, kept in keep.items())
    assert_same(before, run(model, inputs), keep, widths)
    return keep
