"""Deterministic synthetic COCO detection datasets: a "source" domain and a shifted "target" one.

They let transfer and pruning experiments (pre-train on source, fine-tune on a few target images)
run end to end on a CPU, with no downloads, at a difficulty that neither fails nor saturates.
"""

from __future__ import annotations

import colorsys
import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, ImageDraw

from d2prune.errors import UserError

try:
    from tqdm import tqdm as _progress
except ImportError:

    def _progress(iterable, **kwargs):
        return iterable


# Part of the manifest hash: bump it whenever a change alters the generated files, so that
# datasets made by older code are regenerated instead of silently reused.
VERSION = 2

DOMAINS = ("source", "target")
SPLIT_NAMES = ("train", "val")
SOURCE_CLASSES = ("circle", "square", "triangle", "cross", "ring", "star")
TARGET_CLASSES = ("hexagon", "diamond", "crescent", "arrow", "heart", "ellipse")
CLASSES = {"source": SOURCE_CLASSES, "target": TARGET_CLASSES}

# Dataset names, as registered in Detectron2's catalogs, and where each one comes from.
SPLITS = {
    "synthetic_source_train": ("source", "train"),
    "synthetic_source_val": ("source", "val"),
    "synthetic_target_train": ("target", "train"),
    "synthetic_target_val": ("target", "val"),
}

# Shapes are rasterised at this many sub-pixels per pixel and box-averaged, which antialiases them.
_SUPERSAMPLE = 4
# Object sizes (longest side before rotation) as fractions of the image side, drawn log-uniformly
# so small objects are as common as large ones; FPN's small levels then have work to do.
_MIN_SCALE, _MAX_SCALE = 0.08, 0.60
# An object hidden this much is dropped from the annotations: its remnant is not recognisable.
_MIN_VISIBLE_FRACTION = 0.3
_MIN_VISIBLE_AREA = 16
# A new object may cover at most this share of an earlier object's box; beyond that, it is moved
# (up to _PLACEMENT_TRIES times) so occlusion stays partial and images keep several objects.
_MAX_COVER = 0.6
_PLACEMENT_TRIES = 10


class SplitInfo(NamedTuple):
    """What `generate_all` did for one split."""

    json_file: Path
    image_root: Path
    num_images: int
    num_annotations: int
    generated: bool  # False when the files on disk were already up to date


def split_paths(root: str | os.PathLike, domain: str, split: str) -> tuple[Path, Path]:
    """Return `(json_file, image_root)` of a split under `root`."""
    domain_dir = Path(root) / domain
    return domain_dir / f"{split}.json", domain_dir / split


# ---------------------------------------------------------------------------------------------
# Shapes: each is a list of (polygon in unit coordinates, filled?) drawn in order; an unfilled
# polygon cuts a hole (ring, crescent).


def _points(*xy: float) -> np.ndarray:
    return np.array(xy, dtype=float).reshape(-1, 2)


def _circle(radius: float = 1.0, center: tuple[float, float] = (0.0, 0.0), n: int = 64):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([center[0] + radius * np.cos(t), center[1] + radius * np.sin(t)], axis=1)


def _regular_polygon(n: int, phase: float = 0.0):
    t = phase + np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.45):
    radius = np.tile([1.0, inner], points)
    t = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _cross(t: float = 0.3):
    """A plus sign whose arms are 2 * t wide."""
    return _points(
        -t, -1, t, -1, t, -t, 1, -t, 1, t, t, t, t, 1, -t, 1, -t, t, -1, t, -1, -t, -t, -t
    )


def _heart(n: int = 64):
    # The classic parametric heart; y is negated because image rows grow downwards.
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1)


def _shape(outline: np.ndarray, *holes: np.ndarray) -> list[tuple[np.ndarray, bool]]:
    """Centre and scale a shape so its outline spans [-1, 1] along its longest side.

    This gives the sampled object size the same meaning for every class.
    """
    lo, hi = outline.min(axis=0), outline.max(axis=0)
    center, half = (lo + hi) / 2, (hi - lo).max() / 2
    parts = [(outline, True)] + [(hole, False) for hole in holes]
    return [((points - center) / half, filled) for points, filled in parts]


