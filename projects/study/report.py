"""The transfer study's results turned into an answer: mean and spread over seeds, paired
comparisons with the unpruned baseline, latency per architecture, a markdown table and plots.
"""

import json
import math
import statistics
from collections import Counter, defaultdict
from typing import Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "summarize", "answer", "coverage", "markdown_table", "delta_table", "versus", "plot_delta", "plot_ap_vs_flops",
    "plot_ap_vs_train_size", "spec_key", "write_csv", "paired_t_test", "is_baseline", "arm_label",
    "paired_differences", "mean_curve", "curve_verdict", "overfitting_lines", "regime_table", "regime_section",
    "plot_curves", "plot_ap_vs_latency",
]


def spec_key(spec: Mapping[str, int]) -> str:
    """A stable key of an architecture (its channel spec)."""
    return json.dumps(dict(sorted(spec.items())))


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    values = list(values)
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else float("nan")


def paired_t_test(differences: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test that the mean difference is zero (nan below two
    pairs). With 3 seeds it has 2 degrees of freedom: only large, consistent effects reach p < 0.05."""
    n = len(differences)
    if n < 2:
        return float("nan")
    mean, std = _mean_std(differences)
    if std == 0:
        return 0.0 if mean != 0 else 1.0
    from scipy import stats

    t = mean / (std / math.sqrt(n))
    return float(2 * stats.t.sf(abs(t), df=n - 1))


def is_baseline(r: Mapping) -> bool:
    """Whether a result or row is the unpruned fine-tune that the other arms are compared with
    (not an unpruned arm with a frozen backbone)."""
    return r["criterion"] is None and r.get("freeze_at") is None


def arm_label(r: Mapping) -> str:
    """What a result or row is, in words: `unpruned`, `unpruned, FREEZE_AT 3`, `l1 ratio 0.5`,
    `l1 FLOPs -50 %`, `l1 latency -50 %`."""
    if r["criterion"] is None:
        return "unpruned" if r.get("freeze_at") is None else f"unpruned, FREEZE_AT {r['freeze_at']}"
    target = r.get("target", "channels")
    if target == "channels":
        return f"{criterion_label(r)} ratio {r['ratio']:g}"
    return f"{criterion_label(r)} {'FLOPs' if target == 'flops' else 'latency'} -{100 * r['ratio']:.0f} %"


def criterion_label(r: Mapping) -> str:
    """A pruned arm's criterion, with the cost weighting when it is not the uniform one:
    `l1`, `l1 (sensitivity)`."""
    weighting = r.get("weighting", "uniform")
    return r["criterion"] if weighting == "uniform" else f"{r['criterion']} ({weighting})"


def _arm_key(r: Mapping) -> Tuple:
    return (r["train_size"], r["criterion"], r.get("target", "channels"), r["ratio"], r.get("freeze_at"),
            r.get("weighting", "uniform"))  # fmt: skip


def _arm_order(r: Mapping) -> Tuple:
    kind = 0 if is_baseline(r) else 1 if r["criterion"] is None else 2
    return (r["train_size"], kind, r.get("freeze_at") or 0, r.get("target", "channels"), r["ratio"],
            r["criterion"] or "", r.get("weighting", "uniform"))  # fmt: skip


def _mean_latency(runs: Sequence[Mapping], latency: Optional[Callable[[Mapping], Optional[float]]]) -> Optional[float]:
    """Mean measured latency over the runs of an arm (their architectures can differ by seed)."""
    values = [v for v in (latency(r) for r in runs) if v] if latency else []
    return statistics.fmean(values) if values else None


def summarize(results: Sequence[Mapping], latency: Optional[Callable[[Mapping], Optional[float]]] = None,
              metric: str = "bbox_AP") -> List[Dict]:
    """One row per arm (train size, criterion, target and ratio, or unpruned with or without
    FREEZE_AT), baseline rows (unpruned) included: mean and std over seeds of `metric` (AP: the
    final weights' `bbox_AP`, or the early-stopped model's `es_bbox_AP`) and its AP50; params and
    FLOPs; and, against the baseline of the same train size on the seeds both have, the mean and
    std of the AP difference (the same metric on both sides), its paired t-test p-value, and
    FLOPs/params/latency as shares of the baseline's. Results without `metric` are left out."""
    cells: Dict[Tuple, List[Mapping]] = defaultdict(list)
    for r in results:
        if r.get(metric) is not None:
            cells[_arm_key(r)].append(r)
    rows = []
    for (size, criterion, target, ratio, freeze_at, _), runs in cells.items():
        ap, ap_std = _mean_std([r[metric] for r in runs])
        ap50, ap50_std = _mean_std([r[f"{metric}50"] for r in runs])
        rows.append({
            # A weighted arm is reported as a criterion of its own: `l1 (sensitivity)`.
            "train_size": size, "criterion": criterion_label(runs[0]) if criterion else criterion,
            "target": target, "ratio": ratio, "freeze_at": freeze_at,
            "metric": metric, "seeds": sorted(r["seed"] for r in runs),
            "AP": ap, "AP_std": ap_std, "AP50": ap50, "AP50_std": ap50_std,
            "params": statistics.fmean(r["params"] for r in runs),
            "flops": statistics.fmean(r["flops"] for r in runs),
            "backbone_flops": statistics.fmean(r["backbone_flops"] for r in runs),
            "latency_ms": _mean_latency(runs, latency),
            "runs": runs,
        })
    baselines = {row["train_size"]: row for row in rows if is_baseline(row)}
    for row in rows:
        base = baselines.get(row["train_size"])
        if base is None:
            continue
        diffs = paired_differences(row["runs"], base["runs"], metric)
        row["diffs"] = diffs
        row["dAP"], row["dAP_std"] = _mean_std(diffs) if diffs else (float("nan"), float("nan"))
        row["pairs"] = len(diffs)
        row["p"] = paired_t_test(diffs)
        for key in ("params", "flops", "backbone_flops"):
            row[f"{key}_share"] = row[key] / base[key]
        if row["latency_ms"] and base["latency_ms"]:
            row["latency_share"] = row["latency_ms"] / base["latency_ms"]
    rows.sort(key=_arm_order)
    return rows


def paired_differences(runs: Sequence[Mapping], reference: Sequence[Mapping], metric: str = "bbox_AP",
                       reference_metric: Optional[str] = None) -> List[float]:
    """`metric` of each run minus `reference_metric` (default: the same) of the reference run
    with the same seed, for the seeds both have."""
    other = {r["seed"]: r[reference_metric or metric] for r in reference if r.get(reference_metric or metric) is not None}
    return [r[metric] - other[r["seed"]] for r in runs if r["seed"] in other and r.get(metric) is not None]


def answer(rows: Sequence[Mapping], train_size: int) -> List[str]:
    """Plain sentences: for each criterion, the largest backbone-FLOPs reduction at which it beats
    the baseline (mean AP difference paired by seed above zero) or matches it (within the
    baseline's std over seeds), on `train_size` target images."""
    base = next((r for r in rows if is_baseline(r) and r["train_size"] == train_size), None)
    if base is None:
        return [f"No baseline on {train_size} images yet."]
    tolerance = base["AP_std"] if not math.isnan(base["AP_std"]) else 0.0
    seeds = len(base["seeds"])
    spread = f" ± {tolerance:.2f}" if seeds > 1 else ""
    lines = [f"Baseline (unpruned fine-tune, {seeds} seed{'s' if seeds > 1 else ''}): AP {base['AP']:.2f}{spread}."]
    by_criterion = defaultdict(list)
    for r in rows:
        if r["criterion"] is not None and r["train_size"] == train_size and r.get("pairs"):
            by_criterion[r["criterion"]].append(r)
    for name, cells in sorted(by_criterion.items()):
        beat = [r for r in cells if r["dAP"] > 0]
        match = [r for r in cells if r["dAP"] >= -tolerance]

        def best(found):
            r = max(found, key=lambda r: 1 - r["backbone_flops_share"])
            spread = "" if r["pairs"] < 2 else f" ± {r['dAP_std']:.2f}, p {r['p']:.2f}"
            return (f"{100 * (1 - r['backbone_flops_share']):.0f} % fewer backbone FLOPs ({_level_text(_level(r))}, "
                    f"ΔAP {r['dAP']:+.2f}{spread}, {r['pairs']} seed{'s' if r['pairs'] > 1 else ''})")

        if beat:
            lines.append(f"{name}: above the baseline up to {best(beat)}.")
        elif match:
            lines.append(f"{name}: within the baseline's seed spread up to {best(match)}.")
        else:
            worst = min(cells, key=lambda r: r["ratio"])
            lines.append(f"{name}: below the baseline's seed spread at every level "
                         f"(at {_level_text(_level(worst))}: ΔAP {worst['dAP']:+.2f}, {worst['pairs']} seed(s)).")
    return lines + _headline(by_criterion, tolerance)


def _headline(by_criterion: Mapping[str, Sequence[Mapping]], tolerance: float) -> List[str]:
    """Across criteria: the largest reduction that any criterion matches the baseline at, the
    criterion with the best AP difference averaged over its ratios, and how many comparisons
    reach p < 0.05 (about one in twenty would by chance)."""
    cells = [r for rows in by_criterion.values() for r in rows]
    if not cells:
        return []
    lines = []
    matched = [r for r in cells if r["dAP"] >= -tolerance]
    parts = []
    for label, found in (("on several seeds", [r for r in matched if r["pairs"] >= 2]),
                         ("on one seed", [r for r in matched if r["pairs"] < 2])):
        if found:
            deepest = max((_level(r) for r in found), key=lambda level: level[1])
            at = [r for r in found if _level(r) == deepest]
            share = statistics.fmean(r["backbone_flops_share"] for r in at)
            parts.append(f"{label}, {_level_text(deepest)} ({100 * (1 - share):.0f} % fewer backbone FLOPs) "
                         f"by {', '.join(sorted(r['criterion'] for r in at))}")
    if parts:
        lines.append(f"Deepest pruning matched: {'; '.join(parts)}.")
    pooled = _pooled(cells)
    lines.append("Pooled over criteria (every pruned run against its seed's baseline): "
                 + ", ".join(f"ΔAP {mean:+.2f} ± {_fmt(std, '.2f')} at {_level_text(x)} ({n} run{'s' if n > 1 else ''})"
                             for x, (mean, std, n) in sorted(pooled.items())) + ".")
    means = {name: statistics.fmean(r["dAP"] for r in rows) for name, rows in by_criterion.items()}
    ranked = sorted(means, key=means.get, reverse=True)
    lines.append("Mean ΔAP over each criterion's ratios, best first: "
                 + ", ".join(f"{name} {means[name]:+.2f}" for name in ranked) + ".")
    tested = [r for r in cells if r["pairs"] >= 2]
    if tested:
        significant = sorted(f"{r['criterion']} at {_level_text(_level(r))} ({r['dAP']:+.2f})" for r in tested if r["p"] < 0.05)
        lines.append(f"{len(significant)} of {len(tested)} paired comparisons reach p < 0.05"
                     + (f": {', '.join(significant)}" if significant else "")
                     + f" (by chance alone about {0.05 * len(tested):.1f} would).")
    return lines


def coverage(planned: Sequence[Mapping], finished: Collection[str], main_size: int) -> str:
    """"" when every planned run (mappings with name, criterion, ratio, train_size) is finished,
    else one sentence: finished / planned runs in all and per cell kind, and the criteria with
    no finished run yet."""
    done = [job for job in planned if job["name"] in finished]
    if len(done) == len(planned):
        return ""
    counts: Dict[str, List[int]] = {}
    for job in planned:
        if job["criterion"] is None:
            kind = arm_label(job)
        elif job.get("target", "channels") == "channels":
            kind = f"ratio {job['ratio']:g}"
        else:
            kind = f"{job['target']} -{100 * job['ratio']:.0f} %"
        if job.get("weighting", "uniform") != "uniform":
            kind += f" ({job['weighting']})"
        if job["train_size"] != main_size:
            kind += f" on {job['train_size']} images"
        cell = counts.setdefault(kind, [0, 0])
        cell[0] += job["name"] in finished
        cell[1] += 1
    started = {job["criterion"] for job in done}
    missing = sorted({job["criterion"] for job in planned if job["criterion"] not in started} - {None})
    return (f"Partial: {len(done)} of {len(planned)} planned runs finished ("
            + "; ".join(f"{kind}: {a}/{b}" for kind, (a, b) in counts.items()) + ")"
            + (f"; not yet run: {', '.join(missing)}" if missing else "") + ".")


def thread_counts(results: Sequence[Mapping]) -> str:
    """One sentence on the torch thread counts the runs used (`threads` in each result; older
    results lack it). Runs with different counts add floats in different orders, which by itself
    moves a fine-tune's AP, so ΔAP between them carries that noise too."""
    counts = Counter(r.get("threads") for r in results)
    known = sorted(n for n in counts if n is not None)
    if len(known) == 1 and None not in counts:
        return f"every run with {known[0]} torch thread{'s' if known[0] > 1 else ''}"
    parts = [f"{n}: {counts[n]} run{'s' if counts[n] > 1 else ''}" for n in known]
    parts += [f"not recorded: {counts[None]}"] if None in counts else []
    return ("torch threads per run: " + ", ".join(parts) + (
        "; runs with different thread counts sum floats in different orders, which by itself "
        "moves AP: compare runs of one count" if len(known) > 1 else ""))


def _fmt(value, spec=".1f", empty="–"):
    return empty if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown_table(rows: Sequence[Mapping]) -> str:
    """The study table: one line per (train size, criterion, ratio), relative to the baseline."""
    head = ("| train imgs | criterion | ratio | seeds | AP | AP50 | ΔAP vs baseline (paired) | p | params (M) "
            "| backbone GFLOPs | latency ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        base = is_baseline(r)
        lines.append("| " + " | ".join([
            str(r["train_size"]),
            "**unpruned**" if base else r["criterion"] or arm_label(r),
            "–" if r["criterion"] is None else _amount(r),
            str(len(r["seeds"])),
            f"{r['AP']:.2f} ± {_fmt(r['AP_std'], '.2f')}",
            f"{r['AP50']:.2f} ± {_fmt(r['AP50_std'], '.2f')}",
            "–" if base else f"{_fmt(r.get('dAP'), '+.2f')} ± {_fmt(r.get('dAP_std'), '.2f')}",
            "–" if base else _fmt(r.get("p"), ".2f"),
            f"{r['params'] / 1e6:.2f}" + ("" if base else f" ({100 * r.get('params_share', float('nan')):.0f} %)"),
            f"{r['backbone_flops'] / 1e9:.3f}" + ("" if base else f" ({100 * r.get('backbone_flops_share', float('nan')):.0f} %)"),
            _fmt(r["latency_ms"]) + ("" if base or "latency_share" not in r else f" ({100 * r['latency_share']:.0f} %)"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def _amount(r: Mapping) -> str:
    """A pruned arm's amount: the ratio of channels, or the share of FLOPs or latency removed."""
    target = r.get("target", "channels")
    return f"{r['ratio']:g}" if target == "channels" else f"-{100 * r['ratio']:.0f} % {target}"


def _level(r: Mapping) -> Tuple[str, float]:
    """What a pruned arm removes, as a key that orders and compares: (target, amount). A study
    can mix targets (block channel ratios beside latency targets, `--report-all`)."""
    return r.get("target", "channels"), r["ratio"]


def _level_text(level: Tuple[str, float]) -> str:
    """`ratio 0.5`, `-40 % FLOPs`, `-40 % latency`."""
    target, amount = level
    if target == "channels":
        return f"ratio {amount:g}"
    return f"-{100 * amount:.0f} % {'FLOPs' if target == 'flops' else 'latency'}"


def _pooled(cells: Sequence[Mapping]) -> Dict[Tuple[str, float], Tuple[float, float, int]]:
    """Per level (`_level`): mean and std of the paired AP differences of every run of every
    criterion, and their number: what pruning that much costs, whichever criterion picks."""
    by_ratio = defaultdict(list)
    for r in cells:
        by_ratio[_level(r)] += r["diffs"]
    return {x: (*_mean_std(d), len(d)) for x, d in by_ratio.items() if d}


def _delta_grid(rows: Sequence[Mapping], train_size: int):
    """The pruned cells paired with a baseline on `train_size` images, as the delta table and
    plot lay them out: (cells, ratios, backbone FLOPs share per ratio, {criterion: {ratio:
    cell}}, criteria sorted by their mean ΔAP, best first)."""
    cells = [r for r in rows if r["criterion"] is not None and r["train_size"] == train_size and r.get("pairs")]
    ratios = sorted({_level(r) for r in cells})
    share = {x: statistics.fmean(r["backbone_flops_share"] for r in cells if _level(r) == x) for x in ratios}
    table = defaultdict(dict)
    for r in cells:
        table[r["criterion"]][_level(r)] = r
    order = sorted(table, key=lambda name: -statistics.fmean(r["dAP"] for r in table[name].values()))
    return cells, ratios, share, table, order


def delta_table(rows: Sequence[Mapping], train_size: int) -> str:
    """ΔAP paired by seed (mean ± std, `*` where p < 0.05) with one line per criterion and one
    column per ratio, the columns headed by their share of the baseline's backbone FLOPs; lines
    sorted by the mean over their cells, best first. When `random` was run, a last column gives
    each criterion's AP difference to it on the same ratio and seed, pooled over ratios: a
    criterion worth its cost should beat picking filters at random."""
    cells, ratios, share, table, order = _delta_grid(rows, train_size)
    if not cells:
        return ""
    reference = table.get("random")
    head = ("| criterion | " + " | ".join(f"{_level_text(x)} ({100 * share[x]:.0f} % FLOPs)" for x in ratios)
            + " | mean |" + (" vs random |" if reference else ""))
    lines = [head, "|" + "---|" * (len(ratios) + 2 + bool(reference))]
    for name in order:
        row = table[name]
        mean = statistics.fmean(r["dAP"] for r in row.values())
        line = f"| {name} | " + " | ".join(_delta_cell(row.get(x)) for x in ratios) + f" | {mean:+.2f} |"
        if reference:
            line += " – |" if name == "random" else f" {_versus_cell(row, reference)} |"
        lines.append(line)
    pooled = _pooled(cells)
    lines.append("| *all criteria pooled* | " + " | ".join(
        f"{pooled[x][0]:+.2f} ± {_fmt(pooled[x][1], '.2f')} ({pooled[x][2]})" for x in ratios)
        + " | |" + (" |" if reference else ""))
    return "\n".join(lines) + "\n"


def versus(cells: Mapping[float, Mapping], reference: Mapping[float, Mapping]) -> Tuple[List[float], float]:
    """AP differences of one criterion's runs to a reference criterion's (e.g. random) on the
    same ratio and seed, pooled over ratios, and their paired t-test p-value."""
    diffs = []
    for ratio, row in cells.items():
        other = {r["seed"]: r["bbox_AP"] for r in reference[ratio]["runs"]} if ratio in reference else {}
        diffs += [r["bbox_AP"] - other[r["seed"]] for r in row["runs"] if r["seed"] in other]
    return diffs, paired_t_test(diffs)


def _versus_cell(cells: Mapping[float, Mapping], reference: Mapping[float, Mapping]) -> str:
    return _diff_cell(versus(cells, reference)[0])


def _delta_cell(r: Optional[Mapping]) -> str:
    if r is None:
        return "–"
    star = "*" if r["pairs"] >= 2 and r["p"] < 0.05 else ""
    spread = f" ± {r['dAP_std']:.2f}" if r["pairs"] >= 2 else ""
    return f"{r['dAP']:+.2f}{spread}{star} ({r['pairs']})"


_MARKERS = "os^Dv<>pPX*hH8d"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ap_vs_flops(rows: Sequence[Mapping], train_size: int, path: str) -> Optional[str]:
    """AP (mean ± std over seeds) against backbone GFLOPs, one line per criterion, with the
    baseline's mean and seed spread as a band; None when nothing was pruned on `train_size` images."""
    if not any(r["criterion"] and r["train_size"] == train_size for r in rows):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    base = next((r for r in rows if is_baseline(r) and r["train_size"] == train_size), None)
    if base is not None:
        std = 0.0 if math.isnan(base["AP_std"]) else base["AP_std"]
        ax.axhspan(base["AP"] - std, base["AP"] + std, color="0.85", zorder=0)
        ax.axhline(base["AP"], color="0.3", ls="--", lw=1, label="unpruned (mean ± std)")
        ax.errorbar([base["backbone_flops"] / 1e9], [base["AP"]], yerr=[std], fmt="ks", capsize=3)
    names = sorted({r["criterion"] for r in rows if r["criterion"] and r["train_size"] == train_size})
    for i, name in enumerate(names):
        cells = sorted((r for r in rows if r["criterion"] == name and r["train_size"] == train_size),
                       key=lambda r: r["backbone_flops"])
        x = [r["backbone_flops"] / 1e9 + (i - len(names) / 2) * 0.002 for r in cells]
        yerr = [0.0 if math.isnan(r["AP_std"]) else r["AP_std"] for r in cells]
        # tab20 colours and a marker per criterion: a dozen criteria stay told apart.
        ax.errorbar(x, [r["AP"] for r in cells], yerr=yerr, marker=_MARKERS[i % len(_MARKERS)], ms=5,
                    capsize=2, lw=1, color=plt.cm.tab20(i % 20), label=name)
    ax.set_xlabel("backbone GFLOPs at the test resolution")
    ax.set_ylabel("bbox AP on DATASETS.TEST, final weights")
    ax.set_title(f"Pruned fine-tunes vs the unpruned one ({train_size} target images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_delta(rows: Sequence[Mapping], train_size: int, path: str) -> Optional[str]:
    """ΔAP against the baseline as a criterion x ratio grid (the delta table as a picture):
    colour the mean over seeds on a scale centred on zero and as wide as the largest |ΔAP|,
    each cell annotated with mean ± std and a hatch where fewer than two seeds are paired.
    None when no pruned cell has a baseline yet."""
    cells, ratios, share, table, names = _delta_grid(rows, train_size)
    if not cells:
        return None
    plt = _plt()
    grid = [[table[n][x]["dAP"] if x in table[n] else float("nan") for x in ratios] for n in names]
    limit = max(abs(r["dAP"]) for r in cells) or 1.0
    fig, ax = plt.subplots(figsize=(max(5.5, 2.6 + 1.6 * len(ratios)), 1.4 + 0.38 * len(names)))
    image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for i, name in enumerate(names):
        for j, x in enumerate(ratios):
            r = table[name].get(x)
            if r is None:
                continue
            text = f"{r['dAP']:+.2f}" + (f"\n± {r['dAP_std']:.2f}" if r["pairs"] >= 2 else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if abs(r["dAP"]) > 0.6 * limit else "black")
            if r["pairs"] < 2:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="..", lw=0, color="0.6"))
    ax.set_xticks(range(len(ratios)), [f"{_level_text(x)}\n({100 * share[x]:.0f} % FLOPs)" for x in ratios], fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("ratio of the eligible channels pruned, or the FLOPs / latency target (backbone FLOPs left)", fontsize=8)
    ax.set_title(f"ΔAP vs unpruned, paired by seed ({train_size} images; dotted: 1 seed)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03, label="mean ΔAP")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ap_vs_train_size(rows: Sequence[Mapping], path: str) -> Optional[str]:
    """AP (mean ± std) against the number of target training images, per criterion and ratio
    that was run at more than one size; None when the study has one size only."""
    series = defaultdict(list)
    for r in rows:
        series[r["criterion"], r["ratio"], r.get("target", "channels"), r.get("freeze_at")].append(r)
    series = {k: sorted(v, key=lambda r: r["train_size"]) for k, v in series.items() if len(v) > 1}
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, cells in sorted(series.items(), key=lambda kv: (not is_baseline(kv[1][0]), str(kv[0]))):
        name, label = key[0], arm_label(cells[0])
        yerr = [0.0 if math.isnan(r["AP_std"]) else r["AP_std"] for r in cells]
        ax.errorbar([r["train_size"] for r in cells], [r["AP"] for r in cells], yerr=yerr, marker="o",
                    capsize=3, lw=2 if name is None else 1, color="k" if is_baseline(cells[0]) else None, label=label)
    ax.set_xscale("log")
    ax.set_xticks(sorted({r["train_size"] for v in series.values() for r in v}))
    ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("target training images")
    ax.set_ylabel("bbox AP on DATASETS.TEST, final weights")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# How far below its best a validation curve must end to be said to fall: about the AP that two
# runs differing only in the order of float sums (thread count) or the seed lie apart.
FALL_TOLERANCE = 0.5
# Consecutive evaluations averaged before the best and the end of a curve are compared: the
# highest single evaluation of a noisy curve is biased upwards, and so is its drop to the end.
SMOOTHING = 3


def has_validation(results: Sequence[Mapping]) -> bool:
    """Whether any run evaluated a validation split while it trained (see `regime_section`)."""
    return any(r.get("val_curve") for r in results)


def mean_curve(runs: Sequence[Mapping], key: str = "val_curve", column: int = 1) -> Tuple[List[int], List[float]]:
    """The mean over `runs` of one column of their curves ([iteration, value, ...] lists), on the
    iterations every run has."""
    curves = [{int(p[0]): p[column] for p in r[key]} for r in runs if r.get(key)]
    if not curves:
        return [], []
    iters = sorted(set.intersection(*(set(c) for c in curves)))
    return iters, [statistics.fmean(c[i] for c in curves) for i in iters]


def curve_verdict(iters: Sequence[int], values: Sequence[float], tolerance: float = FALL_TOLERANCE,
                  window: int = SMOOTHING) -> Dict:
    """Where a validation curve peaks and whether it falls: the highest evaluation ("peak_iter",
    "peak"), the last one ("final_iter", "final"), and on the means of `window` consecutive
    evaluations the best ("best_iter": the middle one, "best") and the last ("end"); "drop" is
    best - end, and the curve `falls` when that exceeds `tolerance`."""
    top = max(range(len(values)), key=lambda i: (values[i], -i))
    window = max(1, min(window, len(values)))
    means = [statistics.fmean(values[i:i + window]) for i in range(len(values) - window + 1)]
    best = max(range(len(means)), key=lambda i: (means[i], -i))
    drop = means[best] - means[-1]
    return {"peak_iter": iters[top], "peak": values[top], "final_iter": iters[-1], "final": values[-1],
            "best_iter": iters[best + window // 2], "best": means[best], "end": means[-1], "drop": drop,
            "falls": drop > tolerance}


def overfitting_lines(results: Sequence[Mapping]) -> List[str]:
    """One sentence per train size and unpruned arm: does its validation AP (mean over seeds)
    peak and then fall, where, by how much, and how its training loss moved."""
    lines = []
    arms = defaultdict(list)
    for r in results:
        if r["criterion"] is None and r.get("val_curve"):
            arms[r["train_size"], r.get("freeze_at") or 0].append(r)
    for (size, _), runs in sorted(arms.items()):
        iters, values = mean_curve(runs)
        v = curve_verdict(iters, values)
        loss_iters, losses = mean_curve(runs, "loss_curve")
        seeds = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
        mean = (f"averaged over {SMOOTHING} consecutive evaluations it is best around iteration {v['best_iter']} "
                f"({v['best']:.2f}) and ends at {v['end']:.2f}, {v['drop']:.2f} lower")
        shape = (f"{mean}: it falls (by more than {FALL_TOLERANCE:g})" if v["falls"]
                 else f"{mean}: within {FALL_TOLERANCE:g}, it does not clearly fall" if v["drop"] > 0
                 else f"{mean}: it is at its best at the end")
        loss = (f"; training loss {losses[0]:.3f} at iteration {loss_iters[0]}, {min(losses):.3f} at its lowest, "
                f"{losses[-1]:.3f} at the end" if losses else "")
        lines.append(f"{arm_label(runs[0])} on {size} images ({seeds}): validation AP peaks at {v['peak']:.2f} at "
                     f"iteration {v['peak_iter']} and is {v['final']:.2f} at iteration {v['final_iter']}; {shape}{loss}.")
    return lines


def _diff_cell(diffs: Sequence[float]) -> str:
    """Paired differences as "mean ± std (pairs)", starred when a paired t-test gives p < 0.05."""
    if not diffs:
        return "–"
    mean, std = _mean_std(diffs)
    if len(diffs) < 2:
        return f"{mean:+.2f} (1)"
    return f"{mean:+.2f} ± {std:.2f}{'*' if paired_t_test(diffs) < 0.05 else ''} ({len(diffs)})"


def _ap_cell(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean, std = _mean_std(values)
    return f"{mean:.2f} ± {_fmt(std, '.2f')}"


def regime_table(results: Sequence[Mapping], train_size: int, latency: Optional[Mapping[str, float]] = None) -> str:
    """Every arm on `train_size` images, final and early-stopped, on the test split: the test AP
    of the final weights and of the early-stopped model (mean ± std over seeds), the iterations
    at which the runs stopped, and their AP differences paired by seed with the fair baseline,
    the early-stopped unpruned fine-tune (`*`: paired t-test p < 0.05); the last column against
    the unpruned fine-tune run to the end, as the first study compared."""
    runs = [r for r in results if r["train_size"] == train_size and r.get("es_bbox_AP") is not None]
    arms = defaultdict(list)
    for r in runs:
        arms[_arm_key(r)].append(r)
    base = next((v for v in arms.values() if is_baseline(v[0])), [])
    head = ("| arm | seeds | test AP, final | test AP, early-stopped | stopped at iteration | latency ms "
            "| final − unpruned early-stopped | early-stopped − unpruned early-stopped | final − unpruned final |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key in sorted(arms, key=lambda k: _arm_order(arms[k][0])):
        cell = arms[key]
        stops = sorted(r["es_iter"] for r in cell)
        ms = _mean_latency(cell, (lambda r: latency.get(spec_key(r["spec"]))) if latency else None)
        lines.append("| " + " | ".join([
            f"**{arm_label(cell[0])}**" if is_baseline(cell[0]) else arm_label(cell[0]),
            str(len(cell)),
            _ap_cell([r["bbox_AP"] for r in cell]),
            _ap_cell([r["es_bbox_AP"] for r in cell]),
            " / ".join(str(i) for i in stops),
            _fmt(ms),
            _diff_cell(paired_differences(cell, base, "bbox_AP", "es_bbox_AP")),
            "–" if is_baseline(cell[0]) else _diff_cell(paired_differences(cell, base, "es_bbox_AP")),
            "–" if is_baseline(cell[0]) else _diff_cell(paired_differences(cell, base, "bbox_AP")),
        ]) + " |")
    return "\n".join(lines) + "\n"


def regime_section(results: Sequence[Mapping], plots: Sequence[Optional[str]], folder: str,
                   latency: Optional[Mapping[str, float]] = None) -> List[str]:
    """The markdown of a study whose runs had a validation split: the overfitting sentences, a
    final-vs-early-stopped table per train size, and `plots` (linked relative to `folder`)."""
    import os

    if not has_validation(results):
        return []
    first = next(r for r in results if r.get("val_curve"))
    parts = [
        "## Validation curves and early stopping\n",
        f"Each run evaluated the validation split `{first['val_dataset']}` while it trained; its early-stopped "
        "model is the checkpoint of its best validation AP (for a pruned run, the best after its last pruning "
        f"event), evaluated once on the test split `{first['test_dataset']}`, which chose nothing.\n",
        *(f"- {line}" for line in overfitting_lines(results)),
        "",
    ]
    for size in sorted({r["train_size"] for r in results if r.get("es_bbox_AP") is not None}):
        parts += [f"### {size} target images (test AP)\n", regime_table(results, size, latency)]
    parts += [f"![{os.path.basename(p)}]({os.path.relpath(p, folder)})\n" for p in plots if p]
    return parts


def plot_curves(results: Sequence[Mapping], path: str) -> Optional[str]:
    """Validation AP (top) and training loss (bottom) against the iteration, one column per train
    size, one line per arm (mean over its seeds; the unpruned fine-tune in black, its seeds in
    grey), each peak marked; None when no run has a validation curve."""
    runs = [r for r in results if r.get("val_curve")]
    if not runs:
        return None
    plt = _plt()
    sizes = sorted({r["train_size"] for r in runs})
    fig, axes = plt.subplots(2, len(sizes), figsize=(5.2 * len(sizes), 6.4), sharex=True, squeeze=False)
    for col, size in enumerate(sizes):
        arms = defaultdict(list)
        for r in runs:
            if r["train_size"] == size:
                arms[_arm_key(r)].append(r)
        for i, key in enumerate(sorted(arms, key=lambda k: _arm_order(arms[k][0]))):
            cell = arms[key]
            colour = "k" if is_baseline(cell[0]) else plt.cm.tab20(i % 20)
            label = f"{arm_label(cell[0])} ({len(cell)} seed{'s' if len(cell) > 1 else ''})"
            iters, values = mean_curve(cell)
            axes[0][col].plot(iters, values, color=colour, lw=2 if is_baseline(cell[0]) else 1, marker=".", label=label)
            if is_baseline(cell[0]) and len(cell) > 1:  # how far one seed is from the next
                for r in cell:
                    axes[0][col].plot(*mean_curve([r]), color=colour, lw=0.7, alpha=0.35)
            v = curve_verdict(iters, values)
            axes[0][col].plot([v["peak_iter"]], [v["peak"]], marker="*", ms=12, color=colour)
            loss_iters, losses = mean_curve(cell, "loss_curve")
            axes[1][col].plot(loss_iters, losses, color=colour, lw=1.5 if is_baseline(cell[0]) else 1)
        axes[0][col].set_title(f"{size} target images", fontsize=10)
        axes[0][col].set_ylabel("validation bbox AP")
        axes[1][col].set_ylabel("training loss (median of 20 iterations)")
        axes[1][col].set_xlabel("iteration (4 images each)")
        axes[0][col].legend(fontsize=7)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    fig.suptitle("Validation AP and training loss while fine-tuning (star: the peak)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ap_vs_latency(results: Sequence[Mapping], latency: Mapping[str, float], train_size: int, path: str) -> Optional[str]:
    """Test AP against the measured whole-detector latency, one point per arm on `train_size`
    images (mean ± std over seeds): filled for the final weights, hollow for the early-stopped
    model; the unpruned fine-tune in black. None without latencies."""
    arms = defaultdict(list)
    for r in results:
        if r["train_size"] == train_size and spec_key(r["spec"]) in latency:
            arms[_arm_key(r)].append(r)
    if not arms:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, key in enumerate(sorted(arms, key=lambda k: _arm_order(arms[k][0]))):
        cell = arms[key]
        x, x_std = _mean_std([latency[spec_key(r["spec"])] for r in cell])  # architectures differ by seed
        colour = "k" if is_baseline(cell[0]) else plt.cm.tab20(i % 20)
        shapes = _MARKERS.replace("s", "")  # squares are the unpruned arms
        marker = "s" if cell[0]["criterion"] is None else shapes[i % len(shapes)]
        final, final_std = _mean_std([r["bbox_AP"] for r in cell])
        ax.errorbar([x], [final], yerr=[0.0 if math.isnan(final_std) else final_std],
                    xerr=[0.0 if math.isnan(x_std) else x_std], marker=marker, color=colour,
                    capsize=2, ms=6, ls="none", label=f"{arm_label(cell[0])} ({len(cell)} seeds)")
        stopped = [r["es_bbox_AP"] for r in cell if r.get("es_bbox_AP") is not None]
        if stopped:
            ax.plot([x], [statistics.fmean(stopped)], marker=marker, mfc="none", color=colour, ms=8, ls="none")
    ax.set_xlabel("whole-detector latency, ms per test image (one CPU thread, as deployed)")
    ax.set_ylabel("test bbox AP")
    hollow = "; hollow: early-stopped" if any(r.get("es_bbox_AP") is not None for cell in arms.values() for r in cell) else ""
    ax.set_title(f"AP against measured latency ({train_size} target images{hollow})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_csv(rows: Sequence[Mapping], path: str) -> None:
    """Every run of `rows` as one CSV line (the spec left out)."""
    import csv
    import io

    from d2prune.utils.io import atomic_write_text

    runs = [run for row in rows for run in row["runs"]]
    # The spec and the curves are lists and dicts: results.jsonl holds them.
    keys = list(dict.fromkeys(k for run in runs for k in run if k not in ("spec", "val_curve", "loss_curve")))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(runs)
    atomic_write_text(path, buffer.getvalue())


def _delta_section(rows: Sequence[Mapping], main_size: int) -> List[str]:
    table = delta_table(rows, main_size)
    if not table:
        return []
    return [
        f"## ΔAP by criterion and ratio ({main_size} target images)\n",
        "AP difference to the unpruned fine-tune of the same seed, mean ± std over seeds (number of "
        "seeds in brackets; `*`: paired t-test p < 0.05). Columns: the share of the eligible channels "
        "pruned (ratio), or the FLOPs or latency target, and the backbone FLOPs left, as a share of "
        "the unpruned backbone's.\n",
        table,
    ]


def write_report(
    path: str, rows: Sequence[Mapping], main_size: int, plots: Sequence[str], command: str,
    machine: str, elapsed: str, title: str = "Transfer study", notes: str = "", status: str = "",
    threads: str = "", sections: Sequence[str] = (),
) -> str:
    """The study as markdown at `path`: the answer in sentences, `notes` (a hand-written reading
    of the numbers, kept when the report is regenerated), ΔAP by criterion and ratio, the full
    table, the plots (linked relative to `path`), the command that produced it, the machine, the
    time taken and `threads` (`thread_counts`); `sections` (markdown, e.g. `regime_section`)
    go after the notes."""
    import os

    from d2prune.utils.io import atomic_write_text

    folder = os.path.dirname(os.path.abspath(path))
    parts = [
        f"# {title}\n",
        *([f"**{status}**\n"] if status else []),
        "Fine-tunes of the source model on the synthetic target domain: the unpruned fine-tune "
        "(baseline) and fine-tunes that prune while they train, with the same seeds and schedule; "
        "evaluated on the target val split (with a validation split: on the test split cut beside it). ΔAP is "
        "paired by seed; p is the paired t-test's.\n",
        "## Answer\n",
        *(f"- {line}" for line in answer(rows, main_size)),
        "",
        *([notes.strip() + "\n"] if notes.strip() else []),
        *sections,
        *_delta_section(rows, main_size),
        "## Table\n",
        markdown_table(rows),
        *(f"![{os.path.basename(p)}]({os.path.relpath(p, folder)})\n" for p in plots if p),
        "## How it was made\n",
        f"```\n{command}\n```\n",
        f"- machine: {machine}",
        f"- time: {elapsed}",
        *([f"- {threads}"] if threads else []),
        "- latency: ms per image of the whole detector as deployed (norms folded, channels-last) on "
        "the first 8 test images, one thread, CPU time, the minimum over 3 interleaved rounds, "
        "measured after the fine-tunes beside the unpruned architecture and scaled to its time.",
        "",
    ]
    atomic_write_text(path, "\n".join(parts))
    return path
