"""Detectron2's DefaultPredictor for pruned checkpoints: the model is cut to the checkpoint's
channel spec before its weights load, where DefaultPredictor would refuse a pruned file.
"""

from detectron2.engine import DefaultPredictor

from ..fuse import prepare_for_inference
from .checkpoint import PrunedCheckpointer

__all__ = ["Predictor"]


class Predictor(DefaultPredictor):
    """`DefaultPredictor(cfg)` that loads MODEL.WEIGHTS through `PrunedCheckpointer`.

    Takes one BGR image (or RGB, per INPUT.FORMAT) as a numpy array, resizes it as the test
    config says and returns the model's outputs for it, like DefaultPredictor; a pruned
    checkpoint comes back as the pruned architecture, an unpruned one as usual.

    With `optimize` (the default) the loaded model is prepared for inference
    (`fuse.prepare_for_inference`): FrozenBN and eval-mode BN folded into their convs and, on
    the CPU, weights in channels-last format. The detections are the same up to float rounding
    and faster (13-22 % on one CPU thread, docs/latency.md), but `predictor.model` is then for
    inference only: pass `optimize=False` to keep the model as it loaded (to train or save it).
    """

    def __init__(self, cfg, optimize: bool = True):
        # DefaultPredictor builds the model and the test-time resizing; its own load would fail
        # on a pruned checkpoint, so it loads nothing and the pruned load follows.
        unloaded = cfg.clone()
        unloaded.defrost()
        unloaded.MODEL.WEIGHTS = ""
        super().__init__(unloaded)
        self.cfg = cfg.clone()
        PrunedCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.model.eval()
        if optimize:
            prepare_for_inference(self.model)
