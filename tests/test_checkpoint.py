"""PrunedCheckpointer: pruned checkpoints rebuild their architecture; mismatches are errors.

Also checks that checkpoints without a spec (plain `.pth`, Detectron2 `.pkl`) still load as usual.
"""

import os
import pickle
import random

import pytest
import torch

from d2prune.engine import PrunedCheckpointer
from d2prune.errors import UserError
from d2prune.pruning import apply_spec, channel_spec, find_groups, prune

from . import models

torch.set_num_threads(2)
MODEL = "faster_rcnn_R18_FPN"


def _detections(model):
    with torch.no_grad():
        (output,) = model(models.images(1))
    instances = output["instances"]
    return torch.cat([instances.pred_boxes.tensor, instances.scores[:, None]], dim=1)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A pruned model and the checkpoint PrunedCheckpointer saved for it."""
    model = models.build(MODEL)
    rng = random.Random(0)
    keep = {}
    for group in find_groups(model):
        if group.kind in ("block", "stage", "fpn", "head"):
            count = rng.randrange(group.size // 4, group.size) // group.unit * group.unit
            units = sorted(rng.sample(range(group.size // group.unit), count // group.unit))
            keep[group.name] = [u * group.unit + i for u in units for i in range(group.unit)]
    prune(model, keep)
    save_dir = str(tmp_path_factory.mktemp("pruned"))
    PrunedCheckpointer(model, save_dir).save("model_pruned", iteration=7)
    return model, os.path.join(save_dir, "model_pruned.pth")


def test_pruned_checkpoint_rebuilds_the_model(pruned):
    model, path = pruned
    fresh = models.build_fresh(MODEL)
    assert channel_spec(fresh) != channel_spec(model)

    extra = PrunedCheckpointer(fresh).resume_or_load(path, resume=False)

    assert extra["iteration"] == 7
    assert channel_spec(fresh) == channel_spec(model)
    assert fresh.backbone.output_shape() == model.backbone.output_shape()
    for key, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key
    before, after = _detections(model), _detections(fresh)
    assert before.shape == after.shape and (before - after).abs().max() <= 1e-6


def test_pruned_checkpoint_holds_only_plain_types(pruned):
    model, path = pruned
    checkpoint = torch.load(path, weights_only=True)
    spec = checkpoint["d2prune"]["spec"]
    assert spec == channel_spec(model)
    assert all(type(k) is str and type(v) is int for k, v in spec.items())


def _tampered(path, tmp_path, edit):
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    out = str(tmp_path / "tampered.pth")
    torch.save(checkpoint, out)
    return out


def test_a_spec_that_does_not_fit_the_weights_is_an_error(pruned, tmp_path):
    _, path = pruned

    def widen_fpn(checkpoint):
        checkpoint["d2prune"]["spec"]["backbone.fpn"] += 8

    bad = _tampered(path, tmp_path, widen_fpn)
    with pytest.raises(UserError, match=r"tampered\.pth: tensor 'backbone\.fpn_lateral2\.weight'"):
        PrunedCheckpointer(models.build_fresh(MODEL)).load(bad)


def test_a_spec_for_another_model_is_an_error(pruned, tmp_path):
    _, path = pruned

    def rename(checkpoint):
        spec = checkpoint["d2prune"]["spec"]
        spec["backbone.bottom_up.res9"] = spec.pop("backbone.bottom_up.res5")

    bad = _tampered(path, tmp_path, rename)
    with pytest.raises(UserError, match=r"tampered\.pth: .*'backbone\.bottom_up\.res9'"):
        PrunedCheckpointer(models.build_fresh(MODEL)).load(bad)


def test_a_pruned_checkpoint_missing_a_tensor_is_an_error(pruned, tmp_path):
    _, path = pruned
    # A pruned checkpoint keeps its weights beside the spec (see PrunedCheckpointer).
    bad = _tampered(path, tmp_path, lambda c: c["d2prune"]["model"].pop("roi_heads.box_head.fc1.bias"))
    with pytest.raises(UserError, match="lacks tensor 'roi_heads.box_head.fc1.bias'"):
        PrunedCheckpointer(models.build_fresh(MODEL)).load(bad)


def test_checkpoints_without_a_spec_load_into_the_unpruned_model(tmp_path):
    source = models.build(MODEL)
    state = source.state_dict()
    torch.save({"model": state}, str(tmp_path / "plain.pth"))
    with open(tmp_path / "zoo.pkl", "wb") as f:
        zoo = {k: v.numpy() for k, v in state.items()}
        pickle.dump({"model": zoo, "__author__": "d2prune tests"}, f)

    for name in ("plain.pth", "zoo.pkl"):
        model = models.build_fresh(MODEL)
        PrunedCheckpointer(model).load(str(tmp_path / name))
        for key, tensor in state.items():
            assert torch.equal(model.state_dict()[key], tensor), (name, key)


def test_pretrained_weights_with_other_classes_skip_the_predictor_as_usual(tmp_path):
    torch.save({"model": models.build(MODEL).state_dict()}, str(tmp_path / "pretrained.pth"))
    model = models.build_fresh(MODEL, opts=["MODEL.ROI_HEADS.NUM_CLASSES", 5])
    PrunedCheckpointer(model).load(str(tmp_path / "pretrained.pth"))
    assert model.roi_heads.box_predictor.cls_score.out_features == 6


def test_apply_spec_rebuilds_the_architecture(pruned):
    model, _ = pruned
    fresh = models.build_fresh(MODEL)
    apply_spec(fresh, channel_spec(model))
    assert channel_spec(fresh) == channel_spec(model)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"backbone.fpn": 300}, "width 300"),
        ({"backbone.fpn": 0}, "width 0"),
        ({"backbone.fpn": 12.0}, "width 12.0"),
        ({"backbone.fpn5": 12}, "'backbone.fpn5'"),
    ],
)
def test_apply_spec_refuses_bad_specs(spec, message):
    with pytest.raises(UserError, match=message):
        apply_spec(models.build(MODEL), spec)
