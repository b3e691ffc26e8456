"""Information criteria: the bias-corrected estimator on known distributions, ground truth mapped
onto feature maps, and entropy / mi / mRMR scores that put channels carrying nothing last, the
same on every process.
"""

import copy
import math

import pytest
import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm

from d2prune.config import add_prune_config
from d2prune.criteria import build, information  # importing information registers entropy, mi
from d2prune.criteria.collector import _all_reduce, collect_statistics
from d2prune.criteria.information import class_information, mutual_information
from d2prune.criteria.targets import box_masks, image_positions, position_labels
from d2prune.engine.selection import build_criterion, choose_keep
from d2prune.errors import UserError
from d2prune.pruning import find_groups

from . import models

torch.set_num_threads(2)

BLOCK = "backbone.bottom_up.res3.1.conv1"  # 128 channels on an 8 x 12 map (stride 8)
FC = "roi_heads.box_head.fc1"  # rows are sampled proposals
DEAD = {BLOCK: 5, FC: 7}  # producer weights and norm zeroed: a constant channel
NOISE = {BLOCK: 11, FC: 13}  # replaced by random values, independent of images and targets
COLOURS = torch.tensor([[230.0, 40.0, 40.0], [40.0, 230.0, 40.0], [40.0, 40.0, 230.0]])


def _plug_in(joint: torch.Tensor) -> torch.Tensor:
    """I = sum p log(p / (p_x p_y)), written out independently of the code under test."""
    p = joint.double() / joint.sum((-2, -1), keepdim=True)
    outer = p.sum(-1, keepdim=True) * p.sum(-2, keepdim=True)
    return torch.where(p > 0, p * (p / outer).log(), 0.0).sum((-2, -1))


def _table(x: torch.Tensor, y: torch.Tensor, nx: int, ny: int) -> torch.Tensor:
    """Count tables (..., nx, ny) of samples x, y of shape (..., n)."""
    cells = torch.nn.functional.one_hot(x * ny + y, nx * ny).sum(-2)
    return cells.view(*x.shape[:-1], nx, ny).double()


def test_independent_variables_carry_no_information():
    g = torch.Generator().manual_seed(0)
    n = 100_000
    joint = _table(torch.randint(16, (n,), generator=g), torch.randint(4, (n,), generator=g), 16, 4)
    # The plug-in estimate is biased up by (16 - 1)(4 - 1) / 2n = 2.25e-4; what is left after
    # the correction is noise of standard deviation sqrt(2 * 45) / 2n = 4.7e-5.
    assert _plug_in(joint) > 1.5e-4
    assert abs(mutual_information(joint)) < 1.5e-4


def test_a_function_of_x_tells_its_whole_entropy():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(16, (100_000,), generator=g)
    joint = _table(x, x % 4, 16, 4)
    info = mutual_information(joint).item()
    assert info == pytest.approx(math.log(4), rel=1e-3)
    # Exactly: the plug-in value (H(Y)) plus (16 + 4 - 16 - 1) / 2n.
    assert info == pytest.approx(_plug_in(joint).item() + 3 / 200_000, abs=1e-12)


def test_miller_madow_removes_most_of_the_small_sample_bias():
    g = torch.Generator().manual_seed(0)
    trials, n = 2000, 200
    # X uniform on 8 values; Y = X mod 3, replaced by a uniform draw with probability 1/2.
    x = torch.randint(8, (trials, n), generator=g)
    y = torch.where(torch.rand(trials, n, generator=g) < 0.5, x % 3, torch.randint(3, (trials, n), generator=g))
    p = torch.full((8, 3), 0.5 / 24, dtype=torch.float64)
    p[torch.arange(8), torch.arange(8) % 3] += 0.5 / 8
    truth = _plug_in(p)
    joint = _table(x, y, 8, 3)
    plug_in_bias = _plug_in(joint).mean() - truth
    corrected_bias = mutual_information(joint).mean() - truth
    assert plug_in_bias > 0.02  # about (8 - 1)(3 - 1) / 2n = 0.035
    assert abs(corrected_bias) < plug_in_bias / 4


