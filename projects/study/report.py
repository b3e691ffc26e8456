"""The transfer study's results turned into an answer: mean and spread over seeds, paired
comparisons with the unpruned baseline, latency per architecture, a markdown table and plots.
"""

import json
import math
import statistics
from collections import Counter, defaultdict
from typing import Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["summarize", "answer", "coverage", "markdown_table", "delta_table", "versus", "plot_delta", "plot_ap_vs_flops", "plot_ap_vs_train_size",
           "spec_key", "write_csv", "paired_t_test"]


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


def summarize(results: Sequence[Mapping], latency: Optional[Callable[[Mapping], Optional[float]]] = None) -> List[Dict]:
    """One row per (train size, criterion, ratio), baseline rows (criterion None) included:
    mean and std over seeds of AP and AP50; params and FLOPs; and, against the baseline of the
    same train size on the seeds both have, the mean and std of the AP difference, its paired
    t-test p-value, and FLOPs/params/latency as shares of the baseline's."""
    cells: Dict[Tuple, List[Mapping]] = defaultdict(list)
    for r in results:
        cells[r["train_size"], r["criterion"], r["ratio"]].append(r)
    rows = []
    for (size, criterion, ratio), runs in cells.items():
        ap, ap_std = _mean_std([r["bbox_AP"] for r in runs])
        ap50, ap50_std = _mean_std([r["bbox_AP50"] for r in runs])
        rows.append({
            "train_size": size, "criterion": criterion, "ratio": ratio, "seeds": sorted(r["seed"] for r in runs),
            "AP": ap, "AP_std": ap_std, "AP50": ap50, "AP50_std": ap50_std,
            "params": statistics.fmean(r["params"] for r in runs),
            "flops": statistics.fmean(r["flops"] for r in runs),
            "backbone_flops": statistics.fmean(r["backbone_flops"] for r in runs),
            "latency_ms": latency(runs[0]) if latency else None,
            "runs": runs,
        })
    baselines = {row["train_size"]: row for row in rows if row["criterion"] is None}
    for row in rows:
        base = baselines.get(row["train_size"])
        if base is None:
            continue
        base_ap = {r["seed"]: r["bbox_AP"] for r in base["runs"]}
        diffs = [r["bbox_AP"] - base_ap[r["seed"]] for r in row["runs"] if r["seed"] in base_ap]
        row["diffs"] = diffs
        row["dAP"], row["dAP_std"] = _mean_std(diffs) if diffs else (float("nan"), float("nan"))
        row["pairs"] = len(diffs)
        row["p"] = paired_t_test(diffs)
        for key in ("params", "flops", "backbone_flops"):
            row[f"{key}_share"] = row[key] / base[key]
        if row["latency_ms"] and base["latency_ms"]:
            row["latency_share"] = row["latency_ms"] / base["latency_ms"]
    rows.sort(key=lambda r: (r["train_size"], r["criterion"] is not None, r["ratio"], r["criterion"] or ""))
    return rows


