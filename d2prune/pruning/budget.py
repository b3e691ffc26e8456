"""How many channels each group loses: from criterion scores to keep sets for `prune`.

Per group (`local`) or over the whole network (`global`), or until the FLOPs fall by a target
share; the constraints that keep the result valid (widths, whole units, floors) live here.
"""

import copy
import math
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import UserError
from .groups import ChannelGroup
from .kinds import KINDS
from .surgery import prune

__all__ = ["KINDS", "check_options", "select_channels", "select_for_flops"]

_EPS = 1e-12


def select_channels(
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, torch.Tensor],
    *,
    ratio: float,
    mode: str = "local",
    kinds: Sequence[str] = ("block",),
    exclude: Sequence[str] = (),
    max_ratio: float = 0.9,
    min_channels: int = 8,
    round_to: int = 1,
    original: Optional[Mapping[str, int]] = None,
) -> Dict[str, List[int]]:
    """Sorted channel indices to keep, for each group that loses channels (the others are absent).

    Eligible groups are those of `kinds` whose name matches none of the `exclude` regular
    expressions (`re.search`). Channels with the lowest scores go:

    - `local`: each eligible group loses `ratio` of its channels (rounded down);
    - `global`: scores are divided by their group's mean magnitude, so groups of different
      scale compare, and the lowest `ratio` share of all eligible channels goes.

    In both modes a group keeps at least `min_channels` (or all, if it has fewer) and at least
    `1 - max_ratio` of its channels, goes by whole units (GroupNorm groups, conv groups; a unit
    scores the mean of its channels), and keeps a multiple of `round_to` channels: the kept
    count is rounded up, so the removed share can fall short of `ratio`. A group whose width
    is not such a multiple can only stay whole. A request that can remove nothing at all
    (every eligible group at or below its floor) is an error rather than a silent no-op.

    `original` holds the widths before any pruning (a channel spec). When given, `ratio`,
    `max_ratio` and `min_channels` refer to those widths instead of the current ones, and a call
    removes only what is still missing: pruning in several steps toward growing ratios ends at
    the widths that one step to the last ratio would give.
    """
    check_options(ratio, mode, kinds, max_ratio, min_channels, round_to)
    eligible = _eligible(groups, kinds, exclude)
    if ratio == 0:
        return {}
    if not eligible:
        raise UserError(
            f"pruning budget: no channel group of kinds {', '.join(kinds)} is left after "
            f"exclude {list(exclude)}; nothing to prune."
        )
    reference = {g.name: g.size if original is None else original[g.name] for g in eligible}
    unit_scores = {g.name: _unit_scores(g, scores) for g in eligible}
    floors = {g.name: _floor(g, reference[g.name], max_ratio, min_channels) for g in eligible}
    if all(floors[name] >= size for name, size in reference.items()):
        raise UserError(
            f"pruning budget: min_channels={min_channels} and max_ratio={max_ratio} leave "
            f"every eligible group whole (widest: {max(reference.values())} channels)."
        )
    steps = {g.name: math.lcm(g.unit, round_to) for g in eligible}
    if all(math.ceil(floors[n] / steps[n]) * steps[n] >= size for n, size in reference.items()):
        raise UserError(
            f"pruning budget: round_to={round_to} leaves every eligible group whole: none can keep "
            f"a multiple of {round_to} channels (and of its GroupNorm group size) below its width "
            f"(widest: {max(reference.values())} channels)."
        )
    if mode == "local":
        widths = {
            g.name: min(
                max(reference[g.name] - math.floor(ratio * reference[g.name] + 1e-9), floors[g.name]),
                g.size,
            )
            for g in eligible
        }
    else:
        total = sum(reference.values())
        already_removed = total - sum(g.size for g in eligible)
        target = math.floor(ratio * total + 1e-9) - already_removed
        widths = _global_widths(eligible, unit_scores, floors, target)

    keep = {}
    for group in eligible:
        width = _round_width(group, widths[group.name], round_to)
        if width < group.size:
            keep[group.name] = _top_channels(group, unit_scores[group.name], width)
    return keep


