"""Channel importance criteria: every registered one scores every group, and each ranks a
channel that its paper calls unimportant lowest.
"""

import copy
import itertools
import os
import subprocess
import sys

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from torch import nn

from d2prune.criteria import Criterion, available, build
from d2prune.criteria.base import DATA_NEEDS, combine
from d2prune.criteria.collector import collect_statistics
from d2prune.engine.trainer import Trainer
from d2prune.errors import UserError
from d2prune.pruning import find_groups
from d2prune.pruning.groups import ChannelGroup

from . import models
from .conftest import REPO
from .prune_helpers import Untouched, prune_cfg, tiny_dataset

torch.set_num_threads(2)

BLOCK = "backbone.bottom_up.res3.1.conv1"  # a group with a single conv producer
FC = "roi_heads.box_head.fc1"  # a group produced by a Linear layer, without norm
# Options that keep a data-driven criterion's share of the contract test to seconds.
QUICK = {"chip": {"images": 2, "positions": 32}, "hrank": {"images": 2}}


def _scores(name, model, group_name, **options):
    group = next(g for g in find_groups(model) if g.name == group_name)
    return build(name, **options).score(model, [group])[group_name]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The tiny synthetic detector (R18-FPN with BatchNorm, 6 classes, random weights, slimmed
    FPN and box head) and two training batches of two 64 px target-domain images, as its data
    loader gives them."""
    root = tmp_path_factory.mktemp("criteria_contract")
    dataset = tiny_dataset(root, "criteria_contract_train", 4)
    cfg = prune_cfg(
        dataset, root / "out", 1, (1,),
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
    )  # fmt: skip
    batches = list(itertools.islice(Trainer.build_train_loader(cfg), 2))
    torch.manual_seed(0)
    return build_model(cfg), batches


def test_the_registry_lists_every_criterion():
    assert {"l1", "l2", "fpgm", "bn_scale", "random", "taylor", "entropy", "mi", "lrp"} <= set(available())
    assert available() == sorted(available())
    assert all(build(name).data in DATA_NEEDS for name in available())


@pytest.mark.parametrize("name", available())
def test_every_criterion_keeps_the_contract(synthetic, name):
    """Every registered criterion, data-driven ones fed training batches through the shared
    collector: a finite float32 score per channel of every group, the same scores when the same
    criterion scores the same model on the same batches again (as at each pruning event), and
    the model, its modes and the random stream left as they were."""
    model, batches = copy.deepcopy(synthetic[0]), synthetic[1]
    model.train()
    model.roi_heads.eval()  # mixed modes: each module's must come back as it was
    groups = find_groups(model)
    untouched = Untouched(model)

    criterion = build(name, **QUICK.get(name, {}))
    assert criterion.data in DATA_NEEDS

    def score():
        stats = None
        if criterion.data != "none":
            stats = collect_statistics(model, groups, criterion, batches, seed=0)
        return criterion.score(model, groups, stats)

    scores, again = score(), score()
    assert list(scores) == [g.name for g in groups]
    for group in groups:
        s = scores[group.name]
        assert s.shape == (group.size,) and s.dtype == torch.float32, group.name
        assert torch.isfinite(s).all(), group.name
        assert torch.equal(s, again[group.name]), group.name
    untouched.check()


@pytest.mark.parametrize("name", ["l1", "l2"])
@pytest.mark.parametrize("group_name, module", [(BLOCK, BLOCK), (FC, FC)])
def test_norm_criteria_rank_a_zero_filter_lowest(name, group_name, module):
    model = models.build("faster_rcnn_R18_FPN")
    with torch.no_grad():
        dict(model.named_modules())[module].weight[5].zero_()
    scores = _scores(name, model, group_name)
    assert scores.argmin() == 5
    assert scores[5] == 0


def test_fpgm_ranks_the_filter_at_the_median_lowest_whatever_its_norm():
    model = models.build("faster_rcnn_R18_FPN")
    conv = dict(model.named_modules())[BLOCK]
    with torch.no_grad():
        # Shift all filters by a common direction, so that norms and distances disagree: the
        # mean filter (close to the geometric median) is as long as the others, and a zero
        # filter is the shortest but far from all the others.
        shift = torch.randn(conv.weight[0].shape, generator=torch.Generator().manual_seed(0))
        conv.weight += 3 * conv.weight[0].norm() * shift / shift.norm()
        conv.weight[7] = conv.weight.mean(0)
        conv.weight[2] = 0.0
    fpgm = _scores("fpgm", model, BLOCK)
    assert fpgm.argmin() == 7
    assert fpgm[2] > fpgm.median()
    assert _scores("l1", model, BLOCK).argmin() == 2


def test_bn_scale_frozen_bn_uses_the_effective_scale():
    model = models.build("faster_rcnn_R18_FPN")
    norm = dict(model.named_modules())[BLOCK].norm
    assert isinstance(norm, FrozenBatchNorm2d)
    with torch.no_grad():
        norm.weight[3] = 0.0
        norm.weight[4] = norm.weight.max()
        norm.running_var[4] = 1e4  # a large gamma divided by a large std: small effective scale
    scores = _scores("bn_scale", model, BLOCK)
    assert scores.argmin() == 3
    assert scores[4] < scores[torch.arange(128) > 4].min()


def test_bn_scale_batch_norm_and_fallback_without_norm():
    model = models.build("faster_rcnn_R18_FPN")
    conv = dict(model.named_modules())[BLOCK]
    conv.norm = nn.BatchNorm2d(128).eval()
    with torch.no_grad():
        conv.norm.weight.uniform_(0.5, 1.0)
        conv.norm.weight[11] = 0.0
    scores = _scores("bn_scale", model, BLOCK)
    assert scores.argmin() == 11
    assert torch.allclose(scores, combine([conv.norm.weight.abs()]))
    # The box head's fc layers have no norm: scored by their filters' L1 norm instead.
    assert torch.allclose(_scores("bn_scale", model, FC), _scores("l1", model, FC))


def test_random_is_seeded():
    model = models.build("faster_rcnn_R18_FPN")
    a, b = _scores("random", model, BLOCK, seed=1), _scores("random", model, BLOCK, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, _scores("random", model, BLOCK, seed=2))


@pytest.mark.subprocess
def test_random_is_the_same_in_another_process():
    group = ChannelGroup("backbone.fpn", "fpn", 16, ["p"], ["c"])
    here = build("random", seed=3).score(nn.Module(), [group])["backbone.fpn"]
    code = (
        "from d2prune.criteria import build; from d2prune.pruning.groups import ChannelGroup; "
        "import torch.nn as nn; g = ChannelGroup('backbone.fpn', 'fpn', 16, ['p'], ['c']); "
        "print(build('random', seed=3).score(nn.Module(), [g])['backbone.fpn'].tolist())"
    )
    env = dict(os.environ, PYTHONHASHSEED="123", PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert eval(out.stdout.strip().splitlines()[-1]) == here.tolist()


def test_combine_lets_members_of_any_scale_vote_equally():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])
    assert torch.allclose(combine([a, b]), combine([a, 100 * b]))
    assert torch.allclose(combine([a, b]), torch.ones(3))


def test_unknown_criterion_suggests_close_names():
    with pytest.raises(UserError, match="did you mean") as error:
        build("l3")
    assert "l1" in str(error.value) and "l2" in str(error.value)
    with pytest.raises(UserError, match="available: .*bn_scale"):
        build("nonsense")


def test_unknown_or_bad_options_are_user_errors():
    with pytest.raises(UserError, match="'l1' has no option seed"):
        build("l1", seed=1)
    with pytest.raises(UserError, match="seed"):
        build("random", seed="x")


def test_data_driven_criterion_refuses_to_score_without_statistics():
    class NeedsImages(Criterion):
        name = "needs_images"
        data = "images"

    with pytest.raises(UserError, match="needs images"):
        NeedsImages().score(nn.Module(), [])
