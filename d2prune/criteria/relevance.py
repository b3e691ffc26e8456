"""Interpretability criteria: how much each filter contributes to the detector's class scores of
its ground-truth objects, by layer-wise relevance propagation (lrp) and box-grounded Grad-CAM.

Both explain the same score, `class_scores`: for every ground-truth box, its class logit.
"""

import contextlib
from typing import ContextManager, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d
from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN
from detectron2.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead, permute_to_N_HWA_K
from detectron2.modeling.proposal_generator.rpn import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import Res5ROIHeads, StandardROIHeads
from detectron2.structures import Boxes, Instances, pairwise_iou
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import compat
from ..errors import UserError
from ..pruning.groups import ChannelGroup
from ..utils.modules import unwrap
from . import register
from .collector import Accumulator, StatisticsCriterion, samples
from .targets import box_masks

__all__ = ["LRP", "GradCAM", "class_scores", "lrp_rules", "relevance_maps"]

# The stabiliser of both rules, added to denominators with their sign (+ for zero): zennit's
# default for Epsilon and ZPlus, so that the rules here and zennit's agree to float precision.
EPSILON = 1e-6


# -- the explained score --------------------------------------------------------------------


def class_scores(detector: nn.Module, batch: List[dict]) -> torch.Tensor:
    """The score that lrp and gradcam explain, summed over the ground-truth boxes of `batch`.

    Per box of class k: Faster/Mask R-CNN pools the FPN (or C4) features on the box itself, as
    if it were a proposal, through the box head, and takes logit k of the box predictor, plus
    the mean RPN objectness logit of the anchors matched to the box, so that the RPN head is on
    the explained path too. RetinaNet takes the mean logit k of the anchors its matcher assigns
    to the box (IoU at or above the foreground threshold, plus each box's best anchors). Means
    make every box count once whatever its size. Only what this score needs runs: the box
    regression branches and the mask head do not. The padded image tensor requires gradients,
    so every layer's output does, frozen stages included.
    """
    detector = unwrap(detector)
    _check_supported(detector)
    gt = _instances(batch, detector.device)
    images = detector.preprocess_image(batch)
    pixels = images.tensor.detach().requires_grad_()
    features = detector.backbone(pixels)
    total = pixels.sum() * 0.0  # a score on the graph even for a batch without boxes
    if isinstance(detector, RetinaNet):
        maps = [features[f] for f in detector.head_in_features]
        head = detector.head
        logits = torch.cat(
            [permute_to_N_HWA_K(head.cls_score(head.cls_subnet(x)), detector.num_classes) for x in maps],
            dim=1,
        )
        anchors = Boxes.cat(detector.anchor_generator(maps))
        return total + _matched_mean(logits, anchors, gt, detector.anchor_matcher, classes=True)

    rpn = detector.proposal_generator
    maps = [features[f] for f in rpn.in_features]
    head = rpn.rpn_head
    objectness = torch.cat(
        [head.objectness_logits(head.conv(x)).permute(0, 2, 3, 1).flatten(1) for x in maps], dim=1
    )
    anchors = Boxes.cat(rpn.anchor_generator(maps))
    total = total + _matched_mean(objectness, anchors, gt, rpn.anchor_matcher, classes=False)

    roi = detector.roi_heads
    boxes = [x.gt_boxes for x in gt]
    if isinstance(roi, StandardROIHeads):
        x = roi.box_head(roi.box_pooler([features[f] for f in roi.box_in_features], boxes))
    else:  # Res5ROIHeads: the box predictor reads the res5 output mean-pooled to 1x1
        x = compat.res5_box_features(roi, [features[f] for f in roi.in_features], boxes).mean(dim=(2, 3))
    logits = roi.box_predictor.cls_score(torch.flatten(x, 1))
    classes = torch.cat([x.gt_classes for x in gt]).long()
    return total + logits.gather(1, classes[:, None]).sum()


def _matched_mean(scores, anchors: Boxes, gt: List[Instances], matcher, classes: bool):
    """Sum over boxes of the mean score of the anchors `matcher` labels foreground for them;
    `scores` are (images, anchors), or (images, anchors, classes) to read each box's class."""
    total = scores.new_zeros(())
    for i, instances in enumerate(gt):
        if len(instances) == 0:
            continue
        matched, labels = matcher(pairwise_iou(instances.gt_boxes, anchors))
        fg = (labels == 1).nonzero().squeeze(1)
        box = matched[fg]
        values = scores[i, fg, instances.gt_classes[box].long()] if classes else scores[i, fg]
        sums = values.new_zeros(len(instances)).index_add(0, box, values)
        counts = torch.bincount(box, minlength=len(instances))
        hit = counts > 0
        total = total + (sums[hit] / counts[hit]).sum()
    return total


