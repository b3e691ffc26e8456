"""How many channels each group loses: from criterion scores to keep sets for `prune`.

A `Budget` says what to cut (a share of the channels, of the FLOPs, or of the time) and under
which constraints (widths, whole units, floors); `select` turns scores into keep sets under it.
"""

import copy
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import UserError
from .cost import CostModel, select_by_cost
from .groups import ChannelGroup
from .kinds import KINDS, Kind
from .surgery import prune

__all__ = [
    "KINDS", "TARGETS", "MODES", "WEIGHTINGS", "Budget", "select", "select_channels", "select_for_flops",
    "select_for_cost", "probe_keeps",
]  # fmt: skip

_EPS = 1e-12

# What a budget can aim at, each with how reports put the budget in words.
TARGETS = {
    "channels": "ratio {amount:g}, {mode}",
    "flops": "FLOPs reduction {amount:g} ({order})",
    "latency": "latency reduction {amount:g} ({order})",
}

# How channels compete: "local" (each group alone), "global" (on group-normalised scores across
# groups), "cost" (global, on score per unit of cost saved; FLOPs and latency targets only).
MODES = ("local", "global", "cost")

# How mode "cost" weighs one group's scores against another's: "uniform" (every group's scores
# divided by their mean, so a group's average channel is worth as much as any other's), or
# "sensitivity" (scaled by the training loss's measured rise when the group alone is cut,
# `probe_keeps`, so that a channel every head reads weighs what it is worth).
WEIGHTINGS = ("uniform", "sensitivity")


@dataclass(frozen=True)
class Budget:
    """How much to prune and under which constraints; `Budget.from_config` reads the PRUNE keys.

    `target` "channels" removes `amount` of the eligible channels (`mode` "local": of each
    group; "global": of all of them, on group-normalised scores); "flops" and "latency" remove
    channels until the FLOPs (or the time a `CostModel` predicts) fall by `amount`: in the
    global order (modes "local" and "global"), or, with `mode` "cost", by score per unit of
    cost saved (`cost.select_by_cost`). Either way
    `amount` is in [0, 1) and 0 removes nothing. Eligible groups are those of `kinds` whose name matches none of the
    `exclude` regular expressions (`re.search`). A group keeps at least `min_channels` (or all,
    if it has fewer) and at least `1 - max_ratio` of its channels, and a multiple of `round_to`.
    `weighting` (mode "cost" only, `WEIGHTINGS`) says how the scores of different groups compare.
    `kinds` and `exclude` may be given as lists and are kept as tuples, so that a budget is
    hashable. Invalid fields are a one-line `UserError` when the budget is made.
    """

    target: str
    amount: float
    mode: str = "local"
    kinds: Tuple[str, ...] = ("block",)
    exclude: Tuple[str, ...] = ()
    max_ratio: float = 0.9
    min_channels: int = 8
    round_to: int = 1
    weighting: str = "uniform"

    def __post_init__(self):
        if self.target not in TARGETS:
            raise UserError(
                f"pruning budget: target must be one of {', '.join(map(repr, TARGETS))}, "
                f"got {self.target!r}."
            )
        if not _is_number(self.amount) or not 0 <= self.amount < 1:
            raise UserError(f"pruning budget: amount must be in [0, 1), got {self.amount!r}.")
        if self.mode not in MODES:
            raise UserError(f"pruning budget: mode must be one of {', '.join(map(repr, MODES))}, got {self.mode!r}.")
        if self.mode == "cost" and self.target == "channels":
            raise UserError(
                "pruning budget: mode 'cost' weighs scores against FLOPs or time saved: it needs a "
                "FLOPs or latency target (PRUNE.FLOPS_REDUCTION or PRUNE.LATENCY_REDUCTION), not a channel ratio."
            )
        if self.weighting not in WEIGHTINGS:
            raise UserError(
                f"pruning budget: weighting must be one of {', '.join(map(repr, WEIGHTINGS))}, got {self.weighting!r}."
            )
        if self.weighting != "uniform" and self.mode != "cost":
            raise UserError(
                f"pruning budget: weighting {self.weighting!r} weighs groups against the cost they save: it "
                f"needs mode 'cost' (PRUNE.MODE), not {self.mode!r}."
            )
        if isinstance(self.kinds, str) or not isinstance(self.kinds, (list, tuple)):
            raise UserError(
                f"pruning budget: kinds must be a list of group kinds, got {self.kinds!r}."
            )
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise UserError(
                f"pruning budget: unknown group kind {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(KINDS)}."
            )
        if isinstance(self.exclude, str) or not isinstance(self.exclude, (list, tuple)):
            raise UserError(
                "pruning budget: exclude must be a list of regular expressions, "
                f"got {self.exclude!r}."
            )
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise UserError(
                    f"pruning budget: exclude pattern {pattern!r} is invalid: {e}."
                ) from None
        if not _is_number(self.max_ratio) or not 0 < self.max_ratio <= 1:
            raise UserError(f"pruning budget: max_ratio must be in (0, 1], got {self.max_ratio!r}.")
        for key in ("min_channels", "round_to"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"pruning budget: {key} must be a positive integer, got {value!r}.")
        # Tuples keep the budget hashable; a Kind hashes unlike the string it equals.
        kinds = tuple(k.value if isinstance(k, Kind) else k for k in self.kinds)
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @classmethod
    def from_config(cls, cfg) -> "Budget":
        """The budget of a config's PRUNE keys: a FLOPs target when PRUNE.FLOPS_REDUCTION > 0,
        a latency target when PRUNE.LATENCY_REDUCTION > 0, else PRUNE.RATIO of the channels."""
        p = cfg.PRUNE
        if p.FLOPS_REDUCTION > 0:
            target, amount = "flops", p.FLOPS_REDUCTION
        elif p.get("LATENCY_REDUCTION", 0) > 0:
            target, amount = "latency", p.LATENCY_REDUCTION
        else:
            target, amount = "channels", p.RATIO
        return cls(
            target=target,
            amount=amount,
            mode=p.MODE,
            kinds=tuple(p.KINDS),
            exclude=tuple(p.EXCLUDE),
            max_ratio=p.MAX_RATIO,
            min_channels=p.MIN_CHANNELS,
            round_to=p.ROUND_TO,
            weighting=p.get("COST_WEIGHTING", "uniform") if p.MODE == "cost" else "uniform",
        )

    def eligible(self, groups: Sequence[ChannelGroup]) -> List[ChannelGroup]:
        """The groups this budget may narrow: of `kinds`, matching none of `exclude`."""
        return [
            g
            for g in groups
            if g.kind in self.kinds and not any(re.search(p, g.name) for p in self.exclude)
        ]

    def describe(self) -> str:
        """The budget in words for reports, e.g. "ratio 0.5, local"."""
        order = "cost" if self.mode == "cost" else "global"  # FLOPs and latency: global unless cost
        return TARGETS[self.target].format(amount=self.amount, mode=self.mode, order=order)

    def with_amount(self, amount: float) -> "Budget":
        """The same budget with another amount (an iterative schedule's growing targets)."""
        return dataclasses.replace(self, amount=amount)

    def deepest(self) -> "Budget":
        """The deepest channel cut these constraints allow: `max_ratio` (just below 1) of all
        eligible channels in the global order. A FLOPs target searches below it, and a budget
        that this cut leaves whole can remove nothing at all."""
        return dataclasses.replace(
            self, target="channels", amount=min(self.max_ratio, 1 - 1e-6), mode="global", weighting="uniform"
        )


