"""Crash safety: checkpoints and `last_checkpoint` are written atomically, so a run killed at any
moment (also in the middle of a pruning event) resumes with `--resume` and ends at the pruned
model the schedule asks for."""

import os
import queue
import random
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


def _opts(dataset, out):
    """The tiny pruning config on the command line, slimmed further (64 px, narrow FPN and box
    head): three l1 events toward 50 % of the block channels, a checkpoint every second step."""
    return [
        *tiny_opts(out / "no-synthetic-data", out, ITERS),
        "DATASETS.TRAIN", f"('{dataset[0]}',)", "DATASETS.TEST", "()", "SOLVER.BASE_LR", "0.005",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
        "SOLVER.CHECKPOINT_PERIOD", "2",
        "PRUNE.ENABLED", "True", "PRUNE.SCHEDULE", "iterative", "PRUNE.RATIO", "0.5",
        "PRUNE.START_ITER", str(EVENTS[0]), "PRUNE.END_ITER", str(EVENTS[-1]),
        "PRUNE.NUM_EVENTS", str(len(EVENTS)),
    ]  # fmt: skip


class Run:
    """`tools/train_net.py` in a child process whose output lines are read as they come."""

    def __init__(self, dataset, out, *flags):
        command = [
            sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", CONFIG,
            "--dataset", *dataset, *flags, *_opts(dataset, out),
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

    def wait_for(self, text: str, count: int = 1, timeout: float = 600) -> bool:
        """Read output until the `count`-th line containing `text`; False if the run ended first."""
        seen = sum(text in line for line in self.lines)
        deadline = time.monotonic() + timeout
        while seen < count:
            line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            if line is None:
                return False
            self.lines.append(line)
            seen += text in line
        return True

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout: float = 600) -> int:
        """Read the output to its end; the exit status."""
        while (line := self._queue.get(timeout=timeout)) is not None:
            self.lines.append(line)
        return self.proc.wait()


def _check_complete(out) -> str:
    """Every visible checkpoint loads in full and `last_checkpoint` names one of them."""
    for name in os.listdir(out):
        if name.endswith(".pth") and not name.startswith("."):
            torch.load(out / name, weights_only=True)
    last = (out / "last_checkpoint").read_text().strip() if (out / "last_checkpoint").exists() else ""
    assert last == "" or (out / last).is_file()
    return last


@pytest.fixture
def runs():
    """Starts `Run`s; any still running when the test ends (a failed one) is killed."""
    started = []
    yield lambda *args: started.append(Run(*args)) or started[-1]
    for run in started:
        run.kill()


def test_a_killed_pruning_run_resumes_to_the_scheduled_model(tmp_path, runs):
    dataset = tiny_dataset(tmp_path / "data", "crash_resume_train", 2)
    out = tmp_path / "out"
    rng = random.Random(0)

    # Killed inside a pruning event: once it has begun to write its checkpoint, after a random
    # delay, so mostly in the middle of that write.
    run = runs(dataset, out)
    event = rng.choice([1, 2])
    assert run.wait_for(f"Saving checkpoint to {out / f'model_pruned_{EVENTS[event - 1]:07d}.pth'}")
    time.sleep(rng.uniform(0.0, 0.3))
    run.kill()
    torn = [n for n in os.listdir(out) if n.endswith(".tmp")]  # when the kill hit a write
    last = _check_complete(out)
    # The checkpoint written before the event, or one the event's iteration wrote in full.
    assert last in {
        1: ("model_0000001.pth", "model_pruned_0000002.pth"),
        2: ("model_pruned_0000002.pth", "model_pruned_0000003.pth", "model_0000003.pth"),
    }[event]

    run = runs(dataset, out, "--resume")
    assert run.finish() == 0, "".join(run.lines[-40:])
    resumed_at = int(last[-11:-4]) + 1
    assert any(f"Starting training from iteration {resumed_at}" in line for line in run.lines)
    assert _check_complete(out) == "model_final.pth"
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # the resumed run removed them
    print(f"killed in event {event} after {last}; temporary files left: {torn}")

    # The final checkpoint rebuilds the scheduled architecture in a freshly built model.
    cfg = setup_cfg(CONFIG, [*_opts(dataset, out), "PRUNE.ENABLED", "False"])
    torch.manual_seed(0)
    fresh = build_model(cfg)
    original = channel_spec(fresh)
    kinds = {g.name: g.kind for g in find_groups(fresh)}
    extra = PrunedCheckpointer(fresh).load(str(out / "model_final.pth"))
    expected = {n: w // 2 if kinds[n] == "block" else w for n, w in original.items()}
    assert channel_spec(fresh) == expected
    assert extra["d2prune"]["unpruned"] == original  # what another config would be checked against
    assert extra["trainer"]["hooks"]["PruningHook"]["events_done"] == len(EVENTS)
    assert extra["iteration"] == ITERS - 1

    # The last event's log line, with the widths it reached.
    (line,) = [ln for ln in run.lines if "pruning event 3/3" in ln]
    match = re.search(r"pruning event 3/3 at iter 4: block (\d+) -> (\d+) channels \(([-+]\d+\.\d) %", line)
    assert match, line
    old, new, change = int(match[1]), int(match[2]), float(match[3])
    assert new == sum(w for n, w in expected.items() if kinds[n] == "block")
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
