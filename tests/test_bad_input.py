"""Bad input to train_net.py and prune_net.py: one `error: ...` line naming the file, key or value
and what is allowed, exit status 2, no traceback.

Most cases run in this process: the library checks directly, or the tools' `main` (the code
behind the command line minus the interpreter start-up). A few run the tools as a user does.
"""

import importlib.util
import logging
import math
import os
import re
import shutil

import pytest
import torch
from detectron2.engine import HookBase
from detectron2.modeling import build_model

from d2prune.config import check_weights, separate_overrides, setup_cfg, strip_separator
from d2prune.criteria import build as build_criterion
from d2prune.data import register_datasets
from d2prune.engine import PrunedCheckpointer, Trainer
from d2prune.engine.selection import check_budget
from d2prune.errors import UserError
from d2prune.pruning import ChannelGroup, channel_spec, find_groups, prune
from d2prune.pruning.budget import Budget, select_channels

from . import models
from .conftest import CONFIG, REPO, run_tool, tiny_opts
from .prune_helpers import tiny_dataset

torch.set_num_threads(2)
NAME = "bad_input_data"  # the registered tiny dataset


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PRUNE_NET, TRAIN_NET = _tool("prune_net"), _tool("train_net")


def _build(opts=()):
    torch.manual_seed(0)
    return build_model(setup_cfg(CONFIG, ["MODEL.DEVICE", "cpu", *opts]))


