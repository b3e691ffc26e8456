"""The transfer study: its plan, its bookkeeping across crashes, its statistics, and one tiny
study run end to end through tools/study.py, with the local launcher and through submitit."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from d2prune.config import separate_overrides, strip_separator
from d2prune.data.synthetic import generate
from d2prune.errors import UserError
from projects.study import launcher, report
from projects.study import runner as study

from .conftest import CONFIG, REPO, run_tool, tiny_opts


def test_plan_runs_baselines_first_and_every_cell_once():
    jobs = study.plan(["l1", "taylor"], [0.3, 0.5], [0, 1], [20, 40], 40, size_criteria=["taylor"])
    names = [j.name for j in jobs]
    assert len(names) == len(set(names))
    assert [j.criterion for j in jobs[:4]] == [None] * 4
    # 2 sizes x 2 seeds baselines, 2 criteria x 2 ratios x 2 seeds at 40, taylor 0.5 x 2 seeds at 20
    assert len(jobs) == 4 + 8 + 2
    assert study.Job("taylor", 0.5, 1, 20) in jobs
    assert study.Job("l1", 0.5, 1, 20) not in jobs
    assert jobs[0].overrides()[-2:] == ["PRUNE.ENABLED", "False"]
    assert "PRUNE.RATIO" in study.Job("l1", 0.3, 0, 40).overrides()


def test_plan_rejects_unknown_criteria_and_ratios():
    with pytest.raises(UserError, match="did you mean l1"):
        study.plan(["l11"], [0.5], [0], [40], 40)
    with pytest.raises(UserError, match="outside"):
        study.plan(["l1"], [1.0], [0], [40], 40)


def test_target_subsets_are_nested_prefixes(tmp_path):
    entries = study.prepare_target_subsets(str(tmp_path), [2, 5], image_size=64)
    (name2, json2, root2), (name5, json5, _) = entries
    assert (name2, name5) == ("study_target_train_2", "study_target_train_5")
    small, large = (json.load(open(p)) for p in (json2, json5))
    assert [im["id"] for im in small["images"]] == [im["id"] for im in large["images"][:2]]
    ids = {im["id"] for im in small["images"]}
    assert {a["image_id"] for a in small["annotations"]} <= ids
    assert len(small["annotations"]) == sum(a["image_id"] in ids for a in large["annotations"]) > 0
    assert all(os.path.isfile(os.path.join(root2, im["file_name"])) for im in small["images"])
    mtime = os.path.getmtime(json2)
    study.prepare_target_subsets(str(tmp_path), [2, 5], image_size=64)
    assert os.path.getmtime(json2) == mtime  # unchanged files are not rewritten


def test_results_survive_a_line_cut_short(tmp_path):
    (tmp_path / study.RESULTS).write_text(json.dumps({"name": "a"}) + "\n" + '{"name": "b", "bbox_')
    assert [r["name"] for r in study.load_results(str(tmp_path))] == ["a"]


# A stand-in for the training worker: records the result a finished run would, in its own file
# as worker_main does, or fails when the job's seed is 13, so the bookkeeping is tested without
# training (and without importing torch).
FAKE_WORKER = """
import json, os, sys
job = json.loads(sys.argv[2])
if job["seed"] == 13:
    sys.exit(3)
name = ("baseline" if job["criterion"] is None else f"{job['criterion']}_r{job['ratio']:g}") + f"_n{job['train_size']}_s{job['seed']}"
os.makedirs(os.path.join(sys.argv[1], "results"), exist_ok=True)
with open(os.path.join(sys.argv[1], "results", name + ".json"), "w") as f:
    json.dump(dict(job, name=name, bbox_AP=1.0, bbox_AP50=2.0, seconds=0.0), f)
