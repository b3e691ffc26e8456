"""When pruning events happen during training and how much each has removed by then.

Pure arithmetic, no training: every target is cumulative and relative to the unpruned model, so a
run pruned in several events ends where one event to the final target would.
"""

import math
from dataclasses import dataclass
from typing import List

__all__ = ["PruningSchedule", "event_iters", "cumulative_targets"]


@dataclass(frozen=True)
class PruningSchedule:
    """Event k (0-based) happens after iteration `iters[k]` and brings the removed share of
    the unpruned model (channels, or FLOPs) to `targets[k]`."""

    iters: List[int]
    targets: List[float]

    @classmethod
    def build(
        cls, kind: str, final: float, start: int, end: int = 0, num_events: int = 1, curve: str = "linear"
    ) -> "PruningSchedule":
        """`kind` "oneshot": one event at `start` straight to `final`; "iterative": `num_events`
        events from `start` to `end` along `curve` (see `cumulative_targets`)."""
        if kind == "oneshot":
            return cls([start], [final])
        return cls(event_iters(start, end, num_events), cumulative_targets(final, num_events, curve))


def event_iters(start: int, end: int, num_events: int) -> List[int]:
    """`num_events` distinct iterations spread evenly from `start` to `end`, both included."""
    if num_events < 1 or end - start < num_events - 1 or start < 0:
        raise ValueError(f"cannot place {num_events} events from iteration {start} to {end}")
    if num_events == 1:
        return [start]
    step = (end - start) / (num_events - 1)
    return [start + math.floor(k * step + 0.5) for k in range(num_events)]


def cumulative_targets(final: float, num_events: int, curve: str = "linear") -> List[float]:
    """The share removed after each of `num_events` events, ending at `final`.

    With t = k / num_events for event k = 1..num_events: "linear" gives final * t; "cubic"
    (Zhu & Gupta 2017, "To prune, or not to prune") gives final * (1 - (1 - t)^3), which
    removes most while the network is still redundant and little near the end.
    """
    if curve not in ("linear", "cubic"):
        raise ValueError(f"unknown pruning curve {curve!r}")
    targets = []
    for k in range(1, num_events + 1):
        t = k / num_events
        targets.append(final * (t if curve == "linear" else 1 - (1 - t) ** 3))
    return targets
