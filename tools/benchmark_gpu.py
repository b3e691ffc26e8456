#!/usr/bin/env python
"""Whole-detector inference latency of a pruned R50-FPN Faster R-CNN on a GPU (random weights).

    python tools/benchmark_gpu.py --device cuda --side 800 --batches 1 8 --dtypes fp32 fp16 \
        --output benchmark_gpu.md --json benchmark_gpu.json
    python tools/benchmark_gpu.py --device cpu --side 256 --batches 1 --dtypes fp32 \
        --repeats 2 --warmup 1            # smoke test

Three variants of one detector (detectron2's R50-FPN defaults, 80 classes): unpruned; `block`
groups pruned (l1, global order) until the ResNet's FLOPs fall by --flops-reduction (block
pruning alone cannot remove half of the whole detector's FLOPs: at 800 px its limit, 90 % of
every block group, is about 31 %); every group kind (stem, block, stage, fpn, head) pruned the
same way until the whole detector's FLOPs fall by --flops-reduction (--block-target and
--all-target change what the share refers to); every kind pruned by a latency target of the same
share (PRUNE.LATENCY_REDUCTION, mode cost: score per ms saved, on a latency model timed on
--device in the first of --dtypes, widths snapped to the step measured there). FLOPs are counted on the CPU at --flops-side and
scaled to --side (see `flops_at_side`), so the selection stays cheap. The latency cut is set
against the whole detector's FLOPs cut in every row.

Every variant sees the same work outside its convolutions: the RPN's output layers are zeroed
and its NMS is off (`fixed_proposals`: each image sends the same --proposals anchors to the
box head in every variant), and the box predictor is zeroed (every class scores 1/81, below
the 0.05 test threshold: no detection survives, so post-processing costs the same, almost
nothing, in every variant). Latency is wall-clock time of one call on a batch, the device
synchronised before and after; warm-up calls are not timed and the variants take turns
(v1, v2, v3, v1, ...) so that clock and thermal drift hit all of them alike.
"""

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from tabulate import tabulate  # noqa: E402

from d2prune import criteria  # noqa: E402
from d2prune.complexity import (  # noqa: E402
    count_flops,
    count_params,
    dummy_inputs,
    dummy_tensor,
    interleaved_latency,
)
from d2prune.config import add_prune_config  # noqa: E402
from d2prune.engine.selection import build_latency_model, with_device_step  # noqa: E402
from d2prune.pruning import channel_spec, find_groups, prune  # noqa: E402
from d2prune.pruning.budget import Budget, select_for_cost, select_for_flops  # noqa: E402
from projects.benchmark.benchmark import fixed_proposals  # noqa: E402

ALL_KINDS = ["stem", "block", "stage", "fpn", "head"]
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
TARGETS = {"resnet": "ResNet", "backbone": "backbone", "detector": "detector"}


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--side", type=int, default=800, help="square input side, px")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="images per call")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "fp16"],
                        help="fp16/bf16 run under torch.autocast, weights stay fp32")
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=["nchw", "channels_last"],
                        help="memory format of the model's conv weights (activations follow)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per variant and setting")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per variant and setting")
    parser.add_argument("--variants", nargs="+", choices=["unpruned", "block", "all", "latency"],
                        default=["unpruned", "block", "all", "latency"])
    parser.add_argument("--flops-reduction", type=float, default=0.5,
                        help="share of the FLOPs (at --side) the pruned variants remove")
    parser.add_argument("--block-target", choices=list(TARGETS), default="resnet",
                        help="FLOPs that the block variant cuts: the ResNet (backbone.bottom_up), "
                             "the backbone (ResNet + FPN) or the whole detector")
    parser.add_argument("--all-target", choices=list(TARGETS), default="detector",
                        help="FLOPs that the all-kinds variant cuts")
    parser.add_argument("--flops-side", type=int, default=320,
                        help="side at which FLOPs are counted on the CPU (scaled to --side)")
    parser.add_argument("--proposals", type=int, default=1000, help="proposals per image (fixed)")
    parser.add_argument("--round-to", type=int, default=1, help="kept widths are multiples of this")
    parser.add_argument("--cudnn-benchmark", choices=["on", "off"], default="on")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", metavar="FILE.md", help="write the report as Markdown here")
    parser.add_argument("--json", metavar="FILE.json", help="write every figure as JSON here")
    return parser


