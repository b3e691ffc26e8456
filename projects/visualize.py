"""The detections of an unpruned and a pruned detector side by side, beside the ground truth, on
images of a dataset: one PNG per image and an HTML page that shows them (tools/visualize.py).
"""

import html
import os
import re
from dataclasses import dataclass
from typing import List, Sequence, Union

import numpy as np
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.detection_utils import read_image
from detectron2.structures import Instances, pairwise_iou
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import ColorMode, Visualizer
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from d2prune.utils.io import atomic_open, atomic_write_text

# Longest side of each panel in pixels: small images are drawn larger so that labels stay legible.
PANEL = 480
# A pruned model's detection "matches" an unpruned one of the same class at this IoU or more.
MATCH_IOU = 0.5
GAP, TITLE = 8, 26  # pixels between panels; height of the title strip above them


@dataclass
class Model:
    """One of the two detectors compared: its name on the page, its checkpoint, the model."""

    name: str
    weights: str
    model: nn.Module

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


@dataclass
class Row:
    """What the page says about one image."""

    png: str  # relative to the page
    file_name: str
    ground_truth: int
    unpruned: int
    pruned: int
    matched: int  # pruned detections matching an unpruned one (same class, IoU >= MATCH_IOU)


def detect(model: nn.Module, mapper: DatasetMapper, dataset_dict: dict, threshold: float) -> Instances:
    """`model`'s detections on one image of a dataset, with scores of `threshold` or more."""
    with torch.no_grad():
        instances = model([mapper(dataset_dict)])[0]["instances"].to("cpu")
    return instances[instances.scores >= threshold]


def matched(reference: Instances, other: Instances, iou: float = MATCH_IOU) -> int:
    """How many detections of `other` match one of `reference` one-to-one (same class, IoU of
    `iou` or more), taken greedily in `other`'s score order, each to its best free partner."""
    if not len(reference) or not len(other):
        return 0
    overlap = pairwise_iou(other.pred_boxes, reference.pred_boxes)
    overlap[other.pred_classes[:, None] != reference.pred_classes[None, :]] = 0.0
    taken = set()
    for i in other.scores.argsort(descending=True).tolist():
        for j in overlap[i].argsort(descending=True).tolist():
            if overlap[i, j] < iou:
                break
            if j not in taken:
                taken.add(j)
                break
    return len(taken)


def _metadata(split: str) -> Metadata:
    """The split's class names with one fixed colour per class, so that a class looks the same in
    all three panels (detectron2 otherwise picks a random colour per box)."""
    classes = list(MetadataCatalog.get(split).get("thing_classes", []))
    colors = colormap(rgb=True, maximum=255)
    return Metadata(name=split, thing_classes=classes, thing_colors=[tuple(colors[i % len(colors)]) for i in range(len(classes))])


def _ground_truth(dataset_dict: dict, masks: bool, keypoints: bool) -> dict:
    """The annotations as the model would predict them: masks and keypoints only for a model
    that predicts them; crowd regions are not objects to find."""
    dropped = ([] if masks else ["segmentation"]) + ([] if keypoints else ["keypoints"])
    annotations = [
        {k: v for k, v in a.items() if k not in dropped}
        for a in dataset_dict.get("annotations", [])
        if not a.get("iscrowd", 0)
    ]
    return {**dataset_dict, "annotations": annotations}


def _panel(image: np.ndarray, metadata: Metadata, seed: int, shown: Union[dict, Instances]) -> np.ndarray:
    """`image` with `shown` drawn: a dataset dict's annotations or a model's detections."""
    # Visualizer jitters the class colours with NumPy's global generator: seeded per image (and
    # restored) so that a run draws the same PNGs again.
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        scale = PANEL / max(image.shape[:2])
        visualizer = Visualizer(image, metadata, scale=scale, instance_mode=ColorMode.SEGMENTATION)
        if isinstance(shown, Instances):
            return visualizer.draw_instance_predictions(shown).get_image()
        return visualizer.draw_dataset_dict(shown).get_image()
    finally:
        np.random.set_state(state)


def _side_by_side(panels: Sequence[np.ndarray], titles: Sequence[str]) -> Image.Image:
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + GAP * (len(panels) - 1)
    canvas = Image.new("RGB", (width, height + TITLE), "white")
    draw = ImageDraw.Draw(canvas)
    # The font detectron2's Visualizer writes its labels in (matplotlib's DejaVu Sans).
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 16)
    x = 0
    for panel, title in zip(panels, titles):
        canvas.paste(Image.fromarray(panel), (x, TITLE))
        draw.text((x + 4, 4), title, fill="black", font=font)
        x += panel.shape[1] + GAP
    return canvas


