"""What `tools/benchmark.py` runs: each section measured, printed, and written as markdown with
the setting it was measured in.
"""

import datetime
import json
import os
import sys
from typing import List

import torch
from detectron2.modeling import build_model
from tabulate import tabulate

from d2prune import criteria
from d2prune.config import setup_cfg
from d2prune.utils.io import atomic_write_text
from projects.benchmark.benchmark import (
    fix_mmap_threshold,
    fixed_proposals,
    machine_description,
    pruning_event_memory,
    random_batches,
    scoring_overhead,
    speedup,
    surgery_seconds,
)

SECTIONS = ("speedup", "surgery", "scoring", "memory", "detector")
DEFAULT_SECTIONS = ("speedup", "surgery", "scoring", "memory")  # "detector" trains: asked for by name


def speedup_section(args, model):
    rows = speedup(
        model, args.side, args.levels, target=args.target, round_to=args.round_to,
        repeats=args.repeats, rounds=args.rounds, clock=args.clock,
    )  # fmt: skip
    tables = []
    for part, label in (("backbone", "ResNet"), ("detector", "detector")):
        table = []
        for row in rows:
            line = [
                f"{row['level']:.0%}", f"{row[f'{part}_flops'] / 1e9:.2f}",
                f"{row[f'{part}_params'] / 1e6:.1f}",
                f"{row[f'{part}_latency_ms']:.0f} / {row[f'{part}_latency_min_ms']:.0f}",
            ]
            if row["level"]:
                line += [
                    f"{row[f'{part}_flops_cut']:.1%}",
                    f"{row[f'{part}_latency_cut']:.1%} / {row[f'{part}_latency_cut_min']:.1%}",
                    f"{row[f'{part}_latency_over_flops']:.2f} / {row[f'{part}_latency_over_flops_min']:.2f}",
                ]
            table.append(line)
        level = "block channels removed" if args.target == "channels" else "ResNet FLOPs target"
        headers = [level, f"{label} GFLOPs", "params (M)", "ms (median / min)", "FLOPs cut",
                   "latency cut (median / min)", "latency cut / FLOPs cut (median / min)"]
        tables.append(f"{label}:\n\n" + tabulate(table, headers=headers, tablefmt="github"))
    base = rows[0]
    share = base["backbone_latency_min_ms"] / base["detector_latency_min_ms"]
    return "\n\n".join(tables), share


def surgery_section(args, model):
    r = surgery_seconds(model, clock=args.clock)
    return (
        f"Surgery (`prune`, group discovery included) removing half of every block group "
        f"({r['groups_pruned']} groups): {r['median_s'] * 1000:.0f} ms (median of {r['repeats']})."
    )


def scoring_section(args, cfg, model, batches):
    names = args.criteria or criteria.available()
    r = scoring_overhead(
        cfg, model, names, batches, event_batches=cfg.PRUNE.SCORE_BATCHES, clock=args.clock
    )
    table = [["training iteration", "targets", f"{r['iteration_s']:.3f}", "", "", "1.00"]]
    for row in r["criteria"]:
        if "error" in row:
            table.append([row["criterion"], row.get("data", ""), "", "", "", row["error"]])
        else:
            table.append([
                row["criterion"], row["data"], f"{row['collect_s']:.3f}" if row["data"] != "none" else "-",
                f"{row['score_s']:.3f}", f"{row['event_s']:.3f}", f"{row['iterations']:.2f}",
            ])  # fmt: skip
    headers = ["criterion", "data", "collect s / batch", "score s", f"event s ({r['event_batches']} batches)",
               "event in training iterations"]  # fmt: skip
    text = tabulate(table, headers=headers, tablefmt="github")
    return text, [row for row in r["criteria"] if "error" in row]


def memory_section(args, cfg, model, batches):
    table = []
    method = ""
    for name in args.memory_criteria:
        r = pruning_event_memory(cfg, model, criteria.build(name), batches, ratio=args.memory_ratio)
        method = r["event"]["method"]
        table.append([
            name, r["groups_pruned"], f"{r['train']['extra_mib']:.0f}", f"{r['event']['extra_mib']:.0f}",
            f"{r['event']['before_mib']:.0f}", f"{r['params_mib_after']:.1f}",
        ])  # fmt: skip
    headers = ["criterion", "groups cut", "training iteration: peak MiB above start",
               "pruning event: peak MiB above start", "RSS before event (MiB)", "params after (MiB)"]
    return tabulate(table, headers=headers, tablefmt="github"), method


