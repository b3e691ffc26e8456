"""The transfer study: fine-tunes of one source model on a small target set, pruned by each
criterion at each ratio and seed, beside the unpruned fine-tune with the same seeds and schedule.

Every run is its own process (`run_study` starts them here, `projects.study.launcher` as
submitit jobs; `worker_main` is what each one runs), writes into its own folder and resumes from
its last checkpoint. A finished run writes its result to a file of its own, `results/NAME.json`,
atomically, so runs that end at the same moment (on a cluster's shared filesystem too) lose
nothing; the study process merges those files into `results.jsonl`. A killed study loses at
most the runs in flight and a rerun skips the rest.
"""

import json
import logging
import os
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

from d2prune import criteria
from d2prune.complexity import count_flops, count_params
from d2prune.data import register_datasets, validate_datasets
from d2prune.data.synthetic import generate, split_paths
from d2prune.engine.checkpoint import PrunedCheckpointer
from d2prune.engine.oneshot import bbox_metrics, evaluate
from d2prune.engine.selection import sample_inputs
from d2prune.engine.trainer import Trainer
from d2prune.errors import UserError
from d2prune.pruning import channel_spec
from d2prune.utils.io import atomic_write_text
from d2prune.utils.modules import unwrap
from projects.study.config import setup_study_cfg
from projects.study.validation import BEST, ValidationHook, trainer_class

__all__ = [
    "Job", "TARGETS", "plan", "prepare_target_subsets", "prepare_eval_splits", "split_name", "run_job",
    "early_stopped", "loss_curve", "run_study", "worker_main", "record_result", "load_results", "merge_results",
]

logger = logging.getLogger(__name__)

RESULTS = "results.jsonl"
# One file per finished run, written by the run itself: OUTPUT/results/NAME.json.
RESULTS_DIR = "results"
# How a run was started (launcher, process or job id, log), written by the study process:
# OUTPUT/runs/NAME/launch.json. `tools/study.py --status` reads it.
LAUNCH = "launch.json"


# The PRUNE key that holds a pruned run's amount, by what the amount is a share of.
TARGETS = {"channels": "PRUNE.RATIO", "flops": "PRUNE.FLOPS_REDUCTION", "latency": "PRUNE.LATENCY_REDUCTION"}


@dataclass(frozen=True)
class Job:
    """One fine-tune of the study. `criterion` None is an unpruned run: the baseline, or with
    `freeze_at` a baseline with less to train (MODEL.BACKBONE.FREEZE_AT). A pruned run removes
    `ratio` of its `target`: of the eligible channels (PRUNE.RATIO), of the FLOPs
    (PRUNE.FLOPS_REDUCTION) or of the latency (PRUNE.LATENCY_REDUCTION)."""

    criterion: Optional[str]
    ratio: float
    seed: int
    train_size: int
    target: str = "channels"
    freeze_at: Optional[int] = None
    weighting: str = "uniform"  # PRUNE.COST_WEIGHTING of a pruned run in mode "cost"

    @property
    def name(self) -> str:
        if self.criterion is None:
            what = "baseline" if self.freeze_at is None else f"freeze{self.freeze_at}"
        else:
            amount = {"channels": "r", "flops": "flops", "latency": "latency"}[self.target]
            what = f"{self.criterion}_{amount}{self.ratio:g}"
            if self.weighting != "uniform":
                what += f"_{self.weighting}"
        return f"{what}_n{self.train_size}_s{self.seed}"

    def overrides(self) -> List[str]:
        """KEY VALUE pairs that make the study config into this run."""
        opts = ["SEED", str(self.seed), "DATASETS.TRAIN", f"('{train_dataset(self.train_size)}',)"]
        if self.criterion is None:
            opts += ["PRUNE.ENABLED", "False"]
            return opts if self.freeze_at is None else opts + ["MODEL.BACKBONE.FREEZE_AT", str(self.freeze_at)]
        # The weighting is always explicit (mode "cost" reads it, the others ignore it), so that a
        # run is what its name says whatever the config's default.
        return opts + ["PRUNE.ENABLED", "True", "PRUNE.CRITERION", self.criterion, TARGETS[self.target], str(self.ratio),
                       "PRUNE.COST_WEIGHTING", self.weighting]  # fmt: skip

    @classmethod
    def of(cls, result: Dict) -> "Job":
        """The job of a recorded result (results of older studies lack the later fields)."""
        return cls(**{f.name: result[f.name] for f in fields(cls) if f.name in result})


