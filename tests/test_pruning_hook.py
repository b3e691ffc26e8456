"""Pruning while training, in one process: two events of a data-driven criterion, momentum that
follows the kept channels, the pruning curve in metrics.json, and a final checkpoint that
`train_net.py --eval-only` evaluates as the run did."""

import copy
import json
import weakref

import pytest
import torch
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from d2prune.criteria import build
from d2prune.engine import PruningTrainer, Trainer, pruning_hook
from d2prune.engine.pruning_hook import PruningHook, sliced_optimizer_state
from d2prune.pruning import channel_spec, find_groups, prune
from d2prune.pruning.budget import Budget, select_channels

from . import models
from .conftest import CONFIG, copypaste_ap, run_tool, tiny_opts
from .prune_helpers import prune_cfg, tiny_dataset

EVENTS = (1, 3)


class Momentum(HookBase):
    """Before the pruning hook: the momentum and weights by parameter name at each event."""

    def __init__(self):
        self.seen = {}

    def after_step(self):
        if self.trainer.iter in EVENTS:
            model = self.trainer.model
            names = {p: n for n, p in model.named_parameters()}
            self.seen[self.trainer.iter] = {
                names[p]: s["momentum_buffer"].clone() for p, s in self.trainer.optimizer.state.items()
            }


class AfterEvent(HookBase):
    """After the pruning hook: the new optimizer's momentum, by name, right after each event."""

    def __init__(self):
        self.seen = {}

    def after_step(self):
        if self.trainer.iter in EVENTS:
            optimizer = self.trainer.optimizer
            params = dict(self.trainer.model.named_parameters())
            assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in params.values()}
            names = {p: n for n, p in params.items()}
            self.seen[self.trainer.iter] = {
                names[p]: s["momentum_buffer"].clone() for p, s in optimizer.state.items()
            }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root, out = tmp_path_factory.mktemp("hook_data"), tmp_path_factory.mktemp("hook_out")
    dataset = tiny_dataset(root, "prune_hook_train", 2)
    cfg = prune_cfg(
        dataset, out, 4, EVENTS, "PRUNE.CRITERION", "taylor", "PRUNE.SCORE_BATCHES", "1",
        "PRUNE.EVAL_AT_EVENTS", "True", "DATASETS.TEST", f"('{dataset[0]}',)",
    )
    seed_all_rng(0)
    trainer = PruningTrainer(cfg)
    trainer.resume_or_load(resume=False)
    before, after = Momentum(), AfterEvent()
    at = next(i for i, h in enumerate(trainer._hooks) if isinstance(h, PruningHook))
    for hook, index in ((before, at), (after, at + 2)):
        hook.trainer = weakref.proxy(trainer)
        trainer._hooks.insert(index, hook)
    keeps = []
    with pytest.MonkeyPatch.context() as patch:
        # Record the keep sets of the real events (sliced_optimizer_state prunes a copy too).
        patch.setattr(pruning_hook, "prune", lambda m, keep: (keeps.append(keep), prune(m, keep))[1])
        results = trainer.train()
    return dataset, out, results, trainer, keeps[1::2], before.seen, after.seen


