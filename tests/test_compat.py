"""d2prune.compat on both sides of every difference between detectron2 v0.6 and main, whichever is
installed: the other side is simulated by patching detectron2 as that version would have it.
Which side is installed is told by the feature itself, never by the version string."""

import sys
import types

import detectron2
import pytest
import torch
import torch.multiprocessing as mp
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultTrainer, TrainerBase
from detectron2.engine import defaults as d2_defaults
from detectron2.utils import comm
from torch import nn

from d2prune import compat
from d2prune.data import register_coco
from d2prune.engine.trainer import Trainer, build_coco_evaluator
from d2prune.errors import UserError

from .conftest import write_coco


@pytest.fixture
def fresh_caches():
    """compat caches what it finds out about detectron2 for the process; start and end clean."""
    functions = (compat.has_fast_coco_eval, compat.coco_eval_use_fast_impl, compat.tracing_adapter_class)
    for f in functions:
        f.cache_clear()
    yield
    for f in functions:
        f.cache_clear()


# --- fast COCO evaluation: compiled into detectron2._C or not ---------------------------------

def _with_c_module(monkeypatch, module):
    if module is None:  # a build without any extension: `from detectron2 import _C` fails
        monkeypatch.delattr(detectron2, "_C", raising=False)
        monkeypatch.setitem(sys.modules, "detectron2._C", None)
    else:
        monkeypatch.setattr(detectron2, "_C", module, raising=False)
        monkeypatch.setitem(sys.modules, "detectron2._C", module)


def _c_module(*names):
    module = types.ModuleType("detectron2._C")
    for name in names:
        setattr(module, name, lambda *a: None)
    return module


@pytest.mark.parametrize(
    "module, fast",
    [
        (_c_module("COCOevalAccumulate", "COCOevalEvaluateImages", "nms_rotated"), True),  # real ops
        (_c_module(), False),  # the stub extension `make setup` builds
        (_c_module("COCOevalAccumulate"), False),
        (None, False),
    ],
    ids=["compiled", "stub", "half", "absent"],
)
def test_fast_coco_eval_follows_the_extension(monkeypatch, fresh_caches, tmp_path, coco_dict, module, fast):
    _with_c_module(monkeypatch, module)
    assert compat.has_fast_coco_eval() is fast
    assert compat.coco_eval_use_fast_impl() is fast
    json_file, root = write_coco(tmp_path, coco_dict)
    register_coco("compat_eval", json_file, root)
    try:
        evaluator = build_coco_evaluator(None, "compat_eval", str(tmp_path / "eval"))
        assert evaluator._use_fast_impl is fast
    finally:
        DatasetCatalog.remove("compat_eval")
        MetadataCatalog.remove("compat_eval")


# --- checkpointing the optimizer: v0.6's DefaultTrainer has no state_dict, main's has ---------

def _main_state_dict(self):
    return {**TrainerBase.state_dict(self), "_trainer": self._trainer.state_dict()}


def _main_load_state_dict(self, state):
    TrainerBase.load_state_dict(self, state)
    self._trainer.load_state_dict(state["_trainer"])


def _bare_trainer(monkeypatch):
    """A d2prune Trainer with just what state_dict/load_state_dict touch: no model, no data."""
    monkeypatch.setattr(Trainer, "_follow_model", lambda self: None)
    trainer = Trainer.__new__(Trainer)
    trainer.iter, trainer._hooks, loaded = 7, [], []
    trainer.run_seed, trainer._stream = 5, None
    trainer._trainer = types.SimpleNamespace(
        state_dict=lambda: {"optimizer": {"state": {0: "momentum"}}}, load_state_dict=loaded.append
    )
    return trainer, loaded


@pytest.mark.parametrize("main", [False, True], ids=["v0.6", "main"])
def test_the_optimizer_state_is_saved_and_loaded_once(monkeypatch, main):
    installed_main = "state_dict" in vars(DefaultTrainer)
    assert compat.trainer_saves_optimizer(DefaultTrainer) is installed_main
    assert compat.TRAINER_SAVES_OPTIMIZER is installed_main
    if main and not installed_main:
        monkeypatch.setattr(DefaultTrainer, "state_dict", _main_state_dict, raising=False)
        monkeypatch.setattr(DefaultTrainer, "load_state_dict", _main_load_state_dict, raising=False)
    elif installed_main and not main:  # v0.6's DefaultTrainer inherits both from TrainerBase
        monkeypatch.delattr(DefaultTrainer, "state_dict")
        monkeypatch.delattr(DefaultTrainer, "load_state_dict")
    saves = compat.trainer_saves_optimizer(DefaultTrainer)
    assert saves is main
    monkeypatch.setattr(compat, "TRAINER_SAVES_OPTIMIZER", saves)

    trainer, loaded = _bare_trainer(monkeypatch)
    state = trainer.state_dict()
    assert state == {"iteration": 7, "seed": 5, "_trainer": {"optimizer": {"state": {0: "momentum"}}}}
    trainer.iter, trainer.run_seed = 0, 9
    trainer.load_state_dict(state)
    assert trainer.iter == 7 and trainer.run_seed == 5
    assert loaded == [{"optimizer": {"state": {0: "momentum"}}}]  # once, by whichever side owns it


# --- DistributedDataParallel on the CPU -------------------------------------------------------