def plan(
    criteria_names: Sequence[str],
    ratios: Sequence[float],
    seeds: Sequence[int],
    train_sizes: Sequence[int],
    main_size: int,
    size_criteria: Sequence[str] = (),
    size_ratio: float = 0.5,
    target: str = "channels",
    freeze_ats: Sequence[int] = (),
    every_size: bool = False,
    weightings: Sequence[str] = ("uniform",),
) -> List[Job]:
    """The study's runs: every criterion x ratio x seed on `main_size` target images (on every
    train size with `every_size`), plus, for each other train size, `size_criteria` at
    `size_ratio`; the ratios are shares of `target` (see `Job`), and every main pruned arm runs
    once per cost weighting in `weightings` (PRUNE.COST_WEIGHTING). Unpruned runs on every size:
    the baseline and one arm per `freeze_ats`. Unpruned runs come first, so the comparison has
    its reference as early as possible, then seed by seed."""
    for name in dict.fromkeys([*criteria_names, *size_criteria]):
        if name not in criteria.available():
            criteria.build(name)  # a UserError that suggests the closest names
    if target not in TARGETS:
        raise UserError(f"pruning target {target!r} is not one of {', '.join(TARGETS)}.")
    for ratio in list(ratios) + [size_ratio]:
        if not 0 < ratio < 1:
            raise UserError(f"pruning ratio {ratio} is outside (0, 1).")
    for k in freeze_ats:
        if not 1 <= k <= 5:
            raise UserError(f"MODEL.BACKBONE.FREEZE_AT {k} of a baseline arm is outside 1..5 (stem, res2..res5).")
    if main_size not in train_sizes:
        train_sizes = [main_size, *train_sizes]
    jobs = [Job(None, 0.0, s, n, freeze_at=k) for n in train_sizes for s in seeds for k in [None, *freeze_ats]]
    # Seed by seed, so that a study stopped early has every criterion on the first seeds.
    pruned_sizes = train_sizes if every_size else [main_size]
    jobs += [
        Job(c, r, s, n, target, weighting=w)
        for s in seeds for n in pruned_sizes for r in ratios for c in criteria_names for w in weightings
    ]  # fmt: skip
    jobs += [
        Job(c, size_ratio, s, n, target)
        for n in train_sizes if n not in pruned_sizes for c in size_criteria for s in seeds
    ]
    return list(dict.fromkeys(jobs))


def train_dataset(size: int) -> str:
    return f"study_target_train_{size}"


def prepare_target_subsets(root: str, sizes: Iterable[int], image_size: int = 192) -> List[List[str]]:
    """Generate the synthetic target train split with as many images as the largest size (under
    `root`, apart from the default data) and write one COCO file per size holding its first
    images, so every smaller set is contained in the larger ones. Returns [name, json, image
    root] entries for `--dataset` / DATASETS.COCO."""
    sizes = sorted(set(int(n) for n in sizes))
    if not sizes or sizes[0] < 1:
        raise UserError(f"train sizes must be positive integers, got {sizes}.")
    generate(root, "target", "train", sizes[-1], image_size=image_size)
    json_file, image_root = split_paths(root, "target", "train")
    with open(json_file, encoding="utf-8") as f:
        data = json.load(f)
    images = sorted(data["images"], key=lambda im: im["id"])
    entries = []
    for n in sizes:
        ids = {im["id"] for im in images[:n]}
        subset = dict(data, images=images[:n], annotations=[a for a in data["annotations"] if a["image_id"] in ids])
        path = os.path.join(root, f"target_train_{n}.json")
        text = json.dumps(subset)
        if read_text(path) != text:
            atomic_write_text(path, text)
        entries.append([train_dataset(n), path, str(image_root)])
    return entries


