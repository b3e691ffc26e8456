"""Whole-detector pruning, measured: block-only against every kind, by FLOPs and by a latency
target, on a trained detector and real images (`tools/benchmark.py --sections detector`).

For each arm and level the trained model is pruned one-shot (l1 by default), its FLOPs counted
and its time measured on real images (one thread, CPU time; all threads, elapsed time; the
unpruned and every pruned model interleaved in one loop), its AP evaluated as pruned and after a
short fine-tune.
"""

import copy
import logging
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from detectron2.data import DatasetCatalog, detection_utils
from detectron2.data import transforms as T

from d2prune.complexity import count_flops, count_params, interleaved_latency
from d2prune.config import setup_cfg
from d2prune.data import register_datasets
from d2prune.engine import PrunedCheckpointer
from d2prune.engine.checkpoint import load_model
from d2prune.engine.oneshot import evaluate, finetune, scoring_batches
from d2prune.engine.selection import build_criterion, build_latency_model, choose_keep
from d2prune.errors import UserError
from d2prune.fuse import prepare_for_inference
from d2prune.pruning import channel_spec, prune
from d2prune.utils.io import write_json

__all__ = [
    "ALL_KINDS", "ARMS", "arm_options", "real_images", "time_deployed", "detector_rows", "detector_table",
    "plot_ap_vs_latency",
]  # fmt: skip

logger = logging.getLogger(__name__)

ALL_KINDS = ("stem", "block", "stage", "fpn", "head")

# Arm -> (PRUNE.KINDS, target key, PRUNE.MODE, PRUNE.COST_WEIGHTING).
ARMS = {
    "block, FLOPs": (("block",), "FLOPS_REDUCTION", "global", "uniform"),
    "all kinds, FLOPs": (ALL_KINDS, "FLOPS_REDUCTION", "global", "uniform"),
    "all kinds, FLOPs, cost-aware": (ALL_KINDS, "FLOPS_REDUCTION", "cost", "uniform"),
    "all kinds, latency, cost-aware": (ALL_KINDS, "LATENCY_REDUCTION", "cost", "uniform"),
    "all kinds, FLOPs, cost-aware, sensitivity": (ALL_KINDS, "FLOPS_REDUCTION", "cost", "sensitivity"),
    "all kinds, latency, cost-aware, sensitivity": (ALL_KINDS, "LATENCY_REDUCTION", "cost", "sensitivity"),
}


def arm_options(arm: str, level: float) -> List[str]:
    """The PRUNE overrides of one arm at one level."""
    kinds, key, mode, weighting = ARMS[arm]
    return ["PRUNE.KINDS", repr(list(kinds)), f"PRUNE.{key}", str(level), "PRUNE.MODE", mode,
            "PRUNE.COST_WEIGHTING", weighting]  # fmt: skip


def real_images(cfg, dataset: str, count: int) -> List[dict]:
    """The first `count` images of `dataset` as the detector's test-time inputs (resized as
    detectron2's test loader does)."""
    dicts = DatasetCatalog.get(dataset)[:count]
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    inputs = []
    for d in dicts:
        image = detection_utils.read_image(d["file_name"], format=cfg.INPUT.FORMAT)
        resized = resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.transpose(2, 0, 1).copy())
        inputs.append({"image": tensor, "height": d["height"], "width": d["width"]})
    return inputs


def _per_image(model) -> Callable:
    def run(images):
        for x in images:
            model([x])

    return run


def time_deployed(
    models: Sequence[torch.nn.Module], images: List[dict], *, rounds: int = 3, repeats: int = 2, prepared: bool = True,
    threads: int = 1, clock: str = "cpu",
) -> List[Dict[str, float]]:
    """ms per image of each model as deployed: one image per call, on `threads` torch threads
    timed by `clock` (default one thread, CPU time of the process), every model taking turns in
    each of `rounds` rounds of `repeats` passes (`interleaved_latency`); "median_ms" and
    "min_ms" per model. With `prepared`, each is timed as a deep copy made ready by
    `d2prune.fuse.prepare_for_inference` (norms folded, channels-last), as `d2prune.Predictor`
    runs it. Torch's thread count is restored after."""
    before = torch.get_num_threads()
    timed = [prepare_for_inference(copy.deepcopy(m).eval()) for m in models] if prepared else list(models)
    torch.set_num_threads(threads)
    try:
        times = interleaved_latency([_per_image(m) for m in timed], images, warmup=1, repeats=repeats,
                                    rounds=rounds, clock_name=clock)  # fmt: skip
    finally:
        torch.set_num_threads(before)
    return [{"median_ms": t["median_ms"] / len(images), "min_ms": t["min_ms"] / len(images)} for t in times]


