"""Training does not depend on what d2prune can prune (issue 14, item 4).

Without pruning, keypoint R-CNN, Cascade R-CNN and a detector with a head d2prune has no rule for
train through d2prune's Trainer and their checkpoints carry no channel spec. With pruning on,
Cascade R-CNN's box heads and the keypoint head are ordinary `head` groups that prune exactly;
the unknown head is refused in one line naming it.
"""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY
from detectron2.structures import BoxMode
from PIL import Image
from torch import nn

from d2prune.config import setup_cfg
from d2prune.engine import PrunedCheckpointer, PruningTrainer, Trainer
from d2prune.errors import UserError
from d2prune.pruning import find_groups, prune

from . import exactness, models
from .conftest import CONFIG, tiny_opts

torch.set_num_threads(2)

DATASET = "unprunable_keypoints_train"


class UnknownBoxHead(nn.Module):
    """A box head (a conv and an fc layer) that no pruning rule knows."""

    def __init__(self, cfg, input_shape: ShapeSpec):
        super().__init__()
        size = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        self.conv = nn.Conv2d(input_shape.channels, 16, 3, padding=1)
        self.fc = nn.Linear(16 * size * size, 64)

    def forward(self, x):
        return F.relu(self.fc(torch.flatten(F.relu(self.conv(x)), 1)))

    @property
    def output_shape(self) -> ShapeSpec:
        return ShapeSpec(channels=64)


if "UnknownBoxHead" not in ROI_BOX_HEAD_REGISTRY:
    ROI_BOX_HEAD_REGISTRY.register(UnknownBoxHead)

VARIANTS = {
    "keypoint": [
        "MODEL.KEYPOINT_ON", "True", "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", "3",
        "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", "(16, 16)",
    ],
    "cascade": ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads", "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"],
    "unknown": ["MODEL.ROI_BOX_HEAD.NAME", "UnknownBoxHead"],
}  # fmt: skip


@pytest.fixture(scope="module")
def keypoint_data(tmp_path_factory):
    """Four 64x96 images with two boxes of three keypoints each, registered as DATASET."""
    root = tmp_path_factory.mktemp("keypoints")
    rng = np.random.default_rng(0)
    records = []
    for i in range(4):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(path)
        annotations = []
        for k, (x, y, w, h) in enumerate([(8, 6, 32, 44), (40, 12, 50, 44)]):
            points = [x + w / 2, y + 4, 2, x + 4, y + h / 2, 2, x + w - 4, y + h / 2, 2]
            annotations.append(
                {"bbox": [x, y, w, h], "bbox_mode": BoxMode.XYWH_ABS, "category_id": k, "keypoints": points}
            )
        records.append({"file_name": str(path), "image_id": i, "height": 64, "width": 96, "annotations": annotations})
    if DATASET in DatasetCatalog.list():
        DatasetCatalog.remove(DATASET)
        MetadataCatalog.remove(DATASET)
    DatasetCatalog.register(DATASET, lambda: records)
    MetadataCatalog.get(DATASET).set(
        thing_classes=["a", "b"], keypoint_names=["top", "left", "right"], keypoint_flip_map=[["left", "right"]]
    )
    return DATASET


def _cfg(variant: str, out, *opts):
    cfg = setup_cfg(
        CONFIG,
        [*tiny_opts(out / "none", out, 2), "DATASETS.TRAIN", f"('{DATASET}',)", "DATASETS.TEST", "()",
         "MODEL.ROI_HEADS.NUM_CLASSES", "2", *VARIANTS[variant], *opts],
    )  # fmt: skip
    cfg.freeze()
    return cfg


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trains_without_pruning(variant, keypoint_data, tmp_path):
    trainer = Trainer(_cfg(variant, tmp_path))
    trainer.resume_or_load(resume=False)
    trainer.train()

    final = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert "d2prune" not in final and final["iteration"] == 1
    fresh = build_model(_cfg(variant, tmp_path))
    PrunedCheckpointer(fresh).load(str(tmp_path / "model_final.pth"))
    for key, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, final["model"][key]), key


def test_an_unknown_head_is_refused_with_pruning_on(keypoint_data, tmp_path):
    cfg = _cfg("unknown", tmp_path, "PRUNE.ENABLED", "True", "PRUNE.KINDS", "['head']")
    with pytest.raises(UserError, match=r"'roi_heads\.box_head' \(UnknownBoxHead\)") as error:
        PruningTrainer(cfg)
    assert "\n" not in str(error.value)


def test_a_pruned_checkpoint_into_an_unknown_head_is_refused(tmp_path):
    model = models.build("faster_rcnn_R18_FPN")
    prune(model, {g.name: range(g.size // 2) for g in find_groups(model) if g.kind == "block"})
    PrunedCheckpointer(model, str(tmp_path)).save("pruned")
    cfg = models.faster_rcnn_cfg(18)
    cfg.MODEL.ROI_BOX_HEAD.NAME = "UnknownBoxHead"
    with pytest.raises(UserError, match=r"pruned\.pth: .*'roi_heads\.box_head' \(UnknownBoxHead\)") as error:
        PrunedCheckpointer(build_model(cfg)).load(str(tmp_path / "pruned.pth"))
    assert "\n" not in str(error.value)


# -- exact pruning of the new head groups --------------------------------------------------------


def _model(variant: str) -> nn.Module:
    cfg = models.faster_rcnn_cfg(18)
    cfg.merge_from_list(VARIANTS[variant])
    torch.manual_seed(0)
    model = build_model(cfg)
    models._randomize(model)
    return model.eval()


def _run(model, inputs) -> dict:
    records = exactness.run(model, inputs)
    with torch.no_grad():
        outputs = model(inputs)
    for i, output in enumerate(outputs):
        instances = output["instances"]
        if instances.has("pred_keypoint_heatmaps"):
            # The heatmaps, not the keypoints: an argmax over near-equal random logits may move.
            records[f"instances{i}:heatmaps"] = instances.pred_keypoint_heatmaps
    return records


@pytest.mark.parametrize("variant", ["keypoint", "cascade"])
def test_head_and_fpn_groups_prune_exactly(variant):
    model = _model(variant)
    groups = [g for g in find_groups(model) if g.kind in ("head", "fpn")]
    names = {g.name for g in groups}
    if variant == "keypoint":
        assert {"roi_heads.keypoint_head.conv_fcn1", "roi_heads.keypoint_head.conv_fcn2"} <= names
        fcn2 = next(g for g in groups if g.name == "roi_heads.keypoint_head.conv_fcn2")
        assert fcn2.consumers == ["roi_heads.keypoint_head.score_lowres"]
    else:
        assert {f"roi_heads.box_head.{s}.fc{i}" for s in range(3) for i in (1, 2)} <= names
    rng = random.Random(0)
    keep = {}
    for group in groups:
        removed = exactness.removed_channels(group, rng, 0.25)
        exactness.silence(model, group, removed)
        keep[group.name] = sorted(set(range(group.size)) - set(removed))
    inputs = models.images(1)
    widths = exactness.width_groups(model, find_groups(model))
    before = _run(model, inputs)

    prune(model, keep)

    sizes = {g.name: g.size for g in find_groups(model)}
    assert all(sizes[name] == len(kept) for name, kept in keep.items())
    after = _run(model, inputs)
    assert any(":heatmaps" in key for key in after) == (variant == "keypoint")
    exactness.assert_same(before, after, keep, widths)
