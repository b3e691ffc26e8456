"""Discovery of coupled channel groups in Detectron2 ResNet/FPN detectors.

A group is a set of channels that must be kept or removed together; every coupling rule of
detectron2's modules lives here, so surgery, specs and criteria only ever see groups.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

from detectron2.layers import FrozenBatchNorm2d
from detectron2.layers.batch_norm import CycleBatchNormList
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.modeling.proposal_generator.rpn import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import Res5ROIHeads, StandardROIHeads
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import UserError
from ..utils.modules import unwrap

__all__ = ["ChannelGroup", "find_groups", "unwrap"]

# When an identity shortcut or a grouped conv joins two channel spaces, the merged group takes
# the name and kind of the member with the highest rank (ties: the one discovered first), so a
# residual stream that the stem feeds directly is still reported as that stage's stream.
_KIND_RANK = {"stem": 0, "block": 1, "head": 1, "stage": 2, "fpn": 3}

_NORM_TYPES = (FrozenBatchNorm2d, _BatchNorm, nn.GroupNorm, CycleBatchNormList)
_CHANNEL_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


@dataclass
class ChannelGroup:
    """Channels that are kept or removed together, and the modules that write and read them.

    `producers` write the group as their output channels (a detectron2 `Conv2d`'s own `.norm`
    goes with its conv); `consumers` read it as their input channels (a `Linear` that reads a
    flattened C x H x W map reads each channel `in_features // size` times); `norms` are norm
    layers that are separate modules (RetinaNet's subnets). `unit` is the number of consecutive
    channels that must be kept or removed as a whole: channels per GroupNorm group or per
    conv group (ResNeXt), 1 otherwise.
    """

    name: str
    kind: str
    size: int
    producers: List[str]
    consumers: List[str]
    norms: List[str] = field(default_factory=list)
    unit: int = 1


def find_groups(model: nn.Module) -> List[ChannelGroup]:
    """Every channel group of a Detectron2 ResNet/FPN detector, in forward order.

    Supports GeneralizedRCNN (Faster/Mask R-CNN, FPN or C4) and RetinaNet on ResNet/ResNeXt
    backbones; any other layer that carries channels is reported as unsupported.
    """
    return _GroupBuilder(unwrap(model)).build()


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _gn_unit(norm: Optional[nn.Module]) -> int:
    return norm.num_channels // norm.num_groups if isinstance(norm, nn.GroupNorm) else 1


class _GroupBuilder:
    """Union-find over channel spaces: each rule adds a space or ties two spaces together."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        self.parent: List[int] = []
        self.labels: List[tuple] = []  # (name, kind) of each space as created
        self.members: List[tuple] = []  # (space, role, module)

    # -- the union-find ---------------------------------------------------------------------

    def space(self, name: str, kind: str) -> int:
        self.parent.append(len(self.parent))
        self.labels.append((name, kind))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def merge(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        self.parent[max(ra, rb)] = min(ra, rb)

    def produce(self, s: int, module: nn.Module) -> None:
        if not isinstance(module, _CHANNEL_LAYERS):
            self._unsupported(module)
        norm = getattr(module, "norm", None)
        if norm is not None and not isinstance(norm, _NORM_TYPES):
            self._unsupported(norm)
        self.members.append((s, "producers", module))

    def consume(self, s: int, module: nn.Module) -> None:
        if not isinstance(module, _CHANNEL_LAYERS):
            self._unsupported(module)
        self.members.append((s, "consumers", module))

    def _unsupported(self, module: nn.Module) -> None:
        raise UserError(
            f"d2prune cannot trace channels through '{self.names.get(module, '?')}' "
            f"({type(module).__name__}); supported are ResNet/ResNeXt(-FPN) backbones with "
            "RPN, standard or Res5 ROI box/mask heads, and RetinaNet heads."
        )

    # -- the model ----------------------------------------------------------------------------

    def build(self) -> List[ChannelGroup]:
        backbone = getattr(self.model, "backbone", None)
        if backbone is None:
            self._unsupported(self.model)
        features = self.backbone(backbone)
        for module in self.model.modules():
            if isinstance(module, RPN):
                self.rpn(module, features)
            elif isinstance(module, StandardROIHeads):
                self.standard_roi_heads(module, features)
            elif isinstance(module, Res5ROIHeads):
                self.res5_roi_heads(module, features)
            elif isinstance(module, RetinaNetHead):
                self.retinanet_head(module, self.shared(features, self.model.head_in_features))
        self.tie_grouped_convs()
        self.check_coverage()
        return self.groups()

    def backbone(self, backbone: nn.Module) -> Dict[str, int]:
        if isinstance(backbone, FPN):
            return self.fpn(backbone)
        if isinstance(backbone, ResNet):
            return self.resnet(backbone)
        self._unsupported(backbone)

    def resnet(self, resnet: ResNet) -> Dict[str, int]:
        if not isinstance(resnet.stem, BasicStem):
            self._unsupported(resnet.stem)
        x = self.space(self.names[resnet.stem], "stem")
        self.produce(x, resnet.stem.conv1)
        features = {"stem": x}
        for name, stage in zip(resnet.stage_names, resnet.stages):
            x = features[name] = self.stage(stage, x)
        return features

    def stage(self, blocks: nn.Sequential, x: int) -> int:
        """The residual stream of a stage of blocks reading channel space `x`."""
        stream = self.space(self.names[blocks], "stage")
        for i, block in enumerate(blocks):
            if isinstance(block, BottleneckBlock):
                convs = [block.conv1, block.conv2, block.conv3]
            elif isinstance(block, BasicBlock):
                convs = [block.conv1, block.conv2]
            else:
                self._unsupported(block)
            block_in = x if i == 0 else stream
            self.consume(block_in, convs[0])
            for conv, reader in zip(convs, convs[1:]):
                inner = self.space(self.names[conv], "block")
                self.produce(inner, conv)
                self.consume(inner, reader)
            self.produce(stream, convs[-1])
            if block.shortcut is not None:
                self.consume(block_in, block.shortcut)
                self.produce(stream, block.shortcut)
            else:
                # The identity shortcut adds the block's input to its output channel by channel.
                self.merge(block_in, stream)
        return stream

    def fpn(self, fpn: FPN) -> Dict[str, int]:
        if not isinstance(fpn.bottom_up, ResNet):
            self._unsupported(fpn.bottom_up)
        inputs = self.resnet(fpn.bottom_up)
        prefix = self.names[fpn]
        # Lateral and output convs, top-down sums and the extra levels share one width because
        # the heads apply the same weights to every pyramid level.
        width = self.space(f"{prefix}.fpn" if prefix else "fpn", "fpn")
        laterals, outputs = fpn.lateral_convs[::-1], fpn.output_convs[::-1]
        for feature, lateral, output in zip(fpn.in_features, laterals, outputs):
            self.consume(inputs[feature], lateral)
            self.produce(width, lateral)
            self.consume(width, output)
            self.produce(width, output)
        top = fpn.top_block
        if isinstance(top, LastLevelP6P7):
            reads_bottom_up = top.in_feature in fpn.bottom_up._out_features
            self.consume(inputs[top.in_feature] if reads_bottom_up else width, top.p6)
            self.produce(width, top.p6)
            self.consume(width, top.p7)
            self.produce(width, top.p7)
        elif top is not None and not isinstance(top, LastLevelMaxPool):
            self._unsupported(top)
        return {name: width for name in fpn._out_features}

    def shared(self, features: Dict[str, int], names: Iterable[str]) -> int:
        """One space for the features a head reads with shared weights."""
        spaces = [features[f] for f in names]
        for s in spaces[1:]:
            self.merge(spaces[0], s)
        return spaces[0]

    def chain(self, x: int, layers: Sequence[nn.Module]) -> int:
        """Thread space `x` through a sequence of layers; each conv/linear starts a head group."""
        for layer in layers:
            if isinstance(layer, _CHANNEL_LAYERS):
                self.consume(x, layer)
                x = self.space(self.names[layer], "head")
                self.produce(x, layer)
            elif isinstance(layer, _NORM_TYPES):
                self.members.append((x, "norms", layer))
            elif any(True for _ in layer.parameters()):
                self._unsupported(layer)
        return x

    def rpn(self, rpn: RPN, features: Dict[str, int]) -> None:
        head = rpn.rpn_head
        if not isinstance(head, StandardRPNHead):
            self._unsupported(head)
        convs = list(head.conv) if isinstance(head.conv, nn.Sequential) else [head.conv]
        x = self.chain(self.shared(features, rpn.in_features), convs)
        self.consume(x, head.objectness_logits)
        self.consume(x, head.anchor_deltas)

    def box_predictor(self, x: int, predictor: nn.Module) -> None:
        for name in ("cls_score", "bbox_pred"):
            self.consume(x, getattr(predictor, name))

    def mask_head(self, x: int, head: nn.Module) -> None:
        if not isinstance(head, nn.Sequential):
            self._unsupported(head)
        self.consume(self.chain(x, list(head)[:-1]), head[-1])

    def standard_roi_heads(self, roi_heads: StandardROIHeads, features: Dict[str, int]) -> None:
        if roi_heads.keypoint_on:
            self._unsupported(roi_heads.keypoint_head)
        if not isinstance(roi_heads.box_head, nn.Sequential):
            self._unsupported(roi_heads.box_head)
        x = self.chain(self.shared(features, roi_heads.box_in_features), roi_heads.box_head)
        self.box_predictor(x, roi_heads.box_predictor)
        if roi_heads.mask_on:
            x = self.shared(features, roi_heads.mask_in_features)
            self.mask_head(x, roi_heads.mask_head)

    def res5_roi_heads(self, roi_heads: Res5ROIHeads, features: Dict[str, int]) -> None:
        x = self.stage(roi_heads.res5, self.shared(features, roi_heads.in_features))
        # The box predictor reads the stream mean-pooled to 1x1; the mask head reads it as is.
        self.box_predictor(x, roi_heads.box_predictor)
        if roi_heads.mask_on:
            self.mask_head(x, roi_heads.mask_head)

    def retinanet_head(self, head: RetinaNetHead, x: int) -> None:
        self.consume(self.chain(x, head.cls_subnet), head.cls_score)
        self.consume(self.chain(x, head.bbox_subnet), head.bbox_pred)

    # -- checks and the result ----------------------------------------------------------------

    def tie_grouped_convs(self) -> None:
        """A grouped conv's output group g reads only input group g: tie its input to its output.

        Both sides then form one group whose channels go in whole conv groups (ResNeXt conv2
        with conv1's output and conv3's input).
        """
        spaces: Dict[nn.Module, Dict[str, int]] = {}
        for s, role, module in self.members:
            spaces.setdefault(module, {})[role] = s
        for module, roles in spaces.items():
            if getattr(module, "groups", 1) == 1:
                continue
            if (
                isinstance(module, nn.ConvTranspose2d)
                or module.in_channels != module.out_channels
                or len(roles) != 2
            ):
                self._unsupported(module)
            self.merge(roles["producers"], roles["consumers"])

    def check_coverage(self) -> None:
        """Refuse models with channel-carrying layers that no rule above accounts for."""
        covered = set()
        for _, _, module in self.members:
            covered.update(module.modules())  # a Conv2d's .norm, a CycleBatchNormList's BNs
        for module in self.model.modules():
            if module in covered:
                continue
            if isinstance(module, _CHANNEL_LAYERS + _NORM_TYPES) or any(
                True for _ in module.parameters(recurse=False)
            ):
                self._unsupported(module)

    def groups(self) -> List[ChannelGroup]:
        by_root: Dict[int, List[int]] = {}
        for s in range(len(self.parent)):
            by_root.setdefault(self.find(s), []).append(s)
        roles: Dict[int, Dict[str, List[nn.Module]]] = {}
        for s, role, module in self.members:
            roles.setdefault(self.find(s), {}).setdefault(role, []).append(module)

        groups = []
        for root in sorted(by_root):
            members = roles.get(root, {})
            producers = members.get("producers", [])
            consumers = members.get("consumers", [])
            norms = members.get("norms", [])
            if not producers or not consumers:
                continue  # nothing writes or nothing reads it, e.g. a stage output no one uses
            name, kind = max(
                (self.labels[s] for s in by_root[root]), key=lambda label: _KIND_RANK[label[1]]
            )
            sizes = {_out_channels(m) for m in producers}
            assert len(sizes) == 1, f"producers of {name} disagree on their width: {sizes}"
            units = [_gn_unit(getattr(m, "norm", None)) for m in producers]
            units += [_gn_unit(m) for m in norms]
            units += [m.out_channels // m.groups for m in producers if getattr(m, "groups", 1) > 1]
            groups.append(
                ChannelGroup(
                    name=name,
                    kind=kind,
                    size=sizes.pop(),
                    producers=[self.names[m] for m in producers],
                    consumers=[self.names[m] for m in consumers],
                    norms=[self.names[m] for m in norms],
                    unit=math.lcm(*units),
                )
            )
        return groups