_SHAPES = {
    "circle": _shape(_circle()),
    "square": _shape(_points(-1, -1, 1, -1, 1, 1, -1, 1)),
    "triangle": _shape(_regular_polygon(3, phase=-np.pi / 2)),
    "cross": _shape(_cross()),
    "ring": _shape(_circle(), _circle(0.55)),
    "star": _shape(_star()),
    "hexagon": _shape(_regular_polygon(6)),
    "diamond": _shape(_points(0, -1, 0.6, 0, 0, 1, -0.6, 0)),
    "crescent": _shape(_circle(), _circle(0.85, center=(0.45, 0.0))),
    "arrow": _shape(_points(-1, -0.18, 0.1, -0.18, 0.1, -0.6, 1, 0, 0.1, 0.6, 0.1, 0.18, -1, 0.18)),
    "heart": _shape(_heart()),
    "ellipse": _shape(_circle() * [1.0, 0.55]),
}


# ---------------------------------------------------------------------------------------------
# Colours and textures. The target domain differs from the source in every appearance cue a
# detector could latch onto: background texture and brightness, object saturation, object fill.


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return 255.0 * np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _object_colour(rng: np.random.Generator, domain: str) -> np.ndarray:
    if domain == "source":
        return _hsv(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.45, 0.95))
    return _hsv(rng.random(), rng.uniform(0.15, 0.5), rng.uniform(0.55, 0.9))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _source_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A light linear gradient between two pale colours."""
    c0, c1 = rng.uniform(175, 250, 3), rng.uniform(175, 250, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = _grid(size)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / (t.max() - t.min())
    return (c0 + t[..., None] * (c1 - c0)).astype(np.float32)


def _target_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dark, muted stripes, checkers or smooth noise."""
    hue, v0 = rng.random(), rng.uniform(0.1, 0.35)
    c0 = _hsv(hue, rng.uniform(0.1, 0.4), v0)
    c1 = _hsv(hue + rng.uniform(-0.1, 0.1), rng.uniform(0.1, 0.4), v0 + rng.uniform(0.05, 0.2))
    yy, xx = _grid(size)
    angle, period = rng.uniform(0, np.pi), rng.uniform(0.04, 0.12) * size
    u = (xx * math.cos(angle) + yy * math.sin(angle)) / period
    v = (yy * math.cos(angle) - xx * math.sin(angle)) / period
    kind = rng.integers(3)
    if kind == 0:
        t = (u % 1.0 < 0.5).astype(np.float32)
    elif kind == 1:
        t = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    else:
        # Two octaves of bicubically upsampled random grids: cheap, smooth, "Perlin-ish" noise.
        t = np.zeros((size, size), np.float32)
        for cells, weight in ((rng.integers(3, 7), 0.65), (rng.integers(8, 16), 0.35)):
            field = Image.fromarray(rng.random((cells, cells)).astype(np.float32), mode="F")
            t += weight * np.asarray(field.resize((size, size), Image.Resampling.BICUBIC))
        t = np.clip(t, 0.0, 1.0)
    return (c0 + t[..., None] * (c1 - c0)).astype(np.float32)


def _object_fill(rng: np.random.Generator, domain: str) -> Callable[..., np.ndarray]:
    """Return `fill(y0, y1, x0, x1)`, an object's colours over that pixel rectangle.

    Source objects are flat; target objects are mostly striped or dotted, in image coordinates
    so that the texture does not rotate with the shape and give its orientation away.
    """
    colour = _object_colour(rng, domain)
    kind = 0 if domain == "source" else rng.choice(3, p=[0.2, 0.4, 0.4])
    if kind == 0:
        return lambda y0, y1, x0, x1: colour
    # The second colour stays close in brightness so textures do not melt into dark backgrounds.
    second = (
        colour * rng.uniform(0.7, 0.85) if rng.random() < 0.5 else colour + 0.35 * (255 - colour)
    )
    angle, period = rng.uniform(0, np.pi), rng.uniform(3.0, 6.0)
    cos, sin = math.cos(angle), math.sin(angle)

    def fill(y0, y1, x0, x1):
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        u, v = (xx * cos + yy * sin) / period, (yy * cos - xx * sin) / period
        if kind == 1:
            pattern = u % 1.0 < 0.5
        else:
            pattern = np.hypot(u - np.round(u), v - np.round(v)) < 0.28
        return np.where(pattern[..., None], second, colour)

    return fill


# ---------------------------------------------------------------------------------------------
# Rasterising. Everything is drawn as "strokes": (kind, points in pixels, filled, width).


