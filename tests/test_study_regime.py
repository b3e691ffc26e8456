"""The study where fine-tuning can overfit: the arms of its grid, its validation and test splits,
the STUDY config keys, the validation curve and early-stopped model of a run (also across a
crash), and the report's verdict on a curve and its final-vs-early-stopped table."""

import json
import os
import subprocess
import sys

import pytest
import torch

from d2prune.errors import UserError
from projects.study import report
from projects.study import runner as study
from projects.study.config import setup_study_cfg

from .conftest import REPO, run_tool, tiny_opts

STUDY_CONFIG = str(REPO / "configs/synthetic/study/faster_rcnn_R18_FPN_study.yaml")


def test_plan_adds_frozen_baselines_other_targets_and_every_size():
    jobs = study.plan(["l1", "mi"], [0.5], [0, 1], [10, 40], 40, target="flops", freeze_ats=[3], every_size=True)
    names = [j.name for j in jobs]
    assert len(names) == len(set(names)) == 2 * 2 * 2 + 2 * 2 * 2
    # Unpruned first: the baseline and its frozen arm, on every size and seed.
    assert names[:4] == ["baseline_n10_s0", "freeze3_n10_s0", "baseline_n10_s1", "freeze3_n10_s1"]
    assert "l1_flops0.5_n10_s1" in names and "mi_flops0.5_n40_s0" in names
    frozen = study.Job(None, 0.0, 0, 10, freeze_at=3)
    assert frozen.overrides()[-4:] == ["PRUNE.ENABLED", "False", "MODEL.BACKBONE.FREEZE_AT", "3"]
    assert study.Job("l1", 0.3, 0, 10, "latency").overrides()[-4:-2] == ["PRUNE.LATENCY_REDUCTION", "0.3"]
    # A result of the first study (no target, no freeze_at) is the same job as before.
    old = {"criterion": "l1", "ratio": 0.5, "seed": 2, "train_size": 40, "bbox_AP": 8.0}
    assert study.Job.of(old) == study.Job("l1", 0.5, 2, 40) and study.Job.of(old).name == "l1_r0.5_n40_s2"
    with pytest.raises(UserError, match="FREEZE_AT 7"):
        study.plan([], [0.5], [0], [10], 10, freeze_ats=[7])
    with pytest.raises(UserError, match="not one of channels, flops, latency"):
        study.plan(["l1"], [0.5], [0], [10], 10, target="params")


def test_cost_weightings_are_arms_of_their_own_in_the_plan_and_the_report():
    jobs = study.plan(["l1"], [0.4], [0, 1], [40], 40, target="latency", weightings=["uniform", "sensitivity"])
    names = [j.name for j in jobs if j.criterion]
    assert names == ["l1_latency0.4_n40_s0", "l1_latency0.4_sensitivity_n40_s0",
                     "l1_latency0.4_n40_s1", "l1_latency0.4_sensitivity_n40_s1"]
    weighted = study.Job("l1", 0.4, 0, 40, "latency", weighting="sensitivity")
    assert weighted.overrides()[-4:] == ["PRUNE.LATENCY_REDUCTION", "0.4", "PRUNE.COST_WEIGHTING", "sensitivity"]
    assert study.Job("l1", 0.4, 0, 40, "latency").overrides()[-2:] == ["PRUNE.COST_WEIGHTING", "uniform"]
    runs = [dict(_run(None, s, 8.0, 8.0, [[100, 8.0, 0]]), target="latency") for s in (0, 1)]
    runs += [dict(_run("l1", s, ap, ap, [[100, ap, 0]]), target="latency", ratio=0.4, weighting=w)
             for s in (0, 1) for w, ap in (("uniform", 6.0 + s), ("sensitivity", 7.5 + s))]
    rows = {r["criterion"]: r for r in report.summarize([dict(r, train_size=40) for r in runs])}
    assert rows["l1"]["AP"] == 6.5 and rows["l1 (sensitivity)"]["AP"] == 8.0
    assert rows["l1 (sensitivity)"]["dAP"] == pytest.approx(0.0) and rows["l1"]["dAP"] == pytest.approx(-1.5)
    assert report.arm_label(runs[-1]) == "l1 (sensitivity) latency -40 %"
    # Beside a block-channel arm of the same number (`--report-all`): two columns, not one.
    block = [dict(_run("l1", s, 7.0, 7.0, [[100, 7.0, 0]]), ratio=0.4) for s in (0, 1)]
    table = report.delta_table(report.summarize([dict(r, train_size=40) for r in runs + block]), 40)
    assert "| ratio 0.4 (100 % FLOPs) | -40 % latency (100 % FLOPs) | mean |" in table


