"""Readable summaries of finished runs, from the `run_summary.json` a training run writes."""

import json
import os
from typing import Dict, List

from tabulate import tabulate

from ..errors import UserError


def load_run_summary(output_dir: str) -> Dict:
    path = os.path.join(output_dir, "run_summary.json")
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found; is {output_dir} the OUTPUT_DIR of a finished run?")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_summary_table(output_dirs: List[str]) -> str:
    """One row per run: bbox AP, AP50, iterations and training wall time."""
    rows = []
    for out in output_dirs:
        s = load_run_summary(out)
        bbox = s["results"].get("bbox", {})
        rows.append(
            [
                out,
                f"{bbox.get('AP', float('nan')):.1f}",
                f"{bbox.get('AP50', float('nan')):.1f}",
                s["max_iter"],
                f"{s['train_seconds'] / 60:.1f} min ({s['iterations']} it run)",
            ]
        )
    return tabulate(rows, headers=["run", "bbox AP", "bbox AP50", "iterations", "train wall time"])
