"""Crash safety: checkpoints and `last_checkpoint` are written atomically, so a run killed at any
moment (also in the middle of a pruning event) resumes with `--resume` and ends where the run
that was never interrupted ends: the same architecture, chosen globally by a data-driven
criterion while the weights train, and the same weights, bit for bit."""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from detectron2.modeling import build_model

from d2prune.config import setup_cfg
from d2prune.engine import PrunedCheckpointer, checkpoint
from d2prune.pruning import channel_spec, find_groups
from d2prune.utils.io import atomic_open, atomic_write_text

from . import models
from .conftest import CONFIG, REPO, tiny_opts
from .prune_helpers import tiny_dataset

ITERS = 6
EVENTS = (2, 3, 4)
TIMEOUT = 600  # seconds a run may take to reach its stop, or to finish

# `tools/train_net.py` as a user runs it, except that the process stops itself (SIGSTOP) at one
# point of the run that the test names, after printing that it got there: the test then kills
# it there, not wherever a timer happened to fall. argv[1] is the point: "after:<checkpoint>"
# (its file renamed into place and named by last_checkpoint), "inside:<checkpoint>" (written to
# its temporary file, not yet renamed), or "-" to run through.
STOPPING_TRAIN_NET = """
import contextlib, os, runpy, signal, sys
from d2prune.engine import checkpoint

where, _, name = sys.argv.pop(1).partition(":")

def stop():
    print(f"stopped {where} {name}", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)

save, atomic_open = checkpoint.PrunedCheckpointer.save, checkpoint.atomic_open

def stopping_save(self, basename, **kwargs):
    save(self, basename, **kwargs)
    if where == "after" and basename == name:
        stop()

@contextlib.contextmanager
def stopping_atomic_open(path, mode="w"):
    with atomic_open(path, mode) as f:
        yield f
        if where == "inside" and os.path.basename(path) == name + ".pth":
            f.flush()
            stop()

checkpoint.PrunedCheckpointer.save = stopping_save
checkpoint.atomic_open = stopping_atomic_open
sys.argv[0] = sys.argv[1]
del sys.argv[1]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _opts(dataset, out):
    """The tiny pruning config on the command line, slimmed further (64 px, narrow FPN and box
    head): three global taylor events toward 50 % of the block channels while training at a
    real learning rate, a checkpoint every second step."""
    return [
        *tiny_opts(out / "no-synthetic-data", out, ITERS),
        "DATASETS.TRAIN", f"('{dataset[0]}',)", "DATASETS.TEST", "()", "SOLVER.BASE_LR", "0.005",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
        "SOLVER.CHECKPOINT_PERIOD", "2",
        "PRUNE.ENABLED", "True", "PRUNE.SCHEDULE", "iterative", "PRUNE.RATIO", "0.5",
        "PRUNE.START_ITER", str(EVENTS[0]), "PRUNE.END_ITER", str(EVENTS[-1]),
        "PRUNE.NUM_EVENTS", str(len(EVENTS)), "PRUNE.MODE", "global", "PRUNE.CRITERION", "taylor",
    ]  # fmt: skip


class Run:
    """`tools/train_net.py` in a child process whose output lines are read as they come; with
    `stop` ("after:<checkpoint>" or "inside:<checkpoint>") it halts itself there."""

    def __init__(self, dataset, out, *flags, stop="-"):
        command = [
            sys.executable, "-c", STOPPING_TRAIN_NET, stop, str(REPO / "tools" / "train_net.py"),
            "--config-file", CONFIG, "--dataset", *dataset, *flags, *_opts(dataset, out),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, PYTHONWARNINGS="ignore"),
        )  # fmt: skip
        self.lines, self._queue = [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> None:
        """Read output up to the first line containing `text`; fail if the run ends or `timeout`
        seconds pass first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"no line with {text!r} within {timeout} s; last lines:\n{self.tail()}")
            if line is None:
                pytest.fail(f"the run ended (status {self.proc.wait()}) before {text!r}:\n{self.tail()}")
            self.lines.append(line)
            if text in line:
                return

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout: float = TIMEOUT) -> int:
        """Read the output to its end; the exit status."""
        while (line := self._queue.get(timeout=timeout)) is not None:
            self.lines.append(line)
        return self.proc.wait()

    def tail(self) -> str:
        return "".join(self.lines[-40:])


def _check_complete(out) -> str:
    """Every visible checkpoint loads in full and `last_checkpoint` names one of them."""
    for name in os.listdir(out):
        if name.endswith(".pth") and not name.startswith("."):
            torch.load(out / name, weights_only=True)
    last = (out / "last_checkpoint").read_text().strip() if (out / "last_checkpoint").exists() else ""
    assert last == "" or (out / last).is_file()
    return last


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run with nothing killed: (dataset, its final checkpoint)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    dataset = tiny_dataset(root / "data", "crash_resume_train", 4)
    run = Run(dataset, root / "out")
    try:
        assert run.finish() == 0, run.tail()
    finally:
        run.kill()
    return dataset, torch.load(root / "out" / "model_final.pth", weights_only=True)


@pytest.fixture
def runs():
    """Starts `Run`s; any still running when the test ends (a failed one) is killed."""
    started = []
    yield lambda *args, **kwargs: started.append(Run(*args, **kwargs)) or started[-1]
    for run in started:
        run.kill()