"""


@pytest.mark.subprocess
def test_run_study_records_results_skips_finished_runs_and_reports_failures(tmp_path):
    worker = [sys.executable, "-c", FAKE_WORKER, str(tmp_path)]
    jobs = [study.Job(None, 0.0, 0, 4), study.Job("l1", 0.5, 0, 4), study.Job("l1", 0.5, 13, 4)]
    failed = study.run_study(jobs, worker, str(tmp_path), parallel=2)
    assert failed == ["l1_r0.5_n4_s13"]
    assert sorted(r["name"] for r in study.load_results(str(tmp_path))) == ["baseline_n4_s0", "l1_r0.5_n4_s0"]
    lines = (tmp_path / study.RESULTS).read_text().splitlines()
    assert sorted(json.loads(line)["name"] for line in lines) == ["baseline_n4_s0", "l1_r0.5_n4_s0"]
    table = launcher.status(jobs, str(tmp_path))
    rows = status_rows(table)
    assert [rows[job.name][0] for job in jobs] == ["finished", "finished", "failed"]
    assert rows["l1_r0.5_n4_s13"][2] == f"{tmp_path}/runs/l1_r0.5_n4_s13/worker.log (exit 3)"
    assert table.endswith(f"study: 3 runs in {tmp_path}: 2 finished, 0 running, 0 pending, 1 failed")
    # A rerun starts only the run that failed: the finished ones, recorded in results.jsonl, are
    # not run again even when their own result file is gone.
    os.remove(tmp_path / study.RESULTS_DIR / "baseline_n4_s0.json")
    assert study.run_study(jobs, [sys.executable, "-c", "import sys; sys.exit(3)"], str(tmp_path), parallel=2) == [
        "l1_r0.5_n4_s13"]
    assert len(study.load_results(str(tmp_path))) == 2


def status_rows(table: str) -> dict:
    """`--status`'s table as {run: [state, job, log]} (columns are two or more spaces apart)."""
    rows = [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()[2:] if not line.startswith("study:")]
    return {row[0]: row[1:] + [""] * (4 - len(row)) for row in rows}


def test_results_of_an_older_study_are_kept_beside_the_new_files(tmp_path):
    """A study from before the per-run files has only results.jsonl: it still counts, and a run
    recorded in both is taken from its own, newer file."""
    old = [{"name": "a", "bbox_AP": 1.0}, {"name": "b", "bbox_AP": 2.0}]
    (tmp_path / study.RESULTS).write_text("".join(json.dumps(r) + "\n" for r in old))
    study.record_result(str(tmp_path), {"name": "b", "bbox_AP": 3.0})
    study.record_result(str(tmp_path), {"name": "c", "bbox_AP": 4.0})
    merged = study.merge_results(str(tmp_path))
    assert [(r["name"], r["bbox_AP"]) for r in merged] == [("a", 1.0), ("b", 3.0), ("c", 4.0)]
    assert [json.loads(line) for line in (tmp_path / study.RESULTS).read_text().splitlines()] == merged


def _result(criterion, ratio, seed, ap, flops, size=40):
    return {"criterion": criterion, "ratio": ratio, "seed": seed, "train_size": size, "bbox_AP": ap,
            "bbox_AP50": 2 * ap, "params": flops / 10, "flops": flops, "backbone_flops": flops / 2,
            "spec": {"g": int(flops)}}


def test_summary_pairs_by_seed_against_the_baseline():
    results = [_result(None, 0.0, s, ap, 100.0) for s, ap in enumerate([10.0, 11.0, 12.0])]
    results += [_result("l1", 0.5, s, ap, 60.0) for s, ap in enumerate([11.0, 13.0, 15.0])]
    results += [_result("l1", 0.7, 0, 5.0, 40.0)]
    rows = report.summarize(results, latency=lambda r: r["flops"] / 10)
    base, half, most = rows
    assert base["criterion"] is None and base["AP"] == pytest.approx(11.0) and base["AP_std"] == pytest.approx(1.0)
    # differences 1, 2, 3: mean 2, std 1, t = 2 sqrt(3) with 2 degrees of freedom
    assert half["dAP"] == pytest.approx(2.0) and half["dAP_std"] == pytest.approx(1.0)
    assert half["p"] == pytest.approx(0.0742, abs=1e-4)
    assert half["backbone_flops_share"] == pytest.approx(0.6) and half["latency_share"] == pytest.approx(0.6)
    assert most["pairs"] == 1 and math.isnan(most["p"])
    lines = report.answer(rows, 40)
    assert lines[1] == ("l1: above the baseline up to 40 % fewer backbone FLOPs (ratio 0.5, ΔAP +2.00 ± 1.00, "
                        "p 0.07, 3 seeds).")
    table = report.markdown_table(rows)
    assert "| 40 | l1 | 0.5 | 3 | 13.00 ± 2.00 |" in table and "+2.00 ± 1.00 | 0.07 |" in table


