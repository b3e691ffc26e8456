"""The pruning explanation: profile widths that surgery reproduces, class information that splits
exactly into kept and removed filters, patches where the filters peak, and the self-contained
report that tools/explain_net.py writes."""

import copy
import importlib.util
import re

import pytest
import torch

from d2prune import explain as X
from d2prune.config import add_prune_config
from d2prune.criteria import build
from d2prune.criteria.collector import collect_statistics
from d2prune.criteria.information import class_information
from d2prune.engine import PrunedCheckpointer
from d2prune.errors import UserError, exit_on_user_error
from d2prune.pruning import channel_spec, find_groups, prune

from . import models
from .conftest import CONFIG, REPO, run_tool, tiny_opts

torch.set_num_threads(2)

CLASSES = ["a", "b", "c"]  # models.with_targets draws classes 0 and 2 only


def _cfg(criterion: str, *opts):
    cfg = add_prune_config(models.faster_rcnn_cfg(18))
    cfg.merge_from_list(["PRUNE.CRITERION", criterion, "PRUNE.RATIO", 0.5, *opts])
    return cfg


def _batches():
    return [models.with_targets(models.images(2))]


@pytest.fixture(scope="module")
def explained():
    """R18-FPN explained with mi on block and stage groups (a stream has several producers)."""
    model = models.build("faster_rcnn_R18_FPN")
    cfg = _cfg("mi", "PRUNE.KINDS", ["block", "stage"])
    return model, X.explain(cfg, model, _batches(), class_names=CLASSES, filters=3, per_filter=2)


