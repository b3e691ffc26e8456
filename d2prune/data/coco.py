"""Registration of COCO-format detection datasets, and a validator that turns every fault in a
COCO file into one sentence naming the file and the fault, before any training starts.
"""

import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.utils import comm
from PIL import Image
from tqdm import tqdm

from ..errors import UserError

logger = logging.getLogger(__name__)

# A box may overhang its image by this share of the image side (annotation tools round and pad);
# beyond it the box is taken for a wrong coordinate convention or a mixed-up image.
BOX_SLACK = 0.05
REQUIRED_KEYS = ("images", "annotations", "categories")
# EXIF orientations that turn an image by 90 degrees: detectron2's read_image applies them, so
# the image it trains on has the stored width and height swapped.
_EXIF_ORIENTATION = 0x0112
_TURNED = (5, 6, 7, 8)
# Files named in an error about image files; the rest are counted.
_NAMED = 3


def _duplicate(ids: Iterable) -> Optional[object]:
    counts = Counter(ids)
    return next((i for i, n in counts.items() if n > 1), None)


def image_size(path: str) -> Union[Tuple[int, int, bool], str]:
    """(width, height, turned) of the image at `path` as detectron2's `read_image` will see it,
    read from the file's header without decoding the pixels; or why the file cannot be read.

    `turned` says that an EXIF orientation swapped the stored width and height.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as image:
            width, height = image.size
            try:
                # Image.getexif reads the metadata already parsed from the header; PNG's own
                # override decodes the whole image to look for an eXIf chunk after the pixels.
                orientation = Image.Image.getexif(image).get(_EXIF_ORIENTATION)
            except Exception:  # detectron2 ignores unreadable EXIF too (its issue 1885)
                orientation = None
    except Image.UnidentifiedImageError:
        return "not an image file PIL can identify"
    except Exception as e:  # noqa: BLE001 -- whatever stops PIL here stops training later
        return f"{type(e).__name__}: {' '.join(str(e).split())}"
    if orientation in _TURNED:
        return height, width, True
    return width, height, False


def _named(items: List[str], total: int) -> str:
    more = f" and {total - _NAMED} more" if total > _NAMED else ""
    return ", ".join(items[:_NAMED]) + more


def check_image_headers(json_file: str, image_root: str, images: List[Dict], workers: int = 8) -> None:
    """Refuse image files that PIL cannot open, and images whose size (after EXIF orientation)
    differs from the width/height the json gives them, naming the first few and the count.

    Only headers are read, in `workers` threads (reading is mostly waiting on the disk), with a
    progress bar on the main process when it takes more than a second.
    """
    paths = [os.path.join(image_root, img["file_name"]) for img in images]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        sizes = list(
            tqdm(
                pool.map(image_size, paths, chunksize=64),
                total=len(paths),
                desc=f"reading image headers of {os.path.basename(json_file)}",
                unit="img",
                delay=1.0,
                disable=not comm.is_main_process(),
            )
        )
    unreadable = [f"{img['file_name']} ({size})" for img, size in zip(images, sizes) if isinstance(size, str)]
    if unreadable:
        raise UserError(
            f"{json_file}: {len(unreadable)} of {len(images)} image files under {image_root} cannot be "
            f"read as images: {_named(unreadable, len(unreadable))}; replace or remove them (and their "
            "entries in the json)."
        )
    wrong = [
        (img, size) for img, size in zip(images, sizes) if (img["width"], img["height"]) != tuple(size[:2])
    ]
    if wrong:
        img, (width, height, turned) = wrong[0]
        how = "width x height, after its EXIF orientation" if turned else "width x height"
        raise UserError(
            f"{json_file}: {len(wrong)} of {len(images)} images differ in size from their width/height "
            f"in the json, e.g. {img['file_name']} is {width} x {height} ({how}) but the json says "
            f"{img['width']} x {img['height']}; write each image's real width and height into the json "
            "if its boxes were drawn on these files, or re-export the json from the images it was drawn on."
        )


def validate_coco_json(json_file: str, image_root: Optional[str] = None) -> Dict:
    """Check a COCO detection file and return its parsed content.

    Raises `UserError` on the first fault found: missing file, invalid JSON, missing top-level
    keys, duplicate ids, annotations of unknown images or categories, boxes with non-positive
    size or far outside their image, and (when `image_root` is given) image files missing on disk,
    unreadable, or of another size than the json says (see `check_image_headers`).
    Non-contiguous category ids and images without annotations are valid.
    """
    if not os.path.isfile(json_file):
        raise UserError(f"{json_file}: dataset file not found.")
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{json_file}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{json_file}: cannot be read ({e}).") from None
    if not isinstance(data, dict):
        raise UserError(f"{json_file}: the top level must be an object with {', '.join(REQUIRED_KEYS)}.")
    missing = [k for k in REQUIRED_KEYS if not isinstance(data.get(k), list)]
    if missing:
        raise UserError(f"{json_file}: missing or not a list: {', '.join(missing)}.")

    images, annotations, categories = (data[k] for k in REQUIRED_KEYS)
    for kind, items, fields in (
        ("image", images, ("id", "file_name", "width", "height")),
        ("annotation", annotations, ("id", "image_id", "category_id", "bbox")),
        ("category", categories, ("id", "name")),
    ):
        for i, item in enumerate(items):
            lacking = [k for k in fields if not isinstance(item, dict) or k not in item]
            if lacking:
                raise UserError(f"{json_file}: {kind} #{i} lacks {', '.join(lacking)}.")
        dup = _duplicate(item["id"] for item in items)
        if dup is not None:
            raise UserError(f"{json_file}: duplicate {kind} id {dup}.")
    if not categories:
        raise UserError(f"{json_file}: 'categories' is empty; a detection dataset needs at least one.")

    if image_root is not None:
        if not os.path.isdir(image_root):
            raise UserError(f"{image_root}: image root of {json_file} is not a directory.")
        absent = [img["file_name"] for img in images if not os.path.isfile(os.path.join(image_root, img["file_name"]))]
        if absent:
            raise UserError(
                f"{json_file}: {len(absent)} of {len(images)} image files missing under "
                f"{image_root}, e.g. {absent[0]}."
            )
        check_image_headers(json_file, image_root, images)

    image_by_id = {img["id"]: img for img in images}
    category_ids = {c["id"] for c in categories}
    for ann in annotations:
        aid = ann["id"]
        img = image_by_id.get(ann["image_id"])
        if img is None:
            raise UserError(f"{json_file}: annotation {aid} points at unknown image id {ann['image_id']}.")
        if ann["category_id"] not in category_ids:
            raise UserError(
                f"{json_file}: annotation {aid} points at unknown category id {ann['category_id']}."
            )
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise UserError(f"{json_file}: annotation {aid} has bbox {box!r}; expected [x, y, width, height].")
        x, y, w, h = box
        if w <= 0 or h <= 0:
            raise UserError(f"{json_file}: annotation {aid} has a box of non-positive size {w} x {h}.")
        W, H = img["width"], img["height"]
        sx, sy = BOX_SLACK * W, BOX_SLACK * H
        if x < -sx or y < -sy or x + w > W + sx or y + h > H + sy:
            raise UserError(
                f"{json_file}: annotation {aid} has box [{x}, {y}, {w}, {h}] outside its "
                f"{W} x {H} image {img['file_name']}."
            )

    return data


def register_coco(name: str, json_file: str, image_root: str) -> None:
    """Register a COCO-format dataset under `name` (Detectron2's `register_coco_instances`).

    Idempotent: registering the same name with the same files again does nothing; the same name
    with other files is an error rather than a silent swap.
    """
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        same = (
            os.path.abspath(getattr(meta, "json_file", "")) == os.path.abspath(json_file)
            and os.path.abspath(getattr(meta, "image_root", "")) == os.path.abspath(image_root)
        )
        if not same:
            raise UserError(
                f"dataset '{name}' is already registered with {getattr(meta, 'json_file', 'other data')}; "
                f"pick another name for {json_file}."
            )
        return
    register_coco_instances(name, {}, json_file, image_root)


def register_datasets(cfg) -> List[str]:
    """Register the synthetic splits found under `cfg.DATASETS.SYNTHETIC_ROOT` and every entry of
    `cfg.DATASETS.COCO`; return the names registered by this call or before."""
    from .synthetic import SPLITS, split_paths

    names = []
    for name, (domain, split) in SPLITS.items():
        json_file, image_root = split_paths(cfg.DATASETS.SYNTHETIC_ROOT, domain, split)
        if os.path.isfile(json_file):
            register_coco(name, str(json_file), str(image_root))
            names.append(name)
    for entry in cfg.DATASETS.COCO:
        if len(entry) != 3:
            raise UserError(
                f"DATASETS.COCO entry {list(entry)!r} must be [name, json_file, image_root]."
            )
        register_coco(*entry)
        names.append(entry[0])
    return names


def _num_classes(cfg) -> int:
    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        return cfg.MODEL.RETINANET.NUM_CLASSES
    return cfg.MODEL.ROI_HEADS.NUM_CLASSES


def validate_datasets(cfg, names: Optional[Sequence[str]] = None) -> None:
    """Validate every COCO dataset the config trains or tests on (or `names`), and check that it
    has images (a training set: annotated ones) and that its categories fit the model's classes."""
    names = list(names) if names is not None else list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    registered = set(DatasetCatalog.list())
    num_classes = _num_classes(cfg)
    for name in dict.fromkeys(names):
        if name not in registered:
            raise UserError(
                f"dataset '{name}' is not registered; add it with --dataset {name} JSON IMAGE_ROOT "
                f"or DATASETS.COCO (synthetic splits appear after tools/make_synthetic.py)."
            )
        meta = MetadataCatalog.get(name)
        json_file = getattr(meta, "json_file", None)
        if json_file is None:
            continue
        data = validate_coco_json(json_file, meta.image_root)
        if not data["images"]:
            raise UserError(f"{json_file}: 'images' is empty; dataset '{name}' needs at least one image.")
        if name in cfg.DATASETS.TRAIN and not data["annotations"] and cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
            raise UserError(
                f"{json_file}: no annotations, so training dataset '{name}' is empty once "
                "DATALOADER.FILTER_EMPTY_ANNOTATIONS drops the images without boxes."
            )
        if len(data["categories"]) != num_classes:
            raise UserError(
                f"{json_file}: {len(data['categories'])} categories but the model has "
                f"{num_classes} classes; set MODEL.ROI_HEADS.NUM_CLASSES (or MODEL.RETINANET.NUM_CLASSES) "
                f"to {len(data['categories'])}."
            )


def add_dataset_argument(parser, use: str = "same as a DATASETS.COCO entry") -> None:
    """The tools' `--dataset NAME JSON IMAGE_ROOT` (repeatable): COCO-format datasets to
    register, given to `setup_cfg` as DATASETS.COCO entries; `use` ends the help text."""
    parser.add_argument(
        "--dataset", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help=f"register a COCO-format dataset (repeatable); {use}",
    )  # fmt: skip
