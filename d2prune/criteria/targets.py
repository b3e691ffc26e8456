"""Ground truth on feature maps: which object, or background, each position of a map looks at.

Detection-aware criteria (mi, gradcam) and the explanation report read their targets from here,
so that every one of them maps boxes onto a map the same way.
"""

from typing import List, Tuple

import torch

from ..errors import UserError

__all__ = ["position_labels", "box_masks", "image_positions"]


def _centres(map_size: Tuple[int, int], padded_size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates (y, x) of the centres of the rows and columns of an h x w map.

    A map of height h over a padded image of height H has stride s = H / h: its row y covers
    pixels [y s, (y + 1) s), so its centre is (y + 1/2) s; columns likewise.
    """
    (h, w), (height, width) = map_size, padded_size
    return (torch.arange(h) + 0.5) * (height / h), (torch.arange(w) + 0.5) * (width / w)


def _boxes(item: dict, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    instances = item.get("instances")
    if instances is None:
        raise UserError(
            f"input {index} of the batch has no 'instances': criteria that use ground truth need "
            "training batches with boxes (the training data loader's)."
        )
    return instances.gt_boxes.tensor.detach().float().cpu(), instances.gt_classes.cpu()


def _contains(boxes: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    """(n, h, w): whether box j (x0, y0, x1, y1) contains the centre of position (y, x), with
    boxes taken as half-open [x0, x1) x [y0, y1) like the pixels they cover."""
    x0, y0, x1, y1 = boxes.unbind(1)
    rows = (cy >= y0[:, None]) & (cy < y1[:, None])
    cols = (cx >= x0[:, None]) & (cx < x1[:, None])
    return rows[:, :, None] & cols[:, None, :]


def position_labels(
    batch: List[dict], map_size: Tuple[int, int], padded_size: Tuple[int, int]
) -> torch.Tensor:
    """(N, h, w) int64 labels (on the CPU) of an h x w feature map of the N images of `batch`.

    0 is background; k + 1 is an object of class k (`instances.gt_classes`) whose box contains
    the centre of the position. Where boxes overlap, the smallest box wins: a small object in
    front of a large one is what its positions see. Boxes are in the coordinates of
    `batch[i]["image"]`; `padded_size` is the (height, width) of the padded tensor the backbone
    sees (padding is at the bottom and right), which sets the map's stride. Padding positions
    are background here; `image_positions` tells them apart.
    """
    cy, cx = _centres(map_size, padded_size)
    labels = torch.zeros(len(batch), *map_size, dtype=torch.long)
    for i, item in enumerate(batch):
        boxes, classes = _boxes(item, i)
        if len(boxes) == 0:
            continue
        inside = _contains(boxes, cy, cx)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        # The smallest box that contains each position (the first of equal ones).
        smallest = torch.where(inside, area[:, None, None], torch.inf).argmin(0)
        labels[i] = torch.where(inside.any(0), classes[smallest] + 1, 0)
    return labels


def box_masks(
    batch: List[dict], map_size: Tuple[int, int], padded_size: Tuple[int, int]
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """For each image of `batch`: ((n_i, h, w) bool, (n_i,) int64 classes) of its n_i boxes, on
    the CPU.

    A box covers the positions whose centre it contains and, always, the position that holds
    the box's own centre, so that a box smaller than the stride still covers one position.
    Arguments as for `position_labels`.
    """
    (h, w), (height, width) = map_size, padded_size
    cy, cx = _centres(map_size, padded_size)
    masks = []
    for i, item in enumerate(batch):
        boxes, classes = _boxes(item, i)
        inside = _contains(boxes, cy, cx)
        y = ((boxes[:, 1] + boxes[:, 3]) / 2 / (height / h)).floor().long().clamp(0, h - 1)
        x = ((boxes[:, 0] + boxes[:, 2]) / 2 / (width / w)).floor().long().clamp(0, w - 1)
        inside[torch.arange(len(boxes)), y, x] = True
        masks.append((inside, classes))
    return masks


def image_positions(
    batch: List[dict], map_size: Tuple[int, int], padded_size: Tuple[int, int]
) -> torch.Tensor:
    """(N, h, w) bool: whether the centre of each position lies inside image i rather than in
    the padding that batches images of different sizes into one tensor."""
    cy, cx = _centres(map_size, padded_size)
    inside = torch.zeros(len(batch), *map_size, dtype=torch.bool)
    for i, item in enumerate(batch):
        height, width = item["image"].shape[-2:]
        inside[i] = (cy < height)[:, None] & (cx < width)[None, :]
    return inside