def test_class_information_is_one_class_against_the_rest():
    # Channel 0's bin 0 holds exactly the positions of class 1 (label 2); channel 1's bins hold
    # every label in the same proportions.
    joint = torch.zeros(2, 2, 3, dtype=torch.float64)
    joint[0, 0, 2] = 30
    joint[0, 1, :2] = torch.tensor([50.0, 20.0])
    joint[1, :, :] = torch.tensor([25.0, 10.0, 15.0])
    info = class_information(joint)
    assert info.shape == (2, 2)
    n, p = 100, 0.3
    binary = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    # A deterministic one-vs-rest table: H(Y_k) plus Miller-Madow's (2 + 2 - 2 - 1) / 2n.
    assert info[1, 0].item() == pytest.approx(binary + 1 / (2 * n), abs=1e-12)
    assert 0 < info[0, 0] < info[1, 0]  # bin 0 also tells "not class 0", less sharply
    # Independent: the plug-in value is exactly 0, and the correction (2 + 2 - 4 - 1) / 2n.
    assert torch.allclose(info[:, 1], torch.full((2,), -1 / (2 * n), dtype=torch.float64))


def _item(size, boxes, classes):
    instances = Instances(size)
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4))
    instances.gt_classes = torch.tensor(classes, dtype=torch.long)
    return {"image": torch.zeros(3, *size), "instances": instances}


def test_ground_truth_on_feature_maps():
    # A 64 x 96 image and a 40 x 60 one, padded to 64 x 96. A 4 x 6 map has stride 16: centres
    # at y = 8, 24, 40, 56 and x = 8, 24, ..., 88.
    batch = [
        # class 2 over x in [0, 50), y in [0, 34); class 0 over x in [30, 70), y in [16, 60);
        # they overlap at row 1, column 2, where the smaller box (class 2, 1700 px) wins.
        _item((64, 96), [[0, 0, 50, 34], [30, 16, 70, 60]], [2, 0]),
        # class 1 in the small image, and a box of class 2 that contains no centre.
        _item((40, 60), [[40, 20, 60, 40], [4, 4, 8, 8]], [1, 2]),
    ]
    labels = position_labels(batch, (4, 6), (64, 96))
    expected = torch.tensor([
        [[3, 3, 3, 0, 0, 0], [3, 3, 3, 1, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]],
        [[0, 0, 0, 0, 0, 0], [0, 0, 2, 2, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]],
    ])
    assert torch.equal(labels, expected)
    # The stride comes from the padded size: at 2 x 3 (stride 32, centres 16, 48 / 16, 48, 80)
    # the first image's class 2 box holds (0, 0) and (0, 1) wins over class 0 at (0, 1).
    assert torch.equal(position_labels(batch, (2, 3), (64, 96))[0], torch.tensor([[3, 3, 0], [0, 1, 0]]))

    masks = box_masks(batch, (4, 6), (64, 96))
    assert [m.shape for m, _ in masks] == [(2, 4, 6), (2, 4, 6)]
    assert torch.equal(masks[0][1], torch.tensor([2, 0])) and torch.equal(masks[1][1], torch.tensor([1, 2]))
    # Each box covers its own positions, the overlap (row 1, column 2) included.
    assert masks[0][0][0].nonzero().tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert masks[0][0][1].nonzero().tolist() == [[1, 2], [1, 3], [2, 2], [2, 3], [3, 2], [3, 3]]
    # The tiny box covers only the position holding its centre (6, 6).
    assert masks[1][0][1].nonzero().tolist() == [[0, 0]]
    assert torch.equal(masks[1][0][0], expected[1] == 2)

    inside = image_positions(batch, (4, 6), (64, 96))
    assert inside[0].all()
    assert inside[1].nonzero()[:, 0].unique().tolist() == [0, 1]  # y centres 8, 24 < 40
    assert inside[1].nonzero()[:, 1].unique().tolist() == [0, 1, 2, 3]  # x centres up to 56 < 60


def test_ground_truth_is_required():
    with pytest.raises(UserError, match="input 0 of the batch has no 'instances'"):
        position_labels(models.images(1), (4, 6), (64, 96))


