"""The profile's grouping on small models: categories, conv FLOPs and tables; never timings."""

import argparse

import pytest
import torch

from d2prune.complexity import count_flops
from projects.benchmark.benchmark import block_keep, pruned_copy
from projects.benchmark.profile import (
    CATEGORIES,
    VARIANTS,
    category_rows,
    conv_backends,
    latency_rows,
    main,
    module_roles,
    profile_models,
    width_rows,
)

from . import models
from .conftest import CONFIG


@pytest.fixture(scope="module")
def profiled():
    model = models.build("faster_rcnn_R18_FPN")
    pruned = pruned_copy(model, block_keep(model, 0.5))
    inputs = [models.images(1)]
    return model, pruned, inputs, profile_models([model, pruned], inputs, repeats=1)


def test_roles_follow_detectron2_module_types():
    roles = module_roles(models.build("faster_rcnn_R18_FPN"))
    assert roles["backbone.bottom_up.stem"] == "stem"
    assert roles["backbone.bottom_up.res3.0"] == "block"
    assert roles["backbone.bottom_up.res3.0.shortcut"] == "shortcut"
    assert roles["backbone"] == "fpn"
    assert roles["proposal_generator.rpn_head"] == "rpn_head"
    assert roles["proposal_generator.anchor_generator"] == "anchors"
    assert roles["roi_heads.box_pooler"] == "pooler"
    assert roles["roi_heads.box_head"] == "box_head"
    assert roles["roi_heads.box_predictor"] == "box_predictor"
    assert roles[""] == "detector"


def test_every_part_of_the_detector_lands_in_its_category(profiled):
    _, _, _, (unpruned, pruned) = profiled
    for result in (unpruned, pruned):
        assert set(result["categories"]) == set(CATEGORIES)
        assert result["total_ms"] == pytest.approx(sum(result["categories"].values()))
        for category in (
            "stem conv", "block convs", "shortcut convs", "FPN convs", "norms (BN / FrozenBN)",
            "relu", "residual add", "max pool", "FPN top-down (interpolate, add)", "RPN head",
            "anchor generation", "proposals (decode, top-k, NMS)", "ROIAlign (box pooler)",
            "box head fc", "box predictor + postprocess NMS", "Python between ops",
        ):  # fmt: skip
            assert result["categories"][category] > 0, category
    # Every op runs inside some module of the detector.
    assert unpruned["categories"]["other"] == 0


def test_conv_flops_are_fvcores_count(profiled):
    model, pruned, inputs, results = profiled
    image = model.preprocess_image(inputs[0]).tensor
    for m, result in zip((model, pruned), results):
        resnet = sum(f for name, f in result["conv_flops"].items() if name.startswith("backbone.bottom_up."))
        assert resnet == count_flops(m.backbone.bottom_up, image)["total"]
        kinds = set(result["conv_kind"].values())
        assert kinds == {"stem conv", "block convs", "shortcut convs", "FPN convs"}


def test_category_rows_set_the_flops_cut_beside_the_time_cut(profiled):
    *_, (unpruned, pruned) = profiled
    rows = {r["category"]: r for r in category_rows(unpruned, pruned)}
    # Block pruning leaves the stem and the FPN convs as they are, and halves the block convs'
    # inner widths (one side of each block conv).
    assert rows["stem conv"]["flops_cut"] == 0
    assert rows["FPN convs"]["flops_cut"] == 0
    assert 0.4 < rows["block convs"]["flops_cut"] < 0.6
    assert rows["total"]["share_pruned"] == 1.0
    assert rows["total"]["ms_pruned"] == pytest.approx(pruned["total_ms"])
    assert sum(r["share_pruned"] for r in rows.values() if r["category"] != "total") == pytest.approx(1, abs=0.01)


def test_width_rows_pool_every_backbone_and_fpn_conv(profiled):
    *_, results = profiled
    rows = width_rows(results, ["unpruned", "pruned"])
    for label, result in zip(["unpruned", "pruned"], results):
        assert sum(r["convs"] for r in rows if r["model"] == label) == len(result["conv_shapes"])
    # The R18's unpruned widths (64 ... 512, FPN 256) are multiples of 16 except the stem's input.
    unaligned = [r for r in rows if r["model"] == "unpruned" and r["both widths % 16 == 0"] == "no"]
    assert [r["convs"] for r in unaligned] == [1]


def test_conv_backends_time_every_conv_under_every_kernel():
    model = models.build("faster_rcnn_R18_FPN")
    rows = conv_backends(model, [models.images(1)], repeats=1, rounds=1)
    assert len(rows) == 1 + 16 + 3 + 8  # stem, 8 blocks of 2, 3 projections, 4 lateral + 4 output
    for row in rows:
        for kernel in ("PyTorch's choice", "oneDNN", "native", "channels_last"):
            assert row[kernel] >= 0


def test_latency_rows_compare_each_variant_with_its_own_unpruned_model():
    model = models.build("faster_rcnn_R18_FPN")
    pruned = pruned_copy(model, block_keep(model, 0.5))
    flops = {"unpruned": 2.0, "pruned": 1.5}
    rows = latency_rows({"unpruned": model, "pruned": pruned}, [models.images(1)], flops, repeats=1, rounds=1)
    assert [(r["model"], r["variant"]) for r in rows] == [
        (label, variant) for variant in VARIANTS for label in ("unpruned", "pruned")
    ]
    for row in rows:
        if row["model"] == "pruned":
            assert row["flops_cut"] == 0.25
            assert row["ratio"] == pytest.approx(row["cut"] / 0.25)
    assert rows[0]["cut_vs_built"] == 0
    # The variants ran on copies: the models given are unchanged.
    assert model.backbone.bottom_up.res2[0].conv1.norm is not None


def test_the_tool_prints_every_table_for_a_small_resnet(tmp_path):
    args = argparse.Namespace(
        part="resnet", config_file=CONFIG, weights=None, side=64, ratio=0.5, round_to=[1], threads=1,
        repeats=1, profile_variants=["as built"], latency_repeats=1, rounds=1, convs=True, backends=False,
        fixed_proposals=False, fix_mmap_threshold=False, output=str(tmp_path / "profile.md"), opts=[],
        dataset=None, images=1, flops_reduction=None, kinds=[],
    )  # fmt: skip
    threads = torch.get_num_threads()
    try:
        text = main(args)
    finally:
        torch.set_num_threads(threads)  # main sets one thread for the rest of the process
    assert (tmp_path / "profile.md").read_text() == text
    for heading in ("### Profile, as built", "### Latency", "Kernel time per GFLOP", "Per conv"):
        assert heading in text
    assert "| block convs" in text and "| pruned, round_to 1 | fold_norms + channels_last" in text
