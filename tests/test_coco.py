"""Validation of COCO files (one clear error per fault) and dataset registration."""

import copy
import json

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from PIL import Image, ImageFile

from d2prune.config import setup_cfg
from d2prune.data import register_coco, register_datasets, validate_coco_json, validate_datasets
from d2prune.errors import UserError

from .conftest import REPO, write_coco


def test_valid_file_passes(tmp_path, coco_dict):
    json_file, root = write_coco(tmp_path, coco_dict)
    data = validate_coco_json(json_file, root)
    assert len(data["images"]) == 3 and len(data["annotations"]) == 3


def _set(path, value):
    def mutate(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _append(key, item):
    return lambda d: d[key].append(item)


def _drop(key):
    return lambda d: d.pop(key)


BAD_DATA = [
    ("no-images", _drop("images"), "missing or not a list: images"),
    ("no-annotations", _drop("annotations"), "missing or not a list: annotations"),
    ("no-categories", _drop("categories"), "missing or not a list: categories"),
    ("empty-categories", _set(["categories"], []), "'categories' is empty"),
    ("unknown-image", _set(["annotations", 0, "image_id"], 99), "annotation 1 points at unknown image id 99"),
    ("unknown-category", _set(["annotations", 1, "category_id"], 5), "annotation 2 points at unknown category id 5"),
    ("zero-width", _set(["annotations", 0, "bbox"], [4, 4, 0, 10]), "annotation 1 has a box of non-positive size 0 x 10"),
    ("negative-height", _set(["annotations", 0, "bbox"], [4, 4, 5, -2]), "non-positive size 5 x -2"),
    ("box-outside", _set(["annotations", 2, "bbox"], [40, 0, 64, 48]), "annotation 3 has box [40, 0, 64, 48] outside its 64 x 48 image b.png"),
    ("xyxy-box", _set(["annotations", 1, "bbox"], [30, 20, 60, 45]), "annotation 2 has box [30, 20, 60, 45] outside"),
    ("bad-bbox", _set(["annotations", 0, "bbox"], [1, 2, 3]), "annotation 1 has bbox [1, 2, 3]"),
    ("dup-image", _append("images", {"id": 10, "file_name": "a.png", "width": 64, "height": 48}), "duplicate image id 10"),
    ("dup-annotation", _set(["annotations", 2, "id"], 1), "duplicate annotation id 1"),
    ("dup-category", _append("categories", {"id": 3, "name": "again"}), "duplicate category id 3"),
    ("image-lacks-size", lambda d: d["images"][1].pop("width"), "image #1 lacks width"),
    ("top-level-list", lambda d: (d.clear(), d.update({"x": 1})), "missing or not a list: images, annotations, categories"),
]


@pytest.mark.parametrize("case,mutate,message", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_each_fault_is_named(tmp_path, coco_dict, case, mutate, message):
    data = copy.deepcopy(coco_dict)
    mutate(data)
    json_file, root = write_coco(tmp_path, data, with_images=False)
    with pytest.raises(UserError) as info:
        validate_coco_json(json_file)
    text = str(info.value)
    assert text.startswith(json_file + ":")
    assert message in text
    assert "\n" not in text


def test_missing_and_invalid_files(tmp_path, coco_dict):
    with pytest.raises(UserError, match="dataset file not found"):
        validate_coco_json(str(tmp_path / "nope.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [1, 2,, 3]}')
    with pytest.raises(UserError, match=r"broken.json: invalid JSON at line 1, column 18: Expecting value"):
        validate_coco_json(str(broken))


def test_missing_image_files(tmp_path, coco_dict):
    json_file, root = write_coco(tmp_path, coco_dict)
    (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(UserError, match=r"1 of 3 image files missing under .*images, e.g. b.png"):
        validate_coco_json(json_file, root)
    with pytest.raises(UserError, match="is not a directory"):
        validate_coco_json(json_file, str(tmp_path / "elsewhere"))


def test_small_overhang_is_tolerated(tmp_path, coco_dict):
    coco_dict["annotations"][2]["bbox"] = [-1.5, -1.0, 65.5, 49.0]
    json_file, root = write_coco(tmp_path, coco_dict)
    validate_coco_json(json_file, root)


def test_registration_non_contiguous_ids_and_empty_images(tmp_path, coco_dict):
    json_file, root = write_coco(tmp_path, coco_dict)
    register_coco("d2prune_test_noncontig", json_file, root)
    register_coco("d2prune_test_noncontig", json_file, root)  # idempotent
    records = DatasetCatalog.get("d2prune_test_noncontig")
    meta = MetadataCatalog.get("d2prune_test_noncontig")
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
    assert meta.thing_classes == ["cat", "dog"]
    by_file = {r["file_name"].rsplit("/", 1)[-1]: r for r in records}
    assert len(by_file) == 3 and by_file["empty.png"]["annotations"] == []
    assert sorted(a["category_id"] for a in by_file["a.png"]["annotations"]) == [0, 1]
    other = tmp_path / "other"
    other_json, other_root = write_coco(other, coco_dict)
    with pytest.raises(UserError, match="already registered"):
        register_coco("d2prune_test_noncontig", other_json, other_root)


def test_config_registration_and_class_check(tmp_path, coco_dict):
    json_file, root = write_coco(tmp_path, coco_dict)
    cfg = setup_cfg(
        str(REPO / "configs/synthetic/faster_rcnn_R18_FPN_source.yaml"),
        ["DATASETS.TRAIN", "('d2prune_test_cfg',)", "DATASETS.TEST", "()", "DATASETS.SYNTHETIC_ROOT", str(tmp_path / "none")],
        [["d2prune_test_cfg", json_file, root]],
    )
    assert register_datasets(cfg) == ["d2prune_test_cfg"]
    with pytest.raises(UserError, match=r"2 categories but the model has 6 classes"):
        validate_datasets(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    validate_datasets(cfg)
    cfg.DATASETS.TRAIN = ("never_registered",)
    with pytest.raises(UserError, match="dataset 'never_registered' is not registered"):
        validate_datasets(cfg)


def test_bad_config_entry(tmp_path):
    cfg = setup_cfg(str(REPO / "configs/synthetic/faster_rcnn_R18_FPN_source.yaml"))
    cfg.DATASETS.COCO = [["only_name"]]
    cfg.DATASETS.SYNTHETIC_ROOT = str(tmp_path)
    with pytest.raises(UserError, match=r"DATASETS.COCO entry \['only_name'\] must be \[name, json_file, image_root\]"):
        register_datasets(cfg)


def test_json_written_by_test_is_loadable(tmp_path, coco_dict):
    json_file, _ = write_coco(tmp_path, coco_dict)
    assert json.loads(open(json_file).read())["categories"][1]["id"] == 7


# --- image files: read from their headers -----------------------------------------------------

def _exif_rotated(path, size, orientation=6, fmt="JPEG"):
    """Save a `size` (width, height) image whose EXIF orientation tag turns it on display."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", size, (90, 120, 150)).save(path, fmt, exif=exif.tobytes())


def test_unreadable_images_are_named_with_their_count(tmp_path, coco_dict):
    json_file, root = write_coco(tmp_path, coco_dict)
    (tmp_path / "images" / "a.png").write_bytes(b"")
    (tmp_path / "images" / "b.png").write_text("not an image, a text file named .png")
    with pytest.raises(UserError) as info:
        validate_coco_json(json_file, root)
    text = str(info.value)
    assert "\n" not in text and text.startswith(json_file + ": ")
    assert "2 of 3 image files under" in text and "cannot be read as images" in text
    assert "a.png (empty file)" in text and "b.png (not an image file PIL can identify)" in text


def test_many_unreadable_images_name_the_first_few(tmp_path, coco_dict):
    coco_dict["images"] += [
        {"id": 20 + i, "file_name": f"sub/bad{i}.jpg", "width": 64, "height": 48} for i in range(6)
    ]
    (tmp_path / "images" / "sub").mkdir(parents=True)
    json_file, root = write_coco(tmp_path, coco_dict)
    for i in range(6):
        (tmp_path / "images" / "sub" / f"bad{i}.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * i)
    with pytest.raises(UserError) as info:
        validate_coco_json(json_file, root)
    text = str(info.value)
    assert "6 of 9 image files under" in text
    assert "sub/bad0.jpg" in text and "sub/bad2.jpg" in text and "sub/bad3.jpg" not in text
    assert "and 3 more" in text and "\n" not in text


def test_size_mismatch_is_refused_with_the_fix(tmp_path, coco_dict):
    json_file, root = write_coco(tmp_path, coco_dict)
    Image.new("RGB", (80, 48)).save(tmp_path / "images" / "b.png")  # re-exported wider
    with pytest.raises(UserError) as info:
        validate_coco_json(json_file, root)
    text = str(info.value)
    assert "\n" not in text and text.startswith(json_file + ": ")
    assert "1 of 3 images differ in size from their width/height in the json" in text
    assert "b.png is 80 x 48 (width x height) but the json says 64 x 48" in text
    assert "write each image's real width and height into the json" in text


@pytest.mark.parametrize("fmt,suffix", [("JPEG", "jpg"), ("PNG", "png")])
def test_exif_orientation_counts_as_detectron2_reads_it(tmp_path, coco_dict, fmt, suffix):
    """A photo stored 64 x 48 with orientation 6 (turned 90 degrees) is 48 x 64 to detectron2."""
    coco_dict["images"] = [{"id": 10, "file_name": f"turned.{suffix}", "width": 48, "height": 64}]
    coco_dict["annotations"] = [
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [4, 4, 20, 40], "area": 800, "iscrowd": 0}
    ]
    json_file, root = write_coco(tmp_path, coco_dict, with_images=False)
    path = tmp_path / "images" / f"turned.{suffix}"
    _exif_rotated(path, (64, 48), fmt=fmt)
    assert read_image(str(path)).shape[:2] == (64, 48)  # height, width as detectron2 sees it
    validate_coco_json(json_file, root)

    coco_dict["images"][0].update(width=64, height=48)  # the stored size, which detectron2 never sees
    json_file, root = write_coco(tmp_path, coco_dict, with_images=False)
    with pytest.raises(UserError) as info:
        validate_coco_json(json_file, root)
    assert f"turned.{suffix} is 48 x 64 (width x height, after its EXIF orientation) but the json says 64 x 48" in str(info.value)


def test_headers_only_no_pixels_decoded(tmp_path, coco_dict, monkeypatch):
    json_file, root = write_coco(tmp_path, coco_dict)
    _exif_rotated(tmp_path / "images" / "a.png", (48, 64), fmt="PNG")
    coco_dict["images"][0].update(width=64, height=48)
    json_file, root = write_coco(tmp_path, coco_dict, with_images=False)
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.filename))
    validate_coco_json(json_file, root)
    assert loads == []