def select_for_flops(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, torch.Tensor],
    *,
    flops_reduction: float,
    measure: Callable[[nn.Module], float],
    tolerance: float = 0.01,
    max_steps: int = 20,
    kinds: Sequence[str] = ("block",),
    exclude: Sequence[str] = (),
    max_ratio: float = 0.9,
    min_channels: int = 8,
    round_to: int = 1,
    original: Optional[Mapping[str, int]] = None,
    baseline: Optional[float] = None,
) -> Dict[str, List[int]]:
    """Keep sets that cut `measure(model)` (FLOPs) by `flops_reduction`, removing in global order.

    Bisects the `global` ratio of `select_channels`; each candidate is measured on a pruned
    deep copy, so `model` is untouched. Returns the candidate with the smallest ratio found
    whose reduction is at least `flops_reduction`, stopping early once it is within
    `tolerance` above it (FLOPs fall in steps of whole channels, so an exact hit is rare).

    For a model already pruned, `original` (its widths before pruning, see `select_channels`)
    and `baseline` (its FLOPs then) make `flops_reduction` relative to the unpruned model; a
    model that is already there loses nothing.
    """
    if not 0 < flops_reduction < 1:
        raise UserError(
            f"pruning budget: flops_reduction must be in (0, 1), got {flops_reduction!r}."
        )
    options = dict(
        mode="global",
        kinds=kinds,
        exclude=exclude,
        max_ratio=max_ratio,
        min_channels=min_channels,
        round_to=round_to,
        original=original,
    )
    # The global order can remove at most `max_ratio` of the eligible channels.
    low, high = 0.0, min(max_ratio, 1 - 1e-6)
    deepest = select_channels(groups, scores, ratio=high, **options)  # validates the options
    if baseline is None:
        baseline = measure(model)
    elif 1 - measure(model) / baseline >= flops_reduction:
        return {}

    def reduction(keep: Mapping[str, Sequence[int]]) -> float:
        pruned = copy.deepcopy(model)
        prune(pruned, keep)
        return 1 - measure(pruned) / baseline

    best, reached = deepest, reduction(deepest)
    if reached < flops_reduction:
        raise UserError(
            f"pruning budget: flops_reduction={flops_reduction} is out of reach; pruning "
            f"kinds {', '.join(kinds)} as far as max_ratio={max_ratio} and "
            f"min_channels={min_channels} allow removes {reached:.1%} of the FLOPs."
        )
    for _ in range(max_steps):
        if reached - flops_reduction <= tolerance:
            break
        middle = (low + high) / 2
        keep = select_channels(groups, scores, ratio=middle, **options)
        achieved = reduction(keep)
        if achieved >= flops_reduction:
            high, best, reached = middle, keep, achieved
        else:
            low = middle
    return best


def check_options(ratio, mode, kinds, max_ratio, min_channels, round_to) -> None:
    """Raise a `UserError` naming the first budget option outside its allowed values."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise UserError(f"pruning budget: ratio must be in [0, 1), got {ratio!r}.")
    if mode not in ("local", "global"):
        raise UserError(f"pruning budget: mode must be 'local' or 'global', got {mode!r}.")
    if isinstance(kinds, str):
        raise UserError(f"pruning budget: kinds must be a list of group kinds, got {kinds!r}.")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UserError(
            f"pruning budget: unknown group kind {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(KINDS)}."
        )
    if not 0 < max_ratio <= 1:
        raise UserError(f"pruning budget: max_ratio must be in (0, 1], got {max_ratio!r}.")
    for key, value in (("min_channels", min_channels), ("round_to", round_to)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"pruning budget: {key} must be a positive integer, got {value!r}.")


def _eligible(
    groups: Sequence[ChannelGroup], kinds: Sequence[str], exclude: Sequence[str]
) -> List[ChannelGroup]:
    patterns = []
    for pattern in exclude:
        try:
            patterns.append(re.compile(pattern))
        except re.error as e:
            raise UserError(
                f"pruning budget: exclude pattern {pattern!r} is invalid: {e}."
            ) from None
    return [g for g in groups if g.kind in kinds and not any(p.search(g.name) for p in patterns)]


def _unit_scores(group: ChannelGroup, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean score of each unit of the group (a unit is removed as a whole)."""
    score = scores.get(group.name)
    # Scores come from a criterion run on the same model; a mismatch is a bug, not user input.
    if score is None or score.shape != (group.size,):
        raise ValueError(
            f"scores for group {group.name} must have shape ({group.size},), got "
            f"{None if score is None else tuple(score.shape)}"
        )
    if not torch.isfinite(score).all():
        raise ValueError(f"scores for group {group.name} are not all finite")
    return score.detach().double().cpu().view(-1, group.unit).mean(1)


def _floor(group: ChannelGroup, reference: int, max_ratio: float, min_channels: int) -> int:
    """The fewest channels the group may keep: whole units, never empty, never more than it has.

    `reference` is the width that `max_ratio` and `min_channels` refer to (see `original`).
    """
    least = max(min(min_channels, reference), math.ceil(reference * (1 - max_ratio) - 1e-9), 1)
    return min(math.ceil(least / group.unit) * group.unit, group.size)


def _global_widths(
    groups: List[ChannelGroup],
    unit_scores: Mapping[str, torch.Tensor],
    floors: Mapping[str, int],
    target: int,
) -> Dict[str, int]:
    """Widths after removing `target` channels, the lowest ranked network-wide."""
    ranked = []
    for i, group in enumerate(groups):
        units = unit_scores[group.name]
        normalised = units / (units.abs().mean() + _EPS)
        ranked += [(float(s), i) for s in normalised]
    # Within a group the ranking is its own order, so only the count per group matters here.
    ranked.sort()
    widths = {g.name: g.size for g in groups}
    removed = 0
    for _, i in ranked:
        group = groups[i]
        if removed + group.unit > target:
            continue
        if widths[group.name] - group.unit >= floors[group.name]:
            widths[group.name] -= group.unit
            removed += group.unit
    return widths


def _round_width(group: ChannelGroup, width: int, round_to: int) -> int:
    """Round the kept count up to whole units and a multiple of `round_to`, at most the size."""
    step = math.lcm(group.unit, round_to)
    return min(math.ceil(width / step) * step, group.size)


def _top_channels(group: ChannelGroup, unit_scores: torch.Tensor, width: int) -> List[int]:
    """The channels of the `width // unit` best-scored units (ties keep the lower index)."""
    order = sorted(range(len(unit_scores)), key=lambda u: (-float(unit_scores[u]), u))
    kept_units = sorted(order[: width // group.unit])
    return [u * group.unit + c for u in kept_units for c in range(group.unit)]