def _rasterize(strokes) -> tuple[int, int, np.ndarray]:
    """Draw strokes on a supersampled canvas just large enough; return (x0, y0, coverage)."""
    pad = max(width for _, _, _, width in strokes) / 2 + 1
    points = np.concatenate([p for _, p, _, _ in strokes])
    x0, y0 = np.floor(points.min(axis=0) - pad).astype(int)
    x1, y1 = np.ceil(points.max(axis=0) + pad).astype(int)
    s = _SUPERSAMPLE
    canvas = Image.new("L", (int(x1 - x0) * s, int(y1 - y0) * s), 0)
    draw = ImageDraw.Draw(canvas)
    for kind, p, filled, width in strokes:
        xy = ((p - [x0, y0]) * s).ravel().tolist()
        if kind == "polygon":
            draw.polygon(xy, fill=255 if filled else 0)
        else:
            draw.line(xy, fill=255, width=max(1, round(width * s)), joint="curve")
    coverage = np.asarray(canvas.reduce(s), np.float32) / 255.0
    return int(x0), int(y0), coverage


def _paint(image, labels, x0, y0, coverage, fill, label) -> tuple[int, int, int, int] | None:
    """Alpha-blend `fill` into `image` by `coverage`; claim covered pixels for `label`.

    Returns the painted region clipped to the image, or None when it falls outside. The label map
    records who is on top of each pixel, so painting order gives the visible masks for free.
    """
    size = labels.shape[0]
    h, w = coverage.shape
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + w, size), min(y0 + h, size)
    if ix0 >= ix1 or iy0 >= iy1:
        return None
    alpha = coverage[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
    region = image[iy0:iy1, ix0:ix1]
    region += alpha[..., None] * (fill(iy0, iy1, ix0, ix1) - region)
    labels[iy0:iy1, ix0:ix1][alpha >= 0.5] = label
    return ix0, iy0, ix1, iy1


def _sample_object(rng: np.random.Generator, classes: tuple[str, ...], size: int):
    category = int(rng.integers(len(classes)))
    scale = size * math.exp(rng.uniform(math.log(_MIN_SCALE), math.log(_MAX_SCALE)))
    # Mild aspect jitter keeps classes defined by geometry, not by one exact outline.
    stretch = np.array([rng.uniform(0.85, 1.15), 1.0]) * scale / 2
    angle = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    # Centres anywhere in the image: objects near a border are truncated, as in real photos.
    center = rng.uniform(0, size, 2)
    strokes = [
        ("polygon", (points * stretch) @ rotation + center, filled, 0.0)
        for points, filled in _SHAPES[classes[category]]
    ]
    return category, strokes


def _sample_distractor(rng: np.random.Generator, size: int):
    """Clutter that belongs to no class: a thin line, a scribble or a small irregular blob."""
    kind = rng.integers(3)
    start = rng.uniform(0, size, 2)
    if kind < 2:
        width = rng.uniform(0.8, 2.0)
        if kind == 0:
            angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.8) * size
            path = np.stack([start, start + length * np.array([math.cos(angle), math.sin(angle)])])
        else:
            steps = rng.normal(0, 0.08 * size, (int(rng.integers(3, 7)), 2))
            path = start + np.cumsum(np.vstack([[0, 0], steps]), axis=0)
        return [("line", path, True, width)]
    t = np.sort(rng.uniform(0, 2 * np.pi, 7))
    radius = rng.uniform(0.015, 0.04) * size * rng.uniform(0.6, 1.3, 7)
    blob = start + np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    return [("polygon", blob, True, 0.0)]


def _encode_mask(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode("ascii")}


