"""tools/time_checkpoints.py: trained checkpoints, pruned or not, timed against the first one."""

import re

import pytest

from .conftest import CONFIG, own_split, run_tool, tiny_opts


@pytest.mark.subprocess
def test_checkpoints_are_timed_against_the_first(checkpoints, tmp_path):
    root, unpruned, pruned = checkpoints
    table = tmp_path / "times.md"
    proc = run_tool(
        "time_checkpoints.py", "--config-file", CONFIG, "--weights", unpruned, pruned, "--labels", "full", "half",
        *own_split(root), "--images", 2, "--rounds", 1, "--repeats", 1, "--output", table, *tiny_opts(root, tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.read_text().splitlines() if re.match(r"\| (full|half) ", line)}  # fmt: skip
    assert set(rows) == {"full", "half"} and "prepared for inference" in proc.stdout
    params, flops = {k: float(v[0]) for k, v in rows.items()}, {k: float(v[1]) for k, v in rows.items()}
    assert params["half"] < params["full"] and flops["half"] < flops["full"]
    assert rows["full"][2] == "0.0%" and float(rows["half"][2].rstrip("%")) > 10  # FLOPs cut
    assert all(float(v[3].split(" / ")[1]) > 0 for v in rows.values())  # ms


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "args, message",
    [
        (["--weights", "missing.pth"], "missing.pth: checkpoint file not found"),
        (["--weights", "a.pth", "b.pth", "--labels", "one"], "1 names for 2 checkpoints"),
    ],
    ids=["missing", "labels"],
)
def test_bad_input_is_one_line_error(args, message):
    proc = run_tool("time_checkpoints.py", "--config-file", CONFIG, *args)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