# Where the run is killed, and the checkpoint `last_checkpoint` then names. Checkpoints are
# written after iterations 1, 3 and 5 (CHECKPOINT_PERIOD 2) and by the events at 2, 3 and 4.
KILLS = {
    "before-first-event": ("after:model_0000001", "model_0000001.pth"),
    "writing-event-2": ("inside:model_pruned_0000003", "model_pruned_0000002.pth"),
    "after-event-2": ("after:model_pruned_0000003", "model_pruned_0000003.pth"),
    "after-final": ("after:model_final", "model_final.pth"),
}


@pytest.mark.subprocess
@pytest.mark.parametrize("stop, last", KILLS.values(), ids=KILLS.keys())
def test_a_killed_pruning_run_resumes_to_the_uninterrupted_runs_model(tmp_path, runs, uninterrupted, stop, last):
    dataset, reference = uninterrupted
    out = tmp_path / "out"

    killed = runs(dataset, out, stop=stop)
    killed.wait_for(f"stopped {stop.replace(':', ' ')}")
    killed.kill()
    torn = [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert len(torn) == stop.startswith("inside:"), torn
    assert _check_complete(out) == last

    run = runs(dataset, out, "--resume")
    assert run.finish() == 0, run.tail()
    resumed_at = int(last[-11:-4]) + 1 if last != "model_final.pth" else ITERS
    assert any(f"Starting training from iteration {resumed_at}" in line for line in run.lines)
    assert _check_complete(out) == "model_final.pth"
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # the resumed run removed them

    # The final checkpoint rebuilds the scheduled architecture in a freshly built model.
    cfg = setup_cfg(CONFIG, [*_opts(dataset, out), "PRUNE.ENABLED", "False"])
    torch.manual_seed(0)
    fresh = build_model(cfg)
    original = channel_spec(fresh)
    kinds = {g.name: g.kind for g in find_groups(fresh)}
    extra = PrunedCheckpointer(fresh).load(str(out / "model_final.pth"))
    spec = channel_spec(fresh)
    assert {n: w for n, w in spec.items() if kinds[n] != "block"} == {n: w for n, w in original.items() if kinds[n] != "block"}
    blocks = sum(w for n, w in spec.items() if kinds[n] == "block")
    assert blocks == sum(w // 2 for n, w in original.items() if kinds[n] == "block")
    assert len({spec[n] / original[n] for n in spec if kinds[n] == "block"}) > 1  # chosen globally
    # What the run that was never killed ended with, bit for bit.
    assert extra["d2prune"]["spec"] == reference["d2prune"]["spec"]
    final = torch.load(out / "model_final.pth", weights_only=True)["d2prune"]["model"]
    differing = [k for k, v in reference["d2prune"]["model"].items() if not torch.equal(v, final[k])]
    assert not differing, differing[:5]
    assert extra["d2prune"]["unpruned"] == original  # what another config would be checked against
    assert extra["trainer"]["hooks"]["PruningHook"]["events_done"] == len(EVENTS)
    assert extra["iteration"] == ITERS - 1

    # The last event's log line (from whichever run got there), with the widths it reached.
    (line,) = [ln for ln in killed.lines + run.lines if "pruning event 3/3" in ln]
    match = re.search(r"pruning event 3/3 at iter 4: block (\d+) -> (\d+) channels \(([-+]\d+\.\d) %", line)
    assert match, line
    old, new, change = int(match[1]), int(match[2]), float(match[3])
    assert new == blocks
    assert change == pytest.approx(100 * (new - old) / old, abs=0.05)


@pytest.fixture
def saved(tmp_path):
    """A checkpoint directory holding one complete checkpoint, `model_a.pth`."""
    model = models.build("faster_rcnn_R18_FPN")
    checkpointer = PrunedCheckpointer(model, str(tmp_path))
    checkpointer.save("model_a", iteration=1)
    return checkpointer, tmp_path


def test_an_interrupted_save_leaves_the_previous_checkpoint(saved, monkeypatch):
    checkpointer, folder = saved
    before = (folder / "model_a.pth").read_bytes()

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    with pytest.raises(OSError, match="No space left"):
        checkpointer.save("model_b", iteration=2)
    with pytest.raises(OSError, match="No space left"):
        checkpointer.save("model_a", iteration=3)  # over an existing checkpoint

    assert sorted(os.listdir(folder)) == ["last_checkpoint", "model_a.pth"]
    assert (folder / "last_checkpoint").read_text() == "model_a.pth"
    assert (folder / "model_a.pth").read_bytes() == before
    # What a kill (not an exception) leaves behind is removed when the run resumes.
    (folder / ".model_b.pth.0badc0de.tmp").write_bytes(b"PK\x03\x04 half")
    (folder / ".notes.tmp").write_text("not ours")
    fresh = models.build_fresh("faster_rcnn_R18_FPN")
    assert PrunedCheckpointer(fresh, str(folder)).resume_or_load("", resume=True)["iteration"] == 1
    assert sorted(os.listdir(folder)) == [".notes.tmp", "last_checkpoint", "model_a.pth"]


def test_atomic_writes_replace_whole_files_only(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_text(str(path), "old")
    with pytest.raises(RuntimeError):
        with atomic_open(str(path)) as f:
            f.write("new, but cut short")
            raise RuntimeError("crash while writing")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]
    atomic_write_text(str(path), "new")
    assert path.read_text() == "new"
    # Permissions as open() gives them (from the umask), not a temporary file's 0600.
    (tmp_path / "plain").write_text("x")
    assert os.stat(path).st_mode == os.stat(tmp_path / "plain").st_mode
