"""The interpretability criteria lrp and gradcam: LRP rules that conserve relevance and agree
with zennit, useless channels of detectors ranked lowest, and scoring that leaves no trace.
"""

import pytest
import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonPlus

from d2prune.criteria import build
from d2prune.criteria.collector import collect_statistics
from d2prune.criteria.relevance import EPSILON, class_scores, lrp_rules, relevance_maps
from d2prune.errors import UserError
from d2prune.pruning import find_groups

from . import models
from .prune_helpers import Untouched, hook_count, statistics_on_two_ranks

torch.set_num_threads(2)

BLOCK = "backbone.bottom_up.res3.1.conv1"  # a block group: one conv producer with its norm
CONSUMER = "backbone.bottom_up.res3.1.conv2"
DEAD, IGNORED = 5, 9  # constant zero output; varied output that the consumer ignores
R18 = ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64]
FPN_OUTPUTS = [f"backbone.fpn_output{level}" for level in (2, 3, 4, 5)]


# -- the rules on plain networks ------------------------------------------------------------


def _plain_cnn(bias: bool, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, bias=bias), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, 5, bias=bias),
    )


def _layer_relevance(net, x, target, layers):
    """With `lrp_rules` on `net`: the activations a at the input and at the outputs of
    `layers`, the modified gradients g there (a * g is the relevance) and the explained logits."""
    outputs = []

    def record(module, inputs, output):
        outputs.append(output)
        return output.clone()

    x = x.clone().requires_grad_()
    with lrp_rules(net):
        handles = [layer.register_forward_hook(record) for layer in layers]
        y = net(x)
        for handle in handles:
            handle.remove()
        logit = y.gather(1, target[:, None]).squeeze(1)
        grads = torch.autograd.grad(logit.sum(), [x] + outputs)
    return [a.detach() for a in [x] + outputs], grads, logit.detach()


def _per_sample(a, g):
    return (a * g).flatten(1).sum(1)


def test_lrp_conserves_relevance_layer_by_layer():
    net = _plain_cnn(bias=False)
    with torch.no_grad():
        net[6].weight *= 30  # logits of order 1
    x = torch.randn(4, 3, 8, 8)  # signed inputs, as normalised pixels are
    target = torch.tensor([0, 1, 2, 3])
    activations, grads, logit = _layer_relevance(net, x, target, [net[0], net[2], net[6]])
    relevance = [_per_sample(a, g) for a, g in zip(activations, grads)]
    assert torch.equal(relevance[-1], logit) and (logit.abs() > 0.1).all()
    # Without biases z+ and epsilon lose only what the stabiliser takes (EPSILON / |z_j| of a
    # neuron's share: ~3e-6 here in float64) and float32 rounding (~2e-5 here).
    for r in relevance[:-1]:
        assert torch.allclose(r, logit, rtol=1e-4, atol=0), (r, logit)


def test_biases_absorb_their_share_of_relevance():
    net = _plain_cnn(bias=True)
    with torch.no_grad():
        for conv in (net[0], net[2]):
            conv.bias.uniform_(0.1, 0.5)
        net[6].weight.abs_()  # non-negative evidence: every relevance is >= 0
        net[6].bias.zero_()
    x = torch.randn(4, 3, 8, 8)
    target = torch.tensor([0, 1, 2, 3])
    activations, grads, logit = _layer_relevance(net, x, target, [net[0], net[2], net[6]])
    r_in, r_conv1, r_conv2, r_out = [_per_sample(a, g) for a, g in zip(activations, grads)]
    assert torch.allclose(r_out, logit)
    # z+ leaves b_j^+ / z_j of each R_j on the bias, never more: relevance shrinks toward the
    # input, and never changes sign.
    assert (0 < r_in).all() and (r_in < r_conv1).all() and (r_conv1 < r_conv2).all()
    assert (r_conv2 <= r_out * (1 + 1e-6)).all()
    # By exactly that share at the second conv: R_in = sum_j R_j (1 - b_j / z_j), with
    # z_j = sum_i x_i w_ij^+ + b_j over its (non-negative, post-ReLU) inputs x.
    a1, a2, g2 = activations[1], activations[2], grads[2]
    b = net[2].bias[:, None, None].detach()
    z = nn.functional.conv2d(a1.clamp(min=0), net[2].weight.detach().clamp(min=0), padding=1) + b
    absorbed = _per_sample(a2 * b / z, g2)
    assert (absorbed > 0.01 * r_out).all()
    assert torch.allclose(r_conv1, r_conv2 - absorbed, rtol=1e-5)


