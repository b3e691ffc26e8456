"""Tests of the synthetic COCO generator: determinism, caching, COCO validity and domain shift."""

import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
from pycocotools.coco import COCO

from d2prune.data.synthetic import (
    CLASSES,
    SOURCE_CLASSES,
    SPLITS,
    TARGET_CLASSES,
    generate,
    generate_all,
    render_image,
    split_paths,
)
from d2prune.errors import UserError

SIZE = 96
SMALL = dict(source_train=12, source_val=12, target_train=12, target_val=12, image_size=SIZE)


def _render(domain, count, seed=0):
    return [render_image(domain, SIZE, np.random.default_rng([seed, i])) for i in range(count)]


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return root, generate_all(root, workers=1, **SMALL)


def test_same_parameters_give_identical_files(small_set, tmp_path):
    root, _ = small_set
    # A process pool must not change a byte: each image has its own seed.
    generate_all(tmp_path, workers=2, **SMALL)
    first, second = _files(root), _files(tmp_path)
    assert sorted(first) == sorted(second)
    assert len([p for p in first if p.suffix == ".png"]) == 48
    assert first == second


def test_splits_do_not_share_images(small_set):
    root, _ = small_set
    images = [p.read_bytes() for p in root.rglob("*.png")]
    assert len(set(images)) == len(images) == 48


def test_up_to_date_split_is_skipped_and_changed_one_redone(tmp_path):
    json_file = generate(tmp_path, "source", "val", 6, image_size=SIZE, workers=1)
    image_root = split_paths(tmp_path, "source", "val")[1]
    stamps = {p: p.stat().st_mtime_ns for p in [json_file, *image_root.iterdir()]}
    original = json_file.read_bytes()

    generate(tmp_path, "source", "val", 6, image_size=SIZE, workers=1)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    info = generate_all(tmp_path, workers=1, **{**SMALL, "source_val": 6})
    assert not info["synthetic_source_val"].generated
    assert info["synthetic_source_val"].num_images == 6

    # Another seed, then fewer images: each rewrites the split and leaves no stray images.
    generate(tmp_path, "source", "val", 6, image_size=SIZE, seed=1, workers=1)
    assert json_file.read_bytes() != original
    generate(tmp_path, "source", "val", 4, image_size=SIZE, seed=1, workers=1)
    assert len(json.loads(json_file.read_text())["images"]) == 4
    assert len(list(image_root.iterdir())) == 4


def test_interrupted_generation_is_redone(tmp_path):
    json_file = generate(tmp_path, "target", "train", 3, image_size=SIZE, workers=1)
    manifest = json_file.with_suffix(".manifest.json")
    # A run killed before its end leaves no manifest: the split must not count as done.
    manifest.unlink()
    (split_paths(tmp_path, "target", "train")[1] / "000001.png").unlink()
    generate(tmp_path, "target", "train", 3, image_size=SIZE, workers=1)
    assert manifest.exists()
    assert (split_paths(tmp_path, "target", "train")[1] / "000001.png").exists()


def test_files_are_valid_coco(small_set):
    root, info = small_set
    assert sorted(info) == sorted(SPLITS)
    for name, (domain, split) in SPLITS.items():
        json_file, image_root = split_paths(root, domain, split)
        assert info[name].json_file == json_file and info[name].generated
        coco = COCO(str(json_file))
        data = coco.dataset
        assert [c["id"] for c in data["categories"]] == list(range(1, len(CLASSES[domain]) + 1))
        assert [c["name"] for c in data["categories"]] == list(CLASSES[domain])
        image_ids = [im["id"] for im in data["images"]]
        annotation_ids = [a["id"] for a in data["annotations"]]
        assert len(set(image_ids)) == len(image_ids) == 12
        assert len(set(annotation_ids)) == len(annotation_ids) == info[name].num_annotations > 0
        for image in data["images"]:
            assert (image_root / image["file_name"]).is_file()
            assert (image["width"], image["height"]) == (SIZE, SIZE)
        for a in data["annotations"]:
            assert a["image_id"] in coco.imgs and a["category_id"] in coco.cats
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
            assert a["iscrowd"] == 0 and 16 <= a["area"] <= w * h
            # The mask is what the box and area were measured on.
            assert coco.annToMask(a).sum() == a["area"]
            assert mask_util.toBbox(a["segmentation"]).tolist() == a["bbox"]


def test_domains_have_disjoint_classes():
    assert len(SOURCE_CLASSES) == 6 and 5 <= len(TARGET_CLASSES) <= 6
    assert not set(SOURCE_CLASSES) & set(TARGET_CLASSES)


def test_target_looks_different():
    def statistics(domain):
        images = np.stack([pixels for pixels, _ in _render(domain, 20)]).astype(np.float32)
        brightness = images.mean()
        saturation = (images.max(axis=-1) - images.min(axis=-1)).mean()
        return brightness, saturation

    source_brightness, source_saturation = statistics("source")
    target_brightness, target_saturation = statistics("target")
    # Light plain backgrounds and vivid objects versus dark textures and muted objects.
    assert source_brightness > 170
    assert target_brightness < 120
    assert target_saturation < 0.7 * source_saturation


def test_objects_vary_in_scale_count_occlusion_and_truncation():
    rendered = _render("source", 50, seed=3)
    boxes = [[a["bbox"] for a in annotations] for _, annotations in rendered]
    sides = [max(w, h) for image in boxes for _, _, w, h in image]
    assert max(sides) / min(sides) >= 4
    assert max(len(image) for image in boxes) >= 3
    assert sum(len(image) for image in boxes) >= 150

    def overlap(a, b):
        return min(a[0] + a[2], b[0] + b[2]) > max(a[0], b[0]) and min(
            a[1] + a[3], b[1] + b[3]
        ) > max(a[1], b[1])

    occluded = sum(
        overlap(a, b) for image in boxes for i, a in enumerate(image) for b in image[i + 1 :]
    )
    truncated = sum(
        x == 0 or y == 0 or x + w == SIZE or y + h == SIZE
        for image in boxes
        for x, y, w, h in image
    )
    assert occluded >= 20 and truncated >= 20


def test_bad_domain_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="'sauce'"):
        generate(tmp_path, "sauce", "train", 1)
