"""Data-driven criteria and their shared statistics collector: channels built to be useless rank
lowest, and collecting leaves the model exactly as it was.
"""

import pytest
import torch

from d2prune.criteria import available, build
from d2prune.criteria.collector import collect_statistics
from d2prune.criteria.rank import channel_independence
from d2prune.errors import UserError
from d2prune.pruning import find_groups

from . import models
from .prune_helpers import statistics_on_two_ranks

torch.set_num_threads(2)

BLOCK = "backbone.bottom_up.res3.1.conv1"  # a block group: one conv producer with FrozenBN
FC = "roi_heads.box_head.fc1"  # a head group produced by a Linear layer
DEAD = {BLOCK: 5, FC: 7}  # the channel made constant zero in each

# Every data-driven criterion; `taylor` also in its 2019 variant, and options that keep hrank and
# chip quick. `mi` is left out of the zero-channel test: its Miller-Madow bias correction puts
# channels that carry little below zero, under the constant one (test_criteria_information
# checks that the constant and a noise channel come last).
DATA_CRITERIA = [name for name in available() if build(name).data != "none"]
OPTIONS = {"hrank": {"images": 2}, "chip": {"images": 1, "positions": 32}}
CRITERIA = [(name, OPTIONS.get(name, {})) for name in DATA_CRITERIA if name != "mi"]
CRITERIA.append(("taylor", {"variant": "2019"}))


def _batches(n: int = 1):
    return [models.with_targets(models.images(2, seed=seed)) for seed in range(n)]


def _score(model, groups, name, batches=None, **options):
    criterion = build(name, **options)
    stats = collect_statistics(model, groups, criterion, batches or _batches())
    return criterion.score(model, groups, stats)


