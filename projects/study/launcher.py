"""The study's runs as submitit jobs (`tools/study.py --launcher slurm|local-submitit`): one Slurm
job array whose tasks run the same worker as local runs and resume from their last checkpoint
when the cluster requeues them; and the state of every planned run, for `--status`.
"""

import json
import os
import socket
import time
from dataclasses import asdict
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from tabulate import tabulate
from tqdm import tqdm

from projects import cluster
from projects.study import runner

# sacct states of a Slurm job that has not started yet, or will start again (requeued).
SLURM_WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING",
                 "SUSPENDED", "PREEMPTED", "READY", "UNKNOWN"}
SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
# How long a job that Slurm says COMPLETED may take to show its result file: a shared filesystem
# can hide another machine's new file from this one for a while.
RESULT_GRACE_S = 90.0


class StudyRun(cluster.Checkpointable):
    """One study run as a submitit job: `runner.worker_main(worker_args + [job JSON])`, the worker
    that local runs start as `tools/study.py --run-one`, called in the job's process with
    `threads` torch threads. When Slurm preempts the job or its time runs out, submitit calls
    `checkpoint()`, which requeues this same call: `run_job` then resumes from the run folder's
    last checkpoint, as a rerun of a killed local study does."""

    def __init__(self, worker_args: Sequence[str], job: runner.Job, threads: int):
        self.argv = [*worker_args, json.dumps(asdict(job))]
        self.name = job.name
        self.threads = threads

    def __call__(self) -> Dict:
        torch.set_num_threads(self.threads)
        return runner.worker_main(self.argv)

    def checkpoint(self, *args, **kwargs):
        last = runner.read_text(os.path.join(self.argv[1], "runs", self.name, "last_checkpoint"))
        print(f"{self.name}: preempted or out of time; requeued, it resumes from "
              f"{last.strip() if last else 'its start (no checkpoint yet)'}", flush=True)
        return cluster.submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def submit_study(
    jobs: Sequence[runner.Job],
    worker_args: Sequence[str],
    output: str,
    make_executor: Callable[[str], object],
    parallel: int,
    threads: int,
    poll_s: float = 1.0,
) -> List[str]:
    """Run the `jobs` not yet finished in `output` as submitit jobs of `make_executor(folder)`
    (submitit's files in `output/submitit`), and wait for them. A run whose job from an earlier
    invocation is still queued or running is waited for, not submitted again; a missing or
    failed one is submitted. On Slurm all go in one job array, which runs at most `parallel` at
    once; other executors get at most `parallel` jobs at a time from here. Results are merged
    into `results.jsonl` as runs finish. Returns the names of the runs that failed.

    Stopping this process leaves Slurm jobs running: rerunning the command waits for them."""
    os.makedirs(os.path.join(output, "runs"), exist_ok=True)
    done = {r["name"] for r in runner.load_results(output)}
    todo = [job for job in jobs if job.name not in done]
    if len(todo) < len(jobs):
        print(f"study: {len(jobs) - len(todo)} of {len(jobs)} runs already finished in {output}")
    executor = make_executor(os.path.join(output, "submitit"))
    live: Dict[str, object] = {}  # name -> submitit job submitted by this process
    waiting = [job.name for job in todo
               if runner.read_launch(output, job.name) and run_state(output, job.name).state in ("pending", "running")]
    if waiting:
        print(f"study: waiting for {len(waiting)} run(s) submitted earlier and still queued or running: "
              f"{', '.join(waiting)}")
    queue = [job for job in todo if job.name not in waiting]
    in_flight = set(waiting)

    def submit(batch: Sequence[runner.Job]) -> None:
        submitted = executor.submit_array([StudyRun(worker_args, job, threads) for job in batch])
        for job, sub in zip(batch, submitted):
            runner.write_launch(output, job.name, {"launcher": "submitit", "cluster": executor.cluster,
                                                   "job_id": sub.job_id, "folder": str(executor.folder)})
            live[job.name] = sub
            in_flight.add(job.name)
        where = "Slurm" if executor.cluster == "slurm" else "submitit's LocalExecutor"
        print(f"study: submitted {len(batch)} run(s) to {where}: job(s) {', '.join(s.job_id for s in submitted)}",
              flush=True)

    if queue and executor.cluster == "slurm":  # the array's %parallel is Slurm's to enforce
        submit(queue)
        queue = []
    failed: List[str] = []
    completed_at: Dict[str, float] = {}
    bar = tqdm(total=len(todo), desc="study runs", unit="run", disable=not todo)
    try:
        while queue or in_flight:
            while queue and len(in_flight) < parallel:
                submit([queue.pop(0)])
            time.sleep(poll_s)
            for name in sorted(in_flight):
                run = run_state(output, name, live.get(name))
                if run.state == "finished":
                    runner.merge_results(output)
                    bar.write(runner.result_line(name, runner.finished_result(output, name)))
                elif run.state == "failed":
                    if run.detail == "COMPLETED":
                        completed_at.setdefault(name, time.monotonic())
                        if time.monotonic() - completed_at[name] < RESULT_GRACE_S:
                            continue
                    failed.append(name)
                    bar.write(f"  {name}: FAILED ({run.job}{', ' + run.detail if run.detail else ''}), see {run.log}")
                else:
                    continue
                in_flight.discard(name)
                bar.update(1)
    finally:
        bar.close()
        if in_flight and executor.cluster == "slurm":
            print(f"study: {len(in_flight)} run(s) still queued or running on Slurm; rerun the command to "
                  "wait for them, or add --status to see where they are")
    return failed