def scenes(n: int, seed: int):
    """`n` training inputs in which objects are visible: three boxes of random size and place,
    each filled with its class's colour and some texture, over a grey noisy background (the
    smallest box painted last, as `position_labels` gives it the overlap)."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([models.WIDTH, models.HEIGHT], dtype=torch.float32)
    batch = []
    for _ in range(n):
        image = 100 + 20 * torch.rand(3, models.HEIGHT, models.WIDTH, generator=g)
        wh = torch.rand(3, 2, generator=g) * torch.tensor([40.0, 30.0]) + torch.tensor([20.0, 16.0])
        xy = torch.rand(3, 2, generator=g) * (size - wh)
        boxes = torch.cat([xy, xy + wh], 1).round()
        classes = torch.randint(3, (3,), generator=g)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for j in area.argsort(descending=True).tolist():
            x0, y0, x1, y1 = boxes[j].long().tolist()
            texture = 30 * torch.rand(3, y1 - y0, x1 - x0, generator=g)
            image[:, y0:y1, x0:x1] = COLOURS[classes[j]][:, None, None] + texture
        instances = Instances((models.HEIGHT, models.WIDTH))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = classes
        batch.append({"image": image, "height": models.HEIGHT, "width": models.WIDTH, "instances": instances})
    return batch


BATCHES = [scenes(2, seed) for seed in range(3)]
# Relevance (binned) and redundancy (Gaussian, on the continuous values) are both in nats; at
# lambda = 1 the redundancy of this random network's correlated channels outweighs the
# relevance of some informative ones, which then fall below pure noise.
MRMR = {"mi_redundancy": 0.5}


def _noise(channel: int):
    """A forward hook that replaces `channel` by Gaussian noise of the output's scale; it draws
    from the global generator, which collecting seeds, so runs repeat."""

    def hook(module, inputs, output):
        output = output.clone()
        output[:, channel] = torch.randn_like(output[:, channel]) * output.std()
        return output

    return hook


@pytest.fixture(scope="module")
def useless():
    """R18-FPN with a constant and a noise channel in a block group and in box head fc1."""
    model = models.build("faster_rcnn_R18_FPN")
    modules = dict(model.named_modules())
    conv, fc = modules[BLOCK], modules[FC]
    with torch.no_grad():
        conv.weight[DEAD[BLOCK]] = 0.0
        conv.norm.weight[DEAD[BLOCK]] = 0.0
        conv.norm.bias[DEAD[BLOCK]] = 0.0
        fc.weight[DEAD[FC]] = 0.0
        fc.bias[DEAD[FC]] = 0.0
    for name in DEAD:
        modules[name].register_forward_hook(_noise(NOISE[name]))
    return model, find_groups(model)


@pytest.fixture(scope="module")
def scored(useless):
    """name -> (criterion, statistics) on BATCHES for entropy and mi with redundancy, and the
    classes detectron2's sampler gave the proposals meanwhile."""
    model, groups = useless
    heads = model.roi_heads
    sample, sampled = heads.label_and_sample_proposals, []

    def recorder(*args, **kwargs):
        proposals = sample(*args, **kwargs)
        sampled.append(torch.cat([p.gt_classes for p in proposals]))
        return proposals

    heads.label_and_sample_proposals = recorder
    out = {}
    try:
        for name, options in (("entropy", {}), ("mi", MRMR)):
            criterion = build(name, **options)
            out[name] = criterion, collect_statistics(model, groups, criterion, BATCHES)
        # mi's own recording of the sampler is gone again, the one that was there before kept.
        assert vars(heads)["label_and_sample_proposals"] is recorder
    finally:
        del heads.label_and_sample_proposals
    out["sampled"] = torch.cat(sampled[len(BATCHES):])  # those of the mi run
    return out


def test_entropy_puts_a_constant_channel_last(useless, scored):
    model, groups = useless
    criterion, stats = scored["entropy"]
    scores = criterion.score(model, groups, stats)
    assert list(scores) == [g.name for g in groups]
    assert all(torch.isfinite(s).all() and s.shape == (g.size,) for g, s in zip(groups, scores.values()))
    for name, channel in DEAD.items():
        s = stats[name].result()
        assert s[channel] == 0.0, name
        # Six images in 16 bins: at least 5 in one bin and 1 in another, 0.45 nats, at most log 6.
        assert torch.cat([s[:channel], s[channel + 1:]]).min() > 0.3, name
    assert stats[BLOCK].result().max() <= math.log(6) + 1e-9
    assert stats[FC].result().max() <= math.log(16) + 1e-9  # 192 proposals in 16 bins