def test_ddp_on_cpu_drops_device_ids_for_cpu_models_only(monkeypatch):
    calls = []
    monkeypatch.setattr(compat, "_d2_create_ddp_model", lambda model, **kw: calls.append(kw) or model)
    cpu = nn.Linear(2, 2)
    assert compat.create_ddp_model(cpu, broadcast_buffers=False) is cpu
    meta = nn.Linear(2, 2, device="meta")  # stands for a module on a GPU: left to detectron2
    compat.create_ddp_model(meta, broadcast_buffers=False)
    compat.create_ddp_model(cpu, device_ids=[0])
    assert calls == [
        {"broadcast_buffers": False, "device_ids": None},
        {"broadcast_buffers": False},
        {"device_ids": [0]},
    ]
    original = d2_defaults.create_ddp_model
    with compat.ddp_on_cpu():
        assert d2_defaults.create_ddp_model is compat.create_ddp_model
    assert d2_defaults.create_ddp_model is original


# --- launch: detectron2's (NCCL) or gloo processes on the CPU ----------------------------------

@pytest.fixture
def launches(monkeypatch):
    """Records what `compat.launch` hands to detectron2's launch or to torch's spawn."""
    calls = []
    monkeypatch.setattr(compat, "d2_launch", lambda *a, **kw: calls.append(("d2", a, kw)))
    monkeypatch.setattr(compat.mp, "spawn", lambda fn, **kw: calls.append(("spawn", fn, kw)))
    return calls


def _main(*args):
    return args


def test_launch_picks_detectron2_or_gloo(monkeypatch, launches):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    compat.launch(_main, 1, args=("one",))
    compat.launch(_main, 2, args=("two",))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    compat.launch(_main, 2, args=("gpus",))

    (kind, args, _), (spawn, fn, kw), (gpus, gpu_args, _) = launches
    assert (kind, args[:2]) == ("d2", (_main, 1)) and (gpus, gpu_args[:2]) == ("d2", (_main, 2))
    assert spawn == "spawn" and fn is compat._gloo_worker and kw["nprocs"] == 2
    main_func, world_size, per_machine, machine_rank, url, main_args, _ = kw["args"]
    assert (main_func, world_size, per_machine, machine_rank, main_args) == (_main, 2, 2, 0, ("two",))
    assert url.startswith("tcp://127.0.0.1:") and int(url.rsplit(":", 1)[1]) > 0


def test_launch_faults(monkeypatch, launches):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--dist-url auto works on one machine only"):
        compat.launch(_main, 2, num_machines=2, dist_url="auto")

    def exits(code):
        def spawn(fn, **kw):
            raise mp.ProcessExitedException(f"process 1 terminated with exit code {code}", 1, 4242, code)

        return spawn

    monkeypatch.setattr(compat.mp, "spawn", exits(2))  # a process printed its UserError
    with pytest.raises(SystemExit) as exited:
        compat.launch(_main, 2)
    assert exited.value.code == 2
    monkeypatch.setattr(compat.mp, "spawn", exits(1))  # a crash keeps its exception
    with pytest.raises(mp.ProcessExitedException):
        compat.launch(_main, 2)


@pytest.mark.parametrize("main", [False, True], ids=["v0.6", "main"])
def test_gloo_worker_sets_up_the_local_process_group(monkeypatch, main):
    """One process (world size 1), in this one: the local group is made as each version needs."""
    created = []

    def create_local_process_group(per_machine):  # what main's does, for one machine
        created.append(per_machine)
        comm._LOCAL_PROCESS_GROUP = torch.distributed.new_group(list(range(per_machine)))

    if main:  # main's get_local_size asserts that the group exists
        monkeypatch.setattr(comm, "create_local_process_group", create_local_process_group, raising=False)
    else:
        monkeypatch.delattr(comm, "create_local_process_group", raising=False)
    monkeypatch.setattr(comm, "_LOCAL_PROCESS_GROUP", None, raising=False)
    seen = []

    def main_func(value):
        seen.append((value, comm.get_world_size(), comm.get_rank(), comm.get_local_size()))

    url = f"tcp://127.0.0.1:{compat._free_port()}"
    try:
        compat._gloo_worker(0, main_func, 1, 1, 0, url, ("ran",), compat.DEFAULT_TIMEOUT)
        assert torch.distributed.get_backend() == "gloo"
        assert seen == [("ran", 1, 0, 1)]
        assert created == ([1] if main else [])
        assert comm._LOCAL_PROCESS_GROUP is not None
    finally:
        torch.distributed.destroy_process_group()


# --- export: TracingAdapter under detectron2.export (main) or beside a broken __init__ (v0.6) ---

def _export_imports() -> bool:
    try:
        import detectron2.export  # noqa: F401
    except ImportError:  # v0.6: the package's __init__ needs caffe2, which torch no longer has
        return False
    return True


@pytest.mark.parametrize("main", [False, True], ids=["v0.6", "main"])
def test_tracing_adapter_on_both_versions(monkeypatch, fresh_caches, main):
    installed_main = _export_imports()
    if main:
        if not installed_main:
            export = types.ModuleType("detectron2.export")
            export.TracingAdapter = type("TracingAdapter", (), {})
            monkeypatch.setitem(sys.modules, "detectron2.export", export)
        assert compat.tracing_adapter_class() is sys.modules["detectron2.export"].TracingAdapter
        return

    if installed_main:  # v0.6's import fails; flatten.py is then loaded from its file again
        monkeypatch.setitem(sys.modules, "detectron2.export", None)
        monkeypatch.delitem(sys.modules, "detectron2.export.flatten", raising=False)
    with pytest.raises(ImportError):
        import detectron2.export  # noqa: F401
    adapter = compat.tracing_adapter_class()
    assert adapter.__name__ == "TracingAdapter" and adapter.__module__ == "detectron2.export.flatten"
    assert "detectron2.export" not in sys.modules  # the stand-in package is gone again