def render_image(
    domain: str,
    image_size: int,
    rng: np.random.Generator,
    min_objects: int = 1,
    max_objects: int = 8,
) -> tuple[np.ndarray, list[dict]]:
    """Draw one image of `domain`; return it (uint8 HxWx3) and its COCO annotations.

    Annotations have `category_id` (1-based in the domain's class list), `bbox` and `area` of the
    visible pixels, an RLE `segmentation` of them and `iscrowd`; ids are left to the caller.
    """
    classes = CLASSES[domain]
    size = image_size
    if domain == "source":
        image, noise_sigma, max_distractors = _source_background(rng, size), 3.0, 4
    else:
        image, noise_sigma, max_distractors = _target_background(rng, size), 6.0, 6

    # Distractors are slotted in at random positions among the objects, so clutter lies both
    # under objects and over them (where it also hides object pixels).
    items: list[tuple] = []
    boxes: list[np.ndarray] = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        for _ in range(_PLACEMENT_TRIES):
            category, strokes = _sample_object(rng, classes, size)
            points = np.concatenate([p for _, p, _, _ in strokes])
            box = np.concatenate([points.min(axis=0), points.max(axis=0)])
            if all(_covered_share(earlier, box) <= _MAX_COVER for earlier in boxes):
                boxes.append(box)
                items.append(("object", category, strokes))
                break
    for _ in range(int(rng.integers(0 if domain == "source" else 1, max_distractors + 1))):
        position = int(rng.integers(len(items) + 1))
        items.insert(position, ("distractor", None, _sample_distractor(rng, size)))

    labels = np.full((size, size), -1, np.int16)
    objects = []  # (category, full area, painted region) in painting order
    for kind, category, strokes in items:
        x0, y0, coverage = _rasterize(strokes)
        # Distractors take object colours and textures, so only shape tells them apart.
        fill = _object_fill(rng, domain)
        label = len(objects) if kind == "object" else -1
        region = _paint(image, labels, x0, y0, coverage, fill, label)
        if kind == "object":
            objects.append((category, int((coverage >= 0.5).sum()), region))

    # Grey (luminance) noise, like a camera's; a third of the cost of per-channel noise.
    image += noise_sigma * rng.standard_normal((size, size, 1), dtype=np.float32)
    pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)

    annotations = []
    for index, (category, full_area, region) in enumerate(objects):
        if region is None:
            continue
        ix0, iy0, ix1, iy1 = region
        visible = labels[iy0:iy1, ix0:ix1] == index
        area = int(visible.sum())
        if area < _MIN_VISIBLE_AREA or area < _MIN_VISIBLE_FRACTION * full_area:
            continue
        rows, cols = np.nonzero(visible)
        mask = np.zeros((size, size), bool)
        mask[iy0:iy1, ix0:ix1] = visible
        annotations.append(
            {
                "category_id": category + 1,
                "bbox": [
                    float(ix0 + cols.min()),
                    float(iy0 + rows.min()),
                    float(cols.max() - cols.min() + 1),
                    float(rows.max() - rows.min() + 1),
                ],
                "area": float(area),
                "iscrowd": 0,
                "segmentation": _encode_mask(mask),
            }
        )
    return pixels, annotations


def _covered_share(earlier: np.ndarray, box: np.ndarray) -> float:
    """Share of box `earlier` (x0, y0, x1, y1) that `box` overlaps."""
    w = min(earlier[2], box[2]) - max(earlier[0], box[0])
    h = min(earlier[3], box[3]) - max(earlier[1], box[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / ((earlier[2] - earlier[0]) * (earlier[3] - earlier[1]))


# ---------------------------------------------------------------------------------------------
# Writing splits.


def _render_file(
    image_root: Path, domain, split, image_size, seed, min_objects, max_objects, index
) -> list[dict]:
    """Pool worker: render image `index` from its own seed and write it as PNG."""
    # Seeding by (seed, domain, split, index) makes each image independent of worker count and
    # order, and keeps the splits disjoint.
    rng = np.random.default_rng([seed, DOMAINS.index(domain), SPLIT_NAMES.index(split), index])
    pixels, annotations = render_image(domain, image_size, rng, min_objects, max_objects)
    # Noise makes PNGs nearly incompressible: the fastest level is also about the smallest here.
    Image.fromarray(pixels).save(image_root / f"{index:06d}.png", compress_level=1)
    return annotations


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_arguments(domain, split, num_images, image_size, min_objects, max_objects) -> None:
    if domain not in DOMAINS:
        raise UserError(f"domain must be one of {', '.join(DOMAINS)}, not {domain!r}.")
    if split not in SPLIT_NAMES:
        raise UserError(f"split must be one of {', '.join(SPLIT_NAMES)}, not {split!r}.")
    if num_images < 1:
        raise UserError(f"the {domain} {split} split needs at least 1 image, not {num_images}.")
    if image_size < 32:
        raise UserError(f"image_size must be at least 32 pixels, not {image_size}.")
    if not 1 <= min_objects <= max_objects:
        raise UserError(
            f"objects per image must satisfy 1 <= min_objects <= max_objects, "
            f"not {min_objects} and {max_objects}."
        )


def _generate_split(
    imap, root, domain, split, num_images, image_size, seed, min_objects, max_objects
) -> SplitInfo:
    params = {
        "version": VERSION,
        "domain": domain,
        "split": split,
        "num_images": num_images,
        "image_size": image_size,
        "seed": seed,
        "min_objects": min_objects,
        "max_objects": max_objects,
        "classes": list(CLASSES[domain]),
    }
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    json_file, image_root = split_paths(root, domain, split)
    manifest_file = json_file.with_suffix(".manifest.json")

    manifest = _read_manifest(manifest_file)
    if manifest is not None and manifest.get("sha256") == digest and json_file.exists():
        return SplitInfo(
            json_file, image_root, manifest["num_images"], manifest["num_annotations"], False
        )

    # The manifest goes first and comes back last: an interrupted run leaves no manifest, so the
    # next run redoes the split. Old images go too, so a smaller split leaves no strays behind.
    manifest_file.unlink(missing_ok=True)
    if image_root.exists():
        shutil.rmtree(image_root)
    image_root.mkdir(parents=True)

    render = functools.partial(
        _render_file, image_root, domain, split, image_size, seed, min_objects, max_objects
    )
    images, annotations = [], []
    results = _progress(
        imap(render, range(num_images)), total=num_images, desc=f"{domain}/{split}", disable=None
    )
    for index, image_annotations in enumerate(results):
        image_id = index + 1
        images.append(
            {
                "id": image_id,
                "file_name": f"{index:06d}.png",
                "width": image_size,
                "height": image_size,
            }
        )
        for annotation in image_annotations:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})

    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"}
        for i, name in enumerate(CLASSES[domain])
    ]
    _write_json_atomic(
        json_file,
        {
            "info": {
                "description": f"d2prune synthetic shapes, {domain} {split}",
                "version": str(VERSION),
            },
            "images": images,
            "annotations": annotations,
            "categories": categories,
        },
    )
    _write_json_atomic(
        manifest_file,
        {
            "sha256": digest,
            "params": params,
            "num_images": num_images,
            "num_annotations": len(annotations),
        },
    )
    return SplitInfo(json_file, image_root, num_images, len(annotations), True)