@pytest.mark.parametrize("term", ["relevance", "mrmr"])
def test_mi_puts_constant_and_noise_channels_last(useless, scored, term):
    model, groups = useless
    criterion, stats = scored["mi"]
    scores = criterion.score(model, groups, stats)
    assert all(torch.isfinite(s).all() and s.shape == (g.size,) for g, s in zip(groups, scores.values()))
    acc = stats[BLOCK]
    s = acc.relevance() if term == "relevance" else scores[BLOCK]
    assert set(s.argsort()[:2].tolist()) == {DEAD[BLOCK], NOISE[BLOCK]}, s.sort().values[:4]
    assert acc.relevance()[DEAD[BLOCK]] == 0.0  # one bin: plug-in 0, correction 0
    assert abs(acc.relevance()[NOISE[BLOCK]]) < 0.02
    counts = acc.sums["joint"].sum((0, 1)) / 128
    assert counts.sum() == 6 * 8 * 12  # every position of every image, once per channel
    assert counts[0] / counts.sum() < 0.8  # objects cover a fair share of the positions


def test_mi_labels_box_head_rows_with_the_sampled_classes(scored):
    _, stats = scored["mi"]
    classes = scored["sampled"]  # detectron2's: k for class k, 3 for background
    expected = torch.bincount(torch.where(classes == 3, 0, classes + 1), minlength=4)
    rows = stats[FC].sums["joint"].sum(1)  # (channels, labels)
    assert torch.equal(rows, expected.double().expand_as(rows))
    assert rows[0].sum() == 3 * 2 * 32 and rows[0, 1:].sum() >= 3 * 2 * 3  # the GT boxes at least
    # Random initial proposals rarely overlap an object, so the rows are mostly background; the
    # constant channel tells exactly nothing about them, others do.
    relevance = stats[FC].relevance()
    assert relevance[DEAD[FC]] == 0.0 and relevance.max() > 0.1


def test_region_rows_take_their_proposals_class():
    targets = information._Targets(num_classes=3)
    targets.begin([], (64, 96))
    targets.proposals = torch.tensor([0, 2, 0, 1])  # as recorded from the sampler
    x, y = targets.rows(torch.arange(8.0).view(4, 2), "box_head.fc1")  # (proposals, channels)
    assert torch.equal(x, torch.tensor([[0.0, 2, 4, 6], [1, 3, 5, 7]])) and y.tolist() == [0, 2, 0, 1]
    # The mask head sees the foreground proposals only, each a map of positions.
    x, y = targets.rows(torch.arange(16.0).view(2, 2, 2, 2), "mask_head.mask_fcn1")
    assert x.shape == (2, 8) and torch.equal(x[1], torch.tensor([4.0, 5, 6, 7, 12, 13, 14, 15]))
    assert y.tolist() == [2, 2, 2, 2, 1, 1, 1, 1]
    with pytest.raises(RuntimeError, match="neither the 4 sampled proposals nor the 2 foreground"):
        targets.rows(torch.zeros(3, 2), "box_head.fc1")


def test_redundancy_lowers_a_duplicated_channel(useless, scored):
    model = copy.deepcopy(useless[0])  # the noise hook comes along, drawing the same values
    groups = [g for g in useless[1] if g.name == BLOCK]
    conv = dict(model.named_modules())[BLOCK]
    with torch.no_grad():
        for tensor in (conv.weight, conv.norm.weight, conv.norm.bias, conv.norm.running_mean,
                       conv.norm.running_var):
            tensor[9] = tensor[3]
    twins = collect_statistics(model, groups, build("mi", **MRMR), BATCHES)[BLOCK]
    alone = scored["mi"][1][BLOCK]
    assert twins.relevance()[3] == twins.relevance()[9]
    # The copy shares log B with channel 3, about 0.04 nats more than channel 9 used to.
    assert twins.redundancy()[3] == pytest.approx(twins.redundancy()[9].item())
    assert twins.redundancy()[3] > alone.redundancy()[3] + 0.5 * math.log(16) / 127
    # Channel 3 against the channels both models share: the same relevance, a lower standing.
    others = torch.ones(128, dtype=torch.bool)
    others[[3, 9]] = False
    below = lambda s: (s[others] < s[3]).sum().item()  # noqa: E731
    assert below(twins.relevance()) == below(alone.relevance())
    assert below(twins.result()) < below(alone.result())


