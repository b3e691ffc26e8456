"""What a Detectron2 user meets first with their own data: the README walk-through's commands as
written, and faults that used to end in a traceback (unreadable images, an eval-only run given
only the validation set, OUTPUT_DIR naming a file, a batch the processes cannot share, NaN in
run_summary.json, an override error that repeated every override)."""

import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from d2prune import config
from d2prune.config import setup_cfg
from d2prune.engine.trainer import RunSummary
from d2prune.errors import UserError
from projects.prune_report import run_summary_table

from .conftest import CONFIG, REPO, run_tool, tiny_opts
from .prune_helpers import tiny_dataset

torch.set_num_threads(2)
SOURCE = str(REPO / "models" / "faster_rcnn_R18_FPN_source.pth")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"first_use_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN_NET = _tool("train_net")


def _args(*argv):
    return TRAIN_NET.argument_parser().parse_args([str(a) for a in argv])


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    """Two 96 px target-domain images (6 classes, as the shipped source model): a --dataset entry."""
    return tiny_dataset(tmp_path_factory.mktemp("first_use") / "data", "first_use_val", 2)


# --- eval-only needs only DATASETS.TEST ------------------------------------------------------

def test_eval_only_needs_only_the_test_set(val_set, tmp_path):
    """Walk-through step 5: the config trains on 'my_train', which an evaluation never reads."""
    args = _args(
        "--config-file", CONFIG, "--eval-only", "--dataset", *val_set,
        *tiny_opts(tmp_path / "no-synthetic-data", tmp_path / "out"),
        "DATASETS.TRAIN", "('my_train',)", "DATASETS.TEST", f"('{val_set[0]}',)", "MODEL.WEIGHTS", SOURCE,
    )  # fmt: skip
    results = TRAIN_NET.main(args)
    assert 0.0 <= results["bbox"]["AP50"] <= 100.0


def test_eval_only_without_a_test_set(val_set, tmp_path):
    args = _args(
        "--config-file", CONFIG, "--eval-only", *tiny_opts(tmp_path / "none", tmp_path / "out"),
        "DATASETS.TEST", "()", "MODEL.WEIGHTS", SOURCE,
    )  # fmt: skip
    with pytest.raises(UserError, match=r"^--eval-only evaluates on DATASETS\.TEST, which is empty; name a registered dataset there\.$"):
        TRAIN_NET.main(args)


def test_unreadable_image_stops_training_before_it_starts(val_set, tmp_path):
    name, json_file, image_root = val_set
    broken = tmp_path / "images"
    broken.mkdir()
    for image in json.loads(open(json_file).read())["images"]:
        (broken / image["file_name"]).write_bytes(b"")  # 0-byte files under the same names
    args = _args(
        "--config-file", CONFIG, "--dataset", "first_use_broken", json_file, broken,
        *tiny_opts(tmp_path / "none", tmp_path / "out"), "DATASETS.TRAIN", "('first_use_broken',)",
        "DATASETS.TEST", "()", "MODEL.WEIGHTS", SOURCE,
    )  # fmt: skip
    with pytest.raises(UserError) as error:
        TRAIN_NET.main(args)
    text = str(error.value)
    assert re.match(re.escape(json_file) + r": 2 of 2 image files under .* cannot be read as images: \S+ \(empty file\), \S+ \(empty file\); ", text), text


# --- OUTPUT_DIR and IMS_PER_BATCH ------------------------------------------------------------

