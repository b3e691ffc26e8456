"""What pruning removes: widths per group, the criterion's scores and their cut, the image patches
a layer's filters answer to, and the class information the removed filters carried.

The statistics behind `tools/explain_net.py`, as plain data (`Explanation`); drawing them into
an HTML report is `projects/explain`'s job.
"""

import difflib
import logging
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import DatasetMapper, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.modeling import build_model
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.resnet import BasicBlock
from torch import nn
from tqdm import tqdm

from . import criteria
from .config import check_prune_config
from .criteria.collector import collect_statistics
from .criteria.information import class_information
from .criteria.relevance import relevance_maps
from .criteria.targets import image_positions, position_labels
from .engine.checkpoint import PrunedCheckpointer
from .engine.selection import build_criterion, choose_keep
from .errors import UserError
from .pruning import ChannelGroup, channel_spec, find_groups
from .pruning.budget import Budget
from .utils.modules import unwrap

__all__ = [
    "Explanation",
    "explain",
    "explain_checkpoint",
    "explanation_batches",
    "information_split",
    "load_model",
    "pruning_profile",
    "receptive_field",
    "resolve_layer",
    "short_name",
]

logger = logging.getLogger(__name__)

# Images per forward pass while collecting: small enough for full-size images on a CPU.
BATCH_SIZE = 4
# A filter whose activation is non-positive (zero after its ReLU) at this share of all positions
# or more counts as near-silent, the regime APoZ (Hu et al. 2016) prunes first.
NEAR_SILENT = 0.9
# Kinds whose producers run once per image on a spatial map, so that patches make sense.
_SPATIAL_KINDS = ("stem", "block", "stage", "fpn")


@dataclass
class Hit:
    """Where one filter answers most strongly on one image."""

    image: int  # index into the explained images, in loader order
    y: int  # argmax row and column on the layer's feature map
    x: int
    value: float  # the activation there
    box: Tuple[int, int, int, int]  # the crop (x0, y0, x1, y1) in image pixels around it
    label: str  # class of the smallest ground-truth box holding its centre, or "background"
    heatmap: np.ndarray  # the channel's relevance (or activation) map on that image, (h, w)


@dataclass
class FilterView:
    channel: int
    score: float
    removed: bool
    hits: List[Hit]


@dataclass
class ImageView:
    rgb: np.ndarray  # (H, W, 3) uint8, as the model sees it (resized, not padded)
    boxes: np.ndarray  # (n, 4) ground-truth XYXY boxes in the same pixels
    classes: np.ndarray  # (n,) contiguous class ids


@dataclass
class LayerView:
    """The most and the least important filters of one layer, where they fire and why."""

    group: str
    module: str
    stride: float  # image pixels per feature-map position
    receptive_field: Optional[int]  # theoretical, in pixels; None outside the bottom-up ResNet
    heatmap: str  # what the heat maps show: "relevance" or "activation"
    most: List[FilterView]
    least: List[FilterView]


@dataclass
class Explanation:
    """Everything the report shows; widths are channel specs, tensors are per channel."""

    weights: str
    dataset: str
    criterion: str
    budget: str  # the cut in words, e.g. "ratio 0.5, local"
    kinds: List[str]
    class_names: List[str]
    class_counts: List[int]  # ground-truth objects of each class in the explained images
    groups: List[ChannelGroup]
    eligible: List[str]  # groups of the pruned kinds, the ones the cut may narrow
    reference: Dict[str, int]  # widths the config builds
    before: Dict[str, int]  # widths of the checkpoint
    after: Dict[str, int]  # widths after the cut
    scores: Dict[str, torch.Tensor]
    keep: Dict[str, List[int]]  # groups that lose channels only
    apoz: Dict[str, torch.Tensor]  # share of non-positive activations, eligible groups
    information: Optional[Dict[str, torch.Tensor]]  # eligible group -> (classes, channels) nats
    layer: LayerView
    images: Dict[int, ImageView]  # the images the layer view refers to
    num_images: int
    notes: List[str]

    @property
    def pruned_checkpoint(self) -> bool:
        return self.reference != self.before

    def removed(self, group: str) -> torch.Tensor:
        """Boolean mask of the channels of `group` that the cut removes."""
        return removed_mask(self.before[group], self.keep.get(group))