def test_one_shot_selection_repeats_the_scores(useless, scored):
    model, groups = useless
    cfg = add_prune_config(models.faster_rcnn_cfg(18))
    cfg.PRUNE.CRITERION = "mi"
    cfg.PRUNE.CRITERION_OPTIONS = [["mi_redundancy", "0.5"], ["bins", 16]]
    cfg.PRUNE.RATIO = 0.5
    criterion = build_criterion(cfg)
    assert (criterion.mi_redundancy, criterion.bins) == (0.5, 16)
    keep = choose_keep(cfg, model, criterion, BATCHES)
    # Collected again from the same batches, the scores are those of the first run exactly.
    first = scored["mi"][0].score(model, groups, scored["mi"][1])
    for group in groups:
        if group.kind == "block":
            expected = first[group.name].argsort(descending=True)[: group.size // 2].sort().values
            assert keep[group.name] == expected.tolist(), group.name
    assert DEAD[BLOCK] not in keep[BLOCK] and NOISE[BLOCK] not in keep[BLOCK]


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="mi_redundancy must be a number >= 0"):
        build("mi", mi_redundancy=-1)
    with pytest.raises(UserError, match="bins must be an integer >= 2"):
        build("entropy", bins=1)
    with pytest.raises(UserError, match="images must be an integer >= 1"):
        build("entropy", images=0.5)
    model = models.build("faster_rcnn_R18_FPN")
    with pytest.raises(UserError, match="'mi' needs images with ground-truth boxes"):
        build("mi").score(model, find_groups(model))


def _as_rank(monkeypatch, rank: int, other=()):
    """Make this process rank `rank` of two. Each all_reduce records what this rank sends and
    adds what the other rank sent in the same call, where `other` holds it; returns the record."""
    sent = []

    def all_reduce(tensor, *args, **kwargs):
        sent.append(tensor.clone())
        if len(sent) <= len(other):
            tensor.add_(other[len(sent) - 1])

    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "get_rank", lambda: rank)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    return sent


def test_statistics_are_summed_across_processes(useless, monkeypatch):
    # Rank r sees BATCHES[r]. Ranks run one after the other: what a rank sends depends only on
    # its own data, so a run that adds the other rank's record is what that rank gets in a real
    # two-process run. The collector's all-reduce of the sums is the last collective.
    model, groups = useless
    groups = [g for g in groups if g.name in (BLOCK, FC, "proposal_generator.rpn_head.conv")]

    def run(name, rank, other=()):
        sent = _as_rank(monkeypatch, rank, other)
        criterion = build(name, **(MRMR if name == "mi" else {}))
        return criterion, collect_statistics(model, groups, criterion, BATCHES[rank : rank + 1]), sent

    # mi: the bin edges are agreed on during the first batch, one collective per producer.
    _, _, first = run("mi", 0)
    assert len(first) == 3 + 1
    criterion, one, sent1 = run("mi", 1, first[:-1])
    _, zero, sent0 = run("mi", 0, sent1)
    _as_rank(monkeypatch, 1, sent0[-1:])
    _all_reduce(one, torch.device("cpu"))  # rank 1's reduction, now that rank 0's sums are known
    for name in zero:
        assert torch.equal(zero[name].edges, one[name].edges), name
        assert all(torch.equal(t, one[name].sums[k]) for k, t in zero[name].sums.items()), name
    a, b = criterion.score(model, groups, zero), criterion.score(model, groups, one)
    assert all(torch.equal(a[g.name], b[g.name]) for g in groups)
    # Every position of both ranks' images, counted once per channel.
    assert zero[BLOCK].sums["joint"].sum() == 128 * (2 * 2) * 8 * 12

    # entropy: rank r's pooled values of its two images land in its own block of the rows.
    criterion, one, sent1 = run("entropy", 1)
    _, zero, sent0 = run("entropy", 0, sent1)
    _as_rank(monkeypatch, 1, sent0)
    _all_reduce(one, torch.device("cpu"))
    a, b = criterion.score(model, groups, zero), criterion.score(model, groups, one)
    assert all(torch.equal(a[g.name], b[g.name]) for g in groups)
    sums = zero[BLOCK].sums
    assert sums["filled"].tolist() == [2, 2] and sums["values"].shape == (256, 128)
    values = torch.cat([sums["values"][:2], sums["values"][128:130]])
    assert sums["values"].abs().sum() == values.abs().sum() and (values != 0).any(1).all()
    # The scores are the entropies of those four values in 16 bins from their min to their max.
    low, high = values.aminmax(dim=0)
    bins = ((values - low) / (high - low).clamp(min=1e-300) * 16).long().clamp(max=15)
    p = torch.nn.functional.one_hot(bins, 16).sum(0).double() / 4
    expected = -(p * p.clamp(min=1e-300).log()).sum(1)
    assert expected[DEAD[BLOCK]] == 0.0
    assert torch.allclose(zero[BLOCK].result(), expected)