def select(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, torch.Tensor],
    budget: Budget,
    *,
    measure: Optional[Callable[[nn.Module], float]] = None,
    original: Optional[Mapping[str, int]] = None,
    baseline: Optional[float] = None,
    cost_model: Optional[CostModel] = None,
    sensitivity: Optional[Mapping[str, Tuple[int, float]]] = None,
) -> Dict[str, List[int]]:
    """Keep sets under `budget`: `select_channels` for a channels target; `select_for_cost` for
    a latency target or mode "cost" (it takes `cost_model`, and `sensitivity` with weighting
    "sensitivity"); otherwise, a FLOPs target, `select_for_flops` (which takes `measure`,
    `baseline`). `model` is not changed."""
    if budget.target == "channels":
        return select_channels(groups, scores, budget, original)
    if budget.target == "latency" or budget.mode == "cost":
        if cost_model is None:
            raise ValueError(f"a {budget.target} budget in mode {budget.mode!r} needs a cost model")
        return select_for_cost(groups, scores, budget, cost_model, original, sensitivity=sensitivity)
    return select_for_flops(
        model, groups, scores, budget, measure=measure, original=original, baseline=baseline
    )


def select_channels(
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, torch.Tensor],
    budget: Budget,
    original: Optional[Mapping[str, int]] = None,
) -> Dict[str, List[int]]:
    """Sorted channel indices to keep under a channels `budget`, for each group that loses
    channels (the others are absent). Channels with the lowest scores go:

    - `local`: each eligible group loses `amount` of its channels (rounded down);
    - `global`: scores are divided by their group's mean magnitude, so groups of different
      scale compare, and the lowest `amount` share of all eligible channels goes.

    In both modes a group goes by whole units (GroupNorm groups, conv groups; a unit scores
    the mean of its channels) down to its floor (`min_channels`, `max_ratio`), and keeps a
    multiple of `round_to` channels: the kept count is rounded up, so the removed share can fall
    short of `amount`. A group whose width is not such a multiple can only stay whole. A
    request that can remove nothing at all (every eligible group at or below its floor) is an
    error rather than a silent no-op.

    `original` holds the widths before any pruning (a channel spec). When given, `amount`,
    `max_ratio` and `min_channels` refer to those widths instead of the current ones, and a call
    removes only what is still missing: pruning in several steps toward growing amounts ends at
    the widths that one step to the last amount would give.
    """
    if budget.target != "channels":
        raise ValueError(f"select_channels takes a channels budget, got target {budget.target!r}")
    eligible = budget.eligible(groups)
    ratio, max_ratio = budget.amount, budget.max_ratio
    min_channels, round_to = budget.min_channels, budget.round_to
    if ratio == 0:
        return {}
    if not eligible:
        raise UserError(
            f"pruning budget: no channel group of kinds {', '.join(budget.kinds)} is left after "
            f"exclude {list(budget.exclude)}; nothing to prune."
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
    if budget.mode == "local":
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
    budget: Budget,
    *,
    measure: Callable[[nn.Module], float],
    original: Optional[Mapping[str, int]] = None,
    baseline: Optional[float] = None,
    tolerance: float = 0.01,
    max_steps: int = 20,
) -> Dict[str, List[int]]:
    """Keep sets that cut `measure(model)` (FLOPs) by the `amount` of a FLOPs `budget`,
    removing channels in the global order.

    Bisects the amount of a global `select_channels` budget; each candidate is measured on a
    pruned deep copy, so `model` is untouched. Returns the candidate with the smallest amount
    found whose reduction is at least the target, stopping early once it is within `tolerance`
    above it (FLOPs fall in steps of whole channels, so an exact hit is rare).

    For a model already pruned, `original` (its widths before pruning, see `select_channels`)
    and `baseline` (its FLOPs then) make the target relative to the unpruned model; a model
    that is already there loses nothing.
    """
    if budget.target != "flops":
        raise ValueError(f"select_for_flops takes a FLOPs budget, got target {budget.target!r}")
    if budget.mode == "cost":
        raise ValueError("a FLOPs budget in mode 'cost' goes to select_for_cost")
    goal = budget.amount
    if goal == 0:
        return {}
    # The global order can remove at most `max_ratio` of the eligible channels.
    cut = budget.deepest()
    low, high = 0.0, cut.amount
    deepest = select_channels(groups, scores, cut, original)
    if baseline is None:
        baseline = measure(model)
    elif 1 - measure(model) / baseline >= goal:
        return {}

    def reduction(keep: Mapping[str, Sequence[int]]) -> float:
        pruned = copy.deepcopy(model)
        prune(pruned, keep)
        return 1 - measure(pruned) / baseline

    best, reached = deepest, reduction(deepest)
    if reached < goal:
        raise UserError(
            f"pruning budget: FLOPs reduction {goal} is out of reach; pruning "
            f"kinds {', '.join(budget.kinds)} as far as max_ratio={budget.max_ratio} and "
            f"min_channels={budget.min_channels} allow removes {reached:.1%} of the FLOPs."
        )
    for _ in range(max_steps):
        if reached - goal <= tolerance:
            break
        middle = (low + high) / 2
        keep = select_channels(groups, scores, cut.with_amount(middle), original)
        achieved = reduction(keep)
        if achieved >= goal:
            high, best, reached = middle, keep, achieved
        else:
            low = middle
    return best