def detector_cfg(args):
    """detectron2's R50-FPN Faster R-CNN defaults, built in code, on the CPU."""
    cfg = get_cfg()
    add_prune_config(cfg)
    m = cfg.MODEL
    m.DEVICE = "cpu"
    m.WEIGHTS = ""
    m.META_ARCHITECTURE = "GeneralizedRCNN"
    m.BACKBONE.NAME = "build_resnet_fpn_backbone"
    m.RESNETS.DEPTH = 50
    m.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    m.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    m.FPN.OUT_CHANNELS = 256
    m.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    m.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    m.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    m.RPN.PRE_NMS_TOPK_TEST = args.proposals
    m.RPN.POST_NMS_TOPK_TEST = args.proposals
    m.ROI_HEADS.NAME = "StandardROIHeads"
    m.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    m.ROI_HEADS.NUM_CLASSES = 80
    m.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    m.ROI_BOX_HEAD.NUM_FC = 2
    m.ROI_BOX_HEAD.FC_DIM = 1024
    m.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    m.MASK_ON = False
    cfg.INPUT.MIN_SIZE_TEST = args.side
    cfg.INPUT.MAX_SIZE_TEST = max(1333, args.side)
    cfg.PRUNE.CRITERION = "l1"
    cfg.PRUNE.MODE = "global"
    cfg.PRUNE.FLOPS_REDUCTION = args.flops_reduction
    cfg.PRUNE.ROUND_TO = args.round_to
    return cfg


def zero_box_predictor(model):
    """Every class scores 1/(K+1), below the test threshold, for every variant: no detection
    survives, so post-processing (per-class NMS) costs the same in every variant."""
    predictor = model.roi_heads.box_predictor
    with torch.no_grad():
        for layer in (predictor.cls_score, predictor.bbox_pred):
            layer.weight.zero_()
            layer.bias.zero_()
    return model


def flops_keep(cfg, model, groups, scores, kinds, *, measure, baseline):
    """Keep sets that cut `measure` by PRUNE.FLOPS_REDUCTION, l1 scores in the global order,
    under the config's PRUNE constraints (max_ratio, min_channels, round_to)."""
    p = cfg.PRUNE
    budget = Budget(
        target="flops", amount=p.FLOPS_REDUCTION, mode="global", kinds=tuple(kinds),
        max_ratio=p.MAX_RATIO, min_channels=p.MIN_CHANNELS, round_to=p.ROUND_TO,
    )  # fmt: skip
    return select_for_flops(model, groups, scores, budget, measure=measure, baseline=baseline)