def detector_part(args) -> List[str]:
    """The whole-detector section: rows, table, plot and the setting in words."""
    from projects.benchmark.detector import ARMS, detector_rows, detector_table, plot_ap_vs_latency

    if args.detector_rows:  # render what an earlier run measured (it writes rows.json as it goes)
        with open(args.detector_rows, encoding="utf-8") as f:
            saved = json.load(f)
        rows, unreachable = saved["rows"], saved["unreachable"]
    else:
        rows, unreachable = detector_rows(
            args.detector_config, args.detector_weights, args.latency_dataset, args.levels,
            arms=args.detector_arms or tuple(ARMS), criterion=args.detector_criterion,
            finetune_iters=args.finetune_iters, images=args.images, rounds=args.rounds, repeats=args.repeats,
            output_dir=args.detector_output, progress=lambda text: print(text, flush=True),
            opts=["SOLVER.BASE_LR", str(args.finetune_lr)] if args.finetune_lr else [],
        )  # fmt: skip
    evaluated = sum("oneshot_bbox_AP" in r for r in rows)
    tuned = sum("finetuned_bbox_AP" in r for r in rows)
    missing = (
        f" Of the {len(rows)} models, {evaluated} were evaluated one-shot and {tuned} fine-tuned "
        "before the run was stopped; the others show –." if tuned < len(rows) else ""
    )
    text = detector_table(rows)
    print(text, flush=True)
    plot = plot_ap_vs_latency(rows, os.path.splitext(args.output or "benchmark_detector.md")[0] + ".png")
    shown = dict.fromkeys(r["arm"] for r in rows[1:]) or ARMS
    arms = "; ".join(
        f"**{a}**: kinds {', '.join(k)}, {t.replace('_', ' ').lower()} target, mode {m}"
        + (f", groups weighed by {w}" if w != "uniform" else "")
        for a, (k, t, m, w) in ARMS.items() if a in shown
    )  # fmt: skip
    lr = f"at base LR {args.finetune_lr:g}" if args.finetune_lr else "at the config's learning rate"
    return [
        "## The whole detector: block-only against every kind, by FLOPs and by latency", "",
        f"`{args.detector_config}` with `{args.detector_weights}` (the trained shipped model), pruned "
        f"one-shot by `{args.detector_criterion}` at targets of {', '.join(f'{x:.0%}' for x in args.levels)}. "
        f"Arms: {arms}. The latency arm's target is the one-thread time predicted by the latency "
        "model built on this machine (`PRUNE.LATENCY_REDUCTION`). FLOPs: fvcore's count, mean over "
        f"3 images; time: ms per image over the first {args.images} images of `{args.latency_dataset}` "
        f"(real images, real proposals), minimum over {args.rounds} interleaved rounds of "
        f"{args.repeats} passes, one torch thread as CPU time and all threads as elapsed time. "
        f"AP: bbox AP on the config's DATASETS.TEST, as pruned and after {args.finetune_iters} "
        f"iterations of fine-tuning on its DATASETS.TRAIN {lr}. "
        "Every model is timed as deployed on the CPU: `d2prune.fuse.prepare_for_inference` (norms "
        "folded into the convs, channels-last). "
        "Cut ratio: latency cut / FLOPs cut (1.0: every FLOP removed is time saved)." + missing, "",
        text, "", *(["Not reachable:", "", *[f"- {u}" for u in unreachable], ""] if unreachable else []),
        f"![AP against one-thread latency]({os.path.basename(plot)})", "",
    ]