def prepare_eval_splits(root: str, val_size: int, test_size: int, image_size: int = 192) -> List[List[str]]:
    """Generate the synthetic target val split with `test_size + val_size` images under `root`
    (the generator seeds each image by its index, so these are the images of the default target
    val split, and more when it has fewer) and cut it in two disjoint files: the test split, its
    first `test_size` images, on which runs are reported; the validation split, the next
    `val_size`, on which they choose their early-stopped checkpoint. The test split stays the same
    whatever the validation size. Returns the [name, json, image root] entries, test first."""
    if val_size < 1 or test_size < 1:
        raise UserError(f"--val-size and --test-size must be positive, got {val_size} and {test_size}.")
    generate(root, "target", "val", test_size + val_size, image_size=image_size)
    json_file, image_root = split_paths(root, "target", "val")
    with open(json_file, encoding="utf-8") as f:
        data = json.load(f)
    images = sorted(data["images"], key=lambda im: im["id"])
    entries = []
    for name, part in ((split_name("test", test_size), images[:test_size]),
                       (split_name("validation", val_size), images[test_size:test_size + val_size])):
        ids = {im["id"] for im in part}
        subset = dict(data, images=part, annotations=[a for a in data["annotations"] if a["image_id"] in ids])
        path = os.path.join(root, f"{name[len('study_'):]}.json")
        text = json.dumps(subset)
        if read_text(path) != text:
            atomic_write_text(path, text)
        entries.append([name, path, str(image_root)])
    return entries


def split_name(split: str, size: int) -> str:
    """The registered name of the study's `split` ("test" or "validation") of `size` images."""
    return f"study_target_{split}_{size}"


