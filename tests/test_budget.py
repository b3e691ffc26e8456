"""The pruning budget: how many channels each group keeps, and which, under every constraint.

Most cases use hand-made groups and scores; the FLOPs target uses a real model and measures.
"""

import dataclasses
import re

import pytest
import torch

from d2prune.complexity import count_flops, count_params, dummy_tensor
from d2prune.config import setup_cfg
from d2prune.criteria import build
from d2prune.errors import UserError
from d2prune.pruning import ChannelGroup, find_groups, prune
from d2prune.pruning.budget import Budget, select, select_channels, select_for_flops
from d2prune.pruning.kinds import Kind

from . import models
from .conftest import CONFIG

torch.set_num_threads(2)


def group(name, size, kind="block", unit=1):
    return ChannelGroup(name, kind, size, [name + ".conv"], [name + ".next"], unit=unit)


def ramp(size, seed=0):
    """Distinct scores in a shuffled order, so that the kept channels are not simply a prefix."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=generator).float() + 1


def test_local_removes_the_ratio_from_each_group_lowest_first():
    groups = [group("a", 64), group("b", 100), group("c", 30)]
    scores = {g.name: ramp(g.size, i) for i, g in enumerate(groups)}
    keep = select_channels(groups, scores, Budget("channels", 0.25, min_channels=1))
    assert {n: len(k) for n, k in keep.items()} == {"a": 48, "b": 75, "c": 23}  # 30 - 7
    for g in groups:
        assert keep[g.name] == sorted(keep[g.name])
        threshold = scores[g.name].sort(descending=True).values[len(keep[g.name]) - 1]
        assert keep[g.name] == torch.nonzero(scores[g.name] >= threshold).flatten().tolist()


def test_ratio_zero_or_nothing_lost_returns_no_group():
    groups = [group("a", 64)]
    assert select_channels(groups, {"a": ramp(64)}, Budget("channels", 0.0)) == {}
    assert select_channels(groups, {"a": ramp(64)}, Budget("channels", 0.01)) == {}  # 0.64 channels: none


def test_global_ranks_normalised_scores_across_groups():
    # "a": half its channels far below its mean, "b": all at its mean, on another scale.
    a = torch.cat([torch.full((32,), 0.01), torch.full((32,), 1.99)])
    groups, scores = [group("a", 64), group("b", 64)], {"a": a, "b": torch.full((64,), 50.0)}
    keep = select_channels(groups, scores, Budget("channels", 0.4, mode="global", min_channels=1))
    # 51 channels go: the 32 low ones of "a", then 19 of "b", whose normalised 1.0 < 1.99.
    assert keep["a"] == list(range(32, 64))
    assert len(keep["b"]) == 64 - 19


def test_global_respects_max_ratio_and_min_channels():
    a = torch.cat([torch.full((60,), 0.001), torch.full((4,), 10.0)])
    groups = [group("a", 64), group("b", 64), group("tiny", 10)]
    scores = {"a": a, "b": ramp(64) + 100, "tiny": torch.tensor([0.001] * 9 + [100.0])}
    keep = select_channels(groups, scores, Budget("channels", 0.5, mode="global", max_ratio=0.5))
    assert len(keep["a"]) == 32  # its 60 low channels would go, but at most half may
    assert len(keep["tiny"]) == 8  # min_channels
    assert len(keep["b"]) == 32  # so 66 channels go, short of the 69 that ratio asks for
    keep = select_channels(groups, scores, Budget("channels", 0.5, max_ratio=0.3, min_channels=40))
    assert {n: len(k) for n, k in keep.items()} == {"a": 45, "b": 45}  # tiny: 10 < 40, whole


@pytest.mark.parametrize("mode", ["local", "global"])
def test_round_to_makes_widths_multiples(mode):
    groups = [group(f"g{i}", size) for i, size in enumerate([64, 96, 128, 200])]
    scores = {g.name: ramp(g.size, i) for i, g in enumerate(groups)}
    keep = select_channels(groups, scores, Budget("channels", 0.3, mode=mode, round_to=8))
    assert keep and all(len(k) % 8 == 0 for k in keep.values())
    if mode == "local":  # kept counts round up: 64 * 0.7 = 44.8 -> 45 -> 48
        assert len(keep["g0"]) == 48 and len(keep["g3"]) == 144  # 140 -> 144


@pytest.mark.parametrize("mode", ["local", "global"])
def test_group_norm_units_go_whole(mode):
    groups = [group("gn", 32, kind="fpn", unit=4), group("b", 32)]
    score = torch.ones(32)
    score[[1, 6, 11, 12, 13, 14, 15]] = 0.0  # unit 3 is the weakest on average
    budget = Budget("channels", 0.25, mode=mode, kinds=("fpn", "block"), min_channels=1)
    keep = select_channels(groups, {"gn": score, "b": ramp(32)}, budget)
    units = {i // 4 for i in range(32)} - {i // 4 for i in keep["gn"]}
    assert all(sum(i // 4 == u for i in keep["gn"]) == 4 for u in {i // 4 for i in keep["gn"]})
    assert 3 in units and len(keep["gn"]) % 4 == 0


def test_kinds_and_exclude_choose_the_groups():
    groups = [
        group("backbone.bottom_up.res2", 64, kind="stage"),
        group("backbone.bottom_up.res2.0.conv1", 64),
        group("backbone.bottom_up.res3.0.conv1", 64),
        group("backbone.fpn", 64, kind="fpn"),
    ]
    scores = {g.name: ramp(64, i) for i, g in enumerate(groups)}
    assert set(select_channels(groups, scores, Budget("channels", 0.5))) == {
        "backbone.bottom_up.res2.0.conv1",
        "backbone.bottom_up.res3.0.conv1",
    }
    budget = Budget("channels", 0.5, kinds=("block", "stage", "fpn"), exclude=[r"res2\b", "fpn$"])
    assert [g.name for g in budget.eligible(groups)] == ["backbone.bottom_up.res3.0.conv1"]
    assert set(select_channels(groups, scores, budget)) == {"backbone.bottom_up.res3.0.conv1"}


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(target="energy"), "target must be one of 'channels', 'flops', 'latency', got 'energy'."),
        (dict(amount=1.0), "amount must be in [0, 1), got 1.0."),
        (dict(amount=-0.1), "amount must be in [0, 1), got -0.1."),
        (dict(amount="0.5"), "amount must be in [0, 1), got '0.5'."),
        (dict(target="flops", amount=1.5), "amount must be in [0, 1), got 1.5."),
        (dict(mode="layer"), "mode must be one of 'local', 'global', 'cost', got 'layer'."),
        (dict(kinds=("blocks",)), "unknown group kind 'blocks'; allowed: stem, block, stage, fpn, head."),
        (dict(kinds="block"), "kinds must be a list of group kinds, got 'block'."),
        (dict(exclude="conv"), "exclude must be a list of regular expressions, got 'conv'."),
        (dict(exclude=["res[2"]), "exclude pattern 'res[2' is invalid: "),
        (dict(max_ratio=0), "max_ratio must be in (0, 1], got 0."),
        (dict(min_channels=0), "min_channels must be a positive integer, got 0."),
        (dict(round_to=2.5), "round_to must be a positive integer, got 2.5."),
        (dict(round_to=True), "round_to must be a positive integer, got True."),
    ],
)
def test_each_bad_field_is_refused_in_one_line(fields, message):
    fields = {"target": "channels", "amount": 0.5, **fields}
    with pytest.raises(UserError, match="^pruning budget: " + re.escape(message)) as error:
        Budget(**fields)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(exclude=["conv"]), "no channel group of kinds block is left after exclude ['conv']"),
        (dict(min_channels=64), "min_channels=64 and max_ratio=0.9 leave every eligible group whole"),
    ],
)
def test_budgets_that_remove_nothing_are_user_errors(fields, message):
    groups = [group("a.conv1", 64), group("b.conv1", 32)]
    scores = {"a.conv1": ramp(64), "b.conv1": ramp(32)}
    with pytest.raises(UserError, match=re.escape(message)):
        select_channels(groups, scores, Budget("channels", 0.5, **fields))


def test_scores_that_do_not_fit_their_group_are_a_bug():
    budget = Budget("channels", 0.5)
    with pytest.raises(ValueError, match="shape"):
        select_channels([group("a", 64)], {"a": ramp(32)}, budget)
    with pytest.raises(ValueError, match="finite"):
        select_channels([group("a", 64)], {"a": torch.full((64,), float("nan"))}, budget)
    with pytest.raises(ValueError, match="takes a channels budget"):
        select_channels([group("a", 64)], {"a": ramp(64)}, Budget("flops", 0.5))


def test_budget_is_frozen_hashable_and_grows_by_amount():
    budget = Budget("channels", 0.3, kinds=["block", Kind.FPN], exclude=["res2"])
    assert budget.kinds == ("block", "fpn") and budget.exclude == ("res2",)
    assert budget == Budget("channels", 0.3, kinds=("block", "fpn"), exclude=("res2",))
    assert hash(budget) == hash(Budget("channels", 0.3, kinds=("block", "fpn"), exclude=("res2",)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        budget.amount = 0.5
    grown = budget.with_amount(0.6)
    assert grown.amount == 0.6 and grown.kinds == budget.kinds and budget.amount == 0.3
    assert len({budget, grown, budget.with_amount(0.3)}) == 2
    with pytest.raises(UserError, match="amount must be in"):
        budget.with_amount(1.0)  # replacing validates again
    assert budget.describe() == "ratio 0.3, local"


def test_budget_from_config():
    budget = Budget.from_config(setup_cfg(CONFIG))
    assert budget == Budget(
        "channels", 0.5, mode="local", kinds=("block",), exclude=(), max_ratio=0.9, min_channels=8,
        round_to=1,
    )  # fmt: skip
    opts = [
        "PRUNE.RATIO", "0.2", "PRUNE.FLOPS_REDUCTION", "0.3", "PRUNE.KINDS", "['block', 'stage']",
        "PRUNE.EXCLUDE", "['res2']", "PRUNE.MAX_RATIO", "0.7", "PRUNE.MIN_CHANNELS", "4",
        "PRUNE.ROUND_TO", "8",
    ]  # fmt: skip
    budget = Budget.from_config(setup_cfg(CONFIG, opts))
    fields = dict(kinds=("block", "stage"), exclude=("res2",), max_ratio=0.7, min_channels=4, round_to=8)
    assert budget == Budget("flops", 0.3, **fields)  # FLOPS_REDUCTION > 0 overrides RATIO
    assert budget.describe() == "FLOPs reduction 0.3 (global)"
    assert budget.deepest() == Budget("channels", 0.7, mode="global", **fields)
    with pytest.raises(UserError, match=r"^pruning budget: mode must be"):
        Budget.from_config(setup_cfg(CONFIG, ["PRUNE.MODE", "layer"]))


@pytest.fixture(scope="module")
def r18():
    model = models.build("faster_rcnn_R18_FPN")
    groups = find_groups(model)
    return model, groups, build("l1").score(model, groups)


def _pruned(model, keep):
    model = models.build("faster_rcnn_R18_FPN")
    prune(model, keep)
    return model


def test_flops_target_is_reached_and_monotone(r18):
    model, groups, scores = r18
    kinds = ("block", "stage", "head")
    reached, widths = [], []
    for target in (0.25, 0.5):
        keep = select(model, groups, scores, Budget("flops", target, kinds=kinds), measure=count_params)
        reduction = 1 - count_params(_pruned(model, keep)) / count_params(model)
        assert target <= reduction <= target + 0.01
        reached.append(reduction)
        widths.append({g.name: len(keep.get(g.name, range(g.size))) for g in groups})
    assert reached == sorted(reached)
    for narrower, wider in zip(widths[1:], widths):
        assert all(narrower[n] <= wider[n] for n in wider)


def test_flops_target_with_backbone_flops(r18):
    model, groups, scores = r18
    x = dummy_tensor(64)

    def backbone_flops(m):
        return count_flops(m.backbone, x)["total"]

    budget = Budget("flops", 0.3, kinds=("block", "stage", "fpn"), round_to=8)
    keep = select_for_flops(model, groups, scores, budget, measure=backbone_flops, tolerance=0.02)
    reduction = 1 - backbone_flops(_pruned(model, keep)) / backbone_flops(model)
    assert 0.3 <= reduction <= 0.32
    assert all(len(k) % 8 == 0 for k in keep.values())


def test_flops_target_out_of_reach_is_a_user_error(r18):
    model, groups, scores = r18
    too_deep = Budget("flops", 0.9, max_ratio=0.5)
    with pytest.raises(UserError, match=r"FLOPs reduction 0\.9 is out of reach; .* removes \d+\.\d% of"):
        select_for_flops(model, groups, scores, too_deep, measure=count_params)
    assert select_for_flops(model, groups, scores, Budget("flops", 0.0), measure=count_params) == {}
    with pytest.raises(ValueError, match="takes a FLOPs budget"):
        select_for_flops(model, groups, scores, Budget("channels", 0.5), measure=count_params)


def test_select_dispatches_on_the_target(r18):
    model, groups, scores = r18
    budget = Budget("channels", 0.5, mode="global", kinds=("block", "fpn"))
    assert select(model, groups, scores, budget) == select_channels(groups, scores, budget)