def _zennit_relevance(net, x, target, canonizers=None):
    composite = EpsilonPlus(epsilon=EPSILON, stabilizer=EPSILON, canonizers=canonizers)
    with Gradient(model=net, composite=composite) as attributor:
        _, relevance = attributor(x, lambda y: y * nn.functional.one_hot(target, y.shape[1]))
    return relevance


def test_rules_agree_with_zennit_epsilon_plus():
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5),
    ).eval()
    x, target = torch.randn(3, 3, 8, 8), torch.tensor([4, 0, 2])
    expected = _zennit_relevance(net, x, target)
    ours = x.clone().requires_grad_()
    with lrp_rules(net):
        (g,) = torch.autograd.grad(net(ours).gather(1, target[:, None]).sum(), ours)
    relevance = ours.detach() * g
    assert expected.abs().sum() > 0
    assert torch.allclose(relevance, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_folded_norms_agree_with_zennit_merged_batchnorm():
    """A detectron2 Conv2d with its FrozenBN, and a BatchNorm module after a conv (RetinaNet's
    subnets), both with a negative scale somewhere, against zennit's merged BatchNorm."""
    torch.manual_seed(2)
    frozen = FrozenBatchNorm2d(8)
    bn = nn.BatchNorm2d(6).eval()
    for norm in (frozen, bn):
        c = norm.num_features
        norm.weight.data = torch.rand(c) + 0.5
        norm.weight.data[1] = -0.7
        norm.bias.data = torch.randn(c) * 0.2
        norm.running_mean.data = torch.randn(c) * 0.3
        norm.running_var.data = torch.rand(c) + 0.5
    conv1 = Conv2d(3, 8, 3, padding=1, bias=False, norm=frozen)
    conv2 = nn.Conv2d(8, 6, 3, padding=1)
    head = [nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(6 * 4, 5)]
    net = nn.Sequential(conv1, nn.ReLU(), conv2, bn, *head).eval()

    plain1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    plain1.weight.data = conv1.weight.data.clone()
    twin = nn.BatchNorm2d(8).eval()
    for key in ("weight", "bias", "running_mean", "running_var"):
        getattr(twin, key).data = getattr(frozen, key).data.clone()
    reference = nn.Sequential(plain1, twin, nn.ReLU(), conv2, bn, *head).eval()

    x, target = torch.randn(3, 3, 8, 8), torch.tensor([1, 3, 0])
    with torch.no_grad():
        assert torch.allclose(net(x), reference(x), atol=1e-5)
    expected = _zennit_relevance(reference, x, target, canonizers=[SequentialMergeBatchNorm()])
    ours = x.clone().requires_grad_()
    with lrp_rules(net):
        (g,) = torch.autograd.grad(net(ours).gather(1, target[:, None]).sum(), ours)
    relevance = ours.detach() * g
    assert expected.abs().sum() > 0
    assert torch.allclose(relevance, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


# -- detectors ------------------------------------------------------------------------------


def _batches(n: int = 1):
    return [models.with_targets(models.images(2, seed=seed)) for seed in range(n)]


def _score(model, groups, name, batches=None):
    criterion = build(name)
    stats = collect_statistics(model, groups, criterion, batches or _batches())
    return criterion.score(model, groups, stats)


def _with_useless_channels(model):
    """Channel DEAD of BLOCK outputs constant zero; IGNORED varies but its consumer reads none
    of it. Every other channel fires everywhere (a bias of 50 on activations scaled down to
    below 10), so that no channel that never fires ties with them."""
    modules = dict(model.named_modules())
    conv, consumer = modules[BLOCK], modules[CONSUMER]
    with torch.no_grad():
        conv.weight *= 0.1
        conv.norm.bias += 50.0
        conv.weight[DEAD] = 0.0
        conv.norm.weight[DEAD] = 0.0
        conv.norm.bias[DEAD] = 0.0
        consumer.weight[:, IGNORED] = 0.0
    return model


@pytest.fixture(scope="module")
def faster_rcnn():
    model = _with_useless_channels(models.build("faster_rcnn_R18_FPN"))
    return model, find_groups(model)


@pytest.fixture(scope="module")
def retinanet():
    """R18 RetinaNet whose subnets have per-level BatchNorm (norm modules after the convs)."""
    model = models.build_fresh("retinanet_R50_FPN_headBN", opts=R18)
    models._randomize(model)
    model = _with_useless_channels(model)
    return model, find_groups(model)


@pytest.mark.parametrize("name", ["lrp", "gradcam"])
@pytest.mark.parametrize("detector", ["faster_rcnn", "retinanet"])
def test_useless_channels_rank_lowest(request, detector, name):
    model, groups = request.getfixturevalue(detector)
    scores = _score(model, groups, name)
    assert list(scores) == [g.name for g in groups]
    for group in groups:
        s = scores[group.name]
        assert s.shape == (group.size,) and torch.isfinite(s).all() and (s >= 0).all(), group.name
    s = scores[BLOCK]
    others = s[[c for c in range(len(s)) if c not in (DEAD, IGNORED)]]
    assert s[DEAD] < 1e-6 * others.mean() and s[IGNORED] < 1e-6 * others.mean()
    assert max(s[DEAD], s[IGNORED]) < others.min()
    # The box regression branch is not on the explained path: a neutral, constant score.
    off_path = [g for g in groups if "bbox_subnet" in g.name]
    assert len(off_path) == (4 if detector == "retinanet" else 0)
    assert all(torch.equal(scores[g.name], torch.ones(g.size)) for g in off_path)
    # Every other group is reached and ranked.
    assert all(scores[g.name].std() > 0 for g in groups if g not in off_path)


@pytest.mark.parametrize("name", ["lrp", "gradcam"])
def test_scores_are_repeatable_and_summed_across_processes(faster_rcnn, monkeypatch, name):
    model, groups = faster_rcnn
    criterion, batches = build(name), [models.with_targets(models.images(1, seed=4))]
    alone, together, reduced = statistics_on_two_ranks(model, groups, criterion, batches, monkeypatch)
    assert len(reduced) == 1  # one collective for all sums
    # Twice the sums of the first run, bit for bit: the second run repeated the first exactly.
    for producer, acc in alone.items():
        for key, total in acc.sums.items():
            assert torch.equal(together[producer].sums[key], 2 * total), (producer, key)
    a, b = criterion.score(model, groups, alone), criterion.score(model, groups, together)
    assert all(torch.equal(a[g.name], b[g.name]) for g in groups)


def test_scoring_leaves_the_model_as_it_was():
    # BatchNorm backbone, GroupNorm FPN and box head convs, a frozen stem, mixed modes; lrp
    # rewrites every layer's output while it scores.
    model = models.build_fresh("faster_rcnn_R50_FPN_GN_BN", opts=R18)
    models._randomize(model)
    images = models.images(1, seed=5)
    with torch.no_grad():
        before = model.eval()(images)
    model.train()
    model.roi_heads.eval()
    untouched = Untouched(model)

    scores = _score(model, find_groups(model), "lrp", [models.with_targets(models.images(1))])

    assert all(torch.isfinite(s).all() and s.std() > 0 for s in scores.values())
    untouched.check()
    with torch.no_grad():
        after = model.eval()(images)
    for x, y in zip(before, after):
        assert torch.equal(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor)
        assert torch.equal(x["instances"].scores, y["instances"].scores)


def test_relevance_maps_conserve_the_explained_score():
    model = models.build("faster_rcnn_R18_FPN").train()
    batch = models.with_targets(models.images(2, seed=3))
    # Every path from the score to the backbone crosses the FPN outputs. With the head's biases
    # at zero nothing absorbs relevance above them, so their maps sum to the score.
    with torch.no_grad():
        for module in list(model.proposal_generator.modules()) + list(model.roi_heads.modules()):
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.zero_()
    names = [BLOCK] + FPN_OUTPUTS
    maps = relevance_maps(model, batch, names)
    assert model.training and hook_count(model) == 0
    assert list(maps) == names
    assert maps[BLOCK].shape == (2, 128, 8, 12)
    assert [maps[n].shape for n in FPN_OUTPUTS] == [(2, 256, 16 // 2**i, 24 // 2**i) for i in range(4)]
    with torch.no_grad():
        score = class_scores(model.eval(), batch)
    total = sum(maps[n].sum() for n in FPN_OUTPUTS)
    assert score.abs() > 1
    assert torch.allclose(total, score, rtol=1e-4)

    with pytest.raises(UserError, match="must run once on the images"):
        relevance_maps(model, batch[:1], ["proposal_generator.rpn_head.conv"])
    with pytest.raises(UserError, match="no module named backbone.nope"):
        relevance_maps(model, batch, ["backbone.nope"])
    assert hook_count(model) == 0


def test_relevance_criteria_need_ground_truth(faster_rcnn):
    model, groups = faster_rcnn
    for name in ("lrp", "gradcam"):
        assert build(name).data == "targets"
        with pytest.raises(UserError, match="need ground-truth boxes"):
            collect_statistics(model, groups, build(name), [models.images(2)])
    assert hook_count(model) == 0