def _save(model, folder, name, unpruned=None):
    checkpointer = PrunedCheckpointer(model, str(folder))
    checkpointer.unpruned_spec = unpruned
    checkpointer.save(name)
    return str(folder / f"{name}.pth")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A one-image dataset entry, and checkpoints of the config's model: as trained ("source")
    and with half its block channels pruned ("pruned")."""
    root = tmp_path_factory.mktemp("bad_input")
    dataset = tiny_dataset(root / "data", NAME, 1)
    model = _build()
    original = channel_spec(model)
    source = _save(model, root, "source", original)
    prune(model, {g.name: list(range(g.size // 2)) for g in find_groups(model) if g.kind == "block"})
    pruned = _save(model, root, "pruned", original)
    return {"root": root, "dataset": dataset, "source": source, "pruned": pruned}


def _one_line_error(error, *patterns):
    text = str(error.value)
    assert "\n" not in text
    for pattern in patterns:
        assert re.search(pattern, text), (pattern, text)


# --- config files and keys ------------------------------------------------------------------

@pytest.mark.parametrize(
    "content, pattern",
    [
        (None, r"^{f}: config file not found\.$"),
        ("MODEL:\n  WEIGHTS: [1\n", r"^{f}: invalid YAML at line 3, column 1: expected ',' or '\]', but got '<stream end>' \(while parsing a flow sequence\)\.$"),
        ("- MODEL\n- SOLVER\n", r"^{f}: must hold a mapping of config keys .*, holds a list\.$"),
        ("", r"^{f}: must hold a mapping of config keys .*, holds nothing\.$"),
        (b"\xff\xfe\x00binary", r"^{f}: not a text file"),
        ('_BASE_: "missing-base.yaml"\n', r"missing-base\.yaml \(the _BASE_ of {f}\): config file not found"),
        ("PRUNE:\n  RATIOS: 0.3\n", r"^{f}: unknown config key PRUNE\.RATIOS; did you mean PRUNE\.RATIO\?$"),
        ("SOLVER:\n  MAX_ITER: many\n", r"^{f}: Type mismatch .* for config key: SOLVER\.MAX_ITER"),
    ],
    ids=["missing", "invalid-yaml", "list", "empty", "binary", "missing-base", "unknown-key", "bad-type"],
)
def test_faulty_config_files(tmp_path, content, pattern):
    path = tmp_path / "config.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as error:
        setup_cfg(str(path))
    _one_line_error(error, pattern.format(f=re.escape(str(path))))


def test_faulty_command_line_keys():
    with pytest.raises(UserError) as error:
        setup_cfg(CONFIG, ["PRUNE.CRITERON", "l2"])
    _one_line_error(error, r"unknown config key PRUNE\.CRITERON; did you mean PRUNE\.CRITERION\?$")
    with pytest.raises(UserError) as error:
        setup_cfg(CONFIG, ["PRUNE.NO_SUCH_THING", "1"])
    _one_line_error(error, r"unknown config key PRUNE\.NO_SUCH_THING; see add_prune_config")


# --- prune_net.py: flags, keys, datasets and weights, through its main() ----------------------

def _prune_net(env, tmp_path, *flags, opts=(), dataset=None, weights=None, output="out"):
    dataset = dataset or env["dataset"]
    argv = [
        "--config-file", CONFIG, "--output", str(tmp_path / output), "--dataset", *dataset, *flags,
        *tiny_opts(tmp_path / "no-synthetic-data", tmp_path / "out"),
        "DATASETS.TRAIN", f"('{dataset[0]}',)", "DATASETS.TEST", f"('{dataset[0]}',)",
        "MODEL.WEIGHTS", env["source"] if weights is None else weights, *opts,
    ]  # fmt: skip
    args = PRUNE_NET.argument_parser().parse_args(separate_overrides(argv))  # as its __main__ does
    args.opts = strip_separator(args.opts)
    with pytest.raises(UserError) as error:
        PRUNE_NET.main(args)
    assert "\n" not in str(error.value)
    return str(error.value)


PRUNE_NET_FLAGS = [
    (["--criterion", "l11"], r"unknown pruning criterion 'l11'; did you mean l1 or l2\? available: .*fpgm"),
    (["--ratio", "1.0"], r"PRUNE\.RATIO must be a number in \[0, 1\), got 1\.0\."),
    (["--ratio", "-0.1"], r"PRUNE\.RATIO must be a number in \[0, 1\), got -0\.1\."),
    (["--flops-reduction", "1.0"], r"PRUNE\.FLOPS_REDUCTION must be 0 \(off\) or a number in \(0, 1\), got 1\.0"),
    (["--kinds", "block", "blok"], r"PRUNE\.KINDS must be a non-empty list of stem, .*\('blok' is not a kind\)"),
    (["--min-channels", "0"], r"PRUNE\.MIN_CHANNELS must be a positive integer, got 0\."),
    (["--criterion", "random"], None),  # with the option below
    (["--exclude", "."], r"no channel group of kinds block is left after exclude \['\.'\]"),
    (["--min-channels", "600"], r"min_channels=600 and max_ratio=0\.9 leave every eligible group whole \(widest: 512"),
    (["--round-to", "1024"], r"round_to=1024 leaves every eligible group whole"),
]


@pytest.mark.parametrize("flags, pattern", PRUNE_NET_FLAGS, ids=[" ".join(f) for f, _ in PRUNE_NET_FLAGS])
def test_prune_net_flags(env, tmp_path, flags, pattern):
    if pattern is None:
        message = _prune_net(env, tmp_path, *flags, opts=["PRUNE.CRITERION_OPTIONS", "[['sed', 1]]"])
        pattern = r"^PRUNE\.CRITERION: criterion 'random' has no option sed; its options: seed\.$"
    else:
        message = _prune_net(env, tmp_path, *flags)
    assert re.search(pattern, message), message


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_prune_net_datasets(env, tmp_path):
    name, json_file, image_root = env["dataset"]
    missing = str(tmp_path / "nowhere.json")
    message = _prune_net(env, tmp_path, dataset=["bad_missing_json", missing, image_root])
    assert message == f"{missing}: dataset file not found."

    message = _prune_net(env, tmp_path, dataset=["bad_missing_root", json_file, str(tmp_path / "no-images")])
    assert message == f"{tmp_path / 'no-images'}: image root of {json_file} is not a directory."

    not_coco = _write(tmp_path / "list.json", "[1, 2, 3]")
    message = _prune_net(env, tmp_path, dataset=["bad_not_coco", not_coco, image_root])
    assert message == f"{not_coco}: the top level must be an object with images, annotations, categories."

    data = re.sub(r'"bbox": ?\[', '"bbox": ["x", ', open(json_file).read(), count=1)
    malformed = _write(tmp_path / "malformed" / "ann.json", data)
    message = _prune_net(env, tmp_path, dataset=["bad_malformed", malformed, image_root])
    assert re.fullmatch(re.escape(malformed) + r": annotation \d+ has bbox \['x', .*\]; expected \[x, y, width, height\]\.", message)

    no_images = _write(tmp_path / "empty.json", '{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}')
    message = _prune_net(env, tmp_path, dataset=["bad_no_images", no_images, image_root])
    assert message == f"{no_images}: 'images' is empty; dataset 'bad_no_images' needs at least one image."

    message = _prune_net(env, tmp_path, opts=["MODEL.ROI_HEADS.NUM_CLASSES", "3"])
    assert message.startswith(f"{json_file}: 6 categories but the model has 3 classes; set MODEL.ROI_HEADS.NUM_CLASSES")


def test_prune_net_weights_and_output(env, tmp_path):
    missing = str(tmp_path / "missing.pth")
    assert _prune_net(env, tmp_path, weights=missing) == f"MODEL.WEIGHTS {missing}: file not found."
    assert _prune_net(env, tmp_path, weights="") == "MODEL.WEIGHTS is empty: name the trained checkpoint to prune."

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(open(env["source"], "rb").read()[:100_000])  # a copy cut short
    message = _prune_net(env, tmp_path, weights=str(corrupt))
    assert message.startswith(f"{corrupt}: not a checkpoint that torch.load or pickle can read (RuntimeError: ")

    (tmp_path / "taken").write_text("a file where the output folder should go")
    message = _prune_net(env, tmp_path, output="taken")
    assert message == f"{tmp_path / 'taken'}: exists and is not a directory; the output must be a directory."


def test_prune_net_pruned_checkpoint_of_another_architecture(env, tmp_path):
    message = _prune_net(env, tmp_path, weights=env["pruned"], opts=["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256"])
    assert re.match(
        re.escape(env["pruned"]) + r": the checkpoint comes from another architecture than the config builds: the "
        r"model has channel group 'backbone\.bottom_up\.[\w.]+' \(\d+ channels\), which the checkpoint does not "
        r"\(it has \d+ groups, the model \d+\); ", message,
    ), message
    assert message.endswith("load it with the config it was trained with (model depth, FPN width and heads must match).")


# --- checkpoints -----------------------------------------------------------------------------

def test_unreadable_checkpoints(env, tmp_path):
    source = open(env["source"], "rb").read()
    cases = {
        "garbage.pth": (b"not a checkpoint at all" * 10, r"not a checkpoint that torch\.load or pickle can read \(\w+"),
        "garbage.pkl": (b"\x80\x02garbage" * 10, r"not a checkpoint that torch\.load or pickle can read \(\w+"),
        "empty.pth": (b"", r"can read \(EOFError\)"),
        "cut.pth": (source[: len(source) // 2], r"can read \(RuntimeError: PytorchStreamReader failed"),
    }
    for name, (content, _) in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    torch.save({"model": {"weight": "not a tensor"}}, tmp_path / "no_weights.pth")
    cases["tensor.pth"] = (None, r"can read \(RuntimeError: ")
    cases["no_weights.pth"] = (None, r"holds no model weights; expected a checkpoint whose 'model' entry")
    model = _build()
    for name, (_, pattern) in cases.items():
        with pytest.raises(UserError) as error:
            PrunedCheckpointer(model).load(str(tmp_path / name))
        _one_line_error(error, "^" + re.escape(str(tmp_path / name)) + ": ", pattern)
    with pytest.raises(UserError, match=r"missing\.pth: checkpoint file not found\.$"):
        PrunedCheckpointer(model).load(str(tmp_path / "missing.pth"))


def test_resume_with_a_bad_last_checkpoint(env, tmp_path):
    shutil.copy(env["source"], tmp_path / "model_0000009.pth")
    (tmp_path / "model_0000019.pth").write_bytes(open(env["source"], "rb").read()[:-1000])
    last = tmp_path / "last_checkpoint"
    model = _build()
    for content, pattern in [
        ("", r"last_checkpoint: empty; it should name a checkpoint file in "),
        ("model_0000029.pth", r"last_checkpoint names model_0000029\.pth, which is not in .*; write the name of a complete checkpoint there"),
        ("model_0000019.pth", r"model_0000019\.pth, which last_checkpoint names, is not a readable checkpoint \(RuntimeError: .*\); write an earlier"),
    ]:
        last.write_text(content)
        with pytest.raises(UserError) as error:
            PrunedCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
        _one_line_error(error, pattern)
    last.write_text("model_0000009.pth")
    PrunedCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)


def test_pruned_checkpoint_into_other_widths(env, tmp_path):
    # Pruned from FPN 64 and loaded with FPN 128: the saved unpruned widths tell.
    narrow = _build(["MODEL.FPN.OUT_CHANNELS", "64"])
    unpruned = channel_spec(narrow)
    prune(narrow, {"backbone.bottom_up.res3.0.conv1": range(100)})
    path = _save(narrow, tmp_path, "fpn64", unpruned)
    with pytest.raises(UserError) as error:
        PrunedCheckpointer(_build()).load(path)
    _one_line_error(error, r"fpn64\.pth: the checkpoint was pruned from a model whose group 'backbone\.fpn' has 64 channels, but the config builds it with 128; load it")

    # FPN 128 into FPN 64: the spec itself is wider than the model.
    path = _save(_build(), tmp_path, "fpn128")  # without unpruned widths, as older checkpoints
    fresh = _build(["MODEL.FPN.OUT_CHANNELS", "64"])
    with pytest.raises(UserError) as error:
        PrunedCheckpointer(fresh).load(path)
    _one_line_error(error, r"fpn128\.pth: group 'backbone\.fpn' has 128 channels in the checkpoint but only 64 in the model the config builds")
    assert channel_spec(fresh) == unpruned  # refused before any surgery

    # The config it was pruned with rebuilds it.
    fresh = _build()
    PrunedCheckpointer(fresh).load(env["pruned"])
    assert channel_spec(fresh) == torch.load(env["pruned"], weights_only=True)["d2prune"]["spec"]


def test_missing_weights_key():
    cfg = setup_cfg(CONFIG, ["MODEL.WEIGHTS", "nowhere/model.pth"])
    with pytest.raises(UserError, match=r"^MODEL\.WEIGHTS nowhere/model\.pth: file not found\.$"):
        check_weights(cfg)


# --- the budget: floors, rounding and units ---------------------------------------------------

def test_min_channels_above_a_group_width_leaves_that_group_whole():
    model = models.build("faster_rcnn_R18_FPN")
    groups = find_groups(model)
    scores = build_criterion("l1").score(model, groups)
    keep = select_channels(groups, scores, Budget("channels", 0.5, min_channels=100))
    blocks = {g.name: g.size for g in groups if g.kind == "block"}
    assert sorted(set(blocks.values())) == [64, 128, 256, 512]
    expected = {n: max(size // 2, 100) for n, size in blocks.items() if size > 100}
    assert {n: len(k) for n, k in keep.items()} == expected  # the 64-wide groups stay whole
    with pytest.raises(UserError, match=r"min_channels=600 and max_ratio=0\.9 leave every eligible group whole \(widest: 512 channels\)"):
        select_channels(groups, scores, Budget("channels", 0.5, min_channels=600))


def test_a_ratio_near_one_never_empties_a_group():
    model = models.build("faster_rcnn_R18_FPN")
    groups = find_groups(model)
    budget = Budget("channels", 0.999, kinds=["block", "stage", "fpn", "head"], max_ratio=1.0, min_channels=1)
    keep = select_channels(groups, build_criterion("l1").score(model, groups), budget)
    sizes = {g.name: g.size for g in groups}
    assert keep and {n: len(k) for n, k in keep.items()} == {
        n: max(sizes[n] - math.floor(0.999 * sizes[n]), 1) for n in keep
    }  # 1 channel, or 2 of 1024 (0.999 * 1024 = 1022.98 rounds down)
    assert min(len(k) for k in keep.values()) == 1
    prune(model, keep)
    with torch.no_grad():
        (output,) = model(models.images(1))
    assert len(output["instances"]) > 0  # a one-channel network still detects (badly)


def test_round_to_and_group_norm_units():
    gn = ChannelGroup("backbone.fpn", "fpn", 256, ["p"], ["c"], unit=8)
    block = ChannelGroup("res2.0.conv1", "block", 64, ["p"], ["c"])
    scores = {gn.name: torch.arange(256.0), block.name: torch.arange(64.0)}
    keep = select_channels([gn, block], scores, Budget("channels", 0.5, kinds=["fpn", "block"], round_to=3))
    assert len(keep[gn.name]) == 144  # 128 rounded up to a multiple of lcm(8, 3) = 24
    assert len(keep[block.name]) == 33  # 32 rounded up to a multiple of 3
    units = {c // 8 for c in keep[gn.name]}
    assert keep[gn.name] == [u * 8 + i for u in sorted(units) for i in range(8)]  # whole GN groups
    with pytest.raises(UserError) as error:
        select_channels([gn, block], scores, Budget("channels", 0.5, kinds=["fpn", "block"], round_to=256))
    _one_line_error(error, r"round_to=256 leaves every eligible group whole: none can keep a multiple of 256 channels \(and of its GroupNorm group size\) below its width \(widest: 256 channels\)")


def test_budget_checked_before_training_on_the_model(env):
    model = _build()
    cfg = setup_cfg(CONFIG, ["PRUNE.MIN_CHANNELS", "600"])
    with pytest.raises(UserError, match="leave every eligible group whole"):
        check_budget(cfg, model)
    check_budget(setup_cfg(CONFIG), model)
    # FLOPs targets are checked at the deepest cut MAX_RATIO allows.
    check_budget(setup_cfg(CONFIG, ["PRUNE.FLOPS_REDUCTION", "0.5"]), model)
    with pytest.raises(UserError, match="leave every eligible group whole"):
        check_budget(setup_cfg(CONFIG, ["PRUNE.FLOPS_REDUCTION", "0.5", "PRUNE.MIN_CHANNELS", "600"]), model)


class Fail(HookBase):
    def __init__(self, error):
        self.error = error

    def after_step(self):
        raise self.error


@pytest.mark.parametrize("error", [UserError("PRUNE.X is wrong."), RuntimeError("a bug")], ids=["user", "bug"])
def test_errors_during_training_keep_a_traceback_only_for_bugs(env, tmp_path, error):
    """detectron2 logs any exception in training with its traceback; a UserError (from a pruning
    event, say) reaches the tool without one, to be printed as one line."""
    cfg = setup_cfg(
        CONFIG,
        [
            *tiny_opts(tmp_path / "no-synthetic-data", tmp_path / "out", iters=2),
            "DATASETS.TRAIN", f"('{NAME}',)", "DATASETS.TEST", "()", "MODEL.WEIGHTS", env["source"],
        ],
        [env["dataset"]],
    )  # fmt: skip
    register_datasets(cfg)
    cfg.freeze()
    records = []
    loop_logger = logging.getLogger("detectron2.engine.train_loop")
    handler = logging.Handler()
    handler.emit = records.append
    level = loop_logger.level
    loop_logger.addHandler(handler)
    loop_logger.setLevel(logging.INFO)
    try:
        trainer = Trainer(cfg)
        trainer.register_hooks([Fail(error)])
        trainer.resume_or_load(resume=False)
        with pytest.raises(type(error)):
            trainer.train()
    finally:
        loop_logger.removeHandler(handler)
        loop_logger.setLevel(level)
    assert any("Starting training from iteration 0" in r.getMessage() for r in records)
    tracebacks = [r for r in records if r.exc_info]
    assert len(tracebacks) == (0 if isinstance(error, UserError) else 1)
    assert not loop_logger.filters  # the filter lives only while training


# --- end to end: exit status, one line, no traceback -------------------------------------------

def _assert_user_error(proc, pattern):
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert re.search(pattern, line), line


@pytest.mark.subprocess
def test_train_net_resume_from_a_checkpoint_cut_short(env, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_0000004.pth").write_bytes(open(env["source"], "rb").read()[:5000])
    (out / "last_checkpoint").write_text("model_0000004.pth")
    proc = run_tool(
        "train_net.py", "--config-file", CONFIG, "--resume", "--dataset", *env["dataset"],
        *tiny_opts(tmp_path / "no-synthetic-data", out), "DATASETS.TRAIN", f"('{NAME}',)", "DATASETS.TEST", "()",
        "MODEL.WEIGHTS", tmp_path / "never-read.pth",  # resuming: not needed, so not checked
    )  # fmt: skip
    _assert_user_error(
        proc,
        "^error: " + re.escape(str(out / "model_0000004.pth")) + r", which last_checkpoint names, is not a "
        r"readable checkpoint \(OSError: .*\); write an earlier checkpoint's name into last_checkpoint",
    )


@pytest.mark.subprocess
def test_prune_net_checkpoint_of_another_fpn_width(env, tmp_path):
    out = tmp_path / "out"
    proc = run_tool(
        "prune_net.py", "--config-file", CONFIG, "--output", out, "--dataset", *env["dataset"],
        *tiny_opts(tmp_path / "no-synthetic-data", out), "DATASETS.TRAIN", f"('{NAME}',)", "DATASETS.TEST", f"('{NAME}',)",
        "MODEL.WEIGHTS", env["pruned"], "MODEL.FPN.OUT_CHANNELS", "256",
    )  # fmt: skip
    _assert_user_error(
        proc,
        r"^error: .*pruned\.pth: the checkpoint was pruned from a model whose group 'backbone\.fpn' has "
        r"128 channels, but the config builds it with 256; load it with the config it was trained with",
    )
    assert not os.path.exists(out / "report.json")
