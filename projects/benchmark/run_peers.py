"""What `tools/benchmark_peers.py` runs: d2prune beside Torch-Pruning and torch.nn.utils.prune,
printed and written as markdown with the setting it was measured in.
"""

import datetime
import sys

import torch
from detectron2.modeling import build_model
from tabulate import tabulate

from d2prune.config import setup_cfg
from d2prune.utils.io import atomic_write_text
from projects.benchmark.benchmark import (
    compare_with_torch_pruning,
    fixed_proposals,
    machine_description,
    masking_comparison,
    torch_pruning_limits,
)


def torch_pruning_table(results):
    rows = []
    for r in results:
        for tool in ("d2prune", "torch_pruning_first", "torch_pruning_mean"):
            t = r[tool]
            rows.append([
                r["part"], {"d2prune": "d2prune l1", "torch_pruning_first": "Torch-Pruning p=1, first",
                            "torch_pruning_mean": "Torch-Pruning p=1, mean"}[tool],
                f"{t['params'] / 1e6:.3f} (of {r['params_before'] / 1e6:.3f})",
                f"{t['flops'] / 1e9:.3f} (of {r['flops_before'] / 1e9:.3f})",
                f"{t['seconds']:.2f}" + (f" ({t['trace_s']:.2f} + {t['prune_s']:.2f})" if "trace_s" in t else ""),
                f"{t['same_keep']} / {r['groups']}" if "same_keep" in t else "",
                f"{t['kept_overlap']:.1%}" if "kept_overlap" in t else "",
                "" if "max_feature_difference" not in t else
                "-" if t["max_feature_difference"] is None else f"{t['max_feature_difference']:.1e}",
            ])  # fmt: skip
    headers = ["pruned", "tool, importance", "params (M)", "GFLOPs", "seconds (trace + prune)",
               "block groups with d2prune's keep set", "d2prune's kept channels kept",
               "max abs. feature difference"]  # fmt: skip
    return tabulate(rows, headers=headers, tablefmt="github")


def masking_table(r):
    sparsity = {"dense": "0.0%", "masked": f"{r['masked']['zero_share']:.1%} (masked to zero)",
                "d2prune": f"{r['d2prune']['removed_share']:.1%} (removed)"}
    labels = {"dense": "dense", "masked": "torch.nn.utils.prune masks", "d2prune": "d2prune removal"}
    rows = [
        [labels[k], f"{r[k]['params'] / 1e6:.3f}", sparsity[k], f"{r[k]['flops'] / 1e9:.3f}",
         f"{r[k]['latency_ms']:.0f}", f"{r[k]['latency_min_ms']:.0f}"]
        for k in labels
    ]  # fmt: skip
    headers = ["ResNet", "stored params (M)", "sparsity", "GFLOPs (fvcore)", "ms (median)", "ms (min)"]
    return tabulate(rows, headers=headers, tablefmt="github")


def limits_table(findings):
    rows = [[i + 1, f["attempt"], f["works"], f["outcome"].replace("|", "/")] for i, f in enumerate(findings)]
    return tabulate(rows, headers=["#", "attempt", "works", "what happened"], tablefmt="github")