def select_for_cost(
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, torch.Tensor],
    budget: Budget,
    cost_model: CostModel,
    original: Optional[Mapping[str, int]] = None,
    tolerance: float = 0.005,
    max_steps: int = 30,
    *,
    sensitivity: Optional[Mapping[str, Tuple[int, float]]] = None,
) -> Dict[str, List[int]]:
    """Keep sets that bring `cost_model`'s predicted cost (FLOPs or time) down by the `amount`
    of a FLOPs or latency `budget`, relative to the cost at `original` widths (default: now).

    Mode "cost": `cost.select_by_cost`, channels compete on score per unit of cost saved; with
    weighting "sensitivity", each group's scores are scaled by `sensitivity` (per eligible
    group: the units its `probe_keeps` cut removes and the loss rise measured with that cut).
    Otherwise the amount of a global channels budget is bisected until the predicted cost is
    reached (within `tolerance` below the target), so the channels go in the global order, as
    `select_for_flops` removes them. A model already at the target loses nothing; a
    target that the floors make unreachable is a `UserError` saying how far they allow.
    """
    if budget.target == "channels":
        raise ValueError("select_for_cost takes a FLOPs or latency budget")
    goal = budget.amount
    if goal == 0:
        return {}
    current = {g.name: g.size for g in groups}
    full = {**current, **(original or {})}
    baseline = cost_model.predict(full)
    target = baseline * (1 - goal)
    if cost_model.predict(current) <= target:
        return {}
    eligible = budget.eligible(groups)
    what = "FLOPs" if budget.target == "flops" else "latency"

    def out_of_reach(reached: float):
        return UserError(
            f"pruning budget: {what} reduction {goal} is out of reach; pruning kinds "
            f"{', '.join(budget.kinds)} as far as max_ratio={budget.max_ratio} and "
            f"min_channels={budget.min_channels} allow removes {1 - reached / baseline:.1%} "
            f"of the {'FLOPs' if budget.target == 'flops' else 'predicted time'}."
        )

    if budget.mode == "cost":
        if not eligible:
            select_channels(groups, scores, budget.deepest(), original)  # the one-line refusal
        if budget.weighting == "sensitivity" and sensitivity is None:
            raise ValueError("weighting 'sensitivity' needs the measured sensitivity of every eligible group")
        unit_scores = {g.name: _unit_scores(g, scores) for g in eligible}
        floors, steps = _cost_floors(eligible, budget, full, current)
        widths = select_by_cost(
            eligible, unit_scores, floors, steps, cost_model, target, current,
            sensitivity=sensitivity if budget.weighting == "sensitivity" else None,
        )  # fmt: skip
        reached = cost_model.predict({**current, **widths})
        if reached > target * (1 + 1e-9):
            raise out_of_reach(reached)
        return {
            g.name: _top_channels(g, unit_scores[g.name], widths[g.name])
            for g in eligible
            if widths[g.name] < g.size
        }

    def predicted(keep: Mapping[str, Sequence[int]]) -> float:
        return cost_model.predict({**current, **{n: len(k) for n, k in keep.items()}})

    cut = budget.deepest()  # the target lies between no cut and this one
    deepest = select_channels(groups, scores, cut, original)
    reached = predicted(deepest)
    if reached > target:
        raise out_of_reach(reached)
    low, high, best = 0.0, cut.amount, deepest
    for _ in range(max_steps):
        if reached >= target * (1 - tolerance):
            break
        middle = (low + high) / 2
        keep = select_channels(groups, scores, cut.with_amount(middle), original)
        cost = predicted(keep)
        if cost <= target:
            high, best, reached = middle, keep, cost
        else:
            low = middle
    return best