def _shown_name(file_name: str, split: str) -> str:
    """An image's file name relative to its split's image folder, as the dataset's JSON has it."""
    root = MetadataCatalog.get(split).get("image_root", None)
    return os.path.relpath(file_name, root) if root else file_name


def _png_name(index: int, file_name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(file_name))[0])
    return f"{index:03d}_{stem}.png"


def write_visualization(
    cfg, split: str, unpruned: Model, pruned: Model, output: str, num_images: int, threshold: float
) -> str:
    """Draw the first `num_images` images of `split`: the ground truth, then `unpruned`'s and
    `pruned`'s detections scoring `threshold` or more. Writes OUTPUT/images/*.png and
    OUTPUT/index.html; returns the page's path."""
    dataset = DatasetCatalog.get(split)[:num_images]  # loading it also sets its class names
    metadata = _metadata(split)
    mapper = DatasetMapper(cfg, is_train=False)
    os.makedirs(os.path.join(output, "images"), exist_ok=True)
    rows = []
    for index, dataset_dict in enumerate(dataset):
        image = read_image(dataset_dict["file_name"], format="RGB")
        truth = _ground_truth(dataset_dict, cfg.MODEL.MASK_ON, cfg.MODEL.KEYPOINT_ON)
        before = detect(unpruned.model, mapper, dataset_dict, threshold)
        after = detect(pruned.model, mapper, dataset_dict, threshold)
        row = Row(
            png=f"images/{_png_name(index, dataset_dict['file_name'])}",
            file_name=_shown_name(dataset_dict["file_name"], split),
            ground_truth=len(truth["annotations"]),
            unpruned=len(before),
            pruned=len(after),
            matched=matched(before, after),
        )
        panels = [_panel(image, metadata, index, shown) for shown in (truth, before, after)]
        titles = [
            f"ground truth: {row.ground_truth}",
            f"{unpruned.name}: {row.unpruned}",
            f"{pruned.name}: {row.pruned} ({row.matched} as {unpruned.name})",
        ]
        with atomic_open(os.path.join(output, row.png), "wb") as f:
            _side_by_side(panels, titles).save(f, format="PNG")
        rows.append(row)
    page = os.path.join(output, "index.html")
    atomic_write_text(page, render_page(split, unpruned, pruned, threshold, rows))
    return page


def render_page(split: str, unpruned: Model, pruned: Model, threshold: float, rows: List[Row]) -> str:
    e = html.escape
    total = {k: sum(getattr(r, k) for r in rows) for k in ("ground_truth", "unpruned", "pruned", "matched")}
    share = f"{total['matched'] / total['unpruned']:.0%}" if total["unpruned"] else "-"
    models = "".join(
        f"<tr><td>{e(m.name)}</td><td><code>{e(m.weights)}</code></td><td>{m.params:,}</td>"
        f"<td>{count}</td></tr>"
        for m, count in ((unpruned, total["unpruned"]), (pruned, total["pruned"]))
    )
    figures = "\n".join(
        f'<figure><img src="{e(r.png)}" alt="{e(r.file_name)}" loading="lazy">'
        f"<figcaption>{e(r.file_name)}: ground truth {r.ground_truth}, {e(unpruned.name)} {r.unpruned}, "
        f"{e(pruned.name)} {r.pruned} ({r.matched} matching {e(unpruned.name)})</figcaption></figure>"
        for r in rows
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Detections on {e(split)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #444; }}
</style></head><body>
<h1>Detections on {e(split)}</h1>
<p>{len(rows)} images, each drawn three times: the ground truth, the {e(unpruned.name)} model's
detections and the {e(pruned.name)} model's, with scores of {threshold:g} or more. A class has
one colour in all three. A {e(pruned.name)} detection matches an {e(unpruned.name)} one of the same
class at IoU {MATCH_IOU:g} or more: {total['matched']} of the {total['unpruned']} {e(unpruned.name)}
detections ({share}) are matched; the ground truth has {total['ground_truth']} boxes.</p>
<table><tr><th>model</th><th>checkpoint</th><th>parameters</th><th>detections</th></tr>
{models}
</table>
{figures}
</body></html>
"""
