"""Resuming a run that prunes: from the checkpoint of its second event, a new trainer rebuilds
the pruned architecture, optimizer, LR schedule and schedule progress, prunes a third time and
ends exactly where the uninterrupted run ended. In global mode, a run resumed from before,
during or after an event chooses the channels the uninterrupted run chose, and scoring on data
takes no batch from the training stream: it has batches of its own, chosen by the event's index."""

import hashlib
import shutil
import weakref

import numpy as np
import pytest
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from d2prune.engine import PruningTrainer
from d2prune.engine.scoring import ScoringBatches

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
    weights_a, weights_b = (c["model"] if "model" in c else c["d2prune"]["model"] for c in (a, b))
    assert weights_a.keys() == weights_b.keys()
    for key, value in weights_a.items():
        torch.testing.assert_close(weights_b[key], value, rtol=1e-5, atol=1e-6, msg=key)
    state_a = a["trainer"]["_trainer"]["optimizer"]
    state_b = b["trainer"]["_trainer"]["optimizer"]
    assert state_a["param_groups"] == state_b["param_groups"]  # learning rates included
    for index, state in state_a["state"].items():
        torch.testing.assert_close(state_b["state"][index]["momentum_buffer"], state["momentum_buffer"])
    assert a["trainer"]["hooks"]["LRScheduler"] == b["trainer"]["hooks"]["LRScheduler"]


# -- An event's choice does not depend on a restart, and scoring does not move training on ----

GLOBAL_EVENTS = (1, 3, 5)
SLIM = (
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
)  # fmt: skip


def global_cfg(dataset, out):
    """Three taylor events in global mode, a checkpoint after every iteration. The learning rate
    is 0 and the backbone's norms frozen, so that the weights are the same on every run whatever
    data it trained on: what an event chooses then depends on its scoring batches alone (the
    training stream resuming where it stopped is tested with a real learning rate in
    tests/test_crash_resume.py)."""
    return prune_cfg(
        dataset, out, 6, GLOBAL_EVENTS, *SLIM, "PRUNE.MODE", "global", "PRUNE.CRITERION", "taylor",
        "PRUNE.SCORE_BATCHES", "2", "SOLVER.BASE_LR", "0.0", "MODEL.RESNETS.NORM", "FrozenBN",
        "SOLVER.CHECKPOINT_PERIOD", "1",
    )  # fmt: skip


# The checkpoint `last_checkpoint` names when the run is killed: before the first event, in the
# middle of the second (its pruned checkpoint not yet complete), right after the second.
GLOBAL_KILLS = {
    "before-first-event": "model_0000000.pth",
    "during-second-event": "model_0000002.pth",
    "after-second-event": "model_pruned_0000003.pth",
}


@pytest.fixture(scope="module")
def global_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("global")
    dataset = tiny_dataset(root / "data", "prune_resume_global", 6)
    seed_all_rng(0)
    trainer = PruningTrainer(global_cfg(dataset, root / "full"))
    trainer.resume_or_load(resume=False)
    trainer.train()
    return dataset, root


@pytest.mark.slow
@pytest.mark.parametrize("last", GLOBAL_KILLS.values(), ids=GLOBAL_KILLS.keys())
def test_a_global_run_resumed_anywhere_chooses_as_the_uninterrupted_one(global_run, tmp_path, last):
    dataset, root = global_run
    full = root / "full"
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(full / last, resumed)
    (resumed / "last_checkpoint").write_text(last)
    seed_all_rng(1)  # another process: other random state than the uninterrupted run's
    trainer = PruningTrainer(global_cfg(dataset, resumed))
    trainer.resume_or_load(resume=True)
    trainer.train()

    def spec(folder, name):
        return torch.load(folder / name, weights_only=True)["d2prune"]["spec"]

    original = spec(full, "model_0000000.pth")
    events = [f"model_pruned_{i:07d}.pth" for i in GLOBAL_EVENTS]
    specs = [spec(full, name) for name in events]
    # Global mode: the groups lose different shares, so the spec says what scoring chose.
    assert len({original[n] - w for n, w in specs[0].items() if w != original[n]}) > 1
    assert specs[0] != specs[1] != specs[2]
    for name in events:
        if (resumed / name).exists():  # written by the resumed run
            assert spec(resumed, name) == spec(full, name), name
    assert spec(resumed, "model_final.pth") == spec(full, "model_final.pth") == specs[-1]


class TrainingInputs(HookBase):
    """The images of every training step's batch (a digest each), not those that scoring runs."""

    def __init__(self):
        self.seen, self._training = [], False

    def before_train(self):
        def record(module, args):  # a function: events deep-copy the model, hooks included
            if self._training:
                self.seen.append([hashlib.sha1(x["image"].numpy().tobytes()).hexdigest() for x in args[0]])

        self.trainer.model.register_forward_pre_hook(record)

    def before_step(self):
        self._training = True

    def after_step(self):  # first of the hooks: before any pruning event of this step
        self._training = False


@pytest.mark.slow
def test_scoring_on_data_leaves_the_training_batches_as_they_were(tmp_path):
    dataset = tiny_dataset(tmp_path / "data", "prune_resume_stream", 6)
    seen = {}
    for criterion in ("l1", "taylor"):
        cfg = prune_cfg(
            dataset, tmp_path / criterion, 5, (1, 3), *SLIM, "PRUNE.CRITERION", criterion,
            "PRUNE.SCORE_BATCHES", "2",
        )  # fmt: skip
        seed_all_rng(0)
        trainer = PruningTrainer(cfg)
        recorder = TrainingInputs()
        recorder.trainer = weakref.proxy(trainer)
        trainer._hooks.insert(0, recorder)
        trainer.resume_or_load(resume=False)
        trainer.train()
        seen[criterion] = recorder.seen
    assert len(seen["l1"]) == 5 and all(len(batch) == 2 for batch in seen["l1"])
    assert seen["taylor"] == seen["l1"]


def test_scoring_batches_depend_on_the_event_alone_and_split_over_the_ranks(monkeypatch):
    images = [{"file_name": f"{i}.png"} for i in range(10)]

    def mapper(d):  # an augmentation that draws from numpy's global generator, as detectron2's do
        return {"file_name": d["file_name"], "flip": float(np.random.rand())}

    scoring = ScoringBatches(lambda: images, mapper, total_batch_size=4, num_batches=3, seed=7)
    state = np.random.get_state()
    alone = list(scoring(0))
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1]) and state[2] == after[2]
    assert list(scoring(0)) == alone != list(scoring(1))
    assert [len(b) for b in alone] == [4, 4, 4]
    names = [x["file_name"] for b in alone for x in b]
    assert sorted(names[:10]) == sorted(d["file_name"] for d in images)  # 12 > 10: it cycles

    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(comm, "get_rank", lambda rank=rank: rank)
        shards.append(list(scoring(0)))
    assert [a + b for a, b in zip(*shards)] == alone  # each rank its half, the same images as one
