"""A pruned checkpoint moves to a task with another number of classes (issue 14, item 1).

The layers whose output width is the number of classes (box, mask, RetinaNet and Cascade
classifiers, class-specific box regression) keep their fresh initialisation with one warning;
the pruned architecture and every other tensor carry over; a pruned width that differs is still
an error.
"""

import logging
import random

import pytest
import torch
from detectron2.modeling import build_model

from d2prune.config import setup_cfg
from d2prune.data import register_datasets
from d2prune.engine import PrunedCheckpointer, Trainer
from d2prune.engine.checkpoint import load_model
from d2prune.errors import UserError
from d2prune.pruning import apply_spec, channel_spec, find_groups, prune

from . import models
from .conftest import CONFIG, REPO, tiny_opts
from .prune_helpers import tiny_dataset

torch.set_num_threads(2)


def cascade_cfg():
    cfg = models.faster_rcnn_cfg(18)
    cfg.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True
    return cfg


BOX = ["roi_heads.box_predictor.bbox_pred", "roi_heads.box_predictor.cls_score"]
CASES = {  # config -> the layers a change of classes re-initialises
    "faster_rcnn_R18_FPN": (models.CONFIG_BUILDERS["faster_rcnn_R18_FPN"], BOX),
    "mask_rcnn_R50_FPN": (models.mask_rcnn_cfg, BOX + ["roi_heads.mask_head.predictor"]),
    "retinanet_R50_FPN": (models.retinanet_cfg, ["head.cls_score"]),
    # Cascade regresses class-agnostic boxes: only the classifiers depend on the classes.
    "cascade_rcnn_R18_FPN": (cascade_cfg, [f"roi_heads.box_predictor.{i}.cls_score" for i in range(3)]),
}


def _build(make_cfg, classes: int, seed: int):
    cfg = make_cfg()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = classes
    cfg.MODEL.RETINANET.NUM_CLASSES = classes
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def _prune_randomly(model, seed: int = 0) -> None:
    rng = random.Random(seed)
    keep = {}
    for group in find_groups(model):
        if group.kind in ("block", "stage", "fpn", "head"):
            units = group.size // group.unit
            chosen = sorted(rng.sample(range(units), rng.randrange(units // 4, units)))
            keep[group.name] = [u * group.unit + i for u in chosen for i in range(group.unit)]
    prune(model, keep)


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load(model, path):
    checkpointer = PrunedCheckpointer(model)
    warnings = _Warnings()
    checkpointer.logger.addHandler(warnings)
    try:
        checkpointer.load(path)
    finally:
        checkpointer.logger.removeHandler(warnings)
    return warnings.messages


@pytest.mark.parametrize(
    "name, classes",
    [("faster_rcnn_R18_FPN", (3, 5)), ("faster_rcnn_R18_FPN", (6, 3)), ("mask_rcnn_R50_FPN", (3, 5)),
     ("retinanet_R50_FPN", (3, 5)), ("cascade_rcnn_R18_FPN", (3, 5))],
)  # fmt: skip
def test_pruned_checkpoint_moves_to_other_classes(name, classes, tmp_path):
    make_cfg, reset = CASES[name]
    source = _build(make_cfg, classes[0], seed=0)
    _prune_randomly(source)
    PrunedCheckpointer(source, str(tmp_path)).save("pruned")
    target = _build(make_cfg, classes[1], seed=1)
    fresh = _build(make_cfg, classes[1], seed=1)  # the target's initialisation, pruned alike
    apply_spec(fresh, channel_spec(source))

    messages = _load(target, str(tmp_path / "pruned.pth"))

    assert channel_spec(target) == channel_spec(source)
    state, loaded, initial = source.state_dict(), target.state_dict(), fresh.state_dict()
    assert state.keys() == loaded.keys()
    for key, tensor in loaded.items():
        if key.rpartition(".")[0] in reset:
            assert tensor.shape[0] != state[key].shape[0] and torch.equal(tensor, initial[key]), key
        else:
            assert torch.equal(tensor, state[key]), key
    (warning,) = [m for m in messages if "classes" in m or "Skip" in m or "not found" in m]
    assert all(layer in warning for layer in reset), warning
    with torch.no_grad():
        target(models.images(1))


def test_a_pruned_width_that_differs_stays_an_error(tmp_path):
    make_cfg, _ = CASES["faster_rcnn_R18_FPN"]
    source = _build(make_cfg, 3, seed=0)
    _prune_randomly(source)
    PrunedCheckpointer(source, str(tmp_path)).save("pruned")
    checkpoint = torch.load(tmp_path / "pruned.pth", weights_only=True)
    weights = checkpoint["d2prune"]["model"]
    key = "roi_heads.box_predictor.cls_score.weight"
    weights[key] = weights[key][:, :-1]  # reads one channel less than the box head writes
    torch.save(checkpoint, tmp_path / "narrow.pth")

    with pytest.raises(UserError, match=rf"narrow\.pth: tensor '{key}' has shape \(4, \d+\)") as error:
        PrunedCheckpointer(_build(make_cfg, 5, seed=1)).load(str(tmp_path / "narrow.pth"))
    assert "\n" not in str(error.value)


def test_shipped_source_model_loads_into_a_three_class_target():
    """The issue's first command: the 6-class source model fine-tuned on a 3-class set."""
    weights = str(REPO / "models/faster_rcnn_R18_FPN_source.pth")
    cfg = setup_cfg(
        str(REPO / "configs/synthetic/faster_rcnn_R18_FPN_target.yaml"),
        ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"],
    )
    model = load_model(cfg)
    state = torch.load(weights, weights_only=True)["model"]
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    for key, tensor in model.state_dict().items():
        if ".box_predictor." not in key:
            assert torch.equal(tensor, state[key].float()), key


def test_pruned_three_class_model_fine_tunes_on_six_classes(tmp_path):
    source = build_model(setup_cfg(CONFIG, ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.DEVICE", "cpu"]))
    prune(source, {g.name: range(g.size // 2) for g in find_groups(source) if g.kind == "block"})
    PrunedCheckpointer(source, str(tmp_path)).save("pruned3")
    dataset = tiny_dataset(tmp_path / "data", "transfer_six_train", 2)
    cfg = setup_cfg(
        CONFIG,
        [*tiny_opts(tmp_path / "none", tmp_path / "out", 2), "DATASETS.TRAIN", f"('{dataset[0]}',)",
         "DATASETS.TEST", "()", "MODEL.ROI_HEADS.NUM_CLASSES", "6", "MODEL.WEIGHTS", str(tmp_path / "pruned3.pth")],
        [dataset],
    )  # fmt: skip
    register_datasets(cfg)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()

    final = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)
    assert final["d2prune"]["spec"] == channel_spec(source)
    assert final["d2prune"]["model"]["roi_heads.box_predictor.cls_score.weight"].shape[0] == 7
