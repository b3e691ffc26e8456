"""Export a (possibly pruned) detector to TorchScript and ONNX, and check each export against it.

The model is traced through detectron2's `TracingAdapter` on one image; every written file is
loaded back and run beside the eager model on the same images (boxes, scores and classes
compared), and its size and CPU latency are reported.

What the exported models take and return (the same for both formats):

- input `image`: one float32 tensor (3, H, W), channels in `cfg.INPUT.FORMAT` order (BGR by
  default), values 0-255, already resized to the test size (`ResizeShortestEdge` with
  INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST, as `DefaultPredictor` does). Height and width may vary:
  the graph is traced on one size, and parity is checked on the sizes listed in `export.json`.
- outputs, in this order: `pred_boxes` (N, 4) as x0, y0, x1, y1 in the pixels of that input
  image, `pred_classes` (N,), `scores` (N,), any further field of the model's `Instances`
  (e.g. Mask R-CNN's `pred_masks`, (N, 1, 28, 28) per box), then `image_size` (2,).

R-CNN models are traced with `do_postprocess=False`, as detectron2's own
`tools/deploy/export_model.py` does: pasting masks into the full image and rescaling to the
original image size are left to the caller (`detectron2.modeling.postprocessing.
detector_postprocess(instances, height, width)`), which keeps image-size-dependent Python out of
the traced graph. RetinaNet has no such switch; its outputs go through `detector_postprocess` at
the input size (scale 1: clipping and dropping empty boxes only), so both give boxes in the
coordinates of the image they were given.
"""

import importlib.util
import json
import logging
import os
import tempfile
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Boxes, Instances
from tabulate import tabulate
from torch import nn

from .compat import tracing_adapter_class
from .complexity import CLOCKS, count_params, dummy_inputs, interleaved_latency
from .data import validate_datasets
from .engine import checkpoint
from .errors import UserError
from .fuse import fold_norms, folded_convs
from .utils.io import atomic_path, atomic_write_text

__all__ = [
    "FORMATS",
    "build_adapter",
    "check_formats",
    "check_output_dir",
    "check_test_dataset",
    "compare",
    "compare_latency",
    "export_images",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "format_table",
    "load_image",
    "load_model",
    "output_names",
    "parity_failures",
]

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
FILENAMES = {"torchscript": "model.ts", "onnx": "model.onnx"}
# ONNX has RoiAlign with half-pixel coordinates (detectron2's ROIAlignV2, aligned=True) from
# opset 16; torchvision's exporter maps roi_align and nms onto RoiAlign / NonMaxSuppression.
ONNX_OPSET = 17
# Exported and eager outputs may differ by float32 rounding: oneDNN and ONNX Runtime's kernels
# sum in other orders. A float field passes when its largest difference is at most this share
# of its largest eager value (at least 1): 0.0128 px for boxes on a 128 px image, 1e-4 for
# scores. Integer fields (classes) must be equal.
PARITY_RTOL = 1e-4
MB = 1e6

Runner = Callable[[torch.Tensor], Tuple[torch.Tensor, ...]]


def check_formats(formats: Sequence[str]) -> List[str]:
    """The requested formats without repeats; a `UserError` for an unknown one, or for `onnx`
    when onnxruntime (which runs the parity check) is not installed."""
    formats = list(dict.fromkeys(formats))
    if not formats:
        raise UserError(f"--format is missing: give one or more of {', '.join(FORMATS)}.")
    for fmt in formats:
        if fmt not in FORMATS:
            raise UserError(f"--format '{fmt}' is not supported; choose from {', '.join(FORMATS)}.")
    if "onnx" in formats:
        for package in ("onnx", "onnxruntime"):
            if importlib.util.find_spec(package) is None:
                raise UserError(
                    f"--format onnx needs the '{package}' package (pip install onnx onnxruntime)."
                )
    return formats


