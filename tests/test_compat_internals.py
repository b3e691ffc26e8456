"""The detectron2 internals d2prune reaches into, each through one accessor in `d2prune.compat`:
these tests run on whichever detectron2 is installed (v0.6 or main), so a rename upstream fails
here rather than somewhere in training."""

import torch
from detectron2.engine import hooks
from detectron2.layers import CycleBatchNormList
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage
from torch import nn

from d2prune import compat
from d2prune.engine import Trainer

from . import models
from .prune_helpers import prune_cfg, tiny_dataset


def test_trainer_internals(tmp_path):
    dataset = tiny_dataset(tmp_path / "data", "compat_train", 2)
    cfg = prune_cfg(dataset, tmp_path / "out", iters=1)
    trainer = Trainer(cfg)
    assert compat.last_eval_results(trainer) is None
    assert any(isinstance(h, hooks.LRScheduler) for h in compat.trainer_hooks(trainer))
    assert compat.inner_trainer(trainer).optimizer is trainer.optimizer
    writers = [h for h in compat.trainer_hooks(trainer) if isinstance(h, hooks.PeriodicWriter)]
    assert writers and compat.periodic_writers(writers[0])

    optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    model = nn.Sequential(trainer.model)
    compat.replace_optimizer_and_model(trainer, optimizer, model)
    assert trainer.optimizer is optimizer and trainer.model is model
    scheduler = next(h for h in compat.trainer_hooks(trainer) if isinstance(h, hooks.LRScheduler))
    assert scheduler._optimizer is optimizer


def test_res5_box_features_are_the_box_predictor_input():
    model = models.build("mask_rcnn_R50_C4")
    features = model.backbone(torch.randn(1, 3, 64, 96))
    roi = model.roi_heads
    boxes = [Boxes(torch.tensor([[4.0, 4.0, 40.0, 30.0]]))]
    pooled = compat.res5_box_features(roi, [features[f] for f in roi.in_features], boxes)
    assert pooled.shape[:2] == (1, roi.res5[-1].conv3.out_channels)


def test_cycle_batch_norm_list_accessors():
    norm = CycleBatchNormList(2, num_features=4, affine=True)
    assert compat.cycle_bn_affine(norm)
    assert compat.cycle_bn_active(norm) is norm[0]
    norm(torch.randn(2, 4, 3, 3))
    assert compat.cycle_bn_active(norm) is norm[1]
    assert not compat.cycle_bn_affine(CycleBatchNormList(2, num_features=4, affine=False))


def test_conv_forward_with_other_weights():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(1, 3, 9, 9)
    assert torch.equal(compat.conv_forward(conv, x, conv.weight, conv.bias), conv(x))
    doubled = compat.conv_forward(conv, x, 2 * conv.weight, None)
    torch.testing.assert_close(doubled, 2 * (conv(x) - conv.bias[None, :, None, None]))


def test_observe_proposal_sampling_sees_sampled_proposals_and_restores():
    model = models.build("faster_rcnn_R18_FPN").train()
    heads = model.roi_heads
    seen = []
    with compat.observe_proposal_sampling(heads, seen.append), EventStorage():
        model(models.with_targets(models.images(1)))
    assert len(seen) == 1 and seen[0][0].has("gt_classes")
    assert "label_and_sample_proposals" not in vars(heads)


def test_cached_widths_of_backbones_and_box_heads():
    model = models.build("faster_rcnn_R18_FPN")
    fpn, head = model.backbone, model.roi_heads.box_head
    assert compat.backbone_out_features(fpn) == list(fpn.output_shape())
    compat.set_out_feature_channels(fpn, {"p2": 7})
    assert fpn.output_shape()["p2"].channels == 7
    assert compat.box_head_output_size(head) == head.output_shape.channels
    compat.set_box_head_output_size(head, 5)
    assert head.output_shape.channels == 5
