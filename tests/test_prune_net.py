"""tools/prune_net.py end to end on a tiny trained model: report fields, a pruned checkpoint
that `train_net.py --eval-only` loads with no pruning flag and scores exactly as reported."""

import json

import pytest
import torch

from .conftest import CONFIG, eval_only_ap, run_tool, tiny_opts

pytestmark = pytest.mark.subprocess

REPORT_FIELDS = ("bbox_AP", "bbox_AP50", "params", "flops", "latency_ms")


@pytest.fixture(scope="module")
def pruned(trained, tmp_path_factory):
    root, out, _ = trained
    dest = tmp_path_factory.mktemp("pruned")
    proc = run_tool(
        "prune_net.py", "--config-file", CONFIG, "--criterion", "l1", "--ratio", "0.5",
        "--output", dest, "--latency-repeats", "2",
        *tiny_opts(root, dest), "MODEL.WEIGHTS", out / "model_final.pth",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, dest, json.loads((dest / "report.json").read_text()), proc


def test_report_has_before_and_after(pruned):
    _, dest, report, proc = pruned
    for stage in ("before", "after"):
        for field in REPORT_FIELDS:
            assert field in report[stage], (stage, field)
    assert report["criterion"] == "l1" and report["ratio"] == 0.5
    block_before = sum(k["before"] for k in report["widths"]["kinds"] if k["kind"] == "block")
    block_after = sum(k["after"] for k in report["widths"]["kinds"] if k["kind"] == "block")
    assert block_after == block_before // 2  # R18: every block group has an even width >= 16
    assert report["after"]["params"] < report["before"]["params"]
    assert report["after"]["backbone_flops"] < 0.8 * report["before"]["backbone_flops"]
    stage_widths = {k["kind"]: k for k in report["widths"]["kinds"]}["stage"]
    assert stage_widths["after"] == stage_widths["before"]  # only `block` groups were eligible
    assert "# d2prune one-shot pruning report" in (dest / "report.md").read_text()
    assert "bbox AP" in proc.stdout


def test_pruned_checkpoint_evaluates_as_reported(pruned, tmp_path):
    root, dest, report, _ = pruned
    checkpoint = torch.load(dest / "model_pruned.pth", weights_only=True)
    assert checkpoint["d2prune"]["spec"] == report["spec"]
    ap = eval_only_ap(root, tmp_path, dest / "model_pruned.pth")
    assert ap == pytest.approx(report["after"]["bbox_AP"], abs=1e-3)


def test_unknown_criterion_is_one_line_error(trained, tmp_path):
    root, out, _ = trained
    proc = run_tool(
        "prune_net.py", "--config-file", CONFIG, "--criterion", "l3", "--output", tmp_path,
        *tiny_opts(root, tmp_path), "MODEL.WEIGHTS", out / "model_final.pth",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "l3" in line and "l1" in line
