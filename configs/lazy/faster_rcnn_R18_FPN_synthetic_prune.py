"""Faster R-CNN R18-FPN fine-tuned on the synthetic target domain while half of its residual
blocks' channels go in three l1 events: the LazyConfig twin of
configs/synthetic/prune/faster_rcnn_R18_FPN_target_l1.yaml, sized for 2 CPU cores (128 px).

    python tools/lazyconfig_train_net.py --config-file configs/lazy/faster_rcnn_R18_FPN_synthetic_prune.py
    python tools/lazyconfig_train_net.py --config-file configs/lazy/faster_rcnn_R18_FPN_synthetic_prune.py \
        --eval-only train.init_checkpoint=output/lazy/synthetic/prune_l1/model_final.pth

The model is built from detectron2.modeling classes (an installed detectron2 v0.6 ships no
model-zoo configs), with the settings of configs/Base-RCNN-FPN.yaml and
configs/synthetic/Base-Synthetic-R18-FPN.yaml, so it loads their checkpoints.
"""

import torch
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers, StandardROIHeads
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf

from d2prune.compat import coco_eval_use_fast_impl

FPN_WIDTH = 128
SIDE = 128

model = L(GeneralizedRCNN)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            # BatchNorm, every stage trainable: the source model was trained from scratch.
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="BN"),
            stages=L(ResNet.make_default_stages)(depth=18, norm="BN"),
            out_features=["res2", "res3", "res4", "res5"],
            freeze_at=0,
        ),
        in_features=["res2", "res3", "res4", "res5"],
        out_channels=FPN_WIDTH,
        top_block=L(LastLevelMaxPool)(),
    ),
    proposal_generator=L(RPN)(
        in_features=["p2", "p3", "p4", "p5", "p6"],
        head=L(StandardRPNHead)(in_channels=FPN_WIDTH, num_anchors=3),
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[[8], [16], [32], [64], [128]], aspect_ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64], offset=0.0,
        ),
        anchor_matcher=L(Matcher)(thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=64,
        positive_fraction=0.5,
        pre_nms_topk=(400, 300),
        post_nms_topk=(128, 100),
        nms_thresh=0.7,
    ),
    roi_heads=L(StandardROIHeads)(
        num_classes=6,
        batch_size_per_image=64,
        positive_fraction=0.25,
        proposal_matcher=L(Matcher)(thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False),
        box_in_features=["p2", "p3", "p4", "p5"],
        box_pooler=L(ROIPooler)(
            output_size=7, scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32), sampling_ratio=0,
            pooler_type="ROIAlignV2",
        ),
        box_head=L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=FPN_WIDTH, height=7, width=7), conv_dims=[], fc_dims=[256, 256],
        ),
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=256),
            box2box_transform=L(Box2BoxTransform)(weights=(10, 10, 5, 5)),
            num_classes="${..num_classes}",
            test_score_thresh=0.05,
            test_topk_per_image=50,
        ),
    ),
    pixel_mean=[103.530, 116.280, 123.675],
    pixel_std=[1.0, 1.0, 1.0],
    input_format="BGR",
)

# COCO-format datasets to register: the synthetic splits found under `synthetic_root` (written by
# tools/make_synthetic.py), and `coco` entries [name, json_file, image_root] (or --dataset).
datasets = dict(synthetic_root="datasets/synthetic", coco=[])

dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="synthetic_target_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(SIDE,), max_size=SIDE, sample_style="choice"),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="BGR",
        use_instance_mask=False,
    ),
    total_batch_size=8,
    num_workers=1,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="synthetic_target_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=SIDE, max_size=SIDE)],
        image_format="BGR",
    ),
    num_workers=1,
)
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    use_fast_impl=L(coco_eval_use_fast_impl)(),  # pycocotools when detectron2 lacks its C++ ops
)

optimizer = L(torch.optim.SGD)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=0.01,
    momentum=0.9,
    weight_decay=1e-4,
)

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[200, 260], num_updates=300),
    warmup_length=50 / 300,
    warmup_method="linear",
    warmup_factor=0.001,
)

train = dict(
    output_dir="output/lazy/synthetic/prune_l1",
    # The shipped source model (models/README.md); its 6-class head fits the target domain.
    init_checkpoint="models/faster_rcnn_R18_FPN_source.pth",
    max_iter=300,
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=100, max_to_keep=100),
    eval_period=300,
    log_period=20,
    device="cuda",  # the CPU when CUDA is not available
    seed=0,
)

# PRUNE's keys in lower case (d2prune/config.py documents each): three l1 events, cubic
# schedule, between iterations 50 and 150, towards half of the block channels.
prune = dict(
    enabled=True,
    criterion="l1",
    kinds=["block"],
    ratio=0.5,
    mode="local",
    schedule="iterative",
    start_iter=50,
    end_iter=150,
    num_events=3,
    curve="cubic",
    score_batches=8,
    eval_at_events=True,
)
