"""Running d2prune's tools on a Slurm cluster through submitit: the executor factory shared by
`tools/study.py` and `tools/train_net.py`, and one long (multi-GPU, multi-machine) fine-tune as a
requeueable submitit job whose processes Detectron2's `launch` starts from the Slurm environment.

submitit is optional (`pip install -e '.[cluster]'`): without it only `--launcher local` works,
and the other launchers say how to install it.
"""

import argparse
import copy
import importlib
import os
import shlex
import shutil
import socket
import zlib
from typing import Any, Dict, Optional, Sequence

from d2prune.compat import launch_from_args
from d2prune.errors import UserError

try:
    import submitit
    from submitit.helpers import Checkpointable
except ImportError:  # `require_submitit` turns this into one line saying how to install it
    submitit = None
    Checkpointable = object

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")

# local: this process starts the runs itself (today's behaviour); slurm: sbatch through submitit;
# local-submitit: the slurm path run by submitit's LocalExecutor on this machine (no cluster).
LAUNCHERS = ("local", "slurm", "local-submitit")
# Requeues after a time-out before submitit gives a job up; preemptions do not count.
MAX_TIMEOUTS = 10


def add_launcher_arguments(parser: argparse.ArgumentParser, timeout_min: int) -> None:
    """The options every tool that can submit to Slurm shares."""
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="local: processes on this machine; slurm: jobs submitted through submitit "
                             "(requeued and resumed on preemption or time-out); local-submitit: the slurm "
                             "path through submitit's LocalExecutor on this machine")
    parser.add_argument("--partition", default=None, help="Slurm partition (--launcher slurm)")
    parser.add_argument("--timeout-min", type=int, default=timeout_min,
                        help="time limit of one job in minutes; a job that reaches it is requeued and resumes")


def require_submitit(launcher: str):
    """The submitit module, or a UserError for `--launcher launcher` when it is not installed."""
    if submitit is None:
        raise UserError(f"--launcher {launcher} needs submitit, which is not installed: "
                        "pip install submitit (or pip install -e '.[cluster]').")
    return submitit


def check_launcher(launcher: str, partition: Optional[str] = None, nodes: int = 1) -> None:
    """The faults of `--launcher` and its options that can be told before any slow work."""
    if launcher == "local":
        return
    require_submitit(launcher)
    if launcher == "local-submitit" and nodes != 1:
        raise UserError(f"--launcher local-submitit runs on this machine only, not on {nodes} machines.")
    if launcher == "slurm":
        if not partition:
            raise UserError("--launcher slurm needs --partition NAME, the Slurm partition to submit to.")
        if shutil.which("srun") is None or shutil.which("sbatch") is None:
            raise UserError("--launcher slurm: sbatch and srun are not on PATH; submit from a Slurm login node "
                            "(--launcher local-submitit tries the same path on this machine).")


def make_executor(
    launcher: str,
    folder: str,
    *,
    name: str,
    timeout_min: int,
    gpus_per_node: int,
    cpus_per_task: int,
    nodes: int = 1,
    partition: Optional[str] = None,
    array_parallelism: Optional[int] = None,
    env: Optional[Dict[str, str]] = None,
    python_path: Sequence[str] = (REPO,),
):
    """A submitit `AutoExecutor` for `launcher` (`slurm` or `local-submitit`) writing its pickles and
    logs to `folder`. Each job exports `env` and puts `python_path` on PYTHONPATH before Python
    starts (the jobs unpickle callables from `projects/`, which is not installed), and runs in
    the submitting process's working directory, so relative paths keep their meaning on a shared
    filesystem. `array_parallelism` caps how many jobs of one array Slurm runs at once."""
    if launcher not in ("slurm", "local-submitit"):
        raise ValueError(f"make_executor: {launcher!r} is not a submitit launcher")
    check_launcher(launcher, partition, nodes)
    setup = ["export PYTHONPATH=" + shlex.quote(":".join(python_path)) + '"${PYTHONPATH:+:$PYTHONPATH}"']
    setup += [f"export {key}={shlex.quote(str(value))}" for key, value in (env or {}).items()]
    cluster = "slurm" if launcher == "slurm" else "local"
    executor = submitit.AutoExecutor(folder, cluster=cluster, slurm_max_num_timeout=MAX_TIMEOUTS,
                                     local_max_num_timeout=MAX_TIMEOUTS)
    executor.update_parameters(
        name=name, timeout_min=timeout_min, nodes=nodes, tasks_per_node=1, gpus_per_node=gpus_per_node,
        cpus_per_task=cpus_per_task, slurm_partition=partition, slurm_array_parallelism=array_parallelism,
        slurm_setup=setup, local_setup=setup,
    )
    return executor