def answer(rows: Sequence[Mapping], train_size: int) -> List[str]:
    """Plain sentences: for each criterion, the largest backbone-FLOPs reduction at which it beats
    the baseline (mean AP difference paired by seed above zero) or matches it (within the
    baseline's std over seeds), on `train_size` target images."""
    base = next((r for r in rows if r["criterion"] is None and r["train_size"] == train_size), None)
    if base is None:
        return [f"No baseline on {train_size} images yet."]
    tolerance = base["AP_std"] if not math.isnan(base["AP_std"]) else 0.0
    lines = [f"Baseline (unpruned fine-tune, {len(base['seeds'])} seeds): AP {base['AP']:.2f} ± {tolerance:.2f}."]
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
            return (f"{100 * (1 - r['backbone_flops_share']):.0f} % fewer backbone FLOPs (ratio {r['ratio']:g}, "
                    f"ΔAP {r['dAP']:+.2f}{spread}, {r['pairs']} seed{'s' if r['pairs'] > 1 else ''})")

        if beat:
            lines.append(f"{name}: above the baseline up to {best(beat)}.")
        elif match:
            lines.append(f"{name}: within the baseline's seed spread up to {best(match)}.")
        else:
            worst = min(cells, key=lambda r: r["ratio"])
            lines.append(f"{name}: below the baseline's seed spread at every ratio "
                         f"(at {worst['ratio']:g}: ΔAP {worst['dAP']:+.2f}, {worst['pairs']} seed(s)).")
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
            deepest = max(r["ratio"] for r in found)
            at = [r for r in found if r["ratio"] == deepest]
            share = statistics.fmean(r["backbone_flops_share"] for r in at)
            parts.append(f"{label}, ratio {deepest:g} ({100 * (1 - share):.0f} % fewer backbone FLOPs) "
                         f"by {', '.join(sorted(r['criterion'] for r in at))}")
    if parts:
        lines.append(f"Deepest pruning matched: {'; '.join(parts)}.")
    pooled = _pooled(cells)
    lines.append("Pooled over criteria (every pruned run against its seed's baseline): "
                 + ", ".join(f"ΔAP {mean:+.2f} ± {_fmt(std, '.2f')} at {x:g} ({n} run{'s' if n > 1 else ''})"
                             for x, (mean, std, n) in sorted(pooled.items())) + ".")
    means = {name: statistics.fmean(r["dAP"] for r in rows) for name, rows in by_criterion.items()}
    ranked = sorted(means, key=means.get, reverse=True)
    lines.append("Mean ΔAP over each criterion's ratios, best first: "
                 + ", ".join(f"{name} {means[name]:+.2f}" for name in ranked) + ".")
    tested = [r for r in cells if r["pairs"] >= 2]
    if tested:
        significant = sorted(f"{r['criterion']} at {r['ratio']:g} ({r['dAP']:+.2f})" for r in tested if r["p"] < 0.05)
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
        kind = "unpruned" if job["criterion"] is None else f"ratio {job['ratio']:g}"
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
        base = r["criterion"] is None
        lines.append("| " + " | ".join([
            str(r["train_size"]),
            "**unpruned**" if base else r["criterion"],
            "–" if base else f"{r['ratio']:g}",
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


def _pooled(cells: Sequence[Mapping]) -> Dict[float, Tuple[float, float, int]]:
    """Per ratio: mean and std of the paired AP differences of every run of every criterion,
    and their number: what pruning at that ratio costs, whichever criterion picks."""
    by_ratio = defaultdict(list)
    for r in cells:
        by_ratio[r["ratio"]] += r["diffs"]
    return {x: (*_mean_std(d), len(d)) for x, d in by_ratio.items() if d}


def _delta_grid(rows: Sequence[Mapping], train_size: int):
    """The pruned cells paired with a baseline on `train_size` images, as the delta table and
    plot lay them out: (cells, ratios, backbone FLOPs share per ratio, {criterion: {ratio:
    cell}}, criteria sorted by their mean ΔAP, best first)."""
    cells = [r for r in rows if r["criterion"] is not None and r["train_size"] == train_size and r.get("pairs")]
    ratios = sorted({r["ratio"] for r in cells})
    share = {x: statistics.fmean(r["backbone_flops_share"] for r in cells if r["ratio"] == x) for x in ratios}
    table = defaultdict(dict)
    for r in cells:
        table[r["criterion"]][r["ratio"]] = r
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
    head = ("| criterion | " + " | ".join(f"ratio {x:g} ({100 * share[x]:.0f} % FLOPs)" for x in ratios)
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
    diffs, p = versus(cells, reference)
    if not diffs:
        return "–"
    mean, std = _mean_std(diffs)
    if len(diffs) < 2:
        return f"{mean:+.2f} (1)"
    return f"{mean:+.2f} ± {std:.2f}{'*' if p < 0.05 else ''} ({len(diffs)})"


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


def plot_ap_vs_flops(rows: Sequence[Mapping], train_size: int, path: str) -> str:
    """AP (mean ± std over seeds) against backbone GFLOPs, one line per criterion, with the
    baseline's mean and seed spread as a band."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    base = next((r for r in rows if r["criterion"] is None and r["train_size"] == train_size), None)
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
    ax.set_ylabel("target val bbox AP")
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
    ax.set_xticks(range(len(ratios)), [f"{x:g}\n({100 * share[x]:.0f} % FLOPs)" for x in ratios], fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("share of block channels pruned (backbone FLOPs left)", fontsize=8)
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
        series[r["criterion"], r["ratio"]].append(r)
    series = {k: sorted(v, key=lambda r: r["train_size"]) for k, v in series.items() if len(v) > 1}
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (name, ratio), cells in sorted(series.items(), key=lambda kv: (kv[0][0] is not None, str(kv[0]))):
        label = "unpruned" if name is None else f"{name} {ratio:g}"
        yerr = [0.0 if math.isnan(r["AP_std"]) else r["AP_std"] for r in cells]
        ax.errorbar([r["train_size"] for r in cells], [r["AP"] for r in cells], yerr=yerr, marker="o",
                    capsize=3, lw=2 if name is None else 1, color="k" if name is None else None, label=label)
    ax.set_xscale("log")
    ax.set_xticks(sorted({r["train_size"] for v in series.values() for r in v}))
    ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("target training images")
    ax.set_ylabel("target val bbox AP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
    keys = [k for k in runs[0] if k != "spec"] if runs else []
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
        "seeds in brackets; `*`: paired t-test p < 0.05). Columns: pruning ratio of the block channels "
        "and the backbone FLOPs left, as a share of the unpruned backbone's.\n",
        table,
    ]


def write_report(
    path: str, rows: Sequence[Mapping], main_size: int, plots: Sequence[str], command: str,
    machine: str, elapsed: str, title: str = "Transfer study", notes: str = "", status: str = "",
    threads: str = "",
) -> str:
    """The study as markdown at `path`: the answer in sentences, `notes` (a hand-written reading
    of the numbers, kept when the report is regenerated), ΔAP by criterion and ratio, the full
    table, the plots (linked relative to `path`), the command that produced it, the machine, the
    time taken and `threads` (`thread_counts`)."""
    import os

    from d2prune.utils.io import atomic_write_text

    folder = os.path.dirname(os.path.abspath(path))
    parts = [
        f"# {title}\n",
        *([f"**{status}**\n"] if status else []),
        "Fine-tunes of the source model on the synthetic target domain: the unpruned fine-tune "
        "(baseline) and fine-tunes that prune while they train, with the same seeds and schedule; "
        "evaluated on the target val split. ΔAP is paired by seed; p is the paired t-test's.\n",
        "## Answer\n",
        *(f"- {line}" for line in answer(rows, main_size)),
        "",
        *([notes.strip() + "\n"] if notes.strip() else []),
        *_delta_section(rows, main_size),
        "## Table\n",
        markdown_table(rows),
        *(f"![{os.path.basename(p)}]({os.path.relpath(p, folder)})\n" for p in plots if p),
        "## How it was made\n",
        f"```\n{command}\n```\n",
        f"- machine: {machine}",
        f"- time: {elapsed}",
        *([f"- {threads}"] if threads else []),
        "- latency: median of repeated CPU runs of the whole detector on one image at the test "
        "resolution, measured after the fine-tunes, one architecture at a time.",
        "",
    ]
    atomic_write_text(path, "\n".join(parts))
    return path