def test_profile_is_what_surgery_leaves(explained):
    model, e = explained
    rows = X.pruning_profile(e.groups, e.before, e.after)
    pruned = copy.deepcopy(model)
    prune(pruned, e.keep)
    assert {r["group"]: r["before"] for r in rows} == channel_spec(model)
    assert {r["group"]: r["after"] for r in rows} == channel_spec(pruned)
    # Local ratio 0.5: every block and stage group of R18 (even widths >= 64) loses half.
    assert sorted(e.eligible) == sorted(g.name for g in e.groups if g.kind in ("block", "stage"))
    for r in rows:
        assert r["after"] == (r["before"] // 2 if r["group"] in e.eligible else r["before"]), r
    assert not e.pruned_checkpoint
    stages = {s["stage"]: s for s in X.stage_losses(rows)}
    assert stages["res5"]["removed"] == (512 + 512 + 512) // 2  # two blocks and the stream
    assert stages["head"]["removed"] == 0


def test_class_information_of_kept_and_removed_adds_up(explained):
    model, e = explained
    masks = {name: e.removed(name) for name in e.eligible}
    split = X.information_split(e.information, masks)
    assert torch.allclose(split["kept"] + split["removed"], split["total"], rtol=1e-9, atol=1e-12)
    assert split["removed_channels"] == sum(e.before[n] - e.after[n] for n in e.eligible)
    assert split["kept_channels"] == sum(e.after[n] for n in e.eligible)

    # The totals again, from statistics collected anew for the eligible groups only.
    groups = [g for g in find_groups(model) if g.name in e.eligible]
    stats = collect_statistics(model, groups, build("mi"), _batches())
    per_group = {
        g.name: torch.stack([class_information(stats[p].sums["joint"]) for p in g.producers]).mean(0)
        for g in groups
    }
    total = sum(info.sum(1) for info in per_group.values())
    kept = sum(info[:, ~masks[name]].sum(1) for name, info in per_group.items())
    assert torch.allclose(split["total"], total.double(), rtol=1e-6)
    assert torch.allclose(split["kept"], kept.double(), rtol=1e-6)
    # Class b has no object in the batches, so nothing can be known about it; the others do.
    assert e.class_counts == [2, 0, 2]
    assert abs(float(split["total"][1])) < 1e-9
    assert (split["total"][[0, 2]] > 0).all() and (split["removed"][[0, 2]] > 0).all()


def test_top_patch_is_where_the_filter_peaks(explained):
    model, e = explained
    layer = e.layer
    # The default layer is the mid-depth block, res3.1.conv1: stride 8. Its receptive field is
    # the stem's 7 x 7 conv (7) and max pool (+2 * 2), res2's four 3 x 3 convs (+4 * 2 * 4),
    # res3.0's two (+2 * 4 with stride 2, then +2 * 8) and its own (+2 * 8): 83 pixels.
    assert layer.group == layer.module == "backbone.bottom_up.res3.1.conv1"
    assert layer.stride == 8 and layer.receptive_field == 83
    assert layer.heatmap == "relevance"

    module = dict(model.named_modules())[layer.module]
    maps = []
    handle = module.register_forward_hook(lambda m, i, output: maps.append(output.detach().clone()))
    with torch.no_grad():
        for batch in _batches():
            model.backbone(model.preprocess_image(batch).tensor)
    handle.remove()
    a = torch.cat(maps)  # (images, channels, h, w)

    scores = e.scores[layer.group]
    order = scores.argsort(descending=True).tolist()
    assert [v.channel for v in layer.most] == order[:3]
    assert [v.channel for v in layer.least] == order[-3:]
    for view in layer.most + layer.least:
        assert view.removed == bool(e.removed(layer.group)[view.channel])
        channel = a[:, view.channel]
        peaks = channel.flatten(1).max(1).values
        first, second = view.hits
        assert first.value == pytest.approx(float(channel.max()))
        assert float(channel[first.image, first.y, first.x]) == float(channel.max())
        assert peaks[second.image] == peaks[peaks != peaks[first.image]].max()
        for hit in view.hits:
            x0, y0, x1, y1 = hit.box
            cx, cy = (hit.x + 0.5) * layer.stride, (hit.y + 0.5) * layer.stride
            assert x0 <= cx <= x1 and y0 <= cy <= y1
            assert 0 <= x0 < x1 <= models.WIDTH and 0 <= y0 < y1 <= models.HEIGHT
            assert hit.heatmap.shape == tuple(a.shape[-2:])


def test_a_pruned_checkpoint_is_compared_with_the_config(tmp_path):
    cfg = _cfg("l1")
    model = models.build("faster_rcnn_R18_FPN")
    groups = {g.name: g for g in find_groups(model)}
    keep = {"backbone.bottom_up.res4.0.conv1": list(range(0, 256, 4))}
    prune(model, keep)
    PrunedCheckpointer(model, save_dir=str(tmp_path)).save("pruned")
    cfg.MODEL.WEIGHTS = str(tmp_path / "pruned.pth")
    loaded, reference = X.load_model(cfg)
    assert reference == {name: g.size for name, g in groups.items()}
    assert channel_spec(loaded) == channel_spec(model)
    rows = X.pruning_profile(find_groups(loaded), reference, channel_spec(loaded))
    changed = [(r["group"], r["before"], r["after"]) for r in rows if r["before"] != r["after"]]
    assert changed == [("backbone.bottom_up.res4.0.conv1", 256, 64)]


def test_layer_names_are_checked():
    groups = find_groups(models.build("faster_rcnn_R18_FPN"))
    group, module = X.resolve_layer(groups, "backbone.bottom_up.res4")
    assert (group.kind, module) == ("stage", group.producers[0])
    group, module = X.resolve_layer(groups, "backbone.bottom_up.res4.0.shortcut")
    assert (group.name, module) == ("backbone.bottom_up.res4", "backbone.bottom_up.res4.0.shortcut")
    # Names as the report shows them (without backbone.bottom_up.) are understood too.
    group, module = X.resolve_layer(groups, "res3.1.conv2")
    assert (group.name, module) == ("backbone.bottom_up.res3", "backbone.bottom_up.res3.1.conv2")
    with pytest.raises(UserError, match="did you mean res3.1.conv[12] or res3.1.conv[12]"):
        X.resolve_layer(groups, "res3.1.conv9")
    with pytest.raises(UserError, match="head group"):
        X.resolve_layer(groups, "roi_heads.box_head.fc1")


@pytest.mark.subprocess
def test_explain_net_writes_a_self_contained_report(trained, tmp_path):
    root, out, _ = trained
    dest = tmp_path / "explain"
    proc = run_tool(
        "explain_net.py", "--config-file", CONFIG, "--output", dest, "--criterion", "l1",
        "--ratio", "0.5", "--images", "2", "--filters", "2",
        *tiny_opts(root, tmp_path), "MODEL.WEIGHTS", out / "model_final.pth",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (dest / "report.html").read_text()
    for section in ("summary", "profile", "scores", "filters", "information"):
        assert f'<h2 id="{section}">' in page, section
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 5 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"https?://|<link|<script", page)
    for name in ("profile", "scores", "filters_most", "filters_least", "class_information"):
        assert (dest / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    # The demo source classes name the information table's rows; R18's 8 block groups lose half.
    assert "circle" in page and "removes 960 of the 1920 channels (50%)" in page


def test_explain_net_rejects_an_unknown_layer(trained, tmp_path, capsys):
    # The tool's main in this process: the command line minus the interpreter start-up.
    root, out, _ = trained
    spec = importlib.util.spec_from_file_location("tool_explain_net", REPO / "tools" / "explain_net.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = tool.argument_parser().parse_args([
        "--config-file", CONFIG, "--output", str(tmp_path), "--layer", "res9.conv",
        *map(str, tiny_opts(root, tmp_path)), "MODEL.WEIGHTS", str(out / "model_final.pth"),
    ])  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        exit_on_user_error(tool.main, args)
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --layer 'res9.conv'") and "res3.1.conv1" in line
    assert not (tmp_path / "report.html").exists()