def test_output_dir_that_is_a_file(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file where the output folder should go")
    with pytest.raises(UserError) as error:
        TRAIN_NET.setup(_args("--config-file", CONFIG, "OUTPUT_DIR", taken))
    assert str(error.value) == f"OUTPUT_DIR {taken}: exists and is not a directory; name a directory (it is created when missing)."
    with pytest.raises(UserError) as error:
        TRAIN_NET.setup(_args("--config-file", CONFIG, "OUTPUT_DIR", taken / "run1"))
    assert str(error.value) == f"OUTPUT_DIR {taken / 'run1'}: {taken} is a file, so no directory can be made under it."


def test_batch_that_the_processes_cannot_share():
    cfg = setup_cfg(CONFIG, ["SOLVER.IMS_PER_BATCH", "3"])
    with pytest.raises(UserError) as error:
        config.check_run(cfg, world_size=2)
    assert str(error.value) == (
        "SOLVER.IMS_PER_BATCH 3 must be a positive multiple of the number of processes (world size) 2, "
        "since it is the total batch over all of them."
    )
    config.check_run(cfg, world_size=3)
    config.check_run(cfg, world_size=2, training=False)  # evaluation batches one image per process
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 2  # detectron2 rescales the batch from this world size
    with pytest.raises(UserError, match=r"^SOLVER\.IMS_PER_BATCH 3 must be a positive multiple of SOLVER\.REFERENCE_WORLD_SIZE 2"):
        config.check_run(cfg, world_size=4)


@pytest.mark.subprocess
def test_two_processes_with_a_batch_of_one(val_set, tmp_path):
    proc = run_tool(
        "train_net.py", "--config-file", CONFIG, "--num-gpus", "2", "--dataset", *val_set,
        *tiny_opts(tmp_path / "none", tmp_path / "out"), "DATASETS.TRAIN", f"('{val_set[0]}',)",
        "SOLVER.IMS_PER_BATCH", "1", "MODEL.WEIGHTS", SOURCE,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        "error: SOLVER.IMS_PER_BATCH 1 must be a positive multiple of the number of processes (world size) 2, "
        "since it is the total batch over all of them."
    ]


# --- run_summary.json is strict JSON -----------------------------------------------------------

def _strict(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_run_summary_writes_null_for_nan(tmp_path):
    summary = RunSummary(str(tmp_path))
    results = {"bbox": {"AP": float("nan"), "AP50": np.float32(12.5), "APs": float("inf")}}
    summary.trainer = SimpleNamespace(start_iter=0, iter=3, max_iter=3, _last_eval_results=results)
    summary.before_train()
    summary.after_train()
    data = _strict((tmp_path / "run_summary.json").read_text())
    assert data["results"]["bbox"] == {"AP": None, "AP50": 12.5, "APs": None}
    table = run_summary_table([str(tmp_path)])
    assert re.search(re.escape(str(tmp_path)) + r"\s+-\s+12\.5\s+3 ", table), table


# --- override errors name the pair at fault ------------------------------------------------------

@pytest.mark.parametrize(
    "opts, message",
    [
        (["SOLVER.MAX_ITER", "many"], r"^command-line override SOLVER\.MAX_ITER many: Type mismatch .* for config key: SOLVER\.MAX_ITER"),
        (["PRUNE.RATIOS", "0.3"], r"^command-line override PRUNE\.RATIOS 0\.3: unknown config key PRUNE\.RATIOS; did you mean PRUNE\.RATIO\?$"),
        (["SOLVER.BASE_LR"], r"^command-line override SOLVER\.BASE_LR has no value; overrides are KEY VALUE pairs\.$"),
    ],
    ids=["type", "unknown", "odd"],
)
def test_override_error_names_only_the_pair_at_fault(opts, message):
    many = ["SOLVER.IMS_PER_BATCH", "4", "SOLVER.BASE_LR", "0.01", "PRUNE.ENABLED", "True", "PRUNE.CRITERION", "taylor"]
    with pytest.raises(UserError) as error:
        setup_cfg(CONFIG, many + opts)
    text = str(error.value)
    assert re.search(message, text), text
    assert "taylor" not in text and "IMS_PER_BATCH" not in text and "\n" not in text


# --- the README walk-through, as written -----------------------------------------------------------

def _walkthrough_commands():
    """Steps 3-5 of the README walk-through: (step, argv) with `.venv/bin/python` as this interpreter."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Walk-through", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"\n((?: {7}\.venv/bin/python .*\n)(?: {11}.*\n)*)", section):
        argv = shlex.split(block.replace("\\\n", " "))
        commands.append([sys.executable] + argv[1:])
    return commands


def _write_own_dataset(folder):
    """data/{train,val}.json and data/images: 3 categories of coloured rectangles on noise."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(["red", "green", "blue"])]
    for split, n in (("train", 6), ("val", 3)):
        images, annotations = [], []
        for i in range(n):
            w, h = 120, 90
            pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
            for _ in range(2):
                c = int(rng.integers(3))
                x, y = int(rng.integers(0, 60)), int(rng.integers(0, 40))
                pixels[y : y + 40, x : x + 50] = 0
                pixels[y : y + 40, x : x + 50, c] = 230
                annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": c + 1,
                                    "bbox": [x, y, 50, 40], "area": 2000, "iscrowd": 0})
            name = f"{split}_{i}.jpg"
            Image.fromarray(pixels).save(folder / "images" / name)
            images.append({"id": i, "file_name": name, "width": w, "height": h})
        (folder / f"{split}.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


@pytest.mark.slow
@pytest.mark.subprocess
def test_walkthrough_commands_run_as_written(tmp_path):
    """Each command of steps 3-5 runs in a folder holding `data/` as the README has it, with
    overrides appended that only shrink it to CPU seconds: no model-zoo download (random
    weights, a ResNet-18, whose random init does not diverge as ResNet-50's can), 96 px,
    3 iterations with the three pruning events inside them."""
    commands = _walkthrough_commands()
    assert len(commands) == 3 and "--eval-only" in commands[2]
    _write_own_dataset(tmp_path / "data")
    for name in ("tools", "configs"):
        os.symlink(REPO / name, tmp_path / name)
    shrink = [
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "(2,)", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.BASE_LR", "0.0001", "TEST.EVAL_PERIOD", "0", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96", "DATALOADER.NUM_WORKERS", "0",
        "PRUNE.START_ITER", "0", "PRUNE.END_ITER", "2", "PRUNE.SCORE_BATCHES", "1",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for step, argv in enumerate(commands, start=3):
        weights = [] if "MODEL.WEIGHTS" in argv else ["MODEL.WEIGHTS", ""]
        proc = subprocess.run(argv + shrink + weights, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, (step, proc.stderr[-3000:])
        if step == 4:
            assert "pruning event 3/3" in proc.stdout + proc.stderr
    assert (tmp_path / "output/mine/unpruned/model_final.pth").is_file()
    ap = [ln for ln in proc.stdout.splitlines() if "copypaste: " in ln][-1].split("copypaste: ")[1]
    assert math.isnan(float(ap.split(",")[0])) or 0 <= float(ap.split(",")[0]) <= 100