def test_the_test_split_is_disjoint_from_validation_and_independent_of_its_size(tmp_path):
    test, validation = study.prepare_eval_splits(str(tmp_path), val_size=2, test_size=3, image_size=64)
    assert (test[0], validation[0]) == ("study_target_test_3", "study_target_validation_2")
    test_ids = [im["id"] for im in json.load(open(test[1]))["images"]]
    val = json.load(open(validation[1]))
    assert len(test_ids) == 3 and len(val["images"]) == 2
    assert not set(test_ids) & {im["id"] for im in val["images"]}
    assert {a["image_id"] for a in val["annotations"]} <= {im["id"] for im in val["images"]}
    bigger, _ = study.prepare_eval_splits(str(tmp_path), val_size=4, test_size=3, image_size=64)
    assert [im["id"] for im in json.load(open(bigger[1]))["images"]] == test_ids


def test_study_keys_come_from_the_overrides_and_never_name_the_test_split():
    cfg = setup_study_cfg(STUDY_CONFIG, ["STUDY.VAL_DATASET", "v", "SOLVER.MAX_ITER", "7", "STUDY.VAL_PERIOD", "5"])
    assert (cfg.STUDY.VAL_DATASET, cfg.STUDY.VAL_PERIOD, cfg.SOLVER.MAX_ITER) == ("v", 5, 7)
    assert setup_study_cfg(STUDY_CONFIG).STUDY.VAL_DATASET == ""
    with pytest.raises(UserError, match="must not be the one it is reported on"):
        setup_study_cfg(STUDY_CONFIG, ["DATASETS.TEST", "('v',)", "STUDY.VAL_DATASET", "v"])
    with pytest.raises(UserError, match="STUDY.VAL_PERIODS .* the STUDY keys are STUDY.VAL_DATASET, STUDY.VAL_PERIOD"):
        setup_study_cfg(STUDY_CONFIG, ["STUDY.VAL_PERIODS", "5"])
    with pytest.raises(UserError, match="positive number of iterations"):
        setup_study_cfg(STUDY_CONFIG, ["STUDY.VAL_PERIOD", "0"])


def _run(criterion, seed, final, stopped, curve, size=10, freeze_at=None, spec=1):
    return {"criterion": criterion, "ratio": 0.5 if criterion else 0.0, "seed": seed, "train_size": size,
            "target": "channels", "freeze_at": freeze_at, "bbox_AP": final, "bbox_AP50": 2 * final,
            "es_bbox_AP": stopped, "es_bbox_AP50": 2 * stopped, "es_iter": max(curve, key=lambda p: p[1])[0],
            "val_curve": curve, "loss_curve": [[20, 1.0], [40, 0.5]], "val_dataset": "v", "test_dataset": "t",
            "params": 10.0, "flops": 10.0, "backbone_flops": 5.0, "spec": {"g": spec}}


