"""Pruned checkpoints outside d2prune's tools (issue 14, item 5): Detectron2's own loaders refuse
them instead of skipping every pruned tensor; `d2prune.Predictor` and `d2prune.load_model` give
the pruned model back.
"""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

import d2prune
from d2prune.engine import PrunedCheckpointer
from d2prune.fuse import folded_convs
from d2prune.pruning import channel_spec, find_groups, prune

from . import models
from .conftest import REPO

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A pruned R18-FPN model, the config that builds it unpruned, and its checkpoint."""
    model = models.build("faster_rcnn_R18_FPN")
    unpruned = channel_spec(model)
    prune(model, {g.name: range(0, g.size, 2) for g in find_groups(model) if g.kind in ("block", "fpn")})
    folder = tmp_path_factory.mktemp("predictor")
    checkpointer = PrunedCheckpointer(model, str(folder))
    checkpointer.unpruned_spec = unpruned
    checkpointer.save("model_pruned")
    cfg = models.faster_rcnn_cfg(18)
    cfg.MODEL.WEIGHTS = str(folder / "model_pruned.pth")
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 96
    return model, cfg


def test_detectron2_refuses_a_pruned_checkpoint(pruned):
    _, cfg = pruned
    with pytest.raises(ValueError, match="Unsupported type found in checkpoint! d2prune"):
        DetectionCheckpointer(build_model(cfg)).load(cfg.MODEL.WEIGHTS)
    with pytest.raises(ValueError, match="d2prune"):
        DefaultPredictor(cfg)


@pytest.mark.parametrize("optimize", [False, True])
def test_predictor_gives_the_pruned_models_outputs(pruned, optimize):
    model, cfg = pruned
    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    predictor = d2prune.Predictor(cfg, optimize=optimize)
    in_memory = copy.copy(predictor)
    in_memory.model = model

    got, expected = predictor(image)["instances"], in_memory(image)["instances"]

    assert channel_spec(predictor.model) == channel_spec(model) and not predictor.model.training
    # Optimised (the default): norms folded into the convs, so none is left to run, and the
    # same detections up to float rounding; as loaded: the very same numbers.
    assert (len(folded_convs(predictor.model)) == 0) == optimize and folded_convs(model)
    assert len(got) == len(expected) > 0
    tolerance = {"atol": 1e-3, "rtol": 1e-4} if optimize else {"atol": 0, "rtol": 0}
    torch.testing.assert_close(got.pred_boxes.tensor, expected.pred_boxes.tensor, **tolerance)
    torch.testing.assert_close(got.scores, expected.scores, **tolerance)
    assert torch.equal(got.pred_classes, expected.pred_classes)


def test_load_model_gives_the_pruned_model(pruned):
    model, cfg = pruned
    loaded = d2prune.load_model(cfg, cfg.MODEL.WEIGHTS)
    assert channel_spec(loaded) == channel_spec(model) and not loaded.training
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_an_unpruned_checkpoint_stays_a_detectron2_checkpoint(tmp_path):
    """Before any pruning the weights keep their usual place: Detectron2 loads them as ever."""
    model = models.build("faster_rcnn_R18_FPN")
    checkpointer = PrunedCheckpointer(model, str(tmp_path))
    checkpointer.unpruned_spec = channel_spec(model)
    checkpointer.save("model_unpruned")
    fresh = models.build_fresh("faster_rcnn_R18_FPN")
    DetectionCheckpointer(fresh).load(str(tmp_path / "model_unpruned.pth"))
    for key, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key


@pytest.mark.subprocess
def test_import_d2prune_stays_light():
    code = (
        "import sys, d2prune\n"
        "print(sorted(m for m in sys.modules if m.startswith(('detectron2', 'd2prune.'))))\n"
        "d2prune.load_model, d2prune.Predictor\n"
        "print('detectron2.engine' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "True"]