@contextlib.contextmanager
def _image_map(workers: int | None) -> Iterator[Callable]:
    """An order-preserving map over images: in-process for one worker, else a process pool."""
    workers = workers or os.cpu_count() or 1
    if workers <= 1:
        yield map
        return
    with multiprocessing.Pool(workers) as pool:
        yield functools.partial(pool.imap, chunksize=8)


def generate(
    root: str | os.PathLike,
    domain: str,
    split: str,
    num_images: int,
    image_size: int = 192,
    seed: int = 0,
    min_objects: int = 1,
    max_objects: int = 8,
    workers: int | None = None,
) -> Path:
    """Write one split to `root/<domain>/<split>/` and `root/<domain>/<split>.json`.

    Does nothing when a manifest shows the split was already made with the same parameters and
    generator version. Returns the JSON file's path.
    """
    _check_arguments(domain, split, num_images, image_size, min_objects, max_objects)
    with _image_map(workers) as imap:
        return _generate_split(
            imap, root, domain, split, num_images, image_size, seed, min_objects, max_objects
        ).json_file


def generate_all(
    root: str | os.PathLike = "datasets/synthetic",
    source_train: int = 2000,
    source_val: int = 300,
    target_train: int = 40,
    target_val: int = 300,
    image_size: int = 192,
    seed: int = 0,
    workers: int | None = None,
    min_objects: int = 1,
    max_objects: int = 8,
) -> dict[str, SplitInfo]:
    """Write the four splits of `SPLITS` under `root`; return what was done, by dataset name.

    The target validation split should keep at least 200 images: with fewer, the AP of a model
    fine-tuned on 40 images varies too much between seeds to compare pruning criteria.
    """
    sizes = {
        ("source", "train"): source_train,
        ("source", "val"): source_val,
        ("target", "train"): target_train,
        ("target", "val"): target_val,
    }
    # Check every split before writing any, so a bad size does not surface after minutes of work.
    for (domain, split), num_images in sizes.items():
        _check_arguments(domain, split, num_images, image_size, min_objects, max_objects)
    options = dict(
        image_size=image_size, seed=seed, min_objects=min_objects, max_objects=max_objects
    )
    with _image_map(workers) as imap:
        return {
            name: _generate_split(imap, root, domain, split, sizes[domain, split], **options)
            for name, (domain, split) in SPLITS.items()
        }