def check_output_dir(path: str) -> None:
    """Create `path` if needed; a `UserError` when it is not a folder this process can write."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"--output {path}: not a writable folder ({e.strerror or e}).") from None


def check_test_dataset(cfg) -> None:
    """Check the dataset the sample and parity images come from (the first of DATASETS.TEST),
    after `register_datasets`; an empty DATASETS.TEST means random images and needs nothing."""
    if not cfg.DATASETS.TEST:
        return
    name = cfg.DATASETS.TEST[0]
    if name not in DatasetCatalog.list():
        raise UserError(
            f"DATASETS.TEST names '{name}', which is not registered: add it with --dataset {name} "
            "JSON IMAGE_ROOT, or pass DATASETS.TEST \"()\" to trace and compare on random images."
        )
    validate_datasets(cfg, [name])


def load_model(cfg) -> nn.Module:
    """The detector of `cfg` on the CPU, in eval mode, with MODEL.WEIGHTS loaded (a pruned
    checkpoint is cut to its channel spec first)."""
    if not cfg.MODEL.WEIGHTS:
        raise UserError("MODEL.WEIGHTS is empty: name the checkpoint to export.")
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    return checkpoint.load_model(cfg)


def load_image(cfg, path: str) -> torch.Tensor:
    """`path` as the model's input tensor: read in INPUT.FORMAT, resized to the test size."""
    try:
        image = read_image(path, format=cfg.INPUT.FORMAT)
    except (OSError, ValueError) as e:  # missing file, not an image (PIL's errors derive from these)
        raise UserError(f"{path}: cannot be read as an image ({e}).") from None
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"))


def export_images(
    cfg, sample_image: Optional[str] = None, parity_images: int = 3
) -> Tuple[List[torch.Tensor], List[str]]:
    """The image to trace on, then `parity_images` more to compare outputs on, and where each
    came from.

    The sample is `sample_image`, else the first image of DATASETS.TEST. The others are the
    next images of DATASETS.TEST; without a test set (or when it runs out), random images of the
    sample's size (a trained detector may find nothing in noise: `export.json` counts the
    detections compared).
    """
    files: List[str] = []
    if cfg.DATASETS.TEST:
        files = [d["file_name"] for d in DatasetCatalog.get(cfg.DATASETS.TEST[0])[: parity_images + 1]]
    if sample_image is not None:
        files = [sample_image] + files[:parity_images]
    images = [load_image(cfg, f) for f in files]
    sources = list(files)
    if not images:
        side = min(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        images, sources = [dummy_inputs(side)[0]["image"]], ["random"]
    missing = parity_images + 1 - len(images)
    if missing > 0:
        height, width = images[0].shape[1:]
        images += [x["image"] for x in dummy_inputs(height, width, batch=missing, seed=1)]
        sources += ["random"] * missing
    return images, sources


def _inference(model: nn.Module, inputs: List[dict]) -> List[dict]:
    if isinstance(model, GeneralizedRCNN):
        return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]
    return model(inputs)


def build_adapter(model: nn.Module, image: torch.Tensor) -> nn.Module:
    """detectron2's `TracingAdapter` around `model` for one image tensor, run once on `image`
    (which records its output schema); eval mode, so that exporters keep the model in it."""
    adapter = tracing_adapter_class()(model, ([{"image": image}],), _inference).eval()
    try:
        flat = adapter(image)  # records adapter.outputs_schema
        outputs = adapter.outputs_schema(flat)
    except ValueError:  # outputs that do not flatten to tensors
        outputs = None
    if not (
        isinstance(outputs, list) and len(outputs) == 1 and isinstance(outputs[0], dict)
        and list(outputs[0]) == ["instances"] and isinstance(outputs[0]["instances"], Instances)
    ):
        raise UserError(
            f"{type(model).__name__} cannot be exported: only detectors whose outputs are "
            "[{'instances': Instances}] (Faster/Mask R-CNN, RetinaNet) are supported."
        )
    return adapter


