"""One-shot pruning scores data-driven criteria on the seeded batches a first pruning event
would use, so `tools/prune_net.py` chooses the same channels on every run."""

import numpy as np
import pytest
import torch

from d2prune.config import setup_cfg
from d2prune.criteria import build
from d2prune.data import register_datasets
from d2prune.engine import oneshot
from d2prune.engine.scoring import ScoringBatches
from d2prune.errors import UserError

from .conftest import CONFIG, tiny_opts
from .prune_helpers import prune_cfg, tiny_dataset


def _files(batches):
    return [[x["file_name"] for x in batch] for batch in batches]


def test_oneshot_scores_on_the_first_events_seeded_batches(tmp_path):
    dataset = tiny_dataset(tmp_path / "data", "oneshot_train", 6)
    cfg = prune_cfg(dataset, tmp_path / "out", 1)
    taylor = build("taylor")
    seen = []
    for seed in (1, 2):  # whatever the global generators hold
        torch.manual_seed(seed)
        np.random.seed(seed)
        seen.append(_files(oneshot.scoring_batches(cfg, taylor)))
    assert seen[0] == seen[1]
    assert seen[0] == _files(ScoringBatches.from_config(cfg)(0))
    assert len(seen[0]) == cfg.PRUNE.SCORE_BATCHES
    assert oneshot.scoring_batches(cfg, build("l1")) is None
    # A weight-only criterion still reads batches when mode cost weighs groups by their loss
    # sensitivity (the default weighting of mode cost), and not when it weighs them uniformly.
    cost = ["PRUNE.MODE", "cost", "PRUNE.FLOPS_REDUCTION", "0.3", "PRUNE.KINDS", "['block', 'fpn']"]
    weighted = prune_cfg(dataset, tmp_path / "out2", 4, (1, 3), *cost)
    assert _files(oneshot.scoring_batches(weighted, build("l1"))) == seen[0]
    uniform = prune_cfg(dataset, tmp_path / "out3", 4, (1, 3), *cost, "PRUNE.COST_WEIGHTING", "uniform")
    assert oneshot.scoring_batches(uniform, build("l1")) is None
    weighted.defrost()
    weighted.DATASETS.TEST, weighted.DATASETS.TRAIN = weighted.DATASETS.TRAIN, ()
    weighted.MODEL.WEIGHTS = "model.pth"
    with pytest.raises(UserError, match="COST_WEIGHTING 'sensitivity' measures the training loss.*DATASETS.TRAIN"):
        oneshot.check_oneshot_config(weighted)


def test_finetune_after_pruning_repeats_whatever_the_global_generators_hold(trained, tmp_path):
    root, out, _ = trained
    cfg = setup_cfg(CONFIG, tiny_opts(root, tmp_path))
    register_datasets(cfg)
    cfg.freeze()
    after = dict.fromkeys(("params", "flops", "backbone_flops", "latency_ms", "backbone_latency_ms"), 0)
    weights = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        np.random.seed(seed)
        result = oneshot.finetune(cfg, str(out / "model_final.pth"), str(tmp_path / f"run{seed}"), 2, after)
        weights.append(torch.load(result["weights"], map_location="cpu", weights_only=True)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