def _check_supported(detector: nn.Module) -> None:
    if isinstance(detector, RetinaNet) and isinstance(detector.head, RetinaNetHead):
        return
    if (
        isinstance(detector, GeneralizedRCNN)
        and isinstance(detector.proposal_generator, RPN)
        and isinstance(detector.proposal_generator.rpn_head, StandardRPNHead)
        and isinstance(detector.roi_heads, (StandardROIHeads, Res5ROIHeads))
    ):
        return
    raise UserError(
        f"the relevance criteria explain GeneralizedRCNN detectors with an RPN and standard or "
        f"Res5 ROI heads, and RetinaNet; got {type(detector).__name__}."
    )


def _instances(batch: List[dict], device=None) -> List[Instances]:
    if any("instances" not in x for x in batch):
        raise UserError(
            "the relevance criteria need ground-truth boxes: every input needs its 'instances' "
            "(a training data loader gives them)."
        )
    return [x["instances"] if device is None else x["instances"].to(device) for x in batch]


def _logit_layers(detector: nn.Module) -> List[nn.Module]:
    """The layers whose outputs are the explained logits."""
    if isinstance(detector, RetinaNet):
        return [detector.head.cls_score]
    return [detector.roi_heads.box_predictor.cls_score, detector.proposal_generator.rpn_head.objectness_logits]


def _box_modules(detector: nn.Module) -> Set[nn.Module]:
    """Modules that run once per box (the ROI heads): their rows are boxes, not images."""
    if isinstance(detector, RetinaNet):
        return set()
    return set(detector.roi_heads.modules())


# -- LRP as a modified gradient -------------------------------------------------------------


def _stabilize(z: torch.Tensor) -> torch.Tensor:
    return torch.where(z >= 0, z + EPSILON, z - EPSILON)