def output_names(adapter: nn.Module) -> List[str]:
    """Names of the adapter's flat outputs, read from its output schema (a list of one dict of
    one `Instances`): the fields in the sorted order `TracingAdapter` flattens them, then
    `image_size`."""
    instances_schema = adapter.outputs_schema.schemas[0].schemas[0]
    return list(instances_schema.keys) + ["image_size"]


def _reason(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def export_torchscript(adapter: nn.Module, path: str) -> Runner:
    """Trace `adapter` with `torch.jit.trace`, save it to `path`, and return the loaded file as a
    function of an image tensor."""
    try:
        with warnings.catch_warnings():
            # TracerWarnings name the Python values the trace freezes; parity checks the result.
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    except Exception as e:  # any failure inside the model's code while tracing
        raise UserError(f"{type(adapter.model).__name__} cannot be traced to TorchScript: {_reason(e)}.") from None
    with warnings.catch_warnings(), atomic_path(path) as tmp:
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        torch.jit.save(traced, tmp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(path).eval()
    return lambda image: tuple(loaded(image))


def export_onnx(adapter: nn.Module, path: str) -> Runner:
    """Export `adapter` to ONNX at `path` and return an ONNX Runtime session of the file (CPU, as
    many threads as torch uses) as a function of an image tensor.

    torch.onnx's default (dynamo) exporter goes through `torch.export`, which refuses detectron2's
    data-dependent shapes (empty-input checks, NMS); the TorchScript-based exporter
    (`dynamo=False`) traces the model as TorchScript does.
    """
    import onnxruntime as ort

    names = output_names(adapter)
    dynamic = {"image": {1: "height", 2: "width"}}
    dynamic.update({name: {0: "detections"} for name in names if name != "image_size"})
    try:
        with warnings.catch_warnings(), atomic_path(path) as tmp:
            warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
            torch.onnx.export(
                adapter, adapter.flattened_inputs, tmp, dynamo=False, opset_version=ONNX_OPSET,
                input_names=["image"], output_names=names, dynamic_axes=dynamic,
            )
    except Exception as e:  # an op without an ONNX symbolic, or a failure while tracing
        raise UserError(
            f"{type(adapter.model).__name__} cannot be exported to ONNX (opset {ONNX_OPSET}): {_reason(e)}."
        ) from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Idle pool threads would otherwise spin after each run and take the cores from the eager
    # and TorchScript runs that `compare_latency` interleaves with it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda image: tuple(
        torch.from_numpy(v) for v in session.run(None, {"image": image.numpy()})
    )


def _instances(adapter: nn.Module, flat: Sequence[torch.Tensor]) -> Instances:
    return adapter.outputs_schema([*flat])[0]["instances"]


def compare(adapter: nn.Module, runner: Runner, images: Sequence[torch.Tensor]) -> Dict:
    """Largest absolute difference per output field between the eager model and `runner`.

    Returns {"max_abs_diff": {"boxes": d, "classes": d, "scores": d, ...}, "tolerance": {...},
    "images": n, "detections": n, "count_mismatches": [image indices], "run_errors": {image
    index: reason}, "ok": bool}. Images whose detection counts differ cannot be compared box by
    box, and images the export fails to run on (a size its graph does not generalise to) cannot
    be compared at all: both are listed, and fail.
    """
    diffs: Dict[str, float] = {}
    scales: Dict[str, float] = {}
    integer: Dict[str, bool] = {}
    mismatches, errors, detections = [], {}, 0
    with torch.no_grad():
        for i, image in enumerate(images):
            expected = _instances(adapter, adapter(image))
            try:
                got = _instances(adapter, runner(image))
            except Exception as e:  # the exported graph's own failure, reported as a result
                errors[i] = _reason(e)
                continue
            if len(expected) != len(got):
                mismatches.append(i)
                continue
            detections += len(expected)
            for field, want in expected.get_fields().items():
                have = got.get(field)
                want, have = (v.tensor if isinstance(v, Boxes) else v for v in (want, have))
                name = field[len("pred_"):] if field.startswith("pred_") else field
                integer[name] = not want.is_floating_point()
                if want.numel() == 0:
                    diffs.setdefault(name, 0.0)
                    continue
                diff = (want.double() - have.double()).abs().max().item()
                diffs[name] = max(diffs.get(name, 0.0), diff)
                scales[name] = max(scales.get(name, 0.0), want.double().abs().max().item())
    tolerance = {
        name: 0.0 if integer[name] else PARITY_RTOL * max(1.0, scales.get(name, 0.0)) for name in diffs
    }
    ok = not mismatches and not errors and all(diffs[name] <= tolerance[name] for name in diffs)
    return {
        "max_abs_diff": diffs,
        "tolerance": tolerance,
        "images": len(images),
        "detections": detections,
        "count_mismatches": mismatches,
        "run_errors": errors,
        "ok": ok,
    }


def compare_latency(
    runners: Dict[str, Callable],
    image: torch.Tensor,
    warmup: int = 3,
    repeats: int = 20,
    clock: str = "wall",
) -> Dict[str, float]:
    """Median milliseconds of each runner on `image` on `clock` (see `CLOCKS`), no gradients;
    the runners take turns call by call (`interleaved_latency`)."""
    figures = interleaved_latency(
        list(runners.values()), image, warmup=warmup, repeats=1, rounds=repeats, clock_name=clock
    )
    return {name: f["median_ms"] for name, f in zip(runners, figures)}


def export_model(
    cfg,
    formats: Sequence[str],
    output_dir: str,
    sample_image: Optional[str] = None,
    parity_images: int = 3,
    latency_repeats: int = 20,
    clock: str = "wall",
    fold: bool = True,
) -> Dict:
    """Export the detector of `cfg` (MODEL.WEIGHTS, pruned or not) to each of `formats`, check
    the exports against the eager model and time them; write `output_dir/export.json`.

    With `fold` (the default) the norms are folded into their convs first (`fuse.fold_norms`):
    the exported graphs then have no norm layers left to run, and the eager model they are
    checked against is the folded one (the same detections up to rounding).

    Every format is attempted; one that cannot be exported is recorded with its reason in
    `export.json`, and a `UserError` naming it is raised once the others are written.
    Latency is timed with torch's current number of threads (ONNX Runtime gets as many).
    """
    formats = check_formats(formats)
    if clock not in CLOCKS:
        raise UserError(f"--clock must be one of {', '.join(CLOCKS)}, got '{clock}'.")
    if clock == "cpu" and torch.get_num_threads() != 1:
        raise UserError(
            f"--clock cpu sums the CPU time of all {torch.get_num_threads()} threads, which is no "
            "latency: use it with --threads 1."
        )
    if parity_images < 0:
        raise UserError(f"--parity-images must be 0 or more, got {parity_images}.")
    if latency_repeats < 1:
        raise UserError(f"--latency-repeats must be a positive integer, got {latency_repeats}.")
    check_output_dir(output_dir)
    model = load_model(cfg)
    folded = len(folded_convs(model)) if fold else 0
    if fold:
        fold_norms(model)
    images, sources = export_images(cfg, sample_image, parity_images)
    adapter = build_adapter(model, images[0])
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    report = {
        "weights": cfg.MODEL.WEIGHTS,
        "architecture": type(model).__name__,
        "params": count_params(model),
        "folded_norms": folded,
        "input": {
            "name": "image",
            "layout": f"float32 (3, H, W), {cfg.INPUT.FORMAT}, 0-255, resized to the test size",
            "traced_size": list(images[0].shape[1:]),
        },
        "outputs": output_names(adapter),
        # R-CNN: boxes and 28x28 masks as the heads give them; others: postprocessed at scale 1.
        "do_postprocess": not isinstance(model, GeneralizedRCNN),
        "parity_images": [
            {"source": source, "size": list(image.shape[1:])} for source, image in zip(sources, images)
        ],
        "threads": torch.get_num_threads(),
        "clock": clock,
        "latency_repeats": latency_repeats,
        "eager": {"size_mb": round(state_bytes / MB, 3)},
        "formats": {},
    }
    exporters = {"torchscript": export_torchscript, "onnx": export_onnx}
    runners: Dict[str, Runner] = {"eager": adapter}
    failed = []
    for fmt in formats:
        path = os.path.join(output_dir, FILENAMES[fmt])
        logger.info("Exporting %s to %s", type(model).__name__, path)
        try:
            runners[fmt] = exporters[fmt](adapter, path)
        except UserError as e:
            report["formats"][fmt] = {"error": str(e)}
            failed.append(str(e))
            continue
        report["formats"][fmt] = {
            "file": FILENAMES[fmt],
            "size_mb": round(os.path.getsize(path) / MB, 3),
            "parity": compare(adapter, runners[fmt], images),
        }
        if fmt == "onnx":
            report["formats"][fmt]["opset"] = ONNX_OPSET
    logger.info("Timing %s on a %s image", ", ".join(runners), "x".join(map(str, images[0].shape[1:])))
    latency = compare_latency(runners, images[0], repeats=latency_repeats, clock=clock)
    report["eager"]["latency_ms"] = round(latency["eager"], 2)
    for fmt, entry in report["formats"].items():
        if fmt in latency:
            entry["latency_ms"] = round(latency[fmt], 2)
            entry["eager_latency_ms"] = round(latency["eager"], 2)
            entry["speedup"] = round(latency["eager"] / latency[fmt], 3)
    atomic_write_text(os.path.join(output_dir, "export.json"), json.dumps(report, indent=2) + "\n")
    if failed:
        raise UserError(f"{' '.join(failed)} The other formats and export.json are in {output_dir}.")
    return report


def parity_failures(report: Dict) -> List[str]:
    """One line per exported format whose outputs differ from the eager model's."""
    lines = []
    for entry in report["formats"].values():
        parity = entry.get("parity")
        if parity is None or parity["ok"]:
            continue
        if parity["run_errors"]:
            index, reason = next(iter(parity["run_errors"].items()))
            why = f"it fails on parity image {index} ({reason})"
        elif parity["count_mismatches"]:
            why = f"other detection counts on parity images {parity['count_mismatches']}"
        else:
            why = ", ".join(
                f"{name} by {diff:.3g} (allowed {parity['tolerance'][name]:.3g})"
                for name, diff in parity["max_abs_diff"].items()
                if diff > parity["tolerance"][name]
            )
        lines.append(f"{entry['file']} differs from the eager model: {why}.")
    return lines


def format_table(report: Dict) -> str:
    """The report as a text table: one row for the eager model, one per exported format."""

    def diff(entry: Dict, name: str) -> str:
        value = entry["parity"]["max_abs_diff"].get(name)
        return "-" if value is None else f"{value:.2g}"

    eager = report["eager"]
    rows = [["eager (state dict)", eager["size_mb"], "-", "-", "-", "-", "-", eager["latency_ms"], "1.00x"]]
    for fmt, entry in report["formats"].items():
        if "error" in entry:
            rows.append([fmt, "-", "-", "-", "-", "-", "failed", "-", "-"])
            continue
        parity = entry["parity"]
        rows.append([
            f"{fmt} ({entry['file']})", entry["size_mb"], diff(entry, "boxes"), diff(entry, "scores"),
            diff(entry, "classes"), parity["detections"], "ok" if parity["ok"] else "FAILED",
            entry["latency_ms"], f"{entry['speedup']:.2f}x",
        ])
    headers = ["model", "MB", "max |d| boxes", "scores", "classes", "detections", "parity",
               "CPU latency (ms)", "speed-up"]  # fmt: skip
    size = "x".join(map(str, report["input"]["traced_size"]))
    return (
        tabulate(rows, headers=headers)
        + f"\n{report['params'] / 1e6:.2f} M parameters; latency: median {report['clock']} time "
        f"of {report['latency_repeats']} runs on a {size} image, "
        f"{report['threads']} thread{'s' if report['threads'] != 1 else ''}."
    )
