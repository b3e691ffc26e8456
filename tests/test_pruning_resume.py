"""Resuming a run that prunes: from the checkpoint of its second event, a new trainer rebuilds
the pruned architecture, optimizer, LR schedule and schedule progress, prunes a third time and
ends exactly where the uninterrupted run ended."""

import shutil

import torch
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from d2prune.engine import PruningTrainer

from .prune_helpers import prune_cfg, tiny_dataset

EVENTS = (1, 2, 3)


class Reseed(HookBase):
    """Seeds every random generator from the iteration right before the model's forward pass,
    so that a resumed run samples anchors and proposals as the uninterrupted one did. (Not in
    `before_step`: a resumed run creates its data loader's iterator in its first step, which
    draws from torch's generator.)"""

    def before_train(self):
        self.trainer.model.register_forward_pre_hook(lambda *_: seed_all_rng(1000 + self.trainer.iter))


def train(cfg, resume):
    seed_all_rng(0)
    trainer = PruningTrainer(cfg)
    trainer.register_hooks([Reseed()])
    trainer.resume_or_load(resume=resume)
    start = trainer.start_iter
    trainer.train()
    return start


def test_resume_after_second_event_matches_uninterrupted_run(tmp_path):
    # One image: every batch is the same whatever the sampler's position after a restart.
    dataset = tiny_dataset(tmp_path / "data", "prune_resume_train", 1)
    # No random flips: the data is then the same at every step, however the loader restarts.
    no_flip = ("INPUT.RANDOM_FLIP", "none")
    train(prune_cfg(dataset, tmp_path / "full", 5, EVENTS, *no_flip), resume=False)

    # "Killed" after the second event: its checkpoint is the last one the run wrote.
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "full" / "model_pruned_0000002.pth", resumed_dir)
    (resumed_dir / "last_checkpoint").write_text("model_pruned_0000002.pth")
    start = train(prune_cfg(dataset, resumed_dir, 5, EVENTS, *no_flip), resume=True)

    assert start == 3
    a = torch.load(tmp_path / "full" / "model_final.pth", weights_only=True)
    b = torch.load(resumed_dir / "model_final.pth", weights_only=True)
    assert b["trainer"]["hooks"]["PruningHook"]["events_done"] == 3
    assert a["d2prune"]["spec"] == b["d2prune"]["spec"]
    assert a["d2prune"]["spec"] != torch.load(resumed_dir / "model_pruned_0000002.pth", weights_only=True)["d2prune"]["spec"]
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    state_a = a["trainer"]["_trainer"]["optimizer"]
    state_b = b["trainer"]["_trainer"]["optimizer"]
    assert state_a["param_groups"] == state_b["param_groups"]  # learning rates included
    for index, state in state_a["state"].items():
        torch.testing.assert_close(state_b["state"][index]["momentum_buffer"], state["momentum_buffer"])
    assert a["trainer"]["hooks"]["LRScheduler"] == b["trainer"]["hooks"]["LRScheduler"]