def distributed_args(env) -> Dict[str, Any]:
    """Detectron2's launch arguments for this task of a submitit job (`submitit.JobEnvironment()`),
    as detectron2 users set them by hand: one task per machine, the machine's rank its node index,
    and the first host of the job the rendezvous, on a port derived from the job id so that every
    machine computes the same one without talking to the others."""
    if env.num_tasks != env.num_nodes:
        raise RuntimeError(f"expected one task per machine, got {env.num_tasks} tasks on {env.num_nodes} nodes")
    port = 20000 + zlib.crc32(str(env.job_id).encode()) % 20000
    return {"num_machines": env.num_nodes, "machine_rank": env.node,
            "dist_url": f"tcp://{env.hostnames[0]}:{port}"}


class TrainJob(Checkpointable):
    """`tools/train_net.py` as one submitit job: `entry` ("module:function", imported in the job,
    so that the processes Detectron2's `launch` spawns can import it too) called through `launch`
    with `args`, whose launcher flags come from the Slurm environment. On preemption or time-out
    submitit calls `checkpoint()`: the requeued job is the same call with `--resume`, which
    continues from the last checkpoint in OUTPUT_DIR."""

    def __init__(self, entry: str, args: argparse.Namespace):
        self.entry = entry
        self.args = args

    def __call__(self):
        env = submitit.JobEnvironment()
        args = copy.copy(self.args)
        vars(args).update(distributed_args(env))
        print(f"{env}: --num-machines {args.num_machines} --machine-rank {args.machine_rank} "
              f"--dist-url {args.dist_url} --resume {args.resume}", flush=True)
        module, function = self.entry.split(":")
        main = getattr(importlib.import_module(module), function)
        return launch_from_args(main, args)

    def checkpoint(self, *args, **kwargs):
        resumed = copy.copy(self.args)
        resumed.resume = True
        return submitit.helpers.DelayedSubmission(TrainJob(self.entry, resumed), *args, **kwargs)


def submit_training(entry: str, args: argparse.Namespace, output_dir: str, cpus_per_task: int) -> Optional[Any]:
    """Submit `TrainJob(entry, args)` for `args.launcher` with `args.num_machines` machines of
    `args.num_gpus` GPUs each; its submitit files go to OUTPUT_DIR/submitit. On Slurm this
    returns once the job is queued; with local-submitit it waits and returns the job's result."""
    executor = make_executor(
        args.launcher, os.path.join(output_dir, "submitit"), name="train_net", timeout_min=args.timeout_min,
        nodes=args.num_machines, gpus_per_node=args.num_gpus, cpus_per_task=cpus_per_task,
        partition=args.partition, python_path=(REPO, TOOLS),
    )
    job = executor.submit(TrainJob(entry, args))
    print(f"train_net: job {job.job_id} submitted from {socket.gethostname()} ({args.num_machines} machine(s) x "
          f"{args.num_gpus} GPU(s)); its log: {job.paths.stdout} and {job.paths.stderr}", flush=True)
    if args.launcher == "slurm":
        print(f"train_net: follow it with squeue -j {job.job_id}; it resumes from its last checkpoint "
              "whenever Slurm requeues it", flush=True)
        return None
    return wait_for(job)


def wait_for(job) -> Any:
    """The result of submitit `job`, waiting for it; a UserError naming its log when it failed."""
    try:
        return job.result()
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError):
        raise UserError(f"job {job.job_id} failed; see {job.paths.stderr}") from None
