"""Helpers for the pruning tests: a tiny dataset, a config that prunes often, statistics as if
collected on two ranks."""

from pathlib import Path

import torch
from detectron2.utils import comm

from d2prune.config import setup_cfg
from d2prune.criteria.collector import collect_statistics
from d2prune.data import register_datasets
from d2prune.data.synthetic import generate, split_paths

from .conftest import CONFIG, tiny_opts


def tiny_dataset(root: Path, name: str, num_images: int) -> list:
    """Generate `num_images` 96 px target-domain images under `root`: a DATASETS.COCO entry."""
    generate(root, "target", "train", num_images, image_size=96, min_objects=2, workers=1)
    json_file, image_root = split_paths(root, "target", "train")
    return [name, str(json_file), str(image_root)]


def prune_cfg(dataset: list, out: Path, iters: int, events=(1, 3), *opts):
    """A tiny config that trains on `dataset` and prunes `block` channels to 50 % over
    `len(events)` l1 events at the iterations `events` (first, last), without evaluating."""
    cfg = setup_cfg(
        CONFIG,
        [
            *tiny_opts(out / "no-synthetic-data", out, iters),
            "DATASETS.TRAIN", f"('{dataset[0]}',)", "DATASETS.TEST", "()",
            "SOLVER.BASE_LR", "0.005",
            "PRUNE.ENABLED", "True", "PRUNE.SCHEDULE", "iterative", "PRUNE.RATIO", "0.5",
            "PRUNE.START_ITER", str(events[0]), "PRUNE.END_ITER", str(events[-1]),
            "PRUNE.NUM_EVENTS", str(len(events)),
            *opts,
        ],
        [dataset],
    )
    register_datasets(cfg)
    cfg.freeze()
    return cfg


def statistics_on_two_ranks(model, groups, criterion, batches, monkeypatch):
    """Statistics collected alone, then as if on two ranks that saw the same images (the
    all-reduce doubles every sum); returns (alone, together, sizes of the collectives)."""
    alone = collect_statistics(model, groups, criterion, batches)
    reduced = []

    def all_reduce(tensor, *args, **kwargs):
        reduced.append(tensor.numel())
        tensor.mul_(2)

    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    together = collect_statistics(model, groups, criterion, batches)
    return alone, together, reduced


def hook_count(model) -> int:
    """Forward, forward-pre and backward hooks registered on the modules of `model`."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


class Untouched:
    """What scoring must leave as it found it: weights and buffers, each module's mode,
    `requires_grad` flags, gradients, hooks and the global random state. Take it before,
    `check()` after."""

    def __init__(self, model):
        self.model = model
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.modes = [m.training for m in model.modules()]
        self.flags = [p.requires_grad for p in model.parameters()]
        self.hooks = hook_count(model)
        self.rng = torch.get_rng_state()

    def check(self) -> None:
        model = self.model
        assert all(torch.equal(self.state[k], v) for k, v in model.state_dict().items())
        assert [m.training for m in model.modules()] == self.modes
        assert [p.requires_grad for p in model.parameters()] == self.flags
        assert all(p.grad is None for p in model.parameters())
        assert hook_count(model) == self.hooks
        assert torch.equal(torch.get_rng_state(), self.rng)