def test_the_report_says_whether_validation_ap_falls_and_compares_with_the_early_stopped_baseline():
    falls = [[i, ap, 0] for i, ap in zip(range(100, 800, 100), [5.0, 8.0, 8.0, 8.0, 6.0, 5.0, 5.0])]
    flat = [[i, ap, 0] for i, ap in zip(range(100, 800, 100), [5.0, 7.0, 7.0, 7.0, 6.8, 6.8, 6.9])]
    # Means of 3 consecutive evaluations: 7, 8, 7.33, 6.33, 5.33 (best around 300, 2.67 above the end).
    assert report.curve_verdict(*zip(*[p[:2] for p in falls])) == {
        "peak_iter": 200, "peak": 8.0, "final_iter": 700, "final": 5.0, "best_iter": 300, "best": 8.0,
        "end": pytest.approx(16 / 3), "drop": pytest.approx(8 / 3), "falls": True}
    assert report.curve_verdict([1, 2, 3], [5.0, 7.0, 6.8], window=1)["drop"] == pytest.approx(0.2)
    # One evaluation far above its neighbours is not a peak: the means drop by 0.33 only.
    assert not report.curve_verdict([1, 2, 3, 4, 5], [5.0, 6.0, 5.0, 5.0, 5.0])["falls"]
    results = [_run(None, s, 6.0 + s, 7.0 + s, falls) for s in (0, 1)]
    results += [_run(None, s, 5.0 + s, 5.5 + s, flat, freeze_at=3) for s in (0, 1)]
    results += [_run("l1", 0, 8.0, 8.0, flat, spec=2), _run("l1", 1, 8.5, 9.5, flat, spec=2)]
    lines = report.overfitting_lines(results)
    assert lines[0] == ("unpruned on 10 images (2 seeds): validation AP peaks at 8.00 at iteration 200 and is 5.00 at "
                        "iteration 700; averaged over 3 consecutive evaluations it is best around iteration 300 (8.00) "
                        "and ends at 5.33, 2.67 lower: it falls (by more than 0.5); training loss 1.000 at iteration "
                        "20, 0.500 at its lowest, 0.500 at the end.")
    assert "FREEZE_AT 3 on 10 images (2 seeds): validation AP peaks at 7.00 at iteration 200" in lines[1]
    assert "ends at 6.83, 0.17 lower: within 0.5, it does not clearly fall" in lines[1]
    table = report.regime_table(results, 10, latency={report.spec_key({"g": 1}): 70.0}).splitlines()
    # The unpruned run's final weights against its own early-stopped model: -1 on both seeds.
    assert table[2] == "| **unpruned** | 2 | 6.50 ± 0.71 | 7.50 ± 0.71 | 200 / 200 | 70.0 | -1.00 ± 0.00* (2) | – | – |"
    assert table[3].startswith("| unpruned, FREEZE_AT 3 | 2 | 5.50 ± 0.71 | 6.00 ± 0.71 | 200 / 200 | 70.0 | -2.00")
    # l1: final 8 / 8.5 against the early-stopped 7 / 8 (+1, +0.5), early-stopped 8 / 9.5 (+1, +1.5),
    # final against final 6 / 7 (+2, +1.5).
    assert table[4] == ("| l1 ratio 0.5 | 2 | 8.25 ± 0.35 | 8.75 ± 1.06 | 200 / 200 | – | +0.75 ± 0.35 (2) "
                        "| +1.25 ± 0.35 (2) | +1.75 ± 0.35 (2) |")
    rows = report.summarize(results, metric="es_bbox_AP")
    assert [(report.arm_label(r), r["AP"]) for r in rows] == [
        ("unpruned", 7.5), ("unpruned, FREEZE_AT 3", 6.0), ("l1 ratio 0.5", 8.75)]
    assert rows[2]["dAP"] == pytest.approx(1.25) and rows[1]["dAP"] == pytest.approx(-1.5)


def test_curve_and_latency_plots(tmp_path):
    results = [_run(None, 0, 6.0, 7.0, [[100, 5.0, 0], [200, 8.0, 0]]),
               _run("l1", 0, 8.0, 8.0, [[100, 5.0, 0], [200, 7.0, 0]], spec=2)]
    assert os.path.isfile(report.plot_curves(results, str(tmp_path / "c.png")))
    latency = {report.spec_key({"g": 1}): 70.0, report.spec_key({"g": 2}): 50.0}
    assert os.path.isfile(report.plot_ap_vs_latency(results, latency, 10, str(tmp_path / "l.png")))
    assert report.plot_ap_vs_latency(results, {}, 10, str(tmp_path / "none.png")) is None
    assert report.plot_curves([{k: v for k, v in r.items() if k != "val_curve"} for r in results], "x.png") is None


# One regime run in a fresh interpreter; with CRASH_AT, the run dies (as if killed) after that
# iteration's hooks started, to be resumed by the same command without it.
ONE_RUN = """
import json, os, sys
from projects.study import validation
from projects.study.runner import Job, run_job
config, out, datasets, opts, job = sys.argv[1:]
crash_at = int(os.environ.get("CRASH_AT", "-1"))
step = validation.ValidationHook.after_step
def after_step(self):
    if self.trainer.iter == crash_at:
        os._exit(3)
    step(self)
validation.ValidationHook.after_step = after_step
run_job(config, Job(**json.loads(job)), out, json.loads(datasets), json.loads(opts))
"""


