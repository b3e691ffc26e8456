"""Rules for detectron2's ResNet/ResNeXt backbone (stem, residual blocks) and its FPN.

Each rule says which channels its module couples (docs/design.md, "Couplings") and which widths
detectron2 caches on it.
"""

from typing import Dict

from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from torch import nn

from ... import compat
from ..kinds import Kind
from .base import Rule, register_rule

__all__ = ["trace_stage"]


def trace_stage(graph, blocks: nn.Sequential, x: int) -> int:
    """The residual stream of a stage of blocks reading channel space `x`."""
    stream = graph.space(graph.names[blocks], Kind.STAGE)
    for i, block in enumerate(blocks):
        graph.trace(block, x if i == 0 else stream, stream)
    return stream


@register_rule(BasicStem)
class BasicStemRule(Rule):
    def trace(self, graph, stem: BasicStem) -> int:
        x = graph.space(graph.names[stem], Kind.STEM)
        graph.produce(x, stem.conv1)
        return x

    def sync(self, stem: BasicStem) -> None:
        stem.out_channels = stem.conv1.out_channels


class _ResidualBlockRule(Rule):
    """A block of convs in a row (`convs`), whose last conv and shortcut add to the stream."""

    convs = ()

    def trace(self, graph, block: nn.Module, x: int, stream: int) -> None:
        convs = [getattr(block, name) for name in self.convs]
        graph.consume(x, convs[0])
        for conv, reader in zip(convs, convs[1:]):
            inner = graph.space(graph.names[conv], Kind.BLOCK)
            graph.produce(inner, conv)
            graph.consume(inner, reader)
        graph.produce(stream, convs[-1])
        if block.shortcut is not None:
            graph.consume(x, block.shortcut)
            graph.produce(stream, block.shortcut)
        else:
            # The identity shortcut adds the block's input to its output channel by channel.
            graph.merge(x, stream)

    def sync(self, block: nn.Module) -> None:
        block.in_channels = getattr(block, self.convs[0]).in_channels
        block.out_channels = getattr(block, self.convs[-1]).out_channels


@register_rule(BottleneckBlock)
class BottleneckBlockRule(_ResidualBlockRule):
    convs = ("conv1", "conv2", "conv3")


@register_rule(BasicBlock)
class BasicBlockRule(_ResidualBlockRule):
    convs = ("conv1", "conv2")


@register_rule(ResNet)
class ResNetRule(Rule):
    def trace(self, graph, resnet: ResNet) -> Dict[str, int]:
        """The space of every stage's output (and the stem's), by feature name."""
        x = graph.trace(resnet.stem)
        features = {"stem": x}
        for name, stage in zip(resnet.stage_names, resnet.stages):
            x = features[name] = trace_stage(graph, stage, x)
        return features

    def sync(self, resnet: ResNet) -> None:
        channels = {"stem": resnet.stem.out_channels}
        for name, stage in zip(resnet.stage_names, resnet.stages):
            channels[name] = stage[-1].out_channels
        compat.set_out_feature_channels(resnet, channels)


@register_rule(FPN)
class FPNRule(Rule):
    def trace(self, graph, fpn: FPN) -> Dict[str, int]:
        inputs = graph.trace(fpn.bottom_up)
        prefix = graph.names[fpn]
        # Lateral and output convs, top-down sums and the extra levels share one width because
        # the heads apply the same weights to every pyramid level.
        width = graph.space(f"{prefix}.fpn" if prefix else "fpn", Kind.FPN)
        laterals, outputs = fpn.lateral_convs[::-1], fpn.output_convs[::-1]
        for feature, lateral, output in zip(fpn.in_features, laterals, outputs):
            graph.consume(inputs[feature], lateral)
            graph.produce(width, lateral)
            graph.consume(width, output)
            graph.produce(width, output)
        if fpn.top_block is not None:
            bottom_up = {f: inputs[f] for f in compat.backbone_out_features(fpn.bottom_up)}
            graph.trace(fpn.top_block, bottom_up, width)
        return {name: width for name in compat.backbone_out_features(fpn)}

    def sync(self, fpn: FPN) -> None:
        width = fpn.output_convs[0].out_channels
        compat.set_out_feature_channels(
            fpn, {name: width for name in compat.backbone_out_features(fpn)}
        )


# An FPN top block gets the spaces of the bottom-up features and the pyramid's width.


@register_rule(LastLevelMaxPool)
class LastLevelMaxPoolRule(Rule):
    def trace(self, graph, top: LastLevelMaxPool, bottom_up: Dict[str, int], width: int) -> None:
        """Max pooling keeps the channels of the level it reads."""


@register_rule(LastLevelP6P7)
class LastLevelP6P7Rule(Rule):
    def trace(self, graph, top: LastLevelP6P7, bottom_up: Dict[str, int], width: int) -> None:
        # As in FPN.forward: P6 reads the bottom-up feature of that name if there is one (res5
        # in RetinaNet), else the pyramid level (p5).
        graph.consume(bottom_up.get(top.in_feature, width), top.p6)
        graph.produce(width, top.p6)
        graph.consume(width, top.p7)
        graph.produce(width, top.p7)
