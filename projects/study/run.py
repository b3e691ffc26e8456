"""What `tools/study.py` runs: plan the grid, run what is missing (each run its own process, here
or as a submitit job on a cluster), measure latencies and write the report, tables and plots.
"""

import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict

import torch

from d2prune import criteria
from d2prune.config import check_weights, setup_cfg
from d2prune.data import register_datasets, validate_datasets
from d2prune.errors import UserError
from d2prune.utils.io import atomic_write_text
from projects import cluster
from projects.study import launcher, report
from projects.study import runner as study

WORKER = "--run-one"  # CONFIG OUTPUT DATASETS_JSON OPTS_JSON JOB_JSON
# The CLI whose WORKER mode runs one job in a process of its own.
TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools", "study.py")
# CPU cores (and torch threads) of one run on Slurm when --cpus-per-run is not given.
SLURM_CPUS_PER_RUN = 4
# Seconds between two looks at the submitted jobs: sacct is asked at most this often.
POLL_S = {"slurm": 15.0, "local-submitit": 1.0}


def main(args):
    started = time.perf_counter()
    for option in ("jobs", "max_parallel", "cpus_per_run"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UserError(f"--{option.replace('_', '-')} must be at least 1, got {value}.")
    if args.notes and not os.path.isfile(args.notes):
        raise UserError(f"--notes: {args.notes} does not exist.")
    names = [] if args.baselines_only else args.criteria or criteria.available()
    main_size = args.main_size or (40 if 40 in args.train_sizes else args.train_sizes[0])
    jobs = study.plan(names, args.ratios, args.seeds, args.train_sizes, main_size, args.size_criteria, args.size_ratio)
    if args.status:
        print(launcher.status(jobs, args.output))
        return None
    if not args.report_only:
        cluster.check_launcher(args.launcher, args.partition)
    datasets = study.prepare_target_subsets(args.data_root, [main_size, *args.train_sizes], args.image_size)
    # Check the config, datasets and weights here, once, rather than in every worker.
    cfg = setup_cfg(args.config_file, args.opts + jobs[0].overrides(), datasets)
    register_datasets(cfg)
    validate_datasets(cfg)
    check_weights(cfg)
    parallel = args.jobs if args.launcher == "local" else args.max_parallel or args.jobs
    print(f"study: {len(jobs)} runs ({len(names)} criteria x {len(args.ratios)} ratios x {len(args.seeds)} seeds "
          f"+ baselines), {parallel} at a time, in {args.output}" +
          ("" if args.launcher == "local" else f", through submitit ({args.launcher})"))

    # What one run's worker takes, before the job: the same for every launcher.
    worker_args = [args.config_file, args.output, json.dumps(datasets), json.dumps(args.opts)]
    if args.report_only:
        failed = []
    elif args.launcher == "local":
        failed = study.run_study(jobs, [sys.executable, TOOL, WORKER, *worker_args], args.output, args.jobs)
    else:
        threads = args.cpus_per_run or (SLURM_CPUS_PER_RUN if args.launcher == "slurm"
                                        else max(1, (os.cpu_count() or 1) // parallel))
        failed = launcher.submit_study(jobs, worker_args, args.output, executor_factory(args, parallel, threads),
                                       parallel, threads, poll_s=POLL_S[args.launcher])

    wanted = {job.name for job in jobs}
    results = [r for r in study.merge_results(args.output) if r["name"] in wanted]
    latency = study.measure_latencies(args.config_file, results, args.output, datasets, args.opts, args.latency_repeats)
    rows = report.summarize(results, lambda r: latency.get(report.spec_key(r["spec"])))
    status = report.coverage([dict(asdict(job), name=job.name) for job in jobs], {r["name"] for r in results}, main_size)
    write_outputs(args, rows, main_size, time.perf_counter() - started, len(results), len(jobs), status)
    if failed:
        raise UserError(f"{len(failed)} run(s) failed: {', '.join(failed)}; see their logs (--status lists them). "
                        "Rerun the same command to retry them.")
    return rows


def executor_factory(args, parallel: int, threads: int):
    """`folder -> submitit executor` for the study's runs under `args.launcher`: each run a job
    of one task with `args.gpus_per_run` GPUs and `threads` CPU cores (its torch threads),
    at most `parallel` at once. `launcher.submit_study` takes any such factory."""
    def make(folder):
        return cluster.make_executor(
            args.launcher, folder, name="d2prune-study", timeout_min=args.timeout_min, gpus_per_node=args.gpus_per_run,
            cpus_per_task=threads, partition=args.partition, array_parallelism=parallel,
            env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
        )
    return make


def write_outputs(args, rows, main_size, seconds, finished, planned, status=""):
    os.makedirs(args.output, exist_ok=True)
    md = args.report or os.path.join(args.output, "results.md")
    figures = os.path.join(os.path.dirname(os.path.abspath(md)), "figures") if args.report else args.output
    os.makedirs(figures, exist_ok=True)
    stem = os.path.splitext(os.path.basename(md))[0]
    plots = [
        report.plot_delta(rows, main_size, os.path.join(figures, f"{stem}_delta_ap.png")),
        report.plot_ap_vs_flops(rows, main_size, os.path.join(figures, f"{stem}_ap_vs_flops.png")),
        report.plot_ap_vs_train_size(rows, os.path.join(figures, f"{stem}_ap_vs_train_size.png")),
    ]
    report.write_csv(rows, os.path.join(args.output, "results.csv"))
    atomic_write_text(os.path.join(args.output, "results.json"),
                      json.dumps([{k: v for k, v in r.items() if k != "runs"} for r in rows], indent=1, default=float))
    command = "python tools/study.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}, Python {platform.python_version()}, "
               f"torch {torch.__version__}, CPU only" if not torch.cuda.is_available()
               else f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    run_minutes = sum(r.get("seconds", 0.0) for row in rows for r in row["runs"]) / 60
    elapsed = (f"{run_minutes:.0f} min of fine-tuning and evaluation: the wall times of {finished} of the "
               f"{planned} planned runs, summed (runs sharing the cores with --jobs > 1 overlap and each takes "
               f"longer); this invocation {seconds / 60:.1f} min")
    notes = ""
    if args.notes:
        with open(args.notes, encoding="utf-8") as f:
            notes = f.read()
    threads = report.thread_counts([r for row in rows for r in row["runs"]])
    report.write_report(md, rows, main_size, plots, command, machine, elapsed, notes=notes, status=status,
                        threads=threads)
    print(report.markdown_table(rows))
    for line in report.answer(rows, main_size):
        print(line)
    if status:
        print(status)
    print(f"study: report {md}; plots {', '.join(p for p in plots if p)}; runs in {args.output}/results.csv")
