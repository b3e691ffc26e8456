"""Small Detectron2 detectors built from configs in code, with random weights, for the tests.

Each builder is cached and handed out as a deep copy, so tests that prune in place stay
independent without paying for `build_model` every time.
"""

import copy
import functools
import os
from typing import Callable, Dict, List, Sequence

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, PolygonMasks

from d2prune.complexity import dummy_inputs

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
HEIGHT, WIDTH = 64, 96


def _cfg(base: str, depth: int = 50):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, base))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = depth
    if depth < 50:
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    # Random weights give near-uniform scores: keep every detection, and few proposals for speed.
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 100
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 20
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 50
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RETINANET.TOPK_CANDIDATES_TEST = 100
    cfg.TEST.DETECTIONS_PER_IMAGE = 10
    return cfg


def faster_rcnn_cfg(depth: int = 50):
    return _cfg("Base-RCNN-FPN.yaml", depth)


def mask_rcnn_cfg(depth: int = 50):
    cfg = _cfg("Base-RCNN-FPN.yaml", depth)
    cfg.MODEL.MASK_ON = True
    return cfg


def retinanet_cfg(depth: int = 50):
    return _cfg("Base-RetinaNet.yaml", depth)


def retinanet_bn_cfg():
    """RetinaNet whose subnets use per-level BatchNorm (norms that are separate modules)."""
    cfg = retinanet_cfg()
    cfg.MODEL.RETINANET.NORM = "BN"
    return cfg


def faster_rcnn_gn_bn_cfg():
    """GroupNorm in FPN and a 2-conv box head, BatchNorm in the backbone."""
    cfg = faster_rcnn_cfg()
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.FPN.NORM = "GN"
    cfg.MODEL.ROI_BOX_HEAD.NORM = "GN"
    cfg.MODEL.ROI_BOX_HEAD.NUM_CONV = 2
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
    return cfg


def resnext_cfg():
    cfg = faster_rcnn_cfg()
    cfg.MODEL.RESNETS.NUM_GROUPS = 32
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 4
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    return cfg


def mask_rcnn_c4_cfg():
    """Mask R-CNN R50-C4: res4 feeds the RPN and `roi_heads.res5`."""
    cfg = _cfg("Base-RCNN-FPN.yaml")
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res4"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32, 64, 128, 256, 512]]
    cfg.MODEL.RPN.IN_FEATURES = ["res4"]
    cfg.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["res4"]
    # Res5 runs once per region: an 8x8 pooler (14 in the model zoo) keeps it cheap on a CPU.
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 8
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 10
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 10
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 0
    return cfg


CONFIG_BUILDERS: Dict[str, Callable] = {
    "faster_rcnn_R50_FPN": faster_rcnn_cfg,
    "faster_rcnn_R18_FPN": functools.partial(faster_rcnn_cfg, 18),
    "retinanet_R50_FPN": retinanet_cfg,
    "retinanet_R50_FPN_headBN": retinanet_bn_cfg,
    "mask_rcnn_R50_FPN": mask_rcnn_cfg,
    "faster_rcnn_R50_FPN_GN_BN": faster_rcnn_gn_bn_cfg,
    "faster_rcnn_X50_FPN": resnext_cfg,
    "mask_rcnn_R50_C4": mask_rcnn_c4_cfg,
}


@functools.cache
def _built(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(CONFIG_BUILDERS[name]())
    _randomize(model)
    return model.eval()


def build(name: str) -> torch.nn.Module:
    """A copy of the named test model (random weights, the same on every call; eval mode)."""
    return copy.deepcopy(_built(name))


def build_fresh(name: str, seed: int = 1, opts: Sequence = ()) -> torch.nn.Module:
    """A newly built test model with other random weights, as `build_model` gives it (eval mode).

    `opts` are config overrides as on a command line, e.g. `["MODEL.ROI_HEADS.NUM_CLASSES", 5]`.
    """
    cfg = CONFIG_BUILDERS[name]()
    cfg.merge_from_list(list(opts))
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def _randomize(model: torch.nn.Module) -> None:
    """Give norms and biases non-trivial values, so that a channel left out of a group shows."""
    generator = torch.Generator().manual_seed(1)

    def uniform(t, low, high):
        t.copy_(torch.rand(t.shape, generator=generator) * (high - low) + low)

    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            if "anchor" in name or name.startswith("pixel_") or tensor.dim() != 1:
                continue
            if leaf == "running_var":
                uniform(tensor, 0.5, 1.5)
            elif leaf in ("bias", "running_mean"):
                uniform(tensor, -0.1, 0.1)
            elif leaf == "weight":  # norm scales
                uniform(tensor, 0.5, 1.0)


def images(n: int = 1, seed: int = 0) -> List[dict]:
    """Detectron2 inputs: `n` random images of HEIGHT x WIDTH."""
    return dummy_inputs(HEIGHT, WIDTH, batch=n, seed=seed)


def with_targets(inputs: List[dict]) -> List[dict]:
    """The inputs with two ground-truth boxes (and box-shaped masks) each, for training."""
    boxes = torch.tensor([[8.0, 6.0, 40.0, 50.0], [36.0, 16.0, 90.0, 60.0]])
    for item in inputs:
        instances = Instances((HEIGHT, WIDTH))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.tensor([0, 2])
        instances.gt_masks = PolygonMasks(
            [[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in boxes.tolist()]
        )
        item["instances"] = instances
    return inputs