def padded(side: int) -> int:
    return -(-side // 32) * 32  # FPN pads images to a multiple of 32


def flops_at_side(model, args, inputs):
    """FLOPs of one --side px image, counted at --flops-side on the CPU, by part: `detector`
    (and its parts `backbone`, `proposal_generator`, `roi_heads`) and `resnet`.

    Backbone and RPN are convolutions over the image, so their FLOPs scale with the (padded)
    area; the box head sees a fixed number of proposals per image whatever the side."""
    batch, image = inputs
    counted = count_flops(model, batch)
    scale = (padded(args.side) / padded(args.flops_side)) ** 2
    parts = {name: value * (scale if name in ("backbone", "proposal_generator") else 1.0)
             for name, value in counted.items() if name != "total"}
    other = counted["total"] - sum(counted[name] for name in parts)
    parts["detector"] = sum(parts.values()) + other
    parts["resnet"] = count_flops(model.backbone.bottom_up, image)["total"] * scale
    return parts


def target_flops(model, args, inputs, target):
    """The FLOPs that a variant's --flops-reduction refers to, at --side."""
    batch, image = inputs
    scale = (padded(args.side) / padded(args.flops_side)) ** 2
    if target == "resnet":
        return count_flops(model.backbone.bottom_up, image)["total"] * scale
    if target == "backbone":
        return count_flops(model.backbone, image)["total"] * scale
    return flops_at_side(model, args, inputs)["detector"]


def latency_keep(cfg, args, base, groups, scores, device, log):
    """Keep sets of every kind that cut the time predicted on `device` by --flops-reduction
    (mode cost), and the latency model's predictions before and after."""
    lat = cfg.clone()
    lat.defrost()
    lat.MODEL.DEVICE = device.type
    lat.PRUNE.FLOPS_REDUCTION = 0.0
    lat.PRUNE.LATENCY_REDUCTION = args.flops_reduction
    lat.PRUNE.MODE = "cost"
    lat.PRUNE.COST_WEIGHTING = "uniform"  # random weights: no training loss worth measuring
    lat.PRUNE.KINDS = ALL_KINDS
    lat.PRUNE.LATENCY_DTYPE = "float16" if args.dtypes[0] == "fp16" and device.type == "cuda" else "float32"
    lat.PRUNE.LATENCY_CACHE = os.path.join(os.path.dirname(os.path.abspath(args.output or "x")), "latency_cache")
    start = time.perf_counter()
    model = copy.deepcopy(base).to(device).eval()
    cost_model = build_latency_model(lat, model)
    budget = with_device_step(Budget.from_config(lat), cost_model)
    keep = select_for_cost(groups, scores, budget, cost_model)
    predicted = cost_model.predict({**channel_spec(base), **{n: len(k) for n, k in keep.items()}})
    log(f"latency model on {device} ({lat.PRUNE.LATENCY_DTYPE}) built and used in {time.perf_counter() - start:.1f} s: "
        f"{cost_model.fixed:.2f} ms fixed + {cost_model.scale:.2f} x tables, width step {cost_model.meta['step']}; "
        f"predicted {cost_model.predict(channel_spec(base)):.2f} -> {predicted:.2f} ms")
    del model
    return keep, {"predicted_before_ms": cost_model.predict(channel_spec(base)), "predicted_after_ms": predicted,
                  "width_step": cost_model.meta["step"], "latency_dtype": lat.PRUNE.LATENCY_DTYPE}


def build_variants(args, log, device=None):
    """{name: {"model", "kinds", "flops", "params", "channels_kept", ...}}, built on the CPU."""
    cfg = detector_cfg(args)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    base = build_model(cfg).eval()
    fixed_proposals(base)
    zero_box_predictor(base)
    log(f"built R50-FPN Faster R-CNN on the CPU in {time.perf_counter() - start:.1f} s")
    inputs = dummy_inputs(args.flops_side), dummy_tensor(padded(args.flops_side))

    start = time.perf_counter()
    base_flops = flops_at_side(base, args, inputs)
    log(f"counted the unpruned detector's FLOPs in {time.perf_counter() - start:.1f} s: "
        f"{base_flops['detector'] / 1e9:.1f} GFLOPs per {args.side} px image "
        f"(ResNet {base_flops['resnet'] / 1e9:.1f}, backbone {base_flops['backbone'] / 1e9:.1f}, "
        f"RPN {base_flops['proposal_generator'] / 1e9:.1f}, box head {base_flops['roi_heads'] / 1e9:.1f})")
    groups = find_groups(base)
    scores = criteria.build(cfg.PRUNE.CRITERION).score(base, groups)
    before = channel_spec(base)
    kinds_of = {g.name: g.kind for g in groups}
    variants = {}
    for name in args.variants:
        kinds = {"unpruned": [], "block": ["block"], "all": ALL_KINDS, "latency": ALL_KINDS}[name]
        target = {"unpruned": None, "block": args.block_target, "all": args.all_target, "latency": "latency"}[name]
        model, keep, seconds, extra = base, {}, 0.0, {}
        if name == "latency":
            start = time.perf_counter()
            keep, extra = latency_keep(cfg, args, base, groups, scores, device or torch.device("cpu"), log)
            model = copy.deepcopy(base)
            with torch.no_grad():
                prune(model, keep)
            seconds = time.perf_counter() - start
        elif kinds:
            start = time.perf_counter()
            keep = flops_keep(
                cfg, base, groups, scores, kinds, baseline=base_flops[target],
                measure=lambda m, t=target: target_flops(m, args, inputs, t),
            )
            model = copy.deepcopy(base)
            with torch.no_grad():
                prune(model, keep)
            seconds = time.perf_counter() - start
        flops = base_flops if model is base else flops_at_side(model, args, inputs)
        after = channel_spec(model)
        widths = {}
        for group, size in before.items():
            w = widths.setdefault(kinds_of.get(group, "?"), [0, 0])
            w[0] += size
            w[1] += after.get(group, size)
        label = {"unpruned": "unpruned", "block": "block", "all": "all kinds", "latency": "all kinds"}[name]
        if target == "latency":
            label += f" -{args.flops_reduction:.0%} latency"
        elif target:
            label += f" -{args.flops_reduction:.0%} {TARGETS[target]}"
        cuts = {part: 1 - flops[part] / base_flops[part] for part in ("detector", "resnet", "backbone")}
        variants[name] = {
            "label": label,
            "kinds": kinds,
            "target": target,
            "model": model,
            "groups_pruned": len(keep),
            "select_s": seconds,
            "flops": flops,
            "flops_cut": cuts["detector"],
            "flops_cuts": cuts,
            "params": count_params(model),
            "channels_kept": {k: f"{a}/{b}" for k, (b, a) in widths.items()},
            **extra,
        }
        v = variants[name]
        log(f"variant {label}: {len(keep)} groups pruned in {seconds:.1f} s, "
            f"{flops['detector'] / 1e9:.1f} GFLOPs/image, cut: detector {cuts['detector']:.1%}, "
            f"backbone {cuts['backbone']:.1%}, ResNet {cuts['resnet']:.1%}; "
            f"{v['params'] / 1e6:.1f} M params; channels kept {v['channels_kept']}")
    return variants


def batch_on(device, side, batch, seed):
    return [{**x, "image": x["image"].to(device)} for x in dummy_inputs(side, batch=batch, seed=seed)]


def time_setting(models, inputs, dtype, args):
    """Each model's latency on `inputs` (`interleaved_latency`: warm-up calls, then the models
    taking turns call by call) under autocast to `dtype`, and its number of detections."""
    device_type = inputs[0]["image"].device.type
    autocast = (
        torch.autocast(device_type, dtype=dtype) if dtype is not None
        else torch.autocast(device_type, enabled=False)
    )
    with torch.inference_mode(), autocast:
        detections = {name: sum(len(o["instances"]) for o in model(inputs)) for name, model in models.items()}
        figures = interleaved_latency(
            list(models.values()), inputs, warmup=args.warmup, repeats=1, rounds=args.repeats
        )
    return dict(zip(models, figures)), detections


def environment(args, device):
    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
    }
    try:
        import detectron2

        env["detectron2"] = f"{detectron2.__version__} ({os.path.dirname(detectron2.__file__)})"
    except Exception:  # noqa: BLE001
        pass
    return env