def main(args):
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now()
    cfg = setup_cfg(args.config_file, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *args.opts])
    model = fixed_proposals(build_model(cfg).eval())

    results = []
    for detector in (False, True):
        results.append(compare_with_torch_pruning(model, args.ratio, args.side, detector=detector, clock=args.clock))
        print(torch_pruning_table(results[-1:]), flush=True)
    versus = torch_pruning_table(results)
    masking = masking_comparison(model, args.ratio, args.side, args.repeats, args.rounds, args.clock)
    masked = masking_table(masking)
    print(masked, flush=True)
    findings = torch_pruning_limits(model, args.probe_side)
    limits = limits_table(findings)
    print(limits, flush=True)
    if not args.output:
        return

    import torch_pruning

    text = [
        "# d2prune and its peers", "",
        f"Produced by: `python {' '.join(sys.argv)}` on {started:%Y-%m-%d}.", "",
        f"Machine: {machine_description()}; Torch-Pruning {torch_pruning.__version__}. The "
        "machine was shared with other jobs while this ran: absolute times are noisy; "
        "comparisons are made within one process, latencies interleaved. Times are "
        + ("CPU time of the process (with one torch thread: the work a call costs, whatever "
           "else runs)." if args.clock == "cpu" else "elapsed (wall-clock) time."), "",
        f"Model: `{args.config_file}` with random weights ({cfg.MODEL.RESNETS.NORM}, `FREEZE_AT` "
        f"{cfg.MODEL.BACKBONE.FREEZE_AT}), the RPN's objectness and box deltas zeroed and its NMS off "
        f"(`fixed_proposals`: the same {cfg.MODEL.RPN.POST_NMS_TOPK_TEST} anchors as proposals "
        f"before and after pruning, so the detector's FLOPs compare), on {args.side} x {args.side} images.", "",
        "## Torch-Pruning on the same block channels", "",
        f"Both remove {args.ratio:.0%} of every `block` group (inside each bottleneck: conv1's "
        "and conv2's outputs), group by group, lowest L1 filter norm first. d2prune: "
        "`find_groups`, `l1` (Li et al. 2017: sum of |W| of the producing filter), "
        "`select_channels(mode='local')` and `prune`. Torch-Pruning: `MetaPruner` with "
        "`GroupMagnitudeImportance(p=1)`, every conv but the block producers in "
        "`ignored_layers`; with `group_reduction='first'` (normalizer None) it scores the "
        "group's first layer, the producing conv: d2prune's l1. Its default reduction "
        "`'mean'` also adds the L1 norm of the consumer's input slice (conv2's or conv3's "
        "weights reading the channel) and so ranks differently. Two workarounds, which the "
        "table below shows to be needed, make it run: the traced input requires grad, and each "
        "detectron2 `Conv2d`'s own norm is sliced after Torch-Pruning cut the conv. The "
        "ResNet (`backbone.bottom_up`) is traced on an image tensor; the whole detector "
        "through its training losses. Seconds: d2prune from group discovery to the pruned "
        "model; Torch-Pruning building the dependency graph (trace) + importance, selection and "
        "surgery (prune). Max abs. feature difference: largest difference between the FPN "
        "features of the d2prune- and the Torch-Pruning-pruned detector on one image, when all "
        "keep sets agree.", "",
        versus, "",
        "## Masking with torch.nn.utils.prune", "",
        f"The same channels ({args.ratio:.0%} of every block group, l1): "
        "`ln_structured(n=1, dim=0)` on each producer picks the filters with the lowest L1 norm "
        f"(the channels d2prune removes: {'yes' if masking['same_channels'] else 'NO'}), and "
        "`custom_from_mask` applies that channel mask to the consumers' input weights, so the "
        "masked ResNet computes what the pruned one does (largest output difference "
        f"{masking['max_output_difference']:.1e}). The masks zero as many parameters as d2prune "
        "removes, but the tensors keep their shapes: fvcore counts the same FLOPs and the "
        "convolutions do the same work (plus applying the masks). Latency of the ResNet on one "
        f"image over {args.rounds} interleaved rounds of {args.repeats} runs: median and minimum "
        "(the steadier figure on a shared machine: other jobs only add time).", "",
        masked, "",
        "## What Torch-Pruning does with a Detectron2 detector as it is", "",
        f"Each attempt on a fresh copy of the model above, at {args.probe_side} px; the outcome "
        "is what the code printed or raised (long module reprs elided in the middle).", "",
        limits, "",
        "What this means in practice: Torch-Pruning can cut Detectron2's block groups once the "
        "input requires grad and the norms inside detectron2's `Conv2d` are sliced by hand "
        "(both in `projects.benchmark.benchmark.torch_pruning_blocks`), and then selects and "
        "removes exactly what d2prune does. Beyond blocks it needs the detector traced through "
        "its training losses (eval-mode outputs are `Instances`, and in eval mode the RPN does "
        "not reach the traced outputs), and it leaves the widths detectron2 caches stale "
        "(`backbone.output_shape()` still states the unpruned widths). Traced through the losses, its "
        "FPN output group is the output convs with every reader of the pyramid (RPN conv, box "
        "head fc1, whose C x 7 x 7 inputs follow), without the lateral convs; d2prune ties "
        "laterals and outputs into one `fpn` group. d2prune reads the coupling from "
        "Detectron2's module structure (`find_groups`) and slices weights, norms, cached widths "
        "and optimizer state in one surgery path.", "",
    ]  # fmt: skip
    atomic_write_text(args.output, "\n".join(text))