class RunState(NamedTuple):
    """Where one run of a study stands. state: `finished` (its result is recorded), `pending`
    (never started, or queued), `running`, `failed` (stopped without a result) or `unknown`
    (started by a local study on another machine, which only that machine can check); job: its
    process or job id; log: where to look, for a run that failed or runs; detail: the exit status
    or the Slurm state of a failed run."""

    state: str
    job: str = ""
    log: str = ""
    detail: str = ""


def run_state(output: str, name: str, live=None) -> RunState:
    """The `RunState` of run `name` of the study in `output`. `live`: the submitit job object of
    a job that this process submitted (its state comes from the process it holds)."""
    record = runner.read_launch(output, name)
    if runner.finished_result(output, name) is not None:
        return RunState("finished", _job_label(record))
    if record is None:
        return RunState("pending")
    job = _job_label(record)
    if record["launcher"] == "local":
        if "exit" in record:
            return RunState("failed", job, record["log"], f"exit {record['exit']}")
        return RunState(_alive_state(_alive(record["host"], record["pid"])), job, record["log"])
    submitit = cluster.require_submitit("slurm" if record["cluster"] == "slurm" else "local-submitit")
    log = str(submitit.core.utils.JobPaths(record["folder"], record["job_id"], 0).stderr)
    if record["cluster"] == "slurm":
        raw = submitit.SlurmJob(record["folder"], record["job_id"]).state or "UNKNOWN"
        raw = raw.split()[0].upper()  # "CANCELLED by 1234"
        if raw in SLURM_WAITING:
            return RunState("pending", job)
        if raw in SLURM_RUNNING:
            return RunState("running", job, log)
        return RunState("failed", job, log, raw)
    if live is not None:
        alive = live.state == "RUNNING"
    else:  # the job id of submitit's LocalExecutor is its controller's process id
        alive = _alive(record["host"], int(record["job_id"]))
    return RunState(_alive_state(alive), job, log)


def _alive_state(alive: Optional[bool]) -> str:
    return "unknown" if alive is None else "running" if alive else "failed"


def _job_label(record: Optional[Dict]) -> str:
    if record is None:
        return ""
    if record["launcher"] == "local":
        return f"pid {record['pid']}"
    return f"{'slurm' if record['cluster'] == 'slurm' else 'local-submitit'} {record['job_id']}"


def _alive(host: str, pid: int) -> Optional[bool]:
    """Whether process `pid` of `host` still runs; None when `host` is not this machine."""
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def status(jobs: Sequence[runner.Job], output: str) -> str:
    """The `--status` table: every planned run with its state, job and, for runs that failed or
    run, the log to read; then the count of each state."""
    rows = []
    for job in jobs:
        run = run_state(output, job.name)
        rows.append((job.name, run.state, run.job, f"{run.log} ({run.detail})" if run.detail else run.log))
    counts = {state: sum(row[1] == state for row in rows)
              for state in ("finished", "running", "pending", "failed", "unknown")}
    summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n or state != "unknown")
    table = tabulate(rows, headers=["run", "state", "job", "log"], tablefmt="simple")
    return f"{table}\nstudy: {len(jobs)} runs in {output}: {summary}"