def _latencies(models: Sequence[torch.nn.Module], images: List[dict], rounds: int, repeats: int) -> Dict[str, List[float]]:
    """ms per image of each model (already prepared as wanted): one torch thread (CPU time) and
    all threads (elapsed), minima over interleaved rounds (other jobs on a shared machine only
    add time)."""
    threads = torch.get_num_threads()
    return {
        label: [t["min_ms"] for t in time_deployed(models, images, rounds=rounds, repeats=repeats, prepared=False,
                                                   threads=n, clock=clock)]
        for label, n, clock in (("1 thread", 1, "cpu"), (f"{threads} threads", threads, "wall"))
    }  # fmt: skip


def detector_rows(
    config_file: str,
    weights: str,
    latency_dataset: str,
    levels: Sequence[float],
    *,
    arms: Sequence[str] = tuple(ARMS),
    criterion: str = "l1",
    finetune_iters: int = 100,
    images: int = 8,
    rounds: int = 3,
    repeats: int = 2,
    output_dir: str = "output/benchmark_detector",
    opts: Sequence[str] = (),
    inference: bool = True,
    progress: Optional[Callable[[str], None]] = None,
) -> List[Dict]:
    """One row per model (the unpruned one first): arm, level, parameters, FLOPs (mean over the
    latency images), ms per image with one thread and with all, their cuts and the cuts' ratio
    to the FLOPs cut, AP as pruned and after `finetune_iters` iterations on the config's
    DATASETS.TRAIN (AP on its DATASETS.TEST); and the arms and levels that the budget could not
    reach, with the reason. With `inference`, every model is timed as deployed:
    `d2prune.fuse.prepare_for_inference` (norms folded into the convs, channels-last on the
    CPU), and the latency arm's model is built on such a copy."""
    say = progress or logger.info
    base_opts = ["MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu", "PRUNE.CRITERION", criterion, *opts]
    cfg = setup_cfg(config_file, base_opts)
    register_datasets(cfg)
    model = load_model(cfg, weights).eval()
    inputs = real_images(cfg, latency_dataset, images)
    counted = inputs[: min(3, len(inputs))]

    def flops(m) -> float:
        return sum(count_flops(m, [x])["total"] for x in counted) / len(counted)

    unreachable: List[str] = []
    rows = [{"arm": "unpruned", "level": 0.0, "params": count_params(model), "flops": flops(model),
             "spec": channel_spec(model)}]  # fmt: skip
    models = [model]
    say(f"unpruned: {rows[0]['flops'] / 1e9:.2f} GFLOPs")
    for arm in arms:
        for level in levels:
            arm_cfg = setup_cfg(config_file, base_opts + arm_options(arm, level))
            pruned = copy.deepcopy(model)
            cost_model = None
            if ARMS[arm][1] == "LATENCY_REDUCTION":
                threads = torch.get_num_threads()
                torch.set_num_threads(1)  # the latency target is the one-thread time
                try:
                    timed = prepare_for_inference(copy.deepcopy(model)) if inference else pruned
                    cost_model = build_latency_model(arm_cfg, timed)
                finally:
                    torch.set_num_threads(threads)
            try:
                criterion = build_criterion(arm_cfg)
                batches = scoring_batches(arm_cfg, criterion)  # data criteria and sensitivity weighting
                keep = choose_keep(arm_cfg, pruned, criterion, batches, cost_model=cost_model)
            except UserError as e:  # e.g. block pruning alone cannot remove that much
                unreachable.append(f"{arm} at {level:.0%}: {e}")
                say(unreachable[-1])
                continue
            prune(pruned, keep)
            row = {"arm": arm, "level": level, "params": count_params(pruned), "flops": flops(pruned),
                   "spec": channel_spec(pruned)}  # fmt: skip
            if cost_model is not None:
                row["predicted_ms"] = cost_model.predict(row["spec"])
                row["predicted_unpruned_ms"] = cost_model.predict(rows[0]["spec"])
            rows.append(row)
            models.append(pruned)
            say(f"{arm} {level:.0%}: {row['flops'] / 1e9:.2f} GFLOPs")
    say("timing every model, interleaved")
    timed = [prepare_for_inference(copy.deepcopy(m)) for m in models] if inference else models
    for label, times in _latencies(timed, inputs, rounds, repeats).items():
        for row, ms in zip(rows, times):
            row[f"ms {label}"] = ms
    base = rows[0]
    for row in rows[1:]:
        row["flops_cut"] = 1 - row["flops"] / base["flops"]
        for key in [k for k in row if k.startswith("ms ")]:
            cut = 1 - row[key] / base[key]
            row[f"cut {key[3:]}"] = cut
            row[f"ratio {key[3:]}"] = cut / row["flops_cut"] if row["flops_cut"] > 0 else float("nan")
    names = ["unpruned" if r["arm"] == "unpruned" else f"{r['arm']}_{r['level']:g}".replace(", ", "_").replace(" ", "-") for r in rows]
    # All one-shot evaluations first, then the fine-tunes: a run cut short keeps whole columns.
    for row, m, name in zip(rows, models, names):
        say(f"evaluating {name}")
        row.update({f"oneshot_{k}": v for k, v in evaluate(cfg, m, os.path.join(output_dir, name, "eval")).items()})
        write_json(os.path.join(output_dir, "rows.json"), {"rows": rows, "unreachable": unreachable})
    for row, m, name in zip(rows, models, names):
        if finetune_iters <= 0:
            break
        folder = os.path.join(output_dir, name)
        say(f"fine-tuning {name} for {finetune_iters} iterations")
        checkpointer = PrunedCheckpointer(m, save_dir=folder)
        checkpointer.unpruned_spec = base["spec"]
        checkpointer.save("model_pruned")
        tuned = finetune(cfg, os.path.join(folder, "model_pruned.pth"), folder, finetune_iters,
                         dict.fromkeys(("params", "flops", "backbone_flops", "latency_ms", "backbone_latency_ms")))  # fmt: skip
        row.update({f"finetuned_{k}": v for k, v in tuned.items() if k.startswith("bbox_")})
        write_json(os.path.join(output_dir, "rows.json"), {"rows": rows, "unreachable": unreachable})
    return rows, unreachable