@pytest.mark.subprocess
def test_a_run_keeps_its_validation_curve_and_best_model_across_a_crash(tmp_path):
    """A pruned run with a validation split, killed after its checkpoint at 6 iterations and
    resumed, ends with the curve, early-stopped model and weights of the run that was not killed;
    its early-stopped model comes after its pruning event and is evaluated on the test split."""
    data = tmp_path / "data"
    datasets = study.prepare_target_subsets(str(data), [4], image_size=96)
    datasets += study.prepare_eval_splits(str(data), val_size=3, test_size=3, image_size=96)
    opts = tiny_opts(data, tmp_path / "unused", iters=9) + [
        "MODEL.WEIGHTS", "", "SOLVER.CHECKPOINT_PERIOD", "3", "DATASETS.TEST", "('study_target_test_3',)",
        "STUDY.VAL_DATASET", "study_target_validation_3", "STUDY.VAL_PERIOD", "2",
        "PRUNE.START_ITER", "2", "PRUNE.END_ITER", "2", "PRUNE.NUM_EVENTS", "1", "PRUNE.SCORE_BATCHES", "1",
    ]  # fmt: skip
    job = json.dumps({"criterion": "l1", "ratio": 0.5, "seed": 0, "train_size": 4})

    def run(out, crash_at=-1):
        env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CRASH_AT=str(crash_at))
        return subprocess.run([sys.executable, "-c", ONE_RUN, STUDY_CONFIG, str(out), json.dumps(datasets), json.dumps(opts), job],
                              capture_output=True, text=True, env=env, timeout=600)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = run(whole)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(killed, crash_at=7)  # after the checkpoint of iteration 6 and the evaluation before it
    assert proc.returncode == 3 and not (killed / "result.json").exists()
    assert (killed / "last_checkpoint").read_text() == "model_0000005.pth"
    proc = run(killed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((out / "result.json").read_text()) for out in (whole, killed))
    # Evaluations every 2 iterations and after the last; the event after iteration 2 (3 done)
    # leaves only the evaluations from 4 on eligible.
    assert [p[0] for p in a["val_curve"]] == [2, 4, 6, 8, 9]
    assert a["es_iter"] >= 4 and a["es_val_AP"] == max(p[1] for p in a["val_curve"][1:])
    assert a["test_dataset"] == "study_target_test_3" and a["val_dataset"] == "study_target_validation_3"
    for key in ("val_curve", "es_iter", "es_val_AP", "es_bbox_AP", "bbox_AP", "spec"):
        assert a[key] == b[key], key
    for name in ("model_final.pth", "model_best.pth"):
        x, y = (torch.load(out / name, map_location="cpu", weights_only=False) for out in (whole, killed))
        x, y = x.get("model") or x["d2prune"]["model"], y.get("model") or y["d2prune"]["model"]
        assert all(torch.equal(x[k], y[k]) for k in x), name
    assert sorted(p.name for p in whole.glob("*.pth")) == ["model_best.pth", "model_final.pth"]


@pytest.mark.subprocess
def test_a_tiny_regime_study_reports_curves_and_early_stopping(trained, tmp_path):
    """tools/study.py with --val-size: the baseline, a frozen arm and a FLOPs-target pruned run,
    one thread each, reported with their curves, early-stopped AP and AP against latency."""
    root, source_out, _ = trained
    opts = tiny_opts(root, tmp_path / "unused", iters=6) + [
        "MODEL.WEIGHTS", str(source_out / "model_final.pth"), "PRUNE.START_ITER", "1", "PRUNE.END_ITER", "1",
        "PRUNE.NUM_EVENTS", "1", "PRUNE.SCORE_BATCHES", "1",
    ]  # fmt: skip
    out = tmp_path / "study"
    proc = run_tool("study.py", "--config-file", STUDY_CONFIG, "--criteria", "l1", "--flops-reduction", "0.3",
                    "--kinds", "block", "stage", "--freeze-at", "4", "--seeds", "0", "--train-sizes", "3",
                    "--val-size", "3", "--test-size", "3", "--val-period", "3", "--data-root", str(tmp_path / "data"),
                    "--image-size", "96", "--latency-repeats", "2", "--jobs", "2", "--threads", "1",
                    "--output", str(out), *opts)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = {r["name"]: r for r in study.load_results(str(out))}
    assert sorted(results) == ["baseline_n3_s0", "freeze4_n3_s0", "l1_flops0.3_n3_s0"]
    assert {r["threads"] for r in results.values()} == {1}
    pruned = results["l1_flops0.3_n3_s0"]
    assert pruned["kinds"] == ["block", "stage"] and pruned["target"] == "flops"
    assert pruned["flops"] < 0.8 * results["baseline_n3_s0"]["flops"]
    assert all([p[0] for p in r["val_curve"]] == [3, 6] for r in results.values())
    md = (out / "results.md").read_text()
    assert "## Validation curves and early stopping" in md and "| l1 FLOPs -30 % | 1 |" in md
    assert (out / "results_curves.png").is_file() and (out / "results_ap_vs_latency_n3.png").is_file()