def test_delta_table_and_headline_rank_criteria_and_count_significant_comparisons():
    results = [_result(None, 0.0, s, 10.0 + s, 100.0) for s in range(3)]
    # l1: +1, +2, +3 at 0.3 (t = 3.46, p 0.074) and exactly +1 on every seed at 0.5 (p 0);
    # taylor: -3 on every seed at 0.5 only, beyond the baseline's spread of 1.
    results += [_result("l1", 0.3, s, 11.0 + 2 * s, 80.0) for s in range(3)]
    results += [_result("l1", 0.5, s, 11.0 + s, 60.0) for s in range(3)]
    results += [_result("taylor", 0.5, s, 7.0 + s, 60.0) for s in range(3)]
    rows = report.summarize(results)
    table = report.delta_table(rows, 40).splitlines()
    assert table[0] == "| criterion | ratio 0.3 (80 % FLOPs) | ratio 0.5 (60 % FLOPs) | mean |"
    assert table[2] == "| l1 | +2.00 ± 1.00 (3) | +1.00 ± 0.00* (3) | +1.50 |"
    assert table[3] == "| taylor | – | -3.00 ± 0.00* (3) | -3.00 |"
    lines = report.answer(rows, 40)
    assert lines[-4] == "Deepest pruning matched: on several seeds, ratio 0.5 (40 % fewer backbone FLOPs) by l1."
    # l1's +1 x 3 and taylor's -3 x 3 at 0.5: mean -1, std sqrt(6 * 4 / 5)
    assert lines[-3] == ("Pooled over criteria (every pruned run against its seed's baseline): ΔAP +2.00 ± 1.00 at ratio 0.3 "
                         "(3 runs), ΔAP -1.00 ± 2.19 at ratio 0.5 (6 runs).")
    assert table[4] == "| *all criteria pooled* | +2.00 ± 1.00 (3) | -1.00 ± 2.19 (6) | |"
    assert lines[-2] == "Mean ΔAP over each criterion's ratios, best first: l1 +1.50, taylor -3.00."
    assert lines[-1] == ("2 of 3 paired comparisons reach p < 0.05: l1 at ratio 0.5 (+1.00), taylor at ratio 0.5 (-3.00) "
                         "(by chance alone about 0.2 would).")
    assert report.delta_table(report.summarize(results[:3]), 40) == ""
    # random at 0.5 on seeds 0 and 1 only: l1 is compared on those two runs (+2, +2), taylor on
    # (-2, -2); both have no spread, so p is 0.
    results += [_result("random", 0.5, s, 9.0 + s, 60.0) for s in range(2)]
    table = report.delta_table(report.summarize(results), 40).splitlines()
    assert table[0].endswith("| mean | vs random |")
    assert table[2] == "| l1 | +2.00 ± 1.00 (3) | +1.00 ± 0.00* (3) | +1.50 | +2.00 ± 0.00* (2) |"
    assert table[3] == "| random | – | -1.00 ± 0.00* (2) | -1.00 | – |"
    assert table[4] == "| taylor | – | -3.00 ± 0.00* (3) | -3.00 | -2.00 ± 0.00* (2) |"


def test_the_headline_keeps_single_seed_matches_apart():
    results = [_result(None, 0.0, s, 10.0 + s, 100.0) for s in range(3)]
    results += [_result("fpgm", 0.5, s, 10.0 + s, 60.0) for s in range(3)]
    results += [_result("l1", 0.7, 0, 9.5, 40.0)]  # within the baseline's std of 1, one seed
    lines = report.answer(report.summarize(results), 40)
    assert lines[-4] == ("Deepest pruning matched: on several seeds, ratio 0.5 (40 % fewer backbone FLOPs) by fpgm; "
                         "on one seed, ratio 0.7 (60 % fewer backbone FLOPs) by l1.")


def test_coverage_says_what_is_missing():
    jobs = study.plan(["l1", "taylor"], [0.3, 0.5], [0, 1], [40, 20], 40, ["l1"], 0.5)
    planned = [dict(vars(job), name=job.name) for job in jobs]
    finished = {job.name for job in jobs if job.criterion != "taylor" and not (job.ratio == 0.3 and job.seed == 1)}
    assert report.coverage(planned, finished, 40) == (
        "Partial: 9 of 14 planned runs finished (unpruned: 2/2; unpruned on 20 images: 2/2; ratio 0.3: 1/4; "
        "ratio 0.5: 2/4; ratio 0.5 on 20 images: 2/2); not yet run: taylor.")
    assert report.coverage(planned, {job.name for job in jobs}, 40) == ""