def _ap(value) -> str:
    return "–" if value is None or value != value else f"{value:.1f}"


def _pct(value) -> str:
    return "–" if value is None or value != value else f"{value:.1%}"


def detector_table(rows: Sequence[Mapping]) -> str:
    """The rows as a markdown table."""
    from tabulate import tabulate

    thread_labels = [k[3:] for k in rows[0] if k.startswith("ms ")]
    table = []
    for r in rows:
        line = [r["arm"], f"{r['level']:.0%}" if r["level"] else "–", f"{r['params'] / 1e6:.2f}",
                f"{r['flops'] / 1e9:.3f}", _pct(r.get("flops_cut"))]  # fmt: skip
        for label in thread_labels:
            line += [f"{r['ms ' + label]:.1f}", _pct(r.get("cut " + label)),
                     "–" if "ratio " + label not in r else f"{r['ratio ' + label]:.2f}"]  # fmt: skip
        line += [_ap(r.get("oneshot_bbox_AP")), _ap(r.get("finetuned_bbox_AP"))]
        table.append(line)
    headers = ["arm", "target", "params (M)", "GFLOPs", "FLOPs cut"]
    for label in thread_labels:
        headers += [f"ms ({label})", f"latency cut ({label})", f"cut ratio ({label})"]
    headers += ["AP one-shot", "AP fine-tuned"]
    return tabulate(table, headers=headers, tablefmt="github")


def plot_ap_vs_latency(rows: Sequence[Mapping], path: str, label: Optional[str] = None) -> str:
    """AP after the fine-tune (one-shot unless every model was fine-tuned) against one-thread ms
    per image, one line per arm, the unpruned model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = label or next(k[3:] for k in rows[0] if k.startswith("ms "))
    ap = "finetuned_bbox_AP" if all("finetuned_bbox_AP" in r for r in rows) else "oneshot_bbox_AP"
    if not any(ap in r for r in rows):  # nothing evaluated yet: FLOPs against time instead
        ap = "flops"
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    base = rows[0]
    for arm in dict.fromkeys(r["arm"] for r in rows[1:]):
        points = sorted((r[f"ms {label}"], r[ap]) for r in rows if r["arm"] == arm and ap in r)
        if points:
            ax.plot(*zip(*points), marker="o", label=arm)
    if ap in base:
        ax.scatter([base[f"ms {label}"]], [base[ap]], marker="*", s=160, color="black", label="unpruned", zorder=3)
    ax.set_xlabel(f"ms per image ({label})")
    ax.set_ylabel({"finetuned_bbox_AP": "bbox AP after fine-tuning", "oneshot_bbox_AP": "bbox AP (one-shot)"}.get(ap, "FLOPs"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
