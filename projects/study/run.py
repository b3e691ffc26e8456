"""What `tools/study.py` runs: plan the grid, run what is missing (each run its own process, here
or as a submitit job on a cluster), measure latencies and write the report, tables and plots.
"""

import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict

import torch

from d2prune import criteria
from d2prune.config import check_prune_config, check_weights
from d2prune.data import register_datasets, validate_datasets
from d2prune.errors import UserError
from d2prune.utils.io import atomic_write_text
from projects import cluster
from projects.study import launcher, report
from projects.study import runner as study
from projects.study.config import setup_study_cfg

WORKER = "--run-one"  # CONFIG OUTPUT DATASETS_JSON OPTS_JSON JOB_JSON
# The CLI whose WORKER mode runs one job in a process of its own.
TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools", "study.py")
# CPU cores (and torch threads) of one run on Slurm when --cpus-per-run is not given.
SLURM_CPUS_PER_RUN = 4
# Seconds between two looks at the submitted jobs: sacct is asked at most this often.
POLL_S = {"slurm": 15.0, "local-submitit": 1.0}


def main(args):
    started = time.perf_counter()
    for option in ("jobs", "max_parallel", "cpus_per_run", "threads"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise UserError(f"--{option.replace('_', '-')} must be at least 1, got {value}.")
    if args.notes and not os.path.isfile(args.notes):
        raise UserError(f"--notes: {args.notes} does not exist.")
    names = [] if args.baselines_only else args.criteria or criteria.available()
    main_size = args.main_size or (40 if 40 in args.train_sizes else args.train_sizes[0])
    target, amounts = pruning_target(args)
    weightings = list(dict.fromkeys(args.cost_weighting))
    if weightings != ["uniform"] and args.mode != "cost":
        raise UserError("--cost-weighting weighs groups against the cost they save: it needs --mode cost "
                        "(and --flops-reduction or --latency-reduction).")
    jobs = study.plan(names, amounts, args.seeds, args.train_sizes, main_size, args.size_criteria, args.size_ratio,
                      target=target, freeze_ats=args.freeze_at, every_size=args.every_size, weightings=weightings)
    if args.status:
        print(launcher.status(jobs, args.output))
        return None
    if not args.report_only:
        cluster.check_launcher(args.launcher, args.partition)
    datasets = study.prepare_target_subsets(args.data_root, [main_size, *args.train_sizes], args.image_size)
    opts = list(args.opts)
    if args.val_size:
        test, validation = study.prepare_eval_splits(args.data_root, args.val_size, args.test_size, args.image_size)
        datasets += [test, validation]
        # First, so that KEY VALUE overrides of the command line still win.
        opts = ["DATASETS.TEST", f"('{test[0]}',)", "STUDY.VAL_DATASET", validation[0],
                "STUDY.VAL_PERIOD", str(args.val_period), *opts]
    if args.kinds:
        opts = ["PRUNE.KINDS", repr(list(args.kinds)), *opts]
    if args.mode:
        opts = ["PRUNE.MODE", args.mode, *opts]
    # Check the config, datasets and weights here, once, rather than in every worker.
    cfg = setup_study_cfg(args.config_file, opts + jobs[0].overrides(), datasets)
    register_datasets(cfg)
    validate_datasets(cfg, [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST, *filter(None, [cfg.STUDY.VAL_DATASET])])
    check_weights(cfg)
    pruned = next((job for job in jobs if job.criterion is not None), None)
    if pruned is not None:
        check_prune_config(setup_study_cfg(args.config_file, opts + pruned.overrides(), datasets))
    parallel = args.jobs if args.launcher == "local" else args.max_parallel or args.jobs
    amount = "ratios" if target == "channels" else f"{target} targets"
    print(f"study: {len(jobs)} runs ({len(names)} criteria x {len(amounts)} {amount} x {len(args.seeds)} seeds "
          f"+ unpruned), {parallel} at a time, in {args.output}" +
          ("" if args.launcher == "local" else f", through submitit ({args.launcher})"))

    # What one run's worker takes, before the job: the same for every launcher.
    worker_args = [args.config_file, args.output, json.dumps(datasets), json.dumps(opts)]
    if args.report_only:
        failed = []
    elif args.launcher == "local":
        failed = study.run_study(jobs, [sys.executable, TOOL, WORKER, *worker_args], args.output, args.jobs,
                                 threads=args.threads)
    else:
        threads = args.cpus_per_run or args.threads or (SLURM_CPUS_PER_RUN if args.launcher == "slurm"
                                                        else max(1, (os.cpu_count() or 1) // parallel))
        failed = launcher.submit_study(jobs, worker_args, args.output, executor_factory(args, parallel, threads),
                                       parallel, threads, poll_s=POLL_S[args.launcher])

    wanted = {job.name for job in jobs}
    results = [r for r in study.merge_results(args.output) if args.report_all or r["name"] in wanted]
    latency = study.measure_latencies(args.config_file, results, args.output, datasets, opts, args.latency_repeats)
    rows = report.summarize(results, lambda r: latency.get(report.spec_key(r["spec"])))
    status = report.coverage([dict(asdict(job), name=job.name) for job in jobs], {r["name"] for r in results}, main_size)
    planned = len(wanted | {r["name"] for r in results})  # --report-all adds earlier commands' runs
    write_outputs(args, rows, main_size, time.perf_counter() - started, len(results), planned, status,
                  results=results, latency=latency)
    if failed:
        raise UserError(f"{len(failed)} run(s) failed: {', '.join(failed)}; see their logs (--status lists them). "
                        "Rerun the same command to retry them.")
    return rows


def pruning_target(args):
    """What the pruned runs' amounts are shares of, and the amounts: `--ratios` (of the eligible
    channels, the default), `--flops-reduction` or `--latency-reduction`."""
    if args.flops_reduction or args.latency_reduction:
        if args.ratios:
            raise UserError("--ratios and --flops-reduction/--latency-reduction both given: a study prunes to one "
                            "kind of target; give one of them.")
        return ("flops", args.flops_reduction) if args.flops_reduction else ("latency", args.latency_reduction)
    return "channels", args.ratios or [0.5]


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


def write_outputs(args, rows, main_size, seconds, finished, planned, status="", results=(), latency=None):
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
    if latency and not report.has_validation(results):  # the regime section has its own, per size
        plots.append(report.plot_ap_vs_latency(results, latency, main_size,
                                               os.path.join(figures, f"{stem}_ap_vs_latency.png")))  # fmt: skip
    sections, regime_plots = [], []
    if report.has_validation(results):
        regime_plots = [report.plot_curves(results, os.path.join(figures, f"{stem}_curves.png"))]
        regime_plots += [report.plot_ap_vs_latency(results, latency or {}, size,
                                                   os.path.join(figures, f"{stem}_ap_vs_latency_n{size}.png"))
                         for size in sorted({r["train_size"] for r in results if not report.is_baseline(r)})]
        sections = report.regime_section(results, regime_plots, os.path.dirname(os.path.abspath(md)), latency)
    report.write_csv(rows, os.path.join(args.output, "results.csv"))
    atomic_write_text(os.path.join(args.output, "results.json"),
                      json.dumps([{k: v for k, v in r.items() if k != "runs"} for r in rows], indent=1, default=float))
    command = "python tools/study.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}, Python {platform.python_version()}, "
               f"torch {torch.__version__}, CPU only" if not torch.cuda.is_available()
               else f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    run_seconds = sorted(r["seconds"] for row in rows for r in row["runs"] if "seconds" in r)
    elapsed = (f"{sum(run_seconds) / 60:.0f} min of fine-tuning and evaluation: the wall times of {finished} of the "
               f"{planned} planned runs, summed (runs sharing the cores with --jobs > 1 overlap and each takes "
               f"longer); this invocation {seconds / 60:.1f} min")
    if run_seconds:
        elapsed += (f"; one run took {run_seconds[0] / 60:.1f}-{run_seconds[-1] / 60:.1f} min, "
                    f"median {statistics.median(run_seconds) / 60:.1f} min")
    notes = ""
    if args.notes:
        with open(args.notes, encoding="utf-8") as f:
            notes = f.read()
    threads = report.thread_counts([r for row in rows for r in row["runs"]])
    report.write_report(md, rows, main_size, plots, command, machine, elapsed, notes=notes, status=status,
                        threads=threads, sections=sections, title=args.title)
    print(report.markdown_table(rows))
    for line in report.answer(rows, main_size) + report.overfitting_lines(results):
        print(line)
    if status:
        print(status)
    print(f"study: report {md}; plots {', '.join(p for p in plots + regime_plots if p)}; "
          f"runs in {args.output}/results.csv")