def test_thread_counts_flag_a_mix():
    assert report.thread_counts([{"threads": 1}, {"threads": 1}]) == "every run with 1 torch thread"
    assert report.thread_counts([{"threads": 2}]) == "every run with 2 torch threads"
    mixed = report.thread_counts([{"threads": 1}, {"threads": 2}, {"threads": 1}, {}])
    assert mixed.startswith("torch threads per run: 1: 2 runs, 2: 1 run, not recorded: 1; runs with different")
    assert report.thread_counts([{"threads": 1}, {}]) == "torch threads per run: 1: 1 run, not recorded: 1"


def test_config_overrides_after_a_list_option_are_kept_apart():
    spec = importlib.util.spec_from_file_location("study_tool", REPO / "tools" / "study.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def parse(*argv):
        args = tool.argument_parser().parse_args(separate_overrides(argv))
        return args.seeds, args.output, strip_separator(args.opts)

    base = ("--config-file", "c.yaml")
    assert parse(*base, "--output", "OUT.DIR", "--seeds", "0", "1", "SOLVER.MAX_ITER", "5") == (
        [0, 1], "OUT.DIR", ["SOLVER.MAX_ITER", "5"])
    assert parse(*base, "--seeds", "2", "--output", "o", "--", "SEED", "3") == ([2], "o", ["SEED", "3"])
    assert parse(*base, "--output", "o") == ([0], "o", [])
    with pytest.raises(SystemExit):  # not a config key: argparse still says what is wrong
        parse(*base, "--output", "o", "--seeds", "0", "SOLVER.MAX_ITERS", "5")


def test_a_criterion_below_the_baseline_is_said_to_be(tmp_path):
    results = [_result(None, 0.0, s, 10.0 + s, 100.0) for s in range(3)]
    results += [_result("random", 0.5, s, 5.0, 60.0) for s in range(3)]
    rows = report.summarize(results)
    assert report.answer(rows, 40)[1] == "random: below the baseline's seed spread at every level (at ratio 0.5: ΔAP -6.00, 3 seed(s))."
    assert os.path.isfile(report.plot_ap_vs_flops(rows, 40, str(tmp_path / "a.png")))
    assert report.plot_ap_vs_train_size(rows, str(tmp_path / "b.png")) is None
    assert os.path.isfile(report.plot_delta(rows, 40, str(tmp_path / "c.png")))
    assert report.plot_delta(report.summarize(results[:3]), 40, str(tmp_path / "d.png")) is None


@pytest.fixture(scope="module")
def tiny_study(trained, tmp_path_factory):
    """The arguments of a tiny study (baseline and one pruned fine-tune of the 3-iteration source
    model) for an output folder, and the local launcher's run of it: (args, output, process)."""
    root, source_out, _ = trained
    generate(root, "target", "val", 4, image_size=96, workers=1)
    tmp = tmp_path_factory.mktemp("tiny_study")
    opts = tiny_opts(root, tmp / "unused", iters=4)
    opts += ["MODEL.WEIGHTS", str(source_out / "model_final.pth"), "PRUNE.START_ITER", "1",
             "PRUNE.END_ITER", "2", "PRUNE.NUM_EVENTS", "1", "PRUNE.SCORE_BATCHES", "1"]

    def args(out, *options):
        return ["--config-file", str(REPO / "configs/synthetic/study/faster_rcnn_R18_FPN_study.yaml"),
                "--criteria", "l1", "--ratios", "0.5", "--seeds", "0", "--train-sizes", "3",
                "--data-root", str(tmp / "data"), "--image-size", "96", "--latency-repeats", "2",
                "--output", str(out), *options, *opts]

    out = tmp / "study"
    return args, out, run_tool("study.py", *args(out, "--jobs", "2"))


@pytest.mark.subprocess
def test_a_tiny_study_end_to_end(tiny_study):
    """Baseline and one pruned fine-tune, each in its own process, then the report; a rerun finds
    both runs finished and rewrites the same table."""
    args, out, proc = tiny_study
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = study.load_results(str(out))
    assert sorted(r["name"] for r in results) == ["baseline_n3_s0", "l1_r0.5_n3_s0"]
    base, pruned = sorted(results, key=lambda r: r["criterion"] is not None)
    assert pruned["params"] < base["params"] and pruned["backbone_flops"] < base["backbone_flops"]
    assert sum(pruned["spec"].values()) < sum(base["spec"].values())
    for name in ("baseline_n3_s0", "l1_r0.5_n3_s0"):  # only the final weights stay
        assert sorted(p.name for p in (out / "runs" / name).glob("*.pth")) == ["model_final.pth"]
    md = (out / "results.md").read_text()
    assert "| 3 | l1 | 0.5 | 1 |" in md and "ap_vs_flops.png" in md and "delta_ap.png" in md
    # Two runs at a time share the cores: each gets its half, recorded with its result.
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert [r["threads"] for r in results] == [threads, threads]
    assert f"- every run with {threads} torch thread" in md
    assert (out / "results_ap_vs_flops.png").is_file() and (out / "results.csv").is_file()
    # Both architectures timed as deployed, the pruned one beside the baseline and scaled to it.
    latency = json.loads((out / "latency_deployed.json").read_text())
    assert set(latency) == {report.spec_key(r["spec"]) for r in results}
    assert latency[report.spec_key(base["spec"])] > 0 and latency[report.spec_key(pruned["spec"])] > 0
    again = run_tool("study.py", *args(out, "--jobs", "2"))
    assert again.returncode == 0 and "2 of 2 runs already finished" in again.stdout
    assert len(study.load_results(str(out))) == 2
    assert json.loads((out / "latency_deployed.json").read_text()) == latency  # read, not timed again


def _without_wall_times(results):
    return sorted(({k: v for k, v in r.items() if k != "seconds"} for r in results), key=lambda r: r["name"])


def _answer_and_delta(md: str) -> str:
    """The report from its answer to its full table: no wall times, no latencies."""
    return md[md.index("## Answer"):md.index("## Table")]


@pytest.mark.subprocess
def test_the_submitit_launcher_gives_the_local_launchers_report(tiny_study, tmp_path):
    """The same study through submitit's LocalExecutor (the Slurm path without a cluster), two
    jobs at once: the same results, bit for bit, and the same report but for wall times and
    latencies; each job's record names its submitit job."""
    args, local_out, local = tiny_study
    assert local.returncode == 0, local.stderr[-3000:]
    out = tmp_path / "submitit"
    proc = run_tool("study.py", *args(out, "--launcher", "local-submitit", "--max-parallel", "2"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("study: submitted 1 run(s) to submitit's LocalExecutor") == 2
    assert _without_wall_times(study.load_results(str(out))) == _without_wall_times(study.load_results(str(local_out)))
    assert _answer_and_delta((out / "results.md").read_text()) == _answer_and_delta((local_out / "results.md").read_text())
    rows = status_rows(launcher.status(study.plan(["l1"], [0.5], [0], [3], 3), str(out)))
    assert [state for state, _, _ in rows.values()] == ["finished", "finished"]
    assert all(job.startswith("local-submitit ") for _, job, _ in rows.values())
    assert sorted(p.name for p in (out / "results").iterdir()) == ["baseline_n3_s0.json", "l1_r0.5_n3_s0.json"]


# One study run in a fresh interpreter, as `tools/study.py` starts each: the RNGs start unseeded.
ONE_RUN = """
import json, sys
import torch
from projects.study.runner import Job, run_job
config, out, datasets, opts, seed = sys.argv[1:]
run_job(config, Job(None, 0.0, int(seed), 4), out, json.loads(datasets), json.loads(opts))
state = torch.load(out + "/model_final.pth", map_location="cpu", weights_only=True)["model"]
torch.save(state, out + "/weights.pt")
"""


@pytest.mark.subprocess
def test_a_study_run_repeats_bit_for_bit(tmp_path):
    """The same run (seed, data, schedule, threads) twice gives the same weights, bit for bit:
    the seed of a job must seed what it trains with (data order, new layers' init)."""
    datasets = study.prepare_target_subsets(str(tmp_path / "data"), [4], image_size=96)
    generate(tmp_path / "data", "target", "val", 2, image_size=96, workers=1)
    opts = tiny_opts(tmp_path / "data", tmp_path / "unused", iters=4) + [
        "DATASETS.TEST", "('synthetic_target_val',)", "MODEL.WEIGHTS", "",
    ]  # fmt: skip
    weights = []
    for i, seed in enumerate([1, 1, 2]):
        out = tmp_path / f"run{i}"
        env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        proc = subprocess.run(
            [sys.executable, "-c", ONE_RUN, CONFIG, str(out), json.dumps(datasets), json.dumps(opts), str(seed)],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights.append(torch.load(out / "weights.pt", weights_only=True))
    first, again, other = weights
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first), "one seed, two different runs"
    assert not all(torch.equal(first[k], other[k]) for k in first), "another seed, the same run"
