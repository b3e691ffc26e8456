"""Pruning schedules: event iterations, cumulative targets (linear, cubic), and budgets that
reach each target relative to the unpruned model however many events it takes."""

import pytest
import torch

from d2prune.complexity import count_params
from d2prune.criteria import build
from d2prune.pruning import ChannelGroup, channel_spec, find_groups, prune
from d2prune.pruning.budget import Budget, select_channels, select_for_flops
from d2prune.pruning.schedule import PruningSchedule, cumulative_targets, event_iters

from . import models


def test_event_iterations_are_spread_evenly_and_distinct():
    assert event_iters(10, 40, 4) == [10, 20, 30, 40]
    assert event_iters(5, 5, 1) == [5]
    assert event_iters(0, 2, 3) == [0, 1, 2]
    assert event_iters(1, 4, 3) == [1, 3, 4]  # 2.5 rounds up
    with pytest.raises(ValueError):
        event_iters(0, 1, 3)


def test_linear_and_cubic_targets_are_cumulative():
    assert cumulative_targets(0.5, 3, "linear") == pytest.approx([0.5 / 3, 1 / 3, 0.5])
    # Zhu & Gupta 2017: r_k = r * (1 - (1 - k/n)^3); with n = 3: 19/27 and 26/27 of r.
    cubic = cumulative_targets(0.5, 3, "cubic")
    assert cubic == pytest.approx([0.5 * 19 / 27, 0.5 * 26 / 27, 0.5])
    assert cubic[0] > cumulative_targets(0.5, 3)[0]  # cubic front-loads the removal
    schedule = PruningSchedule.build("oneshot", 0.4, start=7, end=99, num_events=5)
    assert schedule.iters == [7] and schedule.targets == [0.4]
    schedule = PruningSchedule.build("iterative", 0.6, start=0, end=20, num_events=3)
    assert schedule.iters == [0, 10, 20] and schedule.targets == pytest.approx([0.2, 0.4, 0.6])


def _shrink(groups, scores, keep):
    """The groups and scores after `prune` with `keep`, as they would be found again."""
    groups = [
        ChannelGroup(g.name, g.kind, len(keep.get(g.name, range(g.size))), g.producers, g.consumers)
        for g in groups
    ]
    scores = {n: s[keep[n]] if n in keep else s for n, s in scores.items()}
    return groups, scores


def _prune_in_steps(groups, scores, targets, **fields):
    original = {g.name: g.size for g in groups}
    budget = Budget("channels", 0.0, **fields)
    widths = []
    for target in targets:
        keep = select_channels(groups, scores, budget.with_amount(target), original)
        groups, scores = _shrink(groups, scores, keep)
        widths.append({g.name: g.size for g in groups})
    return widths


def test_local_steps_reach_the_cumulative_widths_of_the_original():
    groups = [ChannelGroup(n, "block", s, [n], []) for n, s in [("a", 64), ("b", 100), ("c", 30)]]
    generator = torch.Generator().manual_seed(0)
    scores = {g.name: torch.rand(g.size, generator=generator) for g in groups}
    targets = cumulative_targets(0.5, 3)
    widths = _prune_in_steps(groups, scores, targets, min_channels=1)
    # After event k each group has lost floor(r_k * original) channels, not r_k of its current
    # width (which would compound to 64 -> 54 -> 44 -> 33 instead of 54, 43, 32).
    assert [w["a"] for w in widths] == [54, 43, 32]
    assert [w["b"] for w in widths] == [84, 67, 50]
    one_step = select_channels(groups, scores, Budget("channels", 0.5, min_channels=1))
    assert widths[-1] == {n: len(k) for n, k in one_step.items()}


def test_global_steps_respect_max_ratio_of_the_original():
    groups = [ChannelGroup("a", "block", 64, ["a"], []), ChannelGroup("b", "block", 64, ["b"], [])]
    # 40 channels of "a" rank below every channel of "b" (on group-normalised scores).
    scores = {"a": torch.tensor([0.01] * 40 + [1.99] * 24), "b": torch.full((64,), 50.0)}
    widths = _prune_in_steps(
        groups, scores, [0.2, 0.4, 0.5], mode="global", max_ratio=0.5, min_channels=1
    )
    # "a" may lose only half of its original 64 channels in all; a floor relative to its
    # current width (39 after the first event) would let it lose all 40 weak ones.
    assert [w["a"] for w in widths] == [64 - 25, 32, 32]
    assert [w["a"] + w["b"] for w in widths] == [128 - 25, 128 - 51, 128 - 64]


def test_flops_steps_are_relative_to_the_original_baseline():
    model = models.build("faster_rcnn_R18_FPN")
    original, baseline = channel_spec(model), count_params(model)
    options = dict(measure=count_params, original=original, baseline=baseline)
    budget = Budget("flops", 0.2)
    reached = []
    for target in (0.1, 0.2):
        groups = find_groups(model)
        scores = build("l1").score(model, groups)
        prune(model, select_for_flops(model, groups, scores, budget.with_amount(target), **options))
        reached.append(1 - count_params(model) / baseline)
    # Relative to the current model the second step would reach 1 - 0.9 * 0.8 = 28 %.
    assert 0.1 <= reached[0] <= 0.115 and 0.2 <= reached[1] <= 0.215
    groups = find_groups(model)
    scores = build("l1").score(model, groups)
    assert select_for_flops(model, groups, scores, budget.with_amount(0.15), **options) == {}