def main(args):
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = "elapsed time" if args.clock == "wall" else "CPU time of the process"
    parts, failed = [], []
    started = datetime.datetime.now()
    if {"speedup", "surgery"} & set(args.sections):
        cfg = setup_cfg(args.speedup_config, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
        model = fixed_proposals(build_model(cfg).eval())
        if "speedup" in args.sections:
            text, share = speedup_section(args, model)
            print(text, flush=True)
            what = "share of every block group's channels removed (l1, local)" if args.target == "channels" \
                else "FLOPs cut of the ResNet targeted (l1, global order)"
            parts += [
                "## Realised speed-up per FLOPs cut", "",
                f"`{args.speedup_config}` (random weights), one {args.side} x {args.side} image. "
                f"Levels: {what}, round_to={args.round_to}. ResNet = `backbone.bottom_up`, where block "
                "groups live; detector = the whole model at inference (FPN, RPN, and "
                f"{cfg.MODEL.RPN.POST_NMS_TOPK_TEST} proposals through the box head: the RPN's "
                "objectness and box deltas zeroed and its NMS off, see `fixed_proposals`, so that "
                "every model sends the same anchors), whose FLOPs block pruning does not touch "
                "outside the ResNet. Latency (ms): "
                f"{clock} per image, median over {args.rounds} interleaved rounds of {args.repeats} runs each. "
                "Minima are the steadier figure on a shared machine (other jobs only add time). "
                "Latency cut / FLOPs cut of 1.0: the FLOPs cut turned fully into time.",
                "", text, "",
                f"The unpruned ResNet takes {share:.0%} of the detector's time here (minima); the "
                "rest (FPN, RPN, ROIAlign and the box head on every proposal, and ROIAlign has no "
                "FLOPs in fvcore's count) block pruning does not touch, so the detector's latency "
                "cut is roughly that share of the ResNet's.", "",
            ]
        if "surgery" in args.sections:
            text = surgery_section(args, model)
            print(text, flush=True)
            parts += ["## Surgery time", "", text, ""]
    if "detector" in args.sections:
        parts += detector_part(args)
    if {"scoring", "memory"} & set(args.sections):
        opts = ["INPUT.MIN_SIZE_TRAIN", f"({args.size},)", "INPUT.MAX_SIZE_TRAIN", str(args.size)]
        cfg = setup_cfg(args.config_file, opts + list(args.opts))
        model = build_model(cfg)
        batches = random_batches(args.batches, args.batch_size, args.size, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        setting = (
            f"`{args.config_file}` (random weights) on {args.batches} random batches of "
            f"{args.batch_size} images of {args.size} px with three boxes each, {cfg.MODEL.DEVICE}"
        )
        if "scoring" in args.sections:
            text, failed = scoring_section(args, cfg, model, batches)
            print(text, flush=True)
            parts += [
                "## Scoring overhead per criterion", "",
                f"{setting}; {clock}. A training iteration is forward, backward and SGD step on one "
                "batch. collect: statistics through the detector (data-driven criteria; gradients "
                "for those that need targets), per batch; score: turning statistics or weights "
                "into scores, once per event; event: PRUNE.SCORE_BATCHES batches of collection "
                "plus one scoring, what a pruning event spends on choosing channels, also counted "
                "in training iterations.",
                "", text, "",
            ]
        if "memory" in args.sections:
            # Only now: with the threshold fixed every feature map is freshly mapped and
            # page-faulted on each call, which doubles the time of the sections above.
            fixed_mmap = fix_mmap_threshold()
            text, method = memory_section(args, cfg, model, batches)
            print(text, flush=True)
            parts += [
                "## Peak memory of a pruning event", "",
                f"{setting}. A pruning event as `PruningHook` runs it: statistics (data-driven "
                f"criteria, on the {args.batches} batches), scores, the budget "
                f"({args.memory_ratio:.0%} of every block group), the optimizer momentum sliced to "
                "the kept channels (one pruned deep copy of the model per state tensor kind), the "
                "surgery and a new optimizer. Peak resident set size (RSS) of the process above "
                f"its RSS just before, measured as {method} (Linux: `/proc/self/status` after "
                "`echo 5 > /proc/self/clear_refs` resets the high-water mark; freed C-allocator "
                "memory is returned with malloc_trim first). "
                + ("Every allocation of 64 KiB or more is its own mmap (glibc's mmap threshold "
                   "fixed before this section, after the timed ones, which it would slow down), so "
                   "freed tensors leave RSS and the sections measured before do not hide this "
                   "one's peak. " if fixed_mmap else
                   "The mmap threshold could not be fixed (not glibc): the peak depends on what "
                   "the sections measured before left in the heap, higher or lower. ")
                + "tracemalloc is not used: it does not see torch's tensor allocations.",
                "", text, "",
            ]
    if args.output:
        header = [
            "# d2prune benchmark", "",
            f"Produced by: `python {' '.join(sys.argv)}` on {started:%Y-%m-%d}.", "",
            f"Machine: {machine_description()}. The machine was shared with other jobs while "
            "this ran, so absolute times are noisy; ratios compare runs made within one "
            "process, interleaved. "
            + ("Times: one thread as CPU time of the process, all threads as elapsed time (the "
               "section says which column is which)." if set(args.sections) == {"detector"} else
               "Times are CPU time of the process: with one torch thread, the work a call costs "
               "whatever else runs (on an idle machine, its one-thread latency)."
               if args.clock == "cpu" else "Times are elapsed (wall-clock) time."), "",
        ]  # fmt: skip
        footer = ["Why a latency cut trails its FLOPs cut, profiled op by op, and the R50-FPN detector at "
                  "800 px: [latency.md](latency.md).", ""]
        atomic_write_text(args.output, "\n".join(header + parts + footer))
    if failed:
        print(f"{len(failed)} criteria failed: {', '.join(r['criterion'] for r in failed)}", file=sys.stderr)
        sys.exit(1)
