"""LazyConfig training with pruning: the shipped configs/lazy R18-FPN trains briefly on CPU (AMP
off) with two taylor events through a SimpleTrainer and `PruningHook`, resumes from a pruned
checkpoint to the same model, and its final checkpoint evaluates to the same AP in eval-only."""

import shutil

import pytest
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import SimpleTrainer, hooks
from detectron2.modeling import build_model

from d2prune.config import setup_cfg
from d2prune.data.synthetic import generate
from d2prune.engine.checkpoint import PrunedCheckpointer
from d2prune.engine.lazy import (
    build_pruning_hook,
    do_eval,
    do_train,
    load_lazy_config,
    prune_config,
    register_lazy_datasets,
)
from d2prune.errors import UserError
from d2prune.pruning import channel_spec, find_groups

from .conftest import REPO, copypaste_ap, run_tool

CONFIG = str(REPO / "configs/lazy/faster_rcnn_R18_FPN_synthetic_prune.py")
EVENTS = (1, 2)


def _overrides(root, out, max_iter=4):
    """The shipped config at 64 px, batch 2, no workers, from random weights, on the CPU: two
    taylor events halving the block channels, evaluation at the end only."""
    return [
        f"datasets.synthetic_root={root}", f"train.output_dir={out}", "train.init_checkpoint=",
        f"train.max_iter={max_iter}", "train.device=cpu", "train.checkpointer.period=1000",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0", "model.roi_heads.box_predictor.test_score_thresh=0.0",
        "prune.criterion=taylor", "prune.score_batches=1", "prune.eval_at_events=False",
        f"prune.start_iter={EVENTS[0]}", f"prune.end_iter={EVENTS[-1]}", f"prune.num_events={len(EVENTS)}",
    ]  # fmt: skip


def _cfg(root, out, *more):
    cfg = load_lazy_config(CONFIG, [*_overrides(root, out), *more])
    for loader in (cfg.dataloader.train, cfg.dataloader.test):
        resize = loader.mapper.augmentations[0]
        resize.short_edge_length, resize.max_size = ((64,) if loader is cfg.dataloader.train else 64), 64
    register_lazy_datasets(cfg)
    return cfg


def _weights(checkpoint):
    return checkpoint["model"] if "model" in checkpoint else checkpoint["d2prune"]["model"]