def _hooks(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


@pytest.fixture(scope="module")
def useless():
    """R18-FPN whose DEAD channels output constant zero while every other channel fires."""
    model = models.build("faster_rcnn_R18_FPN")
    modules = dict(model.named_modules())
    conv, fc = modules[BLOCK], modules[FC]
    with torch.no_grad():
        # Many channels of the random model never fire, a tie at zero for APoZ and Taylor: its
        # activations are tens in size, so a bias of 50 makes the block's fire, and the fc
        # layer's after scaling its weights down (its inputs grew with the block's bias).
        conv.norm.bias += 50.0
        fc.weight *= 0.01
        fc.bias.fill_(10.0)
        conv.weight[DEAD[BLOCK]] = 0.0
        conv.norm.weight[DEAD[BLOCK]] = 0.0
        conv.norm.bias[DEAD[BLOCK]] = 0.0
        fc.weight[DEAD[FC]] = 0.0
        fc.bias[DEAD[FC]] = 0.0
    return model, find_groups(model)


@pytest.mark.parametrize("name, options", CRITERIA, ids=[f"{n}{o.get('variant', '')}" for n, o in CRITERIA])
def test_a_zero_channel_ranks_strictly_lowest(useless, name, options):
    model, groups = useless
    scores = _score(model, groups, name, **options)
    assert list(scores) == [g.name for g in groups]
    # R18's stem feeds res2's identity shortcuts, so it is part of the res2 stream.
    assert {g.kind for g in groups} == {"block", "stage", "fpn", "head"}
    for group in groups:
        s = scores[group.name]
        assert s.shape == (group.size,) and s.dtype == torch.float32, group.name
        assert torch.isfinite(s).all(), group.name
    for group_name, channel in DEAD.items():
        s = scores[group_name]
        others = torch.cat([s[:channel], s[channel + 1:]])
        assert abs(s[channel]) < 1e-6, group_name
        assert s[channel] < others.min(), group_name


def test_channel_independence_is_the_drop_in_nuclear_norm():
    generator = torch.Generator().manual_seed(0)
    # Both Gram matrices (A A^T and A^T A), square, and rows scaled over five decades.
    for shape, decades in [((6, 10), 0), ((10, 6), 0), ((48, 48), 0), ((40, 64), 5), ((64, 40), 5)]:
        A = torch.randn(shape, generator=generator, dtype=torch.float64)
        A *= torch.logspace(-decades, 0, len(A), dtype=torch.float64)[:, None]
        A[2] = 0.0
        A[4] = A[1]
        nuclear = torch.linalg.matrix_norm(A, "nuc")
        expected = [nuclear - torch.linalg.matrix_norm(A * (torch.arange(len(A)) != c)[:, None], "nuc")
                    for c in range(len(A))]
        ci = channel_independence(A)
        # The Gram matrix squares singular values: a zero one comes back as sqrt(eps) * scale.
        assert torch.allclose(ci, torch.stack(expected), atol=1e-6 * nuclear)
        assert 0 <= ci[2] < 1e-6 * nuclear
        assert ci[4] <= (2**0.5 - 1) * A[4].norm()


def test_chip_scores_a_duplicated_channel_low():
    model = models.build("faster_rcnn_R18_FPN")
    groups = [g for g in find_groups(model) if g.name == BLOCK]
    conv = dict(model.named_modules())[BLOCK]
    with torch.no_grad():
        for tensor in (conv.weight, conv.norm.weight, conv.norm.bias, conv.norm.running_mean,
                       conv.norm.running_var):
            tensor[9] = tensor[3]
    maps = []
    conv.register_forward_hook(lambda module, inputs, output: maps.append(output.clone()))
    # 256 positions cover the whole 8 x 12 map: no sampling, so the bound below is exact.
    stats = collect_statistics(model, groups, build("chip", images=2, positions=256), _batches())
    ci = stats[BLOCK].result()
    A = maps[0].flatten(2).double()  # (images, channels, positions)
    assert torch.allclose(ci, torch.stack([channel_independence(a) for a in A]).mean(0))
    assert torch.allclose(ci[3], ci[9])
    # Rows [B; a; a] have the singular values of [B; sqrt(2) a; 0], so removing one copy of a
    # lowers the nuclear norm by at most (sqrt(2) - 1) ||a||; without its copy, channel 3 is
    # above that bound.
    bound = (2**0.5 - 1) * A[:, 3].norm(dim=1).mean()
    unique = torch.stack([channel_independence(a[torch.arange(len(a)) != 9])[3] for a in A])
    assert ci[3] <= bound * (1 + 1e-6) < unique.mean()


def test_scores_are_repeatable(useless):
    # The box head's rows come from proposal sampling and CHIP samples positions of them.
    model, groups = useless[0], [g for g in useless[1] if g.name in DEAD]
    a = _score(model, groups, "chip", images=1, positions=32)
    b = _score(model, groups, "chip", images=1, positions=32)
    assert all(torch.equal(a[g.name], b[g.name]) for g in groups)


def test_collecting_leaves_the_model_as_it_was():
    # BatchNorm with running statistics, frozen stages (FREEZE_AT 2), mixed train/eval modes
    # and gradients already in `.grad`: all must come out as they went in.
    model = models.build_fresh("faster_rcnn_R18_FPN", opts=["MODEL.RESNETS.NORM", "BN"]).train()
    model.roi_heads.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable[:3]:
        p.grad = torch.randn_like(p)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    hooks, rng = _hooks(model), torch.get_rng_state()

    _score(model, find_groups(model), "taylor")

    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [None if p.grad is None else p.grad for p in model.parameters()].count(None) == grads.count(None)
    assert all(a is None or torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert _hooks(model) == hooks
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_failing_batch_leaves_no_hooks_behind():
    model = models.build("faster_rcnn_R18_FPN")
    flags = [p.requires_grad for p in model.parameters()]

    def batches():
        yield from _batches()
        raise RuntimeError("the data loader died")

    with pytest.raises(RuntimeError, match="died"):
        collect_statistics(model, find_groups(model), build("taylor"), batches())
    assert _hooks(model) == 0
    assert not any(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_statistics_are_summed_across_processes(useless, monkeypatch):
    model, groups = useless
    criterion, batches = build("mean_activation"), _batches()
    alone, together, reduced = statistics_on_two_ranks(model, groups, criterion, batches, monkeypatch)
    assert len(reduced) == 1  # one collective for all sums
    for name, acc in alone.items():
        assert torch.equal(together[name].sums["count"], 2 * acc.sums["count"]), name
    a, b = criterion.score(model, groups, alone), criterion.score(model, groups, together)
    assert all(torch.allclose(a[g.name], b[g.name]) for g in groups)


@pytest.mark.parametrize("name", DATA_CRITERIA)
def test_data_criteria_need_statistics(useless, name):
    model, groups = useless
    assert build(name).data in ("images", "targets")
    with pytest.raises(UserError, match=f"'{name}' needs images"):
        build(name).score(model, groups)


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="variant must be '2017' or '2019'"):
        build("taylor", variant="2018")
    with pytest.raises(UserError, match="positions must be a positive integer"):
        build("chip", positions=0)
    with pytest.raises(UserError, match="images must be a positive integer"):
        build("hrank", images=1.5)
    with pytest.raises(UserError, match="no statistics for"):
        model = models.build("faster_rcnn_R18_FPN")
        build("apoz").score(model, find_groups(model), stats={})
