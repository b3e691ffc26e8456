"""Running on a Slurm cluster through submitit, tested without one: results of runs that finish at
once, the job array that Slurm gets (sbatch, srun and sacct stood in for by scripts), Detectron2's
launch arguments from a Slurm environment, and, through submitit's LocalExecutor, a study run that
is preempted, requeued, killed and resubmitted, and a two-process tools/train_net.py job."""

import argparse
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import submitit

from d2prune.data.synthetic import generate
from d2prune.errors import UserError
from projects import cluster
from projects.study import launcher
from projects.study import run as study_run
from projects.study import runner as study

from .conftest import CONFIG, REPO, run_tool, tiny_opts
from .test_study import status_rows


def test_results_of_runs_finishing_at_once_are_all_kept(tmp_path):
    """Forty runs record their results at the same moment while the study merges them into
    results.jsonl over and over: the last merge holds every one, once."""
    out = str(tmp_path)
    (tmp_path / study.RESULTS).write_text(json.dumps({"name": "older", "bbox_AP": 0.5}) + "\n")
    start = threading.Barrier(41)
    errors = []

    def finish(i):
        start.wait()
        study.record_result(out, {"name": f"run{i:02d}", "bbox_AP": float(i)})

    def merge():
        start.wait()
        for _ in range(30):
            try:
                study.merge_results(out)
            except Exception as e:  # a half-written file, a rename racing a read
                errors.append(e)

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(40)] + [threading.Thread(target=merge)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    merged = study.merge_results(out)
    assert sorted(r["name"] for r in merged) == ["older"] + [f"run{i:02d}" for i in range(40)]
    lines = (tmp_path / study.RESULTS).read_text().splitlines()
    assert len(lines) == 41 and {json.loads(line)["name"] for line in lines} == {r["name"] for r in merged}
    assert not [p for p in (tmp_path / study.RESULTS_DIR).iterdir() if not p.name.endswith(".json")]


def test_launcher_faults_are_one_line_errors(tmp_path, monkeypatch):
    cluster.check_launcher("local")  # needs neither submitit nor Slurm
    with pytest.raises(UserError, match="needs --partition NAME"):
        cluster.check_launcher("slurm")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="sbatch and srun are not on PATH; submit from a Slurm login node"):
        cluster.check_launcher("slurm", "gpu")
    with pytest.raises(UserError, match="runs on this machine only, not on 2 machines"):
        cluster.check_launcher("local-submitit", nodes=2)
    monkeypatch.setattr(cluster, "submitit", None)
    with pytest.raises(UserError, match=r"--launcher slurm needs submitit, which is not installed: pip install submitit"):
        cluster.check_launcher("slurm", "gpu")