def test_events_halve_the_block_channels_in_steps(run):
    _, out, _, trainer, keeps, _, _ = run
    specs = [torch.load(out / f"model_pruned_{i:07d}.pth", weights_only=True)["d2prune"]["spec"] for i in EVENTS]
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["d2prune"]["spec"] == specs[-1] == channel_spec(trainer.model)
    kinds = {g.name: g.kind for g in find_groups(trainer.model)}
    block = [n for n, k in kinds.items() if k == "block"]
    original = trainer._hooks[[isinstance(h, PruningHook) for h in trainer._hooks].index(True)].original_spec
    assert all(specs[0][n] == original[n] - original[n] // 4 for n in block)  # linear: 25 %, then 50 %
    assert all(specs[1][n] == original[n] // 2 for n in block)
    assert all(specs[1][n] == original[n] for n in kinds if n not in block)
    assert len(keeps) == 2 and set(keeps[1]) == set(block)
    # The optimizer state travels in the checkpoints, at the pruned shapes.
    momentum = final["trainer"]["_trainer"]["optimizer"]["state"]
    assert momentum and all(s["momentum_buffer"].dim() >= 1 for s in momentum.values())
    assert final["trainer"]["hooks"]["PruningHook"]["events_done"] == 2


def test_momentum_of_kept_channels_survives_each_event(run):
    _, _, _, trainer, keeps, before, after = run
    groups = {g.name: g for g in find_groups(trainer.model)}
    for it, keep in zip(EVENTS, keeps):
        checked = 0
        for name, indices in keep.items():
            group = groups[name]
            for producer in group.producers:
                key = f"{producer}.weight"
                assert torch.equal(after[it][key], before[it][key][indices])
                checked += 1
            for consumer in group.consumers:
                key = f"{consumer}.weight"
                assert torch.equal(after[it][key], before[it][key][:, indices])
        assert checked == len(keep) > 0
        untouched = "roi_heads.box_predictor.cls_score.weight"
        assert torch.equal(after[it][untouched], before[it][untouched])


def test_sliced_optimizer_state_follows_prune():
    model = models.build("faster_rcnn_R18_FPN").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    skipped = "backbone.bottom_up.res2.0.conv1.weight"
    for name, p in model.named_parameters():
        if name != skipped:  # a parameter that never had a gradient has no state
            optimizer.state[p] = {"momentum_buffer": torch.randn(p.shape, generator=generator), "step": 3}
    groups = find_groups(model)
    budget = Budget("channels", 0.5, kinds=["block", "fpn"])
    keep = select_channels(groups, build("random").score(model, groups), budget)
    old = {n: optimizer.state[p] for n, p in model.named_parameters() if p in optimizer.state}
    shadow = copy.deepcopy(model)
    sliced = sliced_optimizer_state(model, optimizer, keep)
    for p, q in zip(model.parameters(), shadow.parameters()):
        assert torch.equal(p, q)  # the model itself is not touched
    prune(model, keep)
    params = dict(model.named_parameters())
    assert skipped not in sliced and set(sliced) == set(old)
    for name, state in sliced.items():
        assert state["momentum_buffer"].shape == params[name].shape and state["step"] == 3
    conv1 = "backbone.bottom_up.res3.0.conv1"
    kept = keep[conv1]
    assert torch.equal(sliced[f"{conv1}.weight"]["momentum_buffer"], old[f"{conv1}.weight"]["momentum_buffer"][kept])
    conv2 = "backbone.bottom_up.res3.0.conv2.weight"
    assert torch.equal(sliced[conv2]["momentum_buffer"], old[conv2]["momentum_buffer"][:, kept])
    fc1 = "roi_heads.box_head.fc1.weight"  # reads the FPN width as C x 7 x 7 inputs
    fpn = keep["backbone.fpn"]
    momentum = old[fc1]["momentum_buffer"]
    expected = momentum.view(momentum.shape[0], 256, -1)[:, fpn].flatten(1)
    assert torch.equal(sliced[fc1]["momentum_buffer"], expected)


def test_pruning_curve_is_in_metrics_json(run):
    _, out, _, _, _, _, _ = run
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    events = {r["iteration"]: r for r in rows if "pruning/event" in r}
    assert sorted(events) == list(EVENTS)
    first, second = events[EVENTS[0]], events[EVENTS[1]]
    assert (first["pruning/event"], second["pruning/event"]) == (1, 2)
    assert first["pruning/width/block"] == 1440 and second["pruning/width/block"] == 960
    assert first["pruning/params"] > second["pruning/params"]
    assert first["pruning/backbone_flops"] > second["pruning/backbone_flops"] > 0
    assert first["pruning/width/stage"] == second["pruning/width/stage"]
    for row in (first, second):
        assert row["pruning/score_seconds"] > 0
        assert 0 <= row["pruning/before/bbox/AP50"] <= 100 and 0 <= row["pruning/after/bbox/AP50"] <= 100


def test_fine_tuning_from_a_pruned_checkpoint_optimises_its_parameters(run, tmp_path):
    dataset, out, _, _, _, _, _ = run
    cfg = prune_cfg(dataset, tmp_path, 1, EVENTS, "PRUNE.ENABLED", "False", "MODEL.WEIGHTS", str(out / "model_final.pth"))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in trainer.model.parameters()}
    assert channel_spec(trainer.model) == torch.load(out / "model_final.pth", weights_only=True)["d2prune"]["spec"]


@pytest.mark.subprocess
def test_eval_only_on_the_final_pruned_checkpoint(run, tmp_path):
    dataset, out, results, _, _, _, _ = run
    proc = run_tool(
        "train_net.py", "--config-file", CONFIG, "--eval-only", "--dataset", *dataset,
        *tiny_opts(tmp_path / "none", tmp_path), "DATASETS.TRAIN", f"('{dataset[0]}',)",
        "DATASETS.TEST", f"('{dataset[0]}',)",
        "MODEL.WEIGHTS", out / "model_final.pth",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert copypaste_ap(proc.stdout) == pytest.approx(results["bbox"]["AP"], abs=1e-3)