def markdown(args, env, variants, rows):
    lines = [
        "# Pruned R50-FPN Faster R-CNN: inference latency",
        "",
        f"Device: **{env['device_name']}** ({env['device']}); torch {env['torch']}, CUDA {env['cuda']}, "
        f"cuDNN {env['cudnn']}, cudnn.benchmark={env['cudnn_benchmark']}, {env['torch_threads']} CPU threads; "
        f"Python {env['python']}; detectron2 {env.get('detectron2', '?')}; {env['date']}.",
        "",
        f"Random weights, {args.side} x {args.side} px images, {args.proposals} fixed proposals per image "
        f"(RPN outputs zeroed, RPN NMS off), box predictor zeroed (no detection passes the test "
        f"threshold). Pruning: l1 scores, global order, until the FLOPs named in the variant fall by "
        f"{args.flops_reduction:.0%} at {args.side} px (counted on the CPU at {args.flops_side} px, backbone and "
        f"RPN scaled by area), max_ratio 0.9, min_channels 8, round_to {args.round_to}. fp16/bf16: torch.autocast. "
        f"Per setting the variants take turns, {args.warmup} untimed then {args.repeats} timed calls each; "
        "times are per call (one batch), device synchronised around each call.",
        "",
        "| variant | detector GFLOPs/img | detector FLOPs cut | backbone cut | ResNet cut | params (M) "
        "| channels kept (kind after/before) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for v in variants.values():
        kept = ", ".join(f"{k} {w}" for k, w in v["channels_kept"].items())
        c = v["flops_cuts"]
        lines.append(f"| {v['label']} | {v['flops']['detector'] / 1e9:.1f} | {c['detector']:.1%} | "
                     f"{c['backbone']:.1%} | {c['resnet']:.1%} | {v['params'] / 1e6:.1f} | {kept} |")
    lines += ["", "Latency cut = 1 - median / unpruned median of the same setting; ratio = latency cut / detector "
              "FLOPs cut (1.0: the FLOPs cut turned fully into time).", ""]
    headers = ["batch", "dtype", "format", "variant", "median ms", "p90 ms", "ms/img", "latency cut",
               "det. FLOPs cut", "ratio"]
    table = [[r["batch"], r["dtype"], r["format"], r["label"], f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}",
              f"{r['median_ms'] / r['batch']:.2f}",
              "" if r["latency_cut"] is None else f"{r['latency_cut']:.1%}",
              "" if not r["flops_cut"] else f"{r['flops_cut']:.1%}",
              "" if r["ratio"] is None else f"{r['ratio']:.2f}"] for r in rows]
    lines.append(tabulate(table, headers=headers, tablefmt="github"))
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = argument_parser().parse_args(argv)
    started = time.perf_counter()

    def log(text):
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
    for dtype in args.dtypes:
        if args.device == "cpu" and dtype == "fp16":
            log("note: fp16 autocast on the CPU is slow and only a smoke test")
    env = environment(args, device)
    log(f"{env['device_name']} | torch {env['torch']} | cudnn.benchmark={env['cudnn_benchmark']} | "
        f"detectron2 {env.get('detectron2', '?')}")

    variants = build_variants(args, log, device)
    # One copy per variant and memory format on the device; weights stay fp32 (autocast).
    on_device = {}
    for fmt in args.formats:
        for name, v in variants.items():
            on_device[fmt, name] = copy.deepcopy(v["model"]).to(device).to(memory_format=FORMATS[fmt]).eval()
    log(f"{len(on_device)} models on {device}")

    rows = []

    def write_reports():
        """Written after every setting, so that a run cut short keeps what it measured."""
        env["seconds"] = time.perf_counter() - started
        if device.type == "cuda":
            env["max_memory_allocated_MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
        report = markdown(args, env, variants, rows)
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                f.write(report)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            data = {
                "args": vars(args),
                "environment": env,
                "variants": {name: {k: v for k, v in var.items() if k != "model"} for name, var in variants.items()},
                "results": rows,
            }
            with open(args.json, "w") as f:
                json.dump(data, f, indent=1)
        return report

    for batch in args.batches:
        inputs = batch_on(device, args.side, batch, args.seed)
        for dtype in args.dtypes:
            for fmt in args.formats:
                models = {name: on_device[fmt, name] for name in variants}
                figures, detections = time_setting(models, inputs, DTYPES[dtype], args)
                base = figures["unpruned"]["median_ms"] if "unpruned" in figures else None
                for name, f in figures.items():
                    v = variants[name]
                    median = f["median_ms"]
                    cut = None if base is None or name == "unpruned" else 1 - median / base
                    row = {
                        "batch": batch, "dtype": dtype, "format": fmt, "variant": name, "label": v["label"],
                        "median_ms": median, "p90_ms": f["p90_ms"], "min_ms": f["min_ms"],
                        "latency_cut": cut, "flops_cut": v["flops_cut"],
                        "ratio": cut / v["flops_cut"] if cut is not None and v["flops_cut"] else None,
                        "detections": detections[name],
                    }
                    rows.append(row)
                    log(f"batch {batch} {dtype} {fmt:13s} {v['label']:24s} median {median:8.2f} ms  "
                        f"p90 {row['p90_ms']:8.2f} ms  " + ("" if cut is None else f"latency cut {cut:6.1%}  "
                        f"FLOPs cut {v['flops_cut']:6.1%}  ratio {row['ratio']:.2f}"))
                write_reports()
    report = write_reports()
    print()
    print(report, flush=True)
    log(f"done in {env['seconds']:.0f} s")


if __name__ == "__main__":
    main()