@contextlib.contextmanager
def lrp_rules(model: nn.Module, output_layers: Iterable[nn.Module] = ()) -> Iterator[None]:
    """While active, gradients through `model` follow LRP rules (Bach et al. 2015; Montavon et
    al. 2019, "Layer-Wise Relevance Propagation: An Overview"), so that `a * grad` at any layer
    output is its relevance R: every conv/linear layer's output y is rewritten as
    y + (z(x) - z(x).detach()) * (y / z(x)).detach(), whose value stays y and whose gradient
    redistributes R_j = y_j g_j over the inputs in proportion to their contributions z_ij.

    - Linear layers and `output_layers` (the logit layers): epsilon rule,
      R_i = sum_j x_i w_ij R_j / (z_j + eps sign z_j), z_j = sum_i x_i w_ij + b_j, so biases
      absorb their share.
    - Every other Conv2d: zennit's ZPlus (alpha1-beta0 for signed inputs),
      R_i = sum_j (x_i^+ w_ij^+ + x_i^- w_ij^-) R_j / z_j, z_j = sum_i (...) + b_j^+. The stem
      conv too: its rule only moves relevance onto pixels, which no channel score reads.
    - A norm is folded into the conv before it, as one affine layer w' = s w, b' = s b + t with
      the norm's per-channel y = s x + t: a detectron2 Conv2d's own `.norm` (FrozenBN, BN with
      running statistics, GN with its per-image group mean and variance taken as constants) and
      a norm that follows a conv in an nn.Sequential (RetinaNet's subnets), which then passes
      relevance unchanged from its output to its input (the conv's output), R_in = R_out.
    - ReLU, sums, nearest upsampling, pooling, ROIAlign, flatten and any other op pass plain
      gradients, which for these linear, bias-free or positively homogeneous ops is the
      relevance-conserving gradient x input.
    """
    output_layers = set(output_layers)
    followed = _norms_after_convs(model)
    affines: Dict[nn.Module, Tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    try:
        for module in model.modules():
            if isinstance(module, nn.Linear) or module in output_layers:
                handles.append(module.register_forward_hook(_epsilon_hook))
            elif isinstance(module, nn.Conv2d):
                norm = getattr(module, "norm", None)
                if isinstance(norm, nn.Module):
                    handles.append(norm.register_forward_pre_hook(_capture_affine(module, affines)))
                handles.append(module.register_forward_hook(_zplus_hook(followed.get(module), affines)))
        for norm in set(followed.values()):
            handles.append(norm.register_forward_hook(_pass_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
        affines.clear()


def _norms_after_convs(model: nn.Module) -> Dict[nn.Module, nn.Module]:
    """Conv -> the norm module that directly follows it in an nn.Sequential."""
    norms = (FrozenBatchNorm2d, _BatchNorm, nn.GroupNorm, CycleBatchNormList)
    followed = {}
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            layers = list(seq)
            for conv, norm in zip(layers, layers[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(norm, norms):
                    followed[conv] = norm
    return followed


def _epsilon_hook(module, inputs, y):
    with torch.no_grad():
        k = y / _stabilize(y)
    return y.detach() + (y - y.detach()) * k


def _capture_affine(conv: nn.Module, affines: Dict):
    def pre_hook(norm, inputs):
        affines[conv] = _norm_affine(norm, inputs[0].detach())

    return pre_hook


def _zplus_hook(norm_after: Optional[nn.Module], affines: Dict):
    def forward_hook(module, inputs, y):
        x = inputs[0]
        if norm_after is not None:
            scale, shift = _norm_affine(norm_after, y.detach())
        elif module in affines:
            scale, shift = affines.pop(module)
        else:
            scale, shift = None, None
        z, bias = _zplus(module, x, scale, shift)
        with torch.no_grad():
            k = y / _stabilize(z if bias is None else z + bias.clamp(min=0))
        return y.detach() + (z - z.detach()) * k

    return forward_hook


def _zplus(conv: nn.Conv2d, x: torch.Tensor, scale, shift):
    """The positive contributions sum_i x_i^+ w'_ij^+ + x_i^- w'_ij^- (on the graph) and the
    folded bias b', for the conv's weights w folded with its norm as w' = scale * w."""
    w = conv.weight
    # Most inputs follow a ReLU: then x^- = 0 and one conv is enough.
    signed = bool((x < 0).any())
    positive = x.clamp(min=0) if signed else x

    def contributions(w_pos, w_neg):
        z = compat.conv_forward(conv, positive, w_pos, None)
        return z + compat.conv_forward(conv, x.clamp(max=0), w_neg, None) if signed else z

    z = contributions(w.clamp(min=0), w.clamp(max=0))
    bias = conv.bias[None, :, None, None] if conv.bias is not None else None
    if scale is None:
        return z, bias
    if bool((scale < 0).any()):
        # A negative scale swaps the roles of w^+ and w^-: s w^- is the positive part of s w.
        z_neg = contributions(w.clamp(max=0), w.clamp(min=0))
        z = scale.clamp(min=0) * z + scale.clamp(max=0) * z_neg
    else:
        z = scale * z
    return z, shift if bias is None else scale * bias + shift


def _norm_affine(norm: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(s, t) with norm(x) = s x + t, shaped (1 or N, C, 1, 1); statistics are constants."""
    channels = x.shape[1]
    if isinstance(norm, CycleBatchNormList):
        scale, shift = _norm_affine(compat.cycle_bn_active(norm), x)  # the BN this call will use
        if compat.cycle_bn_affine(norm):
            w, b = norm.weight[None, :, None, None], norm.bias[None, :, None, None]
            scale, shift = scale * w, shift * w + b
        return scale.detach(), shift.detach()
    if isinstance(norm, (FrozenBatchNorm2d, _BatchNorm)):
        if isinstance(norm, _BatchNorm) and (norm.training or norm.running_mean is None):
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        else:
            mean, var = norm.running_mean, norm.running_var
        scale = (var + norm.eps).rsqrt()
        if getattr(norm, "weight", None) is not None:
            scale = scale * norm.weight
        shift = -mean * scale
        if getattr(norm, "bias", None) is not None:
            shift = shift + norm.bias
        return scale.detach().view(1, -1, 1, 1), shift.detach().view(1, -1, 1, 1)
    if isinstance(norm, nn.GroupNorm):
        grouped = x.reshape(x.shape[0], norm.num_groups, -1)
        per_channel = channels // norm.num_groups
        mean = grouped.mean(2).repeat_interleave(per_channel, 1)
        inv = (grouped.var(2, unbiased=False) + norm.eps).rsqrt().repeat_interleave(per_channel, 1)
        scale = inv * norm.weight if norm.affine else inv
        shift = -mean * scale + (norm.bias if norm.affine else 0)
        return scale.detach()[:, :, None, None], shift.detach()[:, :, None, None]
    raise UserError(
        f"criterion 'lrp' cannot fold a {type(norm).__name__} into its conv; supported norms "
        "are FrozenBN, BN/SyncBN (also per level) and GN."
    )


def _pass_hook(norm, inputs, y):
    """A norm after a conv (folded into that conv's rule): R_in = R_out at every position."""
    x = inputs[0]
    with torch.no_grad():
        ratio = torch.where(x != 0, y / x, torch.zeros_like(y))
    return y.detach() + (x - x.detach()) * ratio


def relevance_maps(
    model: nn.Module, batch: List[dict], module_names: Sequence[str]
) -> Dict[str, torch.Tensor]:
    """Per-channel LRP relevance maps (N, C, h, w) at the outputs of the named conv producers,
    for a detectron2 `batch` with ground-truth `instances`: R = a * g, with g the gradient of
    `class_scores` under `lrp_rules`, detached, on the model's device.

    Over a cut of the network (e.g. all FPN output convs) the maps sum to `class_scores` less
    what biases absorbed on the way (the epsilon layers' biases, positive folded biases of z+
    convs). The model runs in eval mode (norms use their running statistics); modes and
    everything else are restored and no hook is left. Every named module must run once on the
    batch's images: pyramid-level heads and ROI heads have no single map per image.
    """
    detector = unwrap(model)
    modules = dict(detector.named_modules())
    unknown = [n for n in module_names if n not in modules]
    if unknown:
        raise UserError(f"relevance maps: no module named {', '.join(unknown)} in the model.")
    _check_supported(detector)
    recorded: Dict[str, List[torch.Tensor]] = {name: [] for name in module_names}

    def record(name):
        def forward_hook(module, inputs, output):
            recorded[name].append(output)
            return output.clone()  # the block's in-place ReLU must not overwrite the record

        return forward_hook

    modes = {m: m.training for m in detector.modules()}
    handles = []
    try:
        detector.eval()
        with lrp_rules(detector, _logit_layers(detector)), torch.enable_grad():
            handles = [modules[n].register_forward_hook(record(n)) for n in module_names]
            score = class_scores(detector, batch)
            for name, outputs in recorded.items():
                if len(outputs) != 1 or outputs[0].dim() != 4 or len(outputs[0]) != len(batch):
                    raise UserError(
                        f"relevance maps: '{name}' must run once on the images of a batch (a "
                        "backbone or FPN conv); pyramid-level and ROI head layers do not."
                    )
            outputs = [recorded[n][0] for n in module_names]
            grads = torch.autograd.grad(score, outputs, materialize_grads=True)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    return {n: (a.detach() * g).detach() for n, a, g in zip(module_names, outputs, grads)}


# -- the accumulators and criteria ----------------------------------------------------------


class _FilterRelevance(Accumulator):
    """R_c = | sum over the positions (and pyramid levels) of one image of a_c g_c |, averaged
    over the images that have ground-truth boxes."""

    wants_grad = True

    def __init__(self, module: nn.Module, size: int, per_box: bool):
        super().__init__(module, size)
        self.per_box = per_box
        self.sums.update(total=self.zeros(size), count=self.zeros(1))
        self.boxes: List[int] = []
        self.relevance: Optional[torch.Tensor] = None  # (images, C) of this batch

    def begin_batch(self, batch, padded_size):
        self.boxes = [len(x) for x in _instances(batch)]
        self.relevance = None

    def update(self, a, grad=None):
        r = samples(a * grad).sum(2, dtype=torch.float64)  # (samples, C)
        if self.per_box:
            owner = torch.repeat_interleave(
                torch.arange(len(self.boxes), device=r.device),
                torch.tensor(self.boxes, device=r.device),
            )
            r = r.new_zeros(len(self.boxes), r.shape[1]).index_add(0, owner, r)
        self.relevance = r if self.relevance is None else self.relevance + r

    def end_batch(self, grads=()):
        if self.relevance is not None:
            with_boxes = torch.tensor(self.boxes, device=self.relevance.device) > 0
            self.sums["total"] += self.relevance[with_boxes].abs().sum(0)
            self.sums["count"] += with_boxes.sum()
        self.relevance = None

    def result(self):
        return _neutral_if_unreached(self.sums["total"] / self.sums["count"].clamp(min=1))


class _BoxGradCAM(Accumulator):
    """Per ground-truth box: alpha_c = mean over the box's positions of g_c and
    A_c = mean over them of a_c; s_c = mean over boxes of |alpha_c A_c|."""

    wants_grad = True

    def __init__(self, module: nn.Module, size: int, per_box: bool):
        super().__init__(module, size)
        self.per_box = per_box
        self.sums.update(total=self.zeros(size), count=self.zeros(1))

    def begin_batch(self, batch, padded_size):
        self.batch, self.padded = batch, padded_size
        boxes = sum(len(x) for x in _instances(batch))
        # Per box of the batch: sums over its positions of g and a, and the positions.
        self.g, self.a, self.n = self.zeros(boxes, self.size), self.zeros(boxes, self.size), self.zeros(boxes)

    def update(self, a, grad=None):
        a, g = samples(a).double(), samples(grad).double()  # (samples, C, positions)
        if self.per_box:  # a pooled region is all box
            self.g += g.sum(2)
            self.a += a.sum(2)
            self.n += a.shape[2]
            return
        start = 0
        for i, (mask, _) in enumerate(box_masks(self.batch, tuple(grad.shape[-2:]), self.padded)):
            m = mask.flatten(1).to(a)  # (boxes, positions)
            rows = slice(start, start + len(m))
            self.g[rows] += m @ g[i].T
            self.a[rows] += m @ a[i].T
            self.n[rows] += m.sum(1)
            start += len(m)

    def end_batch(self, grads=()):
        seen = self.n > 0
        if seen.any():
            n = self.n[seen, None]
            alpha, activation = self.g[seen] / n, self.a[seen] / n
            self.sums["total"] += (alpha * activation).abs().sum(0)
            self.sums["count"] += seen.sum()

    def result(self):
        return _neutral_if_unreached(self.sums["total"] / self.sums["count"].clamp(min=1))


def _neutral_if_unreached(s: torch.Tensor) -> torch.Tensor:
    """Channels that the explained score never reaches (RetinaNet's box subnet, the box
    regression and mask heads: nothing ran or every gradient was zero) all score 1: there is
    nothing to rank them by, and a constant leaves the decision to the budget's other groups."""
    return torch.ones_like(s) if not bool(s.any()) else s


class _Explaining(StatisticsCriterion):
    data = "targets"

    def prepare(self, detector: nn.Module) -> None:
        _check_supported(detector)
        self._per_box = _box_modules(detector)

    def objective(self, detector: nn.Module, batch: List[dict]) -> torch.Tensor:
        return class_scores(detector, batch)


@register("lrp")
class LRP(_Explaining):
    """Yeom et al. 2021, "Pruning by explaining: A novel criterion for deep neural network
    pruning" (Pattern Recognition): R_c = 1/|B| sum_{x in B} | sum_positions R_c(x) |.

    R_c(x) is the LRP relevance of filter c on a reference image x (`lrp_rules`: epsilon for
    linear and logit layers, z+ for convs, norms folded into their convs), propagated from the
    class logits of the image's ground-truth boxes (`class_scores`) back through the heads, the
    FPN and the backbone, and summed over the positions (all pyramid levels for shared heads;
    the boxes of the image for ROI head layers). The paper's scores are positive because it
    explains a positive class output; a detector's logits are often negative (softmax logits
    are shift-invariant, sigmoid ones start at the focal-loss prior), which flips every
    relevance, so the magnitude per image is taken. B holds the images with at least one box.
    RPN head channels are explained through the objectness logits of the anchors matched to the
    boxes, part of the explained score; channels that the score never reaches score 1.
    """

    def instrument(self, detector: nn.Module) -> ContextManager:
        return lrp_rules(detector, _logit_layers(detector))

    def accumulator(self, module: nn.Module, group: ChannelGroup) -> Accumulator:
        return _FilterRelevance(module, group.size, module in self._per_box)


@register("gradcam")
class GradCAM(_Explaining):
    """Box-grounded Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep
    Networks via Gradient-based Localization", adapted to detection):
    s_c = mean over ground-truth boxes b of | alpha_c^b * mean_{p in b} a_c(p) |, with
    alpha_c^b = mean_{p in b} d y / d a_c(p).

    y is `class_scores` with plain gradients: the sum over boxes of their class logits (and the
    RPN objectness of their anchors), so a box's gradient also carries the other boxes' where
    receptive fields overlap; one backward pass per batch instead of one per box. A box's
    positions on a feature map are those of `targets.box_masks` (the cells whose centres it
    covers, at least the cell of its centre, at the map's stride); over all pyramid levels for
    heads shared across levels, and the whole pooled region for ROI head layers. Grad-CAM keeps only the positive evidence
    (ReLU) to localise a class in an image; for pruning a channel that lowers the score matters
    as much as one that raises it (removing either changes the detection), so the magnitude is
    taken, like Taylor's |a dL/da|. Activations are the producer outputs the collector records.
    """

    def accumulator(self, module: nn.Module, group: ChannelGroup) -> Accumulator:
        return _BoxGradCAM(module, group.size, module in self._per_box)