def removed_mask(width: int, keep: Optional[Sequence[int]]) -> torch.Tensor:
    """Boolean mask of the `width` channels that a keep set (None: all kept) leaves out."""
    mask = torch.zeros(width, dtype=torch.bool)
    if keep is not None:
        mask[:] = True
        mask[list(keep)] = False
    return mask


def short_name(name: str) -> str:
    """A group or module name without the prefixes every backbone name shares."""
    for prefix in ("backbone.bottom_up.", "backbone."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


# -- loading -------------------------------------------------------------------------------------


def load_model(cfg) -> Tuple[nn.Module, Dict[str, int]]:
    """The detector of `cfg` with MODEL.WEIGHTS loaded (a pruned checkpoint cuts it to its spec),
    in eval mode, and the widths the config builds it with (the unpruned spec)."""
    if not cfg.MODEL.WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: explaining a randomly initialised model")
    model = build_model(cfg)
    checkpointer = PrunedCheckpointer(model)
    checkpointer.load(cfg.MODEL.WEIGHTS)
    # A pruned checkpoint tells the widths the config builds; any other load left them as built.
    return model.eval(), checkpointer.unpruned_spec or channel_spec(model)


def explanation_batches(cfg, dataset: str, num_images: int) -> List[List[dict]]:
    """The first `num_images` annotated images of `dataset` as detectron2 training batches (with
    `instances`), resized as at test time and never flipped or cropped, so that every pass over
    them, and every run, sees the same pixels."""
    if num_images < 1:
        raise UserError(f"--images must be a positive number, got {num_images}.")
    dicts = get_detection_dataset_dicts([dataset], filter_empty=True)[:num_images]
    if not dicts:
        raise UserError(f"dataset '{dataset}' has no image with annotations to explain pruning on.")
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    mapper = DatasetMapper(cfg, is_train=True, augmentations=[resize])
    mapped = [mapper(d) for d in dicts]
    return [mapped[i : i + BATCH_SIZE] for i in range(0, len(mapped), BATCH_SIZE)]


# -- the cut: profile, scores, class information ---------------------------------------------------


def widths_after(spec: Mapping[str, int], keep: Mapping[str, Sequence[int]]) -> Dict[str, int]:
    """The channel spec that `prune(model, keep)` leaves a model of widths `spec` with."""
    return {name: len(keep[name]) if name in keep else width for name, width in spec.items()}


def stage_of(group: ChannelGroup) -> str:
    """The backbone stage a group sits in (res2 ... res5), else its kind (fpn, head, stem)."""
    match = re.search(r"\b(res\d+)\b", group.name)
    return match.group(1) if match else group.kind


def pruning_profile(
    groups: Sequence[ChannelGroup], before: Mapping[str, int], after: Mapping[str, int]
) -> List[Dict]:
    """One row per group: name, kind, stage, width before and after."""
    return [
        {
            "group": g.name,
            "kind": g.kind,
            "stage": stage_of(g),
            "before": int(before[g.name]),
            "after": int(after[g.name]),
        }
        for g in groups
    ]


def stage_losses(rows: Sequence[Mapping]) -> List[Dict]:
    """Channels before and removed per stage, most removed first."""
    stages: Dict[str, Dict] = {}
    for row in rows:
        s = stages.setdefault(row["stage"], {"stage": row["stage"], "before": 0, "removed": 0})
        s["before"] += row["before"]
        s["removed"] += row["before"] - row["after"]
    return sorted(stages.values(), key=lambda s: (-s["removed"], -s["removed"] / max(s["before"], 1)))


class _Recorder:
    """A criterion that keeps the statistics and scores `choose_keep` had it compute, so that
    the report shows exactly what was ranked, without collecting twice."""

    def __init__(self, criterion: criteria.Criterion):
        self._criterion = criterion
        self.stats: Optional[Mapping] = None
        self.scores: Optional[Dict[str, torch.Tensor]] = None

    def __getattr__(self, name):
        return getattr(self._criterion, name)

    def score(self, model, groups, stats=None):
        self.stats = stats
        self.scores = self._criterion.score(model, groups, stats)
        return self.scores


def group_information(stats: Mapping, groups: Sequence[ChannelGroup]) -> Dict[str, torch.Tensor]:
    """Group name -> (classes, channels): per class, the MI (nats) between each channel's binned
    activation and "class k vs rest", from the `mi` statistics; a group with several producers
    (a residual stream) gets the mean over them."""
    return {
        g.name: torch.stack(
            [class_information(stats[name].sums["joint"]).double().cpu() for name in g.producers]
        ).mean(0)
        for g in groups
    }


def information_split(
    information: Mapping[str, torch.Tensor], removed: Mapping[str, torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """Per class, the information of the kept and of the removed channels of the groups in
    `removed` (group -> boolean mask of removed channels): sums (`kept`, `removed`, `total`),
    channel counts and means per channel (`kept_mean`, `removed_mean`)."""
    parts = {"kept": [], "removed": []}
    for name, mask in removed.items():
        info = information[name]
        parts["kept"].append(info[:, ~mask])
        parts["removed"].append(info[:, mask])
    kept, gone = torch.cat(parts["kept"], 1), torch.cat(parts["removed"], 1)
    total = torch.cat([information[name] for name in removed], 1).sum(1)
    return {
        "kept": kept.sum(1),
        "removed": gone.sum(1),
        "total": total,
        "kept_channels": kept.shape[1],
        "removed_channels": gone.shape[1],
        "kept_mean": kept.mean(1) if kept.shape[1] else torch.zeros_like(total),
        "removed_mean": gone.mean(1) if gone.shape[1] else torch.zeros_like(total),
    }


def _apoz(model, groups, batches) -> Dict[str, torch.Tensor]:
    """Share of non-positive activations of each channel (APoZ), mean over a group's producers."""
    stats = collect_statistics(model, groups, criteria.build("apoz"), batches)
    return {
        g.name: 1 - torch.stack([stats[name].result() for name in g.producers]).mean(0).float().cpu()
        for g in groups
    }


# -- one layer's filters --------------------------------------------------------------------------


def resolve_layer(groups: Sequence[ChannelGroup], layer: Optional[str]) -> Tuple[ChannelGroup, str]:
    """The group and the producing module whose feature map `layer` means: a group's name or one
    of its producers' (in full or as the report shortens it, e.g. res3.1.conv1), its first
    producer for a group. By default the mid-depth block group."""
    spatial = [g for g in groups if g.kind in _SPATIAL_KINDS]
    if layer is None:
        candidates = [g for g in spatial if g.kind == "block"] or spatial
        group = candidates[(len(candidates) - 1) // 2]
        return group, group.producers[0]
    for group in groups:
        names = [group.name, *group.producers]
        if layer not in names + [short_name(n) for n in names]:
            continue
        if group.kind not in _SPATIAL_KINDS:
            raise UserError(
                f"--layer '{layer}' is a {group.kind} group, whose channels are not one feature "
                f"map per image; name a group of kinds {', '.join(_SPATIAL_KINDS)}."
            )
        module = next((p for p in group.producers if layer in (p, short_name(p))), None)
        return group, module or group.producers[0]
    short = [short_name(g.name) for g in spatial]
    producers = [short_name(p) for g in spatial for p in g.producers]
    candidates = list(dict.fromkeys(short + producers))
    close = difflib.get_close_matches(short_name(layer), candidates, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise UserError(
        f"--layer '{layer}' is neither a channel group of this model nor one of their convs; "
        f"{hint}groups: {', '.join(short)}."
    )


def receptive_field(model: nn.Module, module_name: str) -> Optional[int]:
    """The theoretical receptive field, in input pixels, of the output of conv `module_name` of
    the bottom-up ResNet: kernels and strides chained along the blocks' main paths from the
    stem (r += (k - 1) * dilation * jump; jump *= stride). None for modules outside it."""
    model = unwrap(model)
    backbone = model.backbone
    resnet = backbone.bottom_up if isinstance(backbone, FPN) else backbone
    if not isinstance(resnet, ResNet):
        return None
    names = {m: n for n, m in model.named_modules()}
    size, jump = 1, 1

    def grow(kernel: int, stride: int, dilation: int = 1) -> None:
        nonlocal size, jump
        size += (kernel - 1) * dilation * jump
        jump *= stride

    stem = resnet.stem.conv1
    grow(stem.kernel_size[0], stem.stride[0], stem.dilation[0])
    if names[stem] == module_name:
        return size
    grow(3, 2)  # BasicStem's max pool
    for stage in resnet.stages:
        for block in stage:
            block_input = size
            convs = [block.conv1, block.conv2] if isinstance(block, BasicBlock) else [
                block.conv1, block.conv2, block.conv3
            ]
            if block.shortcut is not None and names[block.shortcut] == module_name:
                return block_input  # a 1x1 conv on the block's input
            for conv in convs:
                grow(conv.kernel_size[0], conv.stride[0], conv.dilation[0])
                if names[conv] == module_name:
                    return size
    return None


def patch_box(
    y: int, x: int, stride: float, side: float, height: int, width: int
) -> Tuple[int, int, int, int]:
    """The square of `side` pixels centred on feature-map position (y, x), clipped to the image."""
    cx, cy, half = (x + 0.5) * stride, (y + 0.5) * stride, side / 2
    x0 = int(np.clip(round(cx - half), 0, width - 1))
    y0 = int(np.clip(round(cy - half), 0, height - 1))
    x1 = int(np.clip(round(cx + half), x0 + 1, width))
    y1 = int(np.clip(round(cy + half), y0 + 1, height))
    return x0, y0, x1, y1


def layer_activations(
    model: nn.Module, batches: Sequence[List[dict]], module_name: str, channels: Sequence[int]
) -> Tuple[List[torch.Tensor], List[torch.Tensor], float]:
    """The activations of `channels` of backbone module `module_name`, one (len(channels), h, w)
    map per image (on its batch's padded size), the (h, w) target labels of each map
    (`position_labels`: 0 background, k + 1 class k; -1 in the padding) and the map's stride
    in image pixels.

    The backbone runs in eval mode on the detector's own normalised, padded input; the
    activation is the module output (after its norm, before the block's ReLU), as the
    statistics collector sees it.
    """
    model = unwrap(model)
    module = dict(model.named_modules())[module_name]
    captured: List[torch.Tensor] = []
    index = torch.as_tensor(list(channels), dtype=torch.long)
    handle = module.register_forward_hook(
        lambda m, inputs, output: captured.append(output.detach()[:, index].float().cpu())
    )
    maps, labels, stride = [], [], 1.0
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc=f"activations of {module_name}", leave=False):
                images = model.preprocess_image(batch)
                captured.clear()
                model.backbone(images.tensor)
                (a,) = captured  # a backbone module runs once per forward
                stride = images.tensor.shape[-2] / a.shape[-2]
                maps += list(a)
                size, padded = tuple(a.shape[-2:]), tuple(images.tensor.shape[-2:])
                inside = image_positions(batch, size, padded)
                labels += list(torch.where(inside, position_labels(batch, size, padded), -1))
    finally:
        handle.remove()
        for m, training in modes.items():
            m.training = training
    return maps, labels, stride


def layer_relevance(
    model: nn.Module, batches: Sequence[List[dict]], module_name: str, channels: Sequence[int]
) -> List[torch.Tensor]:
    """LRP relevance of `channels` at `module_name`, one (len(channels), h, w) map per image."""
    index = torch.as_tensor(list(channels), dtype=torch.long)
    maps = []
    for batch in tqdm(batches, desc=f"relevance at {module_name}", leave=False):
        relevance = relevance_maps(model, batch, [module_name])[module_name]
        maps += list(relevance.detach()[:, index].float().cpu())
    return maps


def top_hits(
    maps: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], j: int, count: int
) -> List[Tuple[int, int, int, float]]:
    """The `count` images where channel `j` of `maps` peaks highest, padding left out (label
    -1): (image, y, x, value) at each peak."""
    inside = [torch.where(y >= 0, m[j], -torch.inf) for m, y in zip(maps, labels)]
    peaks = torch.stack([a.max() for a in inside])
    hits = []
    for image in peaks.argsort(descending=True, stable=True)[:count].tolist():
        a = inside[image]
        y, x = divmod(int(a.argmax()), a.shape[-1])
        hits.append((image, y, x, float(a[y, x])))
    return hits


def _image_views(batches: Sequence[List[dict]], indices, image_format: str) -> Dict[int, ImageView]:
    flat = [x for batch in batches for x in batch]
    views = {}
    for i in sorted(set(indices)):
        x = flat[i]
        rgb = convert_image_to_rgb(x["image"].permute(1, 2, 0), image_format)
        instances = x["instances"]
        views[i] = ImageView(
            rgb=np.clip(np.asarray(rgb, dtype=np.float32), 0, 255).astype(np.uint8),
            boxes=instances.gt_boxes.tensor.numpy().copy(),
            classes=instances.gt_classes.numpy().copy(),
        )
    return views


def explain_layer(
    cfg,
    model: nn.Module,
    batches: Sequence[List[dict]],
    group: ChannelGroup,
    module_name: str,
    scores: torch.Tensor,
    removed: torch.Tensor,
    class_names: Sequence[str],
    filters: int = 4,
    per_filter: int = 3,
) -> Tuple[LayerView, Dict[int, ImageView], List[str]]:
    """The `filters` highest- and lowest-scored channels of `group`, each with the `per_filter`
    images where they fire most: a crop of the receptive field around the peak and the
    channel's relevance map on the image (its activation where relevance is unavailable)."""
    order = scores.argsort(descending=True, stable=True).tolist()
    count = min(filters, len(order) // 2) or 1
    chosen = order[:count] + order[-count:]
    maps, labels, stride = layer_activations(model, batches, module_name, chosen)
    notes = []
    heat, kind = layer_relevance(model, batches, module_name, chosen), "relevance"
    rf = receptive_field(model, module_name)
    side = max(rf if rf is not None else 4 * stride, 2 * stride)
    flat = [x for batch in batches for x in batch]
    raw = {j: top_hits(maps, labels, j, per_filter) for j in range(len(chosen))}
    views = _image_views(batches, [h[0] for hits in raw.values() for h in hits], cfg.INPUT.FORMAT)

    def view(j: int) -> FilterView:
        hits = []
        for image, y, x, value in raw[j]:
            height, width = flat[image]["image"].shape[-2:]
            label = int(labels[image][y, x])
            hits.append(
                Hit(
                    image=image, y=y, x=x, value=value,
                    box=patch_box(y, x, stride, side, height, width),
                    label=class_names[label - 1] if label else "background",
                    heatmap=heat[image][j].numpy(),
                )
            )
        c = chosen[j]
        return FilterView(channel=c, score=float(scores[c]), removed=bool(removed[c]), hits=hits)

    layer = LayerView(
        group=group.name,
        module=module_name,
        stride=stride,
        receptive_field=rf,
        heatmap=kind,
        most=[view(j) for j in range(count)],
        least=[view(j) for j in range(count, len(chosen))],
    )
    return layer, views, notes


# -- the whole analysis ----------------------------------------------------------------------------


def explain(
    cfg,
    model: nn.Module,
    batches: Sequence[List[dict]],
    *,
    reference: Optional[Mapping[str, int]] = None,
    layer: Optional[str] = None,
    dataset: str = "",
    class_names: Optional[Sequence[str]] = None,
    filters: int = 4,
    per_filter: int = 3,
) -> Explanation:
    """Score `model` with PRUNE.CRITERION, cut it under the PRUNE budget (without pruning it) and
    gather what the report shows, on `batches` (training batches with `instances`).

    `reference` is the spec the config builds (default: the model's own); a model narrower
    than it is a pruned checkpoint, and the cut is then a further step from its widths.
    """
    check_prune_config(cfg)
    criterion = build_criterion(cfg)
    groups = find_groups(model)
    group, module_name = resolve_layer(groups, layer)
    before = channel_spec(model)
    reference = dict(reference or before)
    batches = list(batches)
    num_classes = _num_classes(model)
    class_names = list(class_names or [])[:num_classes] or [str(k) for k in range(num_classes)]
    budget = Budget.from_config(cfg)
    eligible = budget.eligible(groups)

    logger.info("Scoring channels with %s on %d images", cfg.PRUNE.CRITERION, sum(map(len, batches)))
    recorder = _Recorder(criterion)
    keep = choose_keep(cfg, model, recorder, batches)
    after = widths_after(before, keep)
    notes = []

    logger.info("Collecting mi statistics for class information")
    stats = recorder.stats if cfg.PRUNE.CRITERION == "mi" else None
    if stats is None:
        stats = collect_statistics(model, eligible, criteria.build("mi"), batches)
    information = group_information(stats, eligible)

    logger.info("Collecting activation statistics (APoZ)")
    apoz = _apoz(model, eligible, batches)

    logger.info("Finding the patches that %s's filters answer to", module_name)
    layer_view, images, layer_notes = explain_layer(
        cfg, model, batches, group, module_name, recorder.scores[group.name],
        removed_mask(before[group.name], keep.get(group.name)), class_names, filters, per_filter,
    )
    return Explanation(
        weights=cfg.MODEL.WEIGHTS, dataset=dataset, criterion=cfg.PRUNE.CRITERION,
        budget=budget.describe(), kinds=list(budget.kinds), class_names=class_names,
        class_counts=_class_counts(batches, len(class_names)), groups=groups, eligible=[g.name for g in eligible], reference=reference,
        before=before, after=after, scores=recorder.scores, keep=keep, apoz=apoz,
        information=information, layer=layer_view, images=images,
        num_images=sum(map(len, batches)), notes=notes + layer_notes,
    )  # fmt: skip


def _class_counts(batches: Sequence[List[dict]], num_classes: int) -> List[int]:
    classes = torch.cat([x["instances"].gt_classes for batch in batches for x in batch])
    return torch.bincount(classes, minlength=num_classes)[:num_classes].tolist()


def _num_classes(model: nn.Module) -> int:
    model = unwrap(model)
    if hasattr(model, "roi_heads"):
        return model.roi_heads.num_classes
    return model.num_classes


def explain_checkpoint(
    cfg,
    dataset: Optional[str] = None,
    num_images: int = 32,
    layer: Optional[str] = None,
    filters: int = 4,
) -> Explanation:
    """Load `cfg.MODEL.WEIGHTS` and explain the PRUNE cut on `dataset` (default: DATASETS.TEST[0])."""
    if dataset is None:
        if not cfg.DATASETS.TEST:
            raise UserError("DATASETS.TEST is empty: name the images to explain on with --split.")
        dataset = cfg.DATASETS.TEST[0]
    if filters < 1:
        raise UserError(f"--filters must be a positive number, got {filters}.")
    check_prune_config(cfg)
    build_criterion(cfg)  # an unknown criterion fails before any slow work
    model, reference = load_model(cfg)
    resolve_layer(find_groups(model), layer)
    batches = explanation_batches(cfg, dataset, num_images)
    class_names = MetadataCatalog.get(dataset).get("thing_classes", None)
    explanation = explain(
        cfg, model, batches, reference=reference, layer=layer, dataset=dataset,
        class_names=class_names, filters=filters,
    )  # fmt: skip
    return explanation