def read_text(path: str) -> Optional[str]:
    """The text of file `path`, or None when there is none."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def run_job(config_file: str, job: Job, run_dir: str, datasets: Sequence[Sequence[str]], opts: Sequence[str] = ()) -> Dict:
    """Fine-tune one run in this process (resuming from its last checkpoint if there is one),
    then write `run_dir/result.json`: the job, bbox AP/AP50/AP75 of the final weights on the test
    set (DATASETS.TEST), params, FLOPs, the final channel spec, the training loss curve, the
    training time and the torch thread count. With a validation split (STUDY.VAL_DATASET) also
    its curve (`val_curve`: [iterations, AP, AP50] per evaluation) and the early-stopped model:
    the iteration of the best validation AP (`es_iter`), that AP (`es_val_AP`) and its test AP
    (`es_bbox_AP`, `es_bbox_AP50`, `es_bbox_AP75`)."""
    cfg = setup_study_cfg(config_file, list(opts) + job.overrides(), datasets)
    cfg.OUTPUT_DIR = run_dir
    cfg.freeze()
    os.makedirs(run_dir, exist_ok=True)
    setup_logger(output=run_dir, name="detectron2", abbrev_name="d2")
    setup_logger(output=run_dir, name="d2prune")
    register_datasets(cfg)
    validate_datasets(cfg, [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST, *filter(None, [cfg.STUDY.VAL_DATASET])])
    # What detectron2's default_setup does for tools/train_net.py: the job's seed fixes the data
    # order (TrainingSampler draws its seed from numpy) and the init of new layers. Without it
    # every run of one seed trained on another order (measured: up to 1.1 AP apart).
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
    start = time.perf_counter()
    trainer = trainer_class(cfg)(cfg)
    trainer.resume_or_load(resume=True)
    results = trainer.train()
    if not results:
        raise RuntimeError(f"{run_dir}: training ended without an evaluation on {cfg.DATASETS.TEST}")
    model = unwrap(trainer.model).eval()
    inputs, tensor = sample_inputs(cfg, model)
    result = {
        **asdict(job),
        "name": job.name,
        **bbox_metrics(results),
        "test_dataset": cfg.DATASETS.TEST[0],
        "params": count_params(model),
        "flops": count_flops(model, inputs)["total"],
        "backbone_flops": count_flops(model.backbone, tensor)["total"],
        "spec": channel_spec(model),
        **({"kinds": list(cfg.PRUNE.KINDS), "mode": cfg.PRUNE.MODE} if cfg.PRUNE.ENABLED else {}),
    }
    if trainer.validation is not None:
        result.update(early_stopped(cfg, trainer.validation, results, run_dir))
    result.update({
        "loss_curve": loss_curve(run_dir),
        "seconds": round(time.perf_counter() - start, 1),
        # The order of float sums depends on it, and that by itself moves AP.
        "threads": torch.get_num_threads(),
    })
    atomic_write_text(os.path.join(run_dir, "result.json"), json.dumps(result, indent=2))
    remove_intermediate_checkpoints(run_dir)
    return result


def early_stopped(cfg, validation: ValidationHook, final: Dict, run_dir: str) -> Dict:
    """The validation curve of a finished run and its early-stopped model (`ValidationHook.best`)
    evaluated on the test split; `final`: the final weights' test results, which are the
    early-stopped model's when the best validation AP came last."""
    # No evaluation after the last pruning event (a schedule that prunes at its last
    # iteration): the final weights are the only model of the pruned architecture.
    best = validation.best or dict(zip(("iter", "AP", "AP50"), validation.history[-1]))
    if best["iter"] == cfg.SOLVER.MAX_ITER:
        metrics = bbox_metrics(final)
    else:
        model = Trainer.build_model(cfg)
        PrunedCheckpointer(model).load(os.path.join(run_dir, BEST + ".pth"))
        metrics = evaluate(cfg, model.eval(), os.path.join(run_dir, "inference", "early_stopped"))
    return {
        "val_dataset": cfg.STUDY.VAL_DATASET,
        "val_curve": validation.history,
        "es_iter": best["iter"],
        "es_val_AP": best["AP"],
        **{f"es_{k}": v for k, v in metrics.items()},
    }


def loss_curve(run_dir: str) -> List[List[float]]:
    """[iterations done, total training loss] as detectron2's writers logged it to metrics.json
    (the median of the last 20 iterations, every 20); a resumed run's repeated lines count once."""
    losses = {}
    for line in (read_text(os.path.join(run_dir, "metrics.json")) or "").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if "total_loss" in entry:
            losses[entry["iteration"] + 1] = entry["total_loss"]
    return [[i, round(loss, 5)] for i, loss in sorted(losses.items())]


def remove_intermediate_checkpoints(run_dir: str) -> List[str]:
    """Delete a finished run's periodic and per-event checkpoints, keeping `model_final.pth`
    (the latency measurement and later analysis load it) and the early-stopped `model_best.pth`:
    a run writes six or more of them, about 400 MB, which a full study of 129 runs could not keep
    on a normal disk. Returns the removed file names."""
    removed = []
    for name in sorted(os.listdir(run_dir)):
        if name.endswith(".pth") and name not in ("model_final.pth", BEST + ".pth"):
            os.remove(os.path.join(run_dir, name))
            removed.append(name)
    return removed


