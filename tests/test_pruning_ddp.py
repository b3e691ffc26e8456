"""Pruning while training with two processes (gloo on the CPU): after every event both ranks
hold the same architecture and weights, and the re-wrapped DDP model still averages gradients."""

import hashlib
import json
from datetime import timedelta

import pytest
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from torch.nn.parallel import DistributedDataParallel

from d2prune.compat import launch
from d2prune.engine import PruningTrainer
from d2prune.pruning import channel_spec

from .prune_helpers import prune_cfg, tiny_dataset

pytestmark = pytest.mark.ddp

EVENTS = (1, 3)


def digest(tensors) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


class CompareRanks(HookBase):
    """After every step: spec, weights and gradients of all ranks, compared through all_gather."""

    def __init__(self):
        self.files = []
        self.records = []

    def before_train(self):
        # What each rank trains on: the images its shard gives it.
        self.trainer.model.module.register_forward_pre_hook(
            lambda _, args: self.files.append([x["file_name"] for x in args[0]])
        )

    def after_step(self):
        model = self.trainer.model
        assert isinstance(model, DistributedDataParallel)
        params = dict(model.module.named_parameters())
        # The optimizer and the DDP wrapper hold the parameters the model has now.
        held = {id(p) for g in self.trainer.optimizer.param_groups for p in g["params"]}
        assert held == {id(p) for p in params.values()} == {id(p) for p in model.parameters()}
        mine = {
            "spec": channel_spec(model),
            "weights": digest(params.values()),
            # At an event, the parameters surgery replaced have no gradient yet.
            "grads": digest(p.grad for p in params.values() if p.grad is not None),
            "files": self.files[-1],
        }
        ranks = comm.all_gather(mine)
        for key in ("spec", "weights", "grads"):
            assert ranks[0][key] == ranks[1][key], (self.trainer.iter, key)
        self.records.append({
            "iter": self.trainer.iter,
            "block": sum(v for k, v in mine["spec"].items() if k.endswith(".conv1")),
            "all_grads": all(p.grad is not None for p in params.values()),
            "same_files": ranks[0]["files"] == ranks[1]["files"],
        })


def _worker(dataset, out):
    torch.set_num_threads(1)  # two processes share the two cores
    cfg = prune_cfg(dataset, out, 6, EVENTS)
    seed_all_rng(comm.get_rank())  # different initial weights: DDP must broadcast rank 0's
    trainer = PruningTrainer(cfg)
    check = CompareRanks()
    trainer.register_hooks([check])
    trainer.resume_or_load(resume=False)
    trainer.train()
    if comm.is_main_process():
        (out / "records.json").write_text(json.dumps(check.records))


def test_two_ranks_stay_identical_through_pruning_events(tmp_path):
    dataset = tiny_dataset(tmp_path / "data", "prune_ddp_train", 2)
    out = tmp_path / "out"
    # IMS_PER_BATCH 2 over two ranks: one image per rank and step, from different shards.
    launch(_worker, 2, dist_url="auto", args=(dataset, out), timeout=timedelta(minutes=3))
    records = json.loads((out / "records.json").read_text())
    assert [r["iter"] for r in records] == list(range(6))
    widths = [r["block"] for r in records]
    assert widths[0] == 1920 and widths[1] == 1440
    assert widths[2] == 1440 and widths[3:] == [960] * 3
    # Every parameter got a gradient, equal on both ranks, in the steps after each event ...
    assert [r["all_grads"] for r in records] == [i not in EVENTS for i in range(6)]
    # ... though the ranks trained on different images: DDP averaged them.
    assert not any(r["same_files"] for r in records)
    assert (out / "model_pruned_0000003.pth").is_file()
