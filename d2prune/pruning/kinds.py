"""The kinds of channel group, one enum for discovery, budgets, criteria and reports."""

import enum

__all__ = ["Kind", "KINDS"]


class Kind(str, enum.Enum):
    """Where a group's channels live; a `str`, so `group.kind == "block"` holds.

    `block`: inside a residual block (conv1 -> conv2 -> conv3); `stage`: a residual stream that
    the blocks of a stage add to; `stem`: the stem's output; `fpn`: the pyramid's shared width,
    read by every head; `head`: the hidden width of an RPN, ROI or RetinaNet head.
    """

    STEM = "stem"
    BLOCK = "block"
    STAGE = "stage"
    FPN = "fpn"
    HEAD = "head"

    def __str__(self) -> str:
        return self.value


# In the order a forward pass meets them; PRUNE.KINDS takes these names.
KINDS = tuple(k.value for k in Kind)
