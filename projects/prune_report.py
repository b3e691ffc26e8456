"""Readable summaries of runs: the one-shot pruning report (`tools/prune_net.py`) as markdown, and
a table of the `run_summary.json` files that training runs write (`tools/summarize.py`)."""

import json
import math
import os
from typing import Dict, List

from tabulate import tabulate

from d2prune.errors import UserError
from d2prune.utils.io import atomic_write_text


def load_run_summary(output_dir: str) -> Dict:
    path = os.path.join(output_dir, "run_summary.json")
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found; is {output_dir} the OUTPUT_DIR of a finished run?")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot be read as JSON ({e}).") from None


def _ap_cell(value) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def run_summary_table(output_dirs: List[str]) -> str:
    """One row per run: bbox AP, AP50, iterations and training wall time. An AP that COCO could
    not compute (null in the summary; NaN in summaries written before) shows as '-'."""
    rows = []
    for out in output_dirs:
        s = load_run_summary(out)
        bbox = s["results"].get("bbox", {})
        rows.append(
            [
                out,
                _ap_cell(bbox.get("AP")),
                _ap_cell(bbox.get("AP50")),
                s["max_iter"],
                f"{s['train_seconds'] / 60:.1f} min ({s['iterations']} it run)",
            ]
        )
    return tabulate(rows, headers=["run", "bbox AP", "bbox AP50", "iterations", "wall time (train + eval)"])


_COLUMNS = (
    ("bbox_AP", "bbox AP", "{:.1f}"),
    ("bbox_AP50", "AP50", "{:.1f}"),
    ("params", "params (M)", "{:.2f}", 1e-6),
    ("flops", "GFLOPs", "{:.2f}", 1e-9),
    ("backbone_flops", "backbone GFLOPs", "{:.2f}", 1e-9),
    ("latency_ms", "CPU latency (ms)", "{:.1f}"),
    ("backbone_latency_ms", "backbone latency (ms)", "{:.1f}"),
)


def _cell(row: Dict, key: str, fmt: str, scale: float = 1.0) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value * scale)


def prune_report_markdown(report: Dict) -> str:
    """The one-shot pruning report as Markdown: metrics before/after (and after fine-tuning),
    relative changes, and channel widths per group kind."""
    stages = [("before pruning", report["before"]), ("after pruning", report["after"])]
    if report.get("finetuned"):
        stages.append(
            (
                f"after {report['finetuned']['iterations']} fine-tuning iterations",
                report["finetuned"],
            )
        )
    if report.get("ratio") is not None:
        budget = f"ratio {report['ratio']}"
    elif report.get("latency_reduction_target") is not None:
        model = report["latency_model"]
        budget = (
            f"latency reduction target {report['latency_reduction_target']} (predicted "
            f"{model['predicted_before_ms']:.1f} -> {model['predicted_after_ms']:.1f} ms, widths in steps of {model['width_step']})"
        )
    else:
        budget = f"FLOPs reduction target {report['flops_reduction_target']}"
    lines = [
        "# d2prune one-shot pruning report",
        "",
        f"- weights: `{report['weights']}`",
        f"- criterion: `{report['criterion']}`, {budget}, mode `{report['mode']}`, kinds {', '.join(report['kinds'])}",
        f"- evaluated on: `{report['dataset']}`; size and speed at {report['before']['image_size']} px, CPU latency is the median of repeated runs",
        f"- surgery took {report['surgery_seconds']} s",
        "",
        tabulate(
            [[name] + [_cell(row, *col[:1], *col[2:]) for col in _COLUMNS] for name, row in stages],
            headers=["model"] + [col[1] for col in _COLUMNS],
            tablefmt="github",
        ),
        "",
    ]
    before, after = report["before"], report["after"]
    ratios = [
        f"- {label}: {after[key] / before[key]:.1%} of the unpruned model"
        for key, label in (
            ("params", "parameters"),
            ("flops", "FLOPs"),
            ("backbone_flops", "backbone FLOPs"),
            ("latency_ms", "CPU latency"),
            ("backbone_latency_ms", "backbone CPU latency"),
        )
        if before.get(key)
    ]
    kinds = report["widths"]["kinds"]
    lines += ratios + [
        "",
        "## Channel widths per group kind",
        "",
        tabulate(
            [
                [k["kind"], k["before"], k["after"], f"{k['after'] / k['before']:.0%}"]
                for k in kinds
            ],
            headers=["kind", "channels before", "channels after", "kept"],
            tablefmt="github",
        ),
        "",
    ]
    return "\n".join(lines)


def write_prune_report(output_dir: str, report: Dict) -> str:
    """Write the one-shot report (`prune_oneshot`'s result) as `output_dir/report.md`, atomically;
    return the markdown."""
    text = prune_report_markdown(report)
    atomic_write_text(os.path.join(output_dir, "report.md"), text)
    return text
