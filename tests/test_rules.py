"""Adding a module type takes one rule: a toy box head joins discovery and exact surgery.

The toy head (a conv and a linear layer) replaces FastRCNNConvFCHead; without its rule, d2prune
refuses the model and names the head.
"""

import random

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import BasicBlock
from torch import nn

from d2prune.errors import UserError
from d2prune.pruning import Rule, find_groups, register_rule, unregister_rule
from d2prune.pruning.rules import rule_for

from . import models
from .exactness import prune_silenced

torch.set_num_threads(2)


class ToyBoxHead(nn.Module):
    """A box head of one 3x3 conv and one fc layer that caches its output width, as
    detectron2's heads do for `output_shape`."""

    def __init__(self, channels: int, resolution: int, conv_dim: int, fc_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, conv_dim, 3, padding=1)
        self.fc = nn.Linear(conv_dim * resolution * resolution, fc_dim)
        self.out_channels = fc_dim

    def forward(self, x):
        return F.relu(self.fc(torch.flatten(F.relu(self.conv(x)), 1)))

    @property
    def output_shape(self) -> ShapeSpec:
        return ShapeSpec(channels=self.out_channels)


class ToyBoxHeadRule(Rule):
    def trace(self, graph, head: ToyBoxHead, x: int) -> int:
        # conv reads the pooled features `x` and starts a head group, which fc reads and
        # flattens; fc starts the group the box predictor reads.
        return graph.chain(x, [head.conv, head.fc])

    def sync(self, head: ToyBoxHead) -> None:
        head.out_channels = head.fc.out_features


@pytest.fixture
def toy_rule():
    register_rule(ToyBoxHead)(ToyBoxHeadRule)
    yield
    unregister_rule(ToyBoxHead)


def _toy_detector() -> nn.Module:
    model = models.build("faster_rcnn_R18_FPN")
    torch.manual_seed(0)
    model.roi_heads.box_head = ToyBoxHead(256, 7, 32, 1024).eval()
    return model


def test_toy_head_groups(toy_rule):
    groups = {g.name: g for g in find_groups(_toy_detector())}
    conv, fc = groups["roi_heads.box_head.conv"], groups["roi_heads.box_head.fc"]
    assert (conv.kind, conv.size, conv.producers, conv.consumers) == (
        "head", 32, ["roi_heads.box_head.conv"], ["roi_heads.box_head.fc"],
    )  # fmt: skip
    assert (fc.kind, fc.size, fc.consumers) == (
        "head", 1024, ["roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"],
    )  # fmt: skip
    assert "roi_heads.box_head.conv" in groups["backbone.fpn"].consumers


def test_toy_head_prunes_exactly(toy_rule):
    model = _toy_detector()
    groups = [g for g in find_groups(model) if g.kind in ("fpn", "head")]
    keep = prune_silenced(model, groups, random.Random(0))

    head = model.roi_heads.box_head
    assert (head.conv.out_channels, head.fc.in_features) == (24, 24 * 7 * 7)
    assert head.output_shape.channels == head.fc.out_features == len(keep["roi_heads.box_head.fc"])


def test_toy_head_without_its_rule_is_refused():
    with pytest.raises(UserError, match=r"'roi_heads.box_head' \(ToyBoxHead\)"):
        find_groups(_toy_detector())


def test_a_subclass_rule_wins_and_types_register_once():
    class WideBlock(BasicBlock):
        pass

    class WideBlockRule(Rule):
        pass

    built_in = rule_for(BasicBlock(8, 8))
    assert rule_for(WideBlock(8, 8)) is built_in
    register_rule(WideBlock)(WideBlockRule)
    try:
        assert isinstance(rule_for(WideBlock(8, 8)), WideBlockRule)
        with pytest.raises(ValueError, match="WideBlock"):
            register_rule(WideBlock)(WideBlockRule)
    finally:
        unregister_rule(WideBlock)
    assert rule_for(WideBlock(8, 8)) is built_in
