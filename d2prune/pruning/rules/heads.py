"""Rules for detectron2's heads: RPN, standard, Cascade and Res5 ROI heads (box, mask and
keypoint), RetinaNet.

The heads are the entry points of discovery (`reads_features`): each reads backbone features.
"""

from typing import Dict

from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.modeling.proposal_generator.rpn import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import (
    CascadeROIHeads,
    FastRCNNConvFCHead,
    FastRCNNOutputLayers,
    Res5ROIHeads,
    StandardROIHeads,
)
from detectron2.modeling.roi_heads.keypoint_head import KRCNNConvDeconvUpsampleHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from torch import nn

from ... import compat
from .backbone import trace_stage
from .base import Rule, register_rule


@register_rule(RPN)
class RPNRule(Rule):
    reads_features = True

    def trace(self, graph, rpn: RPN, features: Dict[str, int]) -> None:
        graph.trace(rpn.rpn_head, graph.shared(features, rpn.in_features))


@register_rule(StandardRPNHead)
class StandardRPNHeadRule(Rule):
    def trace(self, graph, head: StandardRPNHead, x: int) -> None:
        convs = list(head.conv) if isinstance(head.conv, nn.Sequential) else [head.conv]
        x = graph.chain(x, convs)
        graph.consume(x, head.objectness_logits)
        graph.consume(x, head.anchor_deltas)


@register_rule(StandardROIHeads)
class StandardROIHeadsRule(Rule):
    reads_features = True

    def trace(self, graph, roi_heads: StandardROIHeads, features: Dict[str, int]) -> None:
        self.trace_box(graph, roi_heads, graph.shared(features, roi_heads.box_in_features))
        if roi_heads.mask_on:
            graph.trace(roi_heads.mask_head, graph.shared(features, roi_heads.mask_in_features))
        if roi_heads.keypoint_on:
            x = graph.shared(features, roi_heads.keypoint_in_features)
            graph.trace(roi_heads.keypoint_head, x)

    def trace_box(self, graph, roi_heads: StandardROIHeads, x: int) -> None:
        graph.trace(roi_heads.box_predictor, graph.trace(roi_heads.box_head, x))


@register_rule(CascadeROIHeads)
class CascadeROIHeadsRule(StandardROIHeadsRule):
    def trace_box(self, graph, roi_heads: CascadeROIHeads, x: int) -> None:
        # One box head and predictor per stage, each reading the pooled pyramid afresh.
        for head, predictor in zip(roi_heads.box_head, roi_heads.box_predictor):
            graph.trace(predictor, graph.trace(head, x))


@register_rule(FastRCNNConvFCHead)
class FastRCNNConvFCHeadRule(Rule):
    def trace(self, graph, head: FastRCNNConvFCHead, x: int) -> int:
        return graph.chain(x, head)

    def sync(self, head: FastRCNNConvFCHead) -> None:
        if head.fcs:
            size = head.fcs[-1].out_features
        else:
            _, height, width = compat.box_head_output_size(head)
            size = (head.conv_norm_relus[-1].out_channels, height, width)
        compat.set_box_head_output_size(head, size)


@register_rule(FastRCNNOutputLayers)
class FastRCNNOutputLayersRule(Rule):
    # bbox_pred is one box per class unless CLS_AGNOSTIC_BBOX_REG.
    class_layers = ("cls_score", "bbox_pred")

    def trace(self, graph, predictor: FastRCNNOutputLayers, x: int) -> None:
        graph.consume(x, predictor.cls_score)
        graph.consume(x, predictor.bbox_pred)


@register_rule(MaskRCNNConvUpsampleHead)
class MaskRCNNConvUpsampleHeadRule(Rule):
    class_layers = ("predictor",)  # one mask per class unless CLS_AGNOSTIC_MASK

    def trace(self, graph, head: MaskRCNNConvUpsampleHead, x: int) -> None:
        graph.consume(graph.chain(x, list(head)[:-1]), head[-1])


@register_rule(KRCNNConvDeconvUpsampleHead)
class KRCNNConvDeconvUpsampleHeadRule(Rule):
    def trace(self, graph, head: KRCNNConvDeconvUpsampleHead, x: int) -> None:
        # conv_fcn layers (each a head group), then score_lowres, one heatmap per keypoint.
        graph.consume(graph.chain(x, list(head)[:-1]), head.score_lowres)


@register_rule(Res5ROIHeads)
class Res5ROIHeadsRule(Rule):
    reads_features = True

    def trace(self, graph, roi_heads: Res5ROIHeads, features: Dict[str, int]) -> None:
        x = trace_stage(graph, roi_heads.res5, graph.shared(features, roi_heads.in_features))
        # The box predictor reads the stream mean-pooled to 1x1; the mask head reads it as is.
        graph.trace(roi_heads.box_predictor, x)
        if roi_heads.mask_on:
            graph.trace(roi_heads.mask_head, x)


@register_rule(RetinaNetHead)
class RetinaNetHeadRule(Rule):
    reads_features = True
    class_layers = ("cls_score",)

    def trace(self, graph, head: RetinaNetHead, features: Dict[str, int]) -> None:
        # The features the head reads are a setting of the RetinaNet around it.
        x = graph.shared(features, graph.model.head_in_features)
        graph.consume(graph.chain(x, head.cls_subnet), head.cls_score)
        graph.consume(graph.chain(x, head.bbox_subnet), head.bbox_pred)