def _script(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch, srun and sacct on PATH: sbatch keeps each submission file and answers job ids
    4242, 4243...; sacct prints the lines of `states` (`JOBID|STATE|NODE`) that the test writes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "sbatch", f"""#!/bin/sh
n=$(ls {tmp_path}/sbatch_*.sh 2>/dev/null | wc -l)
cp "$1" {tmp_path}/sbatch_$n.sh
echo "Submitted batch job $((4242 + n))"
""")
    _script(bin_dir / "srun", "#!/bin/sh\nexit 1\n")
    _script(bin_dir / "sacct", f"#!/bin/sh\necho 'JobID|State|NodeList'\ncat {tmp_path}/states 2>/dev/null\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    submitit.SlurmJob.watcher.clear()
    yield tmp_path
    submitit.SlurmJob.watcher.clear()


def _wait(condition, timeout=60.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_slurm_gets_one_job_array_and_a_rerun_resubmits_only_the_failed_runs(fake_slurm):
    tmp = fake_slurm
    out = tmp / "study"
    jobs = [study.Job(None, 0.0, seed, 4) for seed in range(3)]
    args = argparse.Namespace(launcher="slurm", partition="gpu", timeout_min=30, gpus_per_run=1)
    factory = study_run.executor_factory(args, parallel=2, threads=6)
    worker_args = ["cfg.yaml", str(out), "[]", "[]"]

    def submit_in_background():
        failed = []
        thread = threading.Thread(target=lambda: failed.extend(
            launcher.submit_study(jobs, worker_args, str(out), factory, parallel=2, threads=6, poll_s=0.05)))
        thread.start()
        return thread, failed

    thread, failed = submit_in_background()
    _wait(lambda: (tmp / "sbatch_0.sh").is_file(), what="the first sbatch")
    # The array's first task finishes (its result recorded by the job), the others fail.
    study.record_result(str(out), {"name": jobs[0].name, "bbox_AP": 1.0, "bbox_AP50": 2.0, "seconds": 1.0})
    (tmp / "states").write_text("4242_0|COMPLETED|n1\n4242_1|FAILED|n2\n4242_2|CANCELLED by 0|n3\n")
    thread.join(timeout=60)
    assert not thread.is_alive() and failed == [jobs[1].name, jobs[2].name]

    sbatch = (tmp / "sbatch_0.sh").read_text().splitlines()
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --time=30", "#SBATCH --nodes=1", "export OMP_NUM_THREADS=6"):
        assert line in sbatch
    assert f"export PYTHONPATH={REPO}" + '"${PYTHONPATH:+:$PYTHONPATH}"' in sbatch
    # Each task of the array runs its own run, through the study's checkpointable worker.
    for i, job in enumerate(jobs):
        call = submitit.helpers.DelayedSubmission.load(out / "submitit" / f"4242_{i}_submitted.pkl").function
        assert isinstance(call, launcher.StudyRun) and call.argv == [*worker_args, json.dumps(vars(job))]
        assert call.threads == 6 and hasattr(call, "checkpoint")
    rows = status_rows(launcher.status(jobs, str(out)))
    assert rows[jobs[0].name] == ["finished", "slurm 4242_0", ""]
    assert rows[jobs[1].name] == ["failed", "slurm 4242_1", f"{out}/submitit/4242_1_0_log.err (FAILED)"]
    assert rows[jobs[2].name][0] == "failed" and rows[jobs[2].name][2].endswith("(CANCELLED)")

    # The rerun submits the two failed runs again, as an array of two, and waits for them.
    submitit.SlurmJob.watcher.clear()
    thread, failed = submit_in_background()
    _wait(lambda: (tmp / "sbatch_1.sh").is_file(), what="the second sbatch")
    assert "#SBATCH --array=0-1%2" in (tmp / "sbatch_1.sh").read_text().splitlines()
    for job in jobs[1:]:
        study.record_result(str(out), {"name": job.name, "bbox_AP": 1.0, "bbox_AP50": 2.0, "seconds": 1.0})
    (tmp / "states").write_text("4243_0|COMPLETED|n1\n4243_1|COMPLETED|n1\n")
    thread.join(timeout=60)
    assert not thread.is_alive() and failed == []
    assert not (tmp / "sbatch_2.sh").exists()
    assert [r["name"] for r in study.load_results(str(out))] == [job.name for job in jobs]
    assert [json.loads(line)["name"] for line in (out / study.RESULTS).read_text().splitlines()] == [
        job.name for job in jobs]


def test_detectron2_launch_arguments_come_from_the_slurm_environment(monkeypatch):
    """Two machines, one task each: machine 1 learns it is rank 1 of 2, and both meet on the first
    host of the node list, on the same port."""
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "7731", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "2",
             "SLURM_NODEID": "1", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    second = cluster.distributed_args(submitit.JobEnvironment())
    assert second["num_machines"] == 2 and second["machine_rank"] == 1
    assert re.fullmatch(r"tcp://gpu07:\d{5}", second["dist_url"])
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert cluster.distributed_args(submitit.JobEnvironment()) == dict(second, machine_rank=0)
    monkeypatch.setenv("SLURM_NTASKS", "4")  # two tasks per machine: not how train_net submits
    with pytest.raises(RuntimeError, match="one task per machine"):
        cluster.distributed_args(submitit.JobEnvironment())


def _task_pids(folder) -> list:
    """Process ids of the submitit tasks that run jobs of `folder` (python -m submitit.core._submit)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in argv and str(folder).encode() in argv:
            pids.append(int(entry))
    return pids


def _starts(log_file) -> list:
    """The iterations the run's training started from, in order (detectron2's log line)."""
    text = log_file.read_text() if log_file.is_file() else ""
    return [int(n) for n in re.findall(r"Starting training from iteration (\d+)", text)]


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_preempted_then_killed_run_resumes_from_its_checkpoints(trained, tmp_path):
    """One study run through submitit's LocalExecutor. Preempted (submitit's USR2) after its first
    checkpoint, it is requeued by `StudyRun.checkpoint` and resumes from that checkpoint; killed
    outright after a later checkpoint, the study reports it failed, `--status` gives its log, and
    rerunning the command resubmits it, resuming from the last checkpoint: no iteration is trained
    from zero twice, and the run finishes."""
    root, source_out, _ = trained
    generate(root, "target", "val", 4, image_size=96, workers=1)
    out = tmp_path / "study"
    opts = tiny_opts(root, tmp_path / "unused", iters=20) + [
        "MODEL.WEIGHTS", str(source_out / "model_final.pth"), "SOLVER.CHECKPOINT_PERIOD", "4",
    ]  # fmt: skip
    args = ["--config-file", str(REPO / "configs/synthetic/study/faster_rcnn_R18_FPN_study.yaml"),
            "--baselines-only", "--seeds", "0", "--train-sizes", "3", "--data-root", str(tmp_path / "data"),
            "--image-size", "96", "--latency-repeats", "2", "--launcher", "local-submitit",
            "--output", str(out), *opts]
    run = out / "runs" / "baseline_n3_s0"
    folder = out / "submitit"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, str(REPO / "tools" / "study.py"), *args], stdout=log,
                                 stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    try:
        _wait(lambda: (run / "model_0000003.pth").is_file(), timeout=180, what="the first checkpoint")
        (preempted,) = _task_pids(folder)
        os.kill(preempted, signal.SIGUSR2)  # what Slurm sends before preempting, or at the time limit
        _wait(lambda: len(_starts(run / "log.txt")) == 2, timeout=120, what="the requeued job's start")
        resumed = _starts(run / "log.txt")[1]
        _wait(lambda: (run / f"model_{resumed + 3:07d}.pth").is_file(), timeout=120, what="a later checkpoint")
        (requeued,) = _task_pids(folder)
        assert requeued != preempted
        os.kill(requeued, signal.SIGKILL)  # a node failure: no signal handler, no requeue
        assert first.wait(timeout=120) == 2
    finally:
        if first.poll() is None:
            first.kill()
    printed = (tmp_path / "first.log").read_text()
    assert "1 run(s) failed: baseline_n3_s0" in printed
    job_id = json.loads((run / study.LAUNCH).read_text())["job_id"]
    assert "requeued, it resumes from model_0000003.pth" in (folder / f"{job_id}_0_log.out").read_text()
    status = run_tool("study.py", "--status", *args)  # options go before the config overrides
    assert status_rows(status.stdout)["baseline_n3_s0"] == [
        "failed", f"local-submitit {job_id}", str(folder / f"{job_id}_0_log.err")]
    killed_at = int(re.search(r"model_(\d+)\.pth", (run / "last_checkpoint").read_text()).group(1))

    again = run_tool("study.py", *args)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "study: submitted 1 run(s)" in again.stdout
    assert _starts(run / "log.txt") == [0, resumed, killed_at + 1]
    assert resumed == 4 or (resumed > 4 and resumed % 4 == 0)
    metrics = [json.loads(line) for line in (run / "metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if "total_loss" in m][-1] == 19  # the schedule's last iteration
    assert [r["name"] for r in study.load_results(str(out))] == ["baseline_n3_s0"]


@pytest.mark.subprocess
@pytest.mark.ddp
def test_train_net_through_submitit_runs_two_processes_from_the_job_environment(trained, tmp_path):
    """`tools/train_net.py --launcher local-submitit --num-gpus 2`: one submitit job whose task
    takes its launch arguments from the job environment and starts two processes (gloo on CPU),
    which import the training function by name; the tool waits for the job and it trains."""
    root, _, _ = trained
    out = tmp_path / "train"
    proc = run_tool("train_net.py", "--launcher", "local-submitit", "--num-gpus", "2", "--config-file", CONFIG,
                    *tiny_opts(root, out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (out / "model_final.pth").is_file()
    (job_log,) = (out / "submitit").glob("*_0_log.out")
    assert re.search(r"--num-machines 1 --machine-rank 0 --dist-url tcp://[^:]+:\d+ --resume False", job_log.read_text())
    assert "Starting training from iteration 0" in (out / "log.txt").read_text()