def record_result(output: str, result: Dict) -> str:
    """Write a finished run's `result` to `output/results/NAME.json`, atomically: the run's own
    file, so that no two runs ever write the same file. Returns its path."""
    path = os.path.join(output, RESULTS_DIR, result["name"] + ".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(result))
    return path


def load_results(output: str) -> List[Dict]:
    """The finished runs of the study in `output`: the lines of `results.jsonl` (a line cut short
    by a crash is skipped), then the runs in `results/` that it does not hold yet, in the order
    they finished. A run in both is taken from its own file."""
    results: Dict[str, Dict] = {}
    path = os.path.join(output, RESULTS)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    result = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s: skipping an incomplete line", path)
                    continue
                results[result["name"]] = result
    folder = os.path.join(output, RESULTS_DIR)
    files = [e for e in os.scandir(folder) if e.name.endswith(".json")] if os.path.isdir(folder) else []
    for entry in sorted(files, key=lambda e: (e.stat().st_mtime, e.name)):
        with open(entry.path, encoding="utf-8") as f:
            result = json.load(f)  # written atomically: complete or absent
        results[result["name"]] = result
    return list(results.values())


def merge_results(output: str) -> List[Dict]:
    """`load_results`, also written back as `output/results.jsonl` (atomically, when it changed):
    the study's one record of its finished runs. Only the study process calls it; the runs
    themselves never touch `results.jsonl`."""
    results = load_results(output)
    text = "".join(json.dumps(r) + "\n" for r in results)
    path = os.path.join(output, RESULTS)
    if results and read_text(path) != text:
        atomic_write_text(path, text)
    return results


def finished_result(output: str, name: str) -> Optional[Dict]:
    """The result run `name` recorded in `output/results/`, or None while it has none."""
    text = read_text(os.path.join(output, RESULTS_DIR, name + ".json"))
    return None if text is None else json.loads(text)


def write_launch(output: str, name: str, record: Dict) -> None:
    """Record how run `name` was started (see LAUNCH), with this host's name."""
    path = os.path.join(output, "runs", name, LAUNCH)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(dict(record, host=socket.gethostname()), indent=1))


def read_launch(output: str, name: str) -> Optional[Dict]:
    """The launch record of run `name`, or None if it was never started."""
    text = read_text(os.path.join(output, "runs", name, LAUNCH))
    return None if text is None else json.loads(text)


def result_line(name: str, result: Dict) -> str:
    """What the study prints when run `name` finishes."""
    return f"  {name}: AP {result['bbox_AP']:.1f}  AP50 {result['bbox_AP50']:.1f}  ({result['seconds']:.0f} s)"