def _cost_floors(
    eligible: Sequence[ChannelGroup], budget: Budget, full: Mapping[str, int], current: Mapping[str, int]
) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Per eligible group, the narrowest width mode "cost" may leave (the floor of `full`,
    rounded up to the step, never above `current`) and the step it removes at a time."""
    steps = {g.name: math.lcm(g.unit, budget.round_to) for g in eligible}
    floors = {}
    for g in eligible:
        floor = _floor(g, full[g.name], budget.max_ratio, budget.min_channels)
        floors[g.name] = min(math.ceil(floor / steps[g.name]) * steps[g.name], current[g.name])
    return floors, steps


def probe_keeps(
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, torch.Tensor],
    budget: Budget,
    original: Optional[Mapping[str, int]] = None,
    share: float = 0.5,
) -> Dict[str, Tuple[int, List[int]]]:
    """The cuts whose loss rise calibrates weighting "sensitivity": per eligible group that can
    still lose a step, the keep set without its lowest-scored units down `share` of the way to
    the floor mode "cost" would stop at (at least one step), with the number of units it
    removes. Each is tried alone: every other group stays whole."""
    current = {g.name: g.size for g in groups}
    full = {**current, **(original or {})}
    eligible = budget.eligible(groups)
    floors, steps = _cost_floors(eligible, budget, full, current)
    probes = {}
    for g in eligible:
        room = (current[g.name] - floors[g.name]) // steps[g.name]
        if room < 1:
            continue
        width = current[g.name] - max(1, round(room * share)) * steps[g.name]
        probes[g.name] = ((g.size - width) // g.unit, _top_channels(g, _unit_scores(g, scores), width))
    return probes


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