def _resume_folder(out, tmp_path, name):
    """A folder holding a copy of the run's checkpoint after its first event, named by
    last_checkpoint: where a resumed run starts."""
    folder = tmp_path / name
    folder.mkdir()
    checkpoint = f"model_pruned_{EVENTS[0]:07d}.pth"
    shutil.copy(out / checkpoint, folder)
    (folder / "last_checkpoint").write_text(checkpoint)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root, out = tmp_path_factory.mktemp("lazy_data"), tmp_path_factory.mktemp("lazy_out")
    generate(root, "target", "train", 4, image_size=96, min_objects=2, workers=1)
    generate(root, "target", "val", 2, image_size=96, workers=1)
    torch.manual_seed(0)
    before = set(DatasetCatalog.list())
    results = do_train(_cfg(root, out))
    yield root, out, results
    # The synthetic names now point at this module's data: later tests register their own.
    for name in set(DatasetCatalog.list()) - before:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_the_lazy_config_trains_and_prunes_on_the_cpu(run):
    root, out, results = run
    cfg = _cfg(root, out)
    unpruned = instantiate(cfg.model)
    original = channel_spec(unpruned)
    kinds = {g.name: g.kind for g in find_groups(unpruned)}
    final = torch.load(out / "model_final.pth", weights_only=True)
    expected = {n: w // 2 if kinds[n] == "block" else w for n, w in original.items()}
    assert final["d2prune"]["spec"] == expected
    assert final["d2prune"]["unpruned"] == original
    first = torch.load(out / f"model_pruned_{EVENTS[0]:07d}.pth", weights_only=True)["d2prune"]["spec"]
    assert all(original[n] > first[n] > expected[n] for n in kinds if kinds[n] == "block")
    assert final["trainer"]["hooks"]["PruningHook"]["events_done"] == len(EVENTS)
    assert final["iteration"] == 3 and "bbox" in results

    # The optimizer state in the checkpoint fits the pruned model's parameters.
    PrunedCheckpointer(unpruned).load(str(out / "model_final.pth"))
    cfg.optimizer.params.model = unpruned
    optimizer = instantiate(cfg.optimizer)
    optimizer.load_state_dict(final["trainer"]["optimizer"])
    assert optimizer.state and all(s["momentum_buffer"].shape == p.shape for p, s in optimizer.state.items())


@pytest.mark.slow
def test_a_lazy_run_resumed_after_its_first_event_ends_with_the_same_architecture(run, tmp_path):
    """Local mode: the widths, not the weights (the training data order restarts on resume)."""
    root, out, _ = run
    resumed = _resume_folder(out, tmp_path, "resumed")
    torch.manual_seed(1)
    do_train(_cfg(root, resumed), resume=True)
    a = torch.load(out / "model_final.pth", weights_only=True)
    b = torch.load(resumed / "model_final.pth", weights_only=True)
    assert b["d2prune"]["spec"] == a["d2prune"]["spec"]
    assert b["trainer"]["hooks"]["PruningHook"]["events_done"] == len(EVENTS)
    assert _weights(b).keys() == _weights(a).keys()
    assert all(_weights(b)[k].shape == v.shape for k, v in _weights(a).items())


def test_eval_only_of_the_pruned_checkpoint_gives_the_runs_ap(run):
    root, out, results = run
    again = do_eval(_cfg(root, out, f"train.init_checkpoint={out / 'model_final.pth'}"))
    assert again["bbox"]["AP"] == pytest.approx(results["bbox"]["AP"], nan_ok=True)


@pytest.mark.subprocess
def test_the_tool_evaluates_a_pruned_checkpoint(run, tmp_path):
    root, out, results = run
    proc = run_tool(
        "lazyconfig_train_net.py", "--config-file", CONFIG, "--eval-only",
        *_overrides(root, tmp_path / "eval"), f"train.init_checkpoint={out / 'model_final.pth'}",
        "dataloader.test.mapper.augmentations.0.short_edge_length=64",
        "dataloader.test.mapper.augmentations.0.max_size=64",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert copypaste_ap(proc.stdout + proc.stderr) == pytest.approx(results["bbox"]["AP"], nan_ok=True)


def test_prune_keys_are_checked_with_their_lazy_names():
    def fails(*opts):
        with pytest.raises(UserError) as e:
            prune_config(load_lazy_config(CONFIG, opts))
        return str(e.value)

    assert fails("+prune.ratioo=0.5").startswith("prune.ratioo is not a pruning key; the keys are enabled, criterion,")
    assert fails("prune.ratio=1.5") == "prune.ratio must be a number in [0, 1), got 1.5."
    assert "prune.start_iter + prune.num_events - 1" in fails("prune.end_iter=50")
    assert "train.max_iter - 1 = 9" in fails("train.max_iter=10")
    options = ["prune.criterion=random", "prune.criterion_options={seed: 3}"]  # a dict, or pairs
    assert prune_config(load_lazy_config(CONFIG, options)).PRUNE.CRITERION_OPTIONS == [["seed", 3]]


def test_the_lazy_model_is_the_yaml_one_and_loads_its_checkpoints():
    cfg = load_lazy_config(CONFIG, ["train.device=cpu"])
    lazy = instantiate(cfg.model).state_dict()
    yaml = build_model(setup_cfg(str(REPO / "configs/synthetic/faster_rcnn_R18_FPN_target.yaml"), ["MODEL.DEVICE", "cpu"]))
    assert {k: v.shape for k, v in lazy.items()} == {k: v.shape for k, v in yaml.state_dict().items()}
    assert prune_config(cfg).INPUT.MIN_SIZE_TEST == 128


@pytest.mark.slow
def test_the_hook_in_detectron2s_own_loop_resumes_a_pruned_run(run, tmp_path):
    """detectron2's lazyconfig_train_net.py order: the optimizer is built for the model as first
    built and the checkpoint loads afterwards; the hook makes the optimizer follow the cut."""
    root, out, _ = run
    folder = _resume_folder(out, tmp_path, "own")
    cfg = _cfg(root, folder)
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    trainer = SimpleTrainer(model, instantiate(cfg.dataloader.train), instantiate(cfg.optimizer))
    checkpointer = PrunedCheckpointer(model, str(folder), trainer=trainer)
    trainer.register_hooks(
        [hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)), build_pruning_hook(cfg, checkpointer),
         hooks.PeriodicCheckpointer(checkpointer, period=1000)]
    )  # fmt: skip
    checkpointer.resume_or_load("", resume=True)
    assert trainer.iter == EVENTS[0]
    trainer.train(trainer.iter + 1, cfg.train.max_iter)
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    final = torch.load(folder / "model_final.pth", weights_only=True)
    assert final["d2prune"]["spec"] == torch.load(out / "model_final.pth", weights_only=True)["d2prune"]["spec"]