def run_study(
    jobs: Sequence[Job],
    worker: Sequence[str],
    output: str,
    parallel: int = 1,
    threads: Optional[int] = None,
) -> List[str]:
    """Run the `jobs` not yet finished in `output`, `parallel` at a time, each as
    `worker + [job JSON]` in its own process (log in `output/runs/NAME/worker.log`); merge each
    result into `results.jsonl` as it finishes. Returns the names of the runs that failed (their
    logs say why)."""
    os.makedirs(os.path.join(output, "runs"), exist_ok=True)
    done = {r["name"] for r in load_results(output)}
    pending = [job for job in jobs if job.name not in done]
    if len(pending) < len(jobs):
        print(f"study: {len(jobs) - len(pending)} of {len(jobs)} runs already finished in {output}")
    threads = threads or max(1, (os.cpu_count() or 1) // max(parallel, 1))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    running: Dict[subprocess.Popen, Job] = {}
    failed: List[str] = []
    queue = list(pending)
    bar = tqdm(total=len(pending), desc="study runs", unit="run", disable=not pending)
    try:
        while queue or running:
            while queue and len(running) < parallel:
                job = queue.pop(0)
                log_path = os.path.join(output, "runs", job.name, "worker.log")
                os.makedirs(os.path.dirname(log_path), exist_ok=True)
                with open(log_path, "ab") as log:
                    process = subprocess.Popen(
                        [*worker, json.dumps(asdict(job))], stdout=log, stderr=subprocess.STDOUT, env=env
                    )
                write_launch(output, job.name, {"launcher": "local", "pid": process.pid, "log": log_path})
                running[process] = job
            time.sleep(1.0)
            for process in [p for p in running if p.poll() is not None]:
                job = running.pop(process)
                record = read_launch(output, job.name)
                write_launch(output, job.name, dict(record, exit=process.returncode))
                result = finished_result(output, job.name)
                if process.returncode == 0 and result is not None:
                    merge_results(output)
                    bar.write(result_line(job.name, result))
                else:
                    failed.append(job.name)
                    bar.write(f"  {job.name}: FAILED (exit {process.returncode}), see {record['log']}")
                bar.update(1)
    finally:
        for process in running:
            process.terminate()
        for process in running:
            process.wait()
            job = running[process]
            write_launch(output, job.name, dict(read_launch(output, job.name), exit=process.returncode))
        bar.close()
    return failed


def worker_main(argv: Sequence[str]) -> Dict:
    """`tools/study.py --run-one CONFIG OUTPUT DATASETS_JSON OPTS_JSON JOB_JSON`: one run, which
    resumes from its folder's last checkpoint and, once finished, records its result
    (`record_result`). The local launcher runs it in a process of its own, a submitit job calls
    it in the job's process; returns the result."""
    config_file, output, datasets, opts, job = argv
    job = Job(**json.loads(job))
    result = run_job(config_file, job, os.path.join(output, "runs", job.name), json.loads(datasets), json.loads(opts))
    record_result(output, result)
    return result


LATENCY_FILE = "latency_deployed.json"  # latency.json of earlier studies was timed another way


def measure_latencies(
    config_file: str, results: Sequence[Dict], output: str, datasets: Sequence[Sequence[str]],
    opts: Sequence[str] = (), repeats: int = 2, *, images: int = 8, rounds: int = 3, chunk: int = 8,
) -> Dict[str, float]:
    """ms per image of the whole detector as deployed, once per distinct architecture among
    `results`, with the final weights of the first run that has it; cached in
    `output/latency_deployed.json`. Run after the fine-tunes, so no other run competes for the
    cores.

    Each architecture runs on the first `images` images of DATASETS.TEST at the test size (real
    proposals), prepared for inference, on one thread, timed as CPU time and interleaved with
    the others (`projects.benchmark.detector.time_deployed`, minimum over `rounds` rounds of
    `repeats` passes). They are timed `chunk` at a time, every chunk with the unpruned baseline's
    architecture beside them: a time is kept relative to the baseline timed beside it and
    scaled to the baseline's own time in the first chunk, so that arms measured in different
    chunks (or studies resumed later) compare."""
    from projects.benchmark.detector import real_images, time_deployed
    from projects.study.report import spec_key

    path = os.path.join(output, LATENCY_FILE)
    cache = json.loads(read_text(path) or "{}")
    first = {}
    for r in results:
        first.setdefault(spec_key(r["spec"]), r)
    todo = [k for k in first if k not in cache]
    if not todo:
        return cache
    reference = next((r for r in results if r["criterion"] is None and r.get("freeze_at") is None), None)
    reference = reference or next(iter(first.values()))

    def load(r):
        job = Job.of(r)
        cfg = setup_study_cfg(config_file, list(opts) + job.overrides(), datasets)
        cfg.freeze()
        model = Trainer.build_model(cfg)
        PrunedCheckpointer(model).load(os.path.join(output, "runs", job.name, "model_final.pth"))
        return cfg, model.eval()

    cfg, base = load(reference)
    inputs = real_images(cfg, cfg.DATASETS.TEST[0], images)
    base_key = spec_key(reference["spec"])
    scale = cache.get(base_key)  # the baseline's own time, from the first chunk ever timed
    todo = [k for k in todo if k != base_key]
    with tqdm(total=len(todo), desc="latency per architecture") as bar:
        for i in range(0, max(len(todo), 1 if scale is None else 0), chunk):
            keys = todo[i:i + chunk]
            times = time_deployed([base, *(load(first[k])[1] for k in keys)], inputs, rounds=rounds, repeats=repeats)
            ref = times[0]["min_ms"]
            if scale is None:
                scale = cache[base_key] = round(ref, 3)
            for key, t in zip(keys, times[1:]):
                cache[key] = round(t["min_ms"] / ref * scale, 3)
            atomic_write_text(path, json.dumps(cache, indent=1))
            bar.update(len(keys))
    return cache
