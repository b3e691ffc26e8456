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
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

from d2prune import criteria
from d2prune.complexity import count_flops, count_params
from d2prune.config import setup_cfg
from d2prune.data import register_datasets, validate_datasets
from d2prune.data.synthetic import generate, split_paths
from d2prune.engine.oneshot import bbox_metrics
from d2prune.engine.selection import sample_inputs
from d2prune.engine.trainer import PruningTrainer, Trainer
from d2prune.errors import UserError
from d2prune.pruning import channel_spec
from d2prune.utils.io import atomic_write_text
from d2prune.utils.modules import unwrap

__all__ = [
    "Job", "plan", "prepare_target_subsets", "run_job", "run_study", "worker_main", "record_result",
    "load_results", "merge_results",
]

logger = logging.getLogger(__name__)

RESULTS = "results.jsonl"
# One file per finished run, written by the run itself: OUTPUT/results/NAME.json.
RESULTS_DIR = "results"
# How a run was started (launcher, process or job id, log), written by the study process:
# OUTPUT/runs/NAME/launch.json. `tools/study.py --status` reads it.
LAUNCH = "launch.json"


@dataclass(frozen=True)
class Job:
    """One fine-tune of the study. `criterion` None is the unpruned baseline."""

    criterion: Optional[str]
    ratio: float
    seed: int
    train_size: int

    @property
    def name(self) -> str:
        what = "baseline" if self.criterion is None else f"{self.criterion}_r{self.ratio:g}"
        return f"{what}_n{self.train_size}_s{self.seed}"

    def overrides(self) -> List[str]:
        """KEY VALUE pairs that make the study config into this run."""
        opts = ["SEED", str(self.seed), "DATASETS.TRAIN", f"('{train_dataset(self.train_size)}',)"]
        if self.criterion is None:
            return opts + ["PRUNE.ENABLED", "False"]
        return opts + ["PRUNE.ENABLED", "True", "PRUNE.CRITERION", self.criterion,
                       "PRUNE.RATIO", str(self.ratio)]


def plan(
    criteria_names: Sequence[str],
    ratios: Sequence[float],
    seeds: Sequence[int],
    train_sizes: Sequence[int],
    main_size: int,
    size_criteria: Sequence[str] = (),
    size_ratio: float = 0.5,
) -> List[Job]:
    """The study's runs: every criterion x ratio x seed on `main_size` target images, plus, for
    each other train size, the baseline and `size_criteria` at `size_ratio`. Baselines come
    first, so the comparison has its reference as early as possible, then seed by seed."""
    for name in dict.fromkeys([*criteria_names, *size_criteria]):
        if name not in criteria.available():
            criteria.build(name)  # a UserError that suggests the closest names
    for ratio in list(ratios) + [size_ratio]:
        if not 0 < ratio < 1:
            raise UserError(f"pruning ratio {ratio} is outside (0, 1).")
    if main_size not in train_sizes:
        train_sizes = [main_size, *train_sizes]
    jobs = [Job(None, 0.0, s, n) for n in train_sizes for s in seeds]
    # Seed by seed, so that a study stopped early has every criterion on the first seeds.
    jobs += [Job(c, r, s, main_size) for s in seeds for r in ratios for c in criteria_names]
    jobs += [
        Job(c, size_ratio, s, n)
        for n in train_sizes if n != main_size for c in size_criteria for s in seeds
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


def read_text(path: str) -> Optional[str]:
    """The text of file `path`, or None when there is none."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def run_job(config_file: str, job: Job, run_dir: str, datasets: Sequence[Sequence[str]], opts: Sequence[str] = ()) -> Dict:
    """Fine-tune one run in this process (resuming from its last checkpoint if there is one),
    then write `run_dir/result.json`: the job, bbox AP/AP50/AP75 on the test set, params, FLOPs,
    the final channel spec, the training time and the torch thread count."""
    cfg = setup_cfg(config_file, list(opts) + job.overrides(), datasets)
    cfg.OUTPUT_DIR = run_dir
    cfg.freeze()
    os.makedirs(run_dir, exist_ok=True)
    setup_logger(output=run_dir, name="detectron2", abbrev_name="d2")
    setup_logger(output=run_dir, name="d2prune")
    register_datasets(cfg)
    validate_datasets(cfg)
    # What detectron2's default_setup does for tools/train_net.py: the job's seed fixes the data
    # order (TrainingSampler draws its seed from numpy) and the init of new layers. Without it
    # every run of one seed trained on another order (measured: up to 1.1 AP apart).
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
    start = time.perf_counter()
    trainer = (PruningTrainer if cfg.PRUNE.ENABLED else Trainer)(cfg)
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
        "params": count_params(model),
        "flops": count_flops(model, inputs)["total"],
        "backbone_flops": count_flops(model.backbone, tensor)["total"],
        "spec": channel_spec(model),
        "seconds": round(time.perf_counter() - start, 1),
        # The order of float sums depends on it, and that by itself moves AP.
        "threads": torch.get_num_threads(),
    }
    atomic_write_text(os.path.join(run_dir, "result.json"), json.dumps(result, indent=2))
    remove_intermediate_checkpoints(run_dir)
    return result


def remove_intermediate_checkpoints(run_dir: str) -> List[str]:
    """Delete a finished run's periodic and per-event checkpoints, keeping `model_final.pth`
    (the latency measurement and later analysis load it): a run writes six of them, about
    400 MB, which a full study of 129 runs could not keep on a normal disk. Returns the removed
    file names."""
    removed = []
    for name in sorted(os.listdir(run_dir)):
        if name.endswith(".pth") and name != "model_final.pth":
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


def measure_latencies(
    config_file: str, results: Sequence[Dict], output: str, datasets: Sequence[Sequence[str]],
    opts: Sequence[str] = (), repeats: int = 20,
) -> Dict[str, float]:
    """Median CPU latency (ms) of the whole detector at the test resolution, once per distinct
    architecture among `results`, with the final weights of the first run that has it; cached in
    `output/latency.json`. Run after the fine-tunes, so no other run competes for the cores."""
    from d2prune.complexity import measure_latency
    from d2prune.engine.checkpoint import PrunedCheckpointer
    from projects.study.report import spec_key

    path = os.path.join(output, "latency.json")
    cache = json.loads(read_text(path) or "{}")
    todo = {}
    for r in results:
        todo.setdefault(spec_key(r["spec"]), r)
    todo = {k: r for k, r in todo.items() if k not in cache}
    for key, r in tqdm(todo.items(), desc="latency per architecture", disable=not todo):
        job = Job(r["criterion"], r["ratio"], r["seed"], r["train_size"])
        cfg = setup_cfg(config_file, list(opts) + job.overrides(), datasets)
        cfg.freeze()
        model = Trainer.build_model(cfg)
        PrunedCheckpointer(model).load(os.path.join(output, "runs", job.name, "model_final.pth"))
        model.eval()
        inputs, _ = sample_inputs(cfg, model)
        cache[key] = round(measure_latency(model, inputs, repeats=repeats)["median_ms"], 2)
        atomic_write_text(path, json.dumps(cache, indent=1))
    return cache
