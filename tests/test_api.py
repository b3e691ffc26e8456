"""`d2prune.api.prune_model`, the one call for people with their own training loop: it prunes in
place with the same selection as the pruning events and returns the new channel spec."""

import pytest
import torch

from d2prune.api import prune_model
from d2prune.criteria import build
from d2prune.criteria.collector import collect_statistics
from d2prune.errors import UserError
from d2prune.pruning import channel_spec, find_groups
from d2prune.pruning.budget import Budget, select_channels

from . import models

CONV = "backbone.bottom_up.res3.0.conv1"  # a block group with one producer


def _batches():
    return [models.with_targets(models.images(2, seed=seed)) for seed in range(2)]


def test_l1_keeps_the_heaviest_filters_and_returns_the_spec():
    model = models.build("faster_rcnn_R18_FPN")
    original = channel_spec(model)
    kinds = {g.name: g.kind for g in find_groups(model)}
    weight = dict(model.named_modules())[CONV].weight.detach().clone()
    heaviest = weight.flatten(1).abs().sum(1).topk(original[CONV] // 2).indices.sort().values

    spec = prune_model(model, "l1", budget={"target": "channels", "amount": 0.5})

    assert spec == channel_spec(model)
    assert spec == {n: w - w // 2 if kinds[n] == "block" else w for n, w in original.items()}
    assert torch.equal(dict(model.named_modules())[CONV].weight, weight[heaviest])
    with torch.no_grad():
        assert len(model(models.images(1))[0]["instances"]) > 0  # it still runs


def test_taylor_scores_on_the_batches_as_the_pruning_events_do():
    model, reference = models.build("faster_rcnn_R18_FPN"), models.build("faster_rcnn_R18_FPN")
    budget = Budget("channels", 0.3, mode="global", kinds=("block", "fpn"))
    batches = _batches()

    spec = prune_model(model, "taylor", budget=budget, batches=batches)

    groups = find_groups(reference)
    criterion = build("taylor")
    scores = criterion.score(reference, groups, collect_statistics(reference, groups, criterion, batches))
    keep = select_channels(groups, scores, budget)
    original = channel_spec(reference)
    assert spec == {n: len(keep[n]) if n in keep else w for n, w in original.items()}
    removed = sum(original[n] - spec[n] for n in spec)
    eligible = sum(w for g, w in zip(groups, original.values()) if g.kind in ("block", "fpn"))
    assert removed == pytest.approx(0.3 * eligible, abs=2)
    assert len({original[n] - spec[n] for n in keep}) > 1  # global: groups lose different shares


def test_a_second_call_relative_to_the_original_ends_where_one_call_does():
    once, twice = models.build("faster_rcnn_R18_FPN"), models.build("faster_rcnn_R18_FPN")
    original = channel_spec(twice)
    expected = prune_model(once, budget={"target": "channels", "amount": 0.5})
    prune_model(twice, budget={"target": "channels", "amount": 0.25})
    assert prune_model(twice, budget={"target": "channels", "amount": 0.5}, original=original) == expected


def test_faults_are_one_line_errors():
    model = models.build("faster_rcnn_R18_FPN")
    with pytest.raises(UserError, match="criterion 'taylor' needs training batches"):
        prune_model(model, "taylor", budget={"target": "channels", "amount": 0.5})
    with pytest.raises(UserError, match="'amout' is not a Budget field"):
        prune_model(model, budget={"target": "channels", "amout": 0.5})
    with pytest.raises(UserError, match="amount must be in"):
        prune_model(model, budget={"target": "channels", "amount": 1.5})
    with pytest.raises(UserError, match="did you mean"):
        prune_model(model, "l11", budget={"target": "channels", "amount": 0.5})
    assert channel_spec(model) == channel_spec(models.build("faster_rcnn_R18_FPN"))
