"""Differences between the detectron2 builds d2prune runs on, in one place.

d2prune supports detectron2 v0.6 (with its real C++ ops, or with the stub extension that
`make setup` builds by default) and detectron2 main. Everything that differs between them is
decided here, so the rest of the library is version-free.
"""

import functools
import logging

logger = logging.getLogger(__name__)


@functools.cache
def has_fast_coco_eval() -> bool:
    """Whether detectron2's C++ COCO evaluator is compiled into `detectron2._C`."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return hasattr(_C, "COCOevalAccumulate") and hasattr(_C, "COCOevalEvaluateImages")


@functools.cache
def coco_eval_use_fast_impl() -> bool:
    """The `use_fast_impl` to give COCOEvaluator; says once in the log when it must be False."""
    fast = has_fast_coco_eval()
    if not fast:
        logger.info(
            "detectron2 was built without its C++ ops: COCO evaluation uses pycocotools "
            "(use_fast_impl=False); results are the same, only slower."
        )
    return fast
