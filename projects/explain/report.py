"""The explanation of a pruning cut (`d2prune.explain.Explanation`) as an HTML report: findings in
plain sentences, tables and the figures of `plots`.
"""

import base64
import html
import os
from typing import Dict, List, Mapping, Sequence

from d2prune.explain import (
    NEAR_SILENT,
    Explanation,
    information_split,
    pruning_profile,
    short_name,
    stage_losses,
)
from d2prune.utils.io import atomic_open, atomic_write_text

from . import plots


def _pct(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole else "-"


def _short(name: str) -> str:
    return short_name(name)


def summary(e: Explanation) -> List[str]:
    """The findings in plain sentences, each with the numbers behind it."""
    lines = []
    if e.pruned_checkpoint:
        rows = pruning_profile(e.groups, e.reference, e.before)
        total, now = sum(e.reference.values()), sum(e.before.values())
        losses = [s for s in stage_losses(rows) if s["removed"]]
        lines.append(
            f"This checkpoint is already pruned: it has {now} of the {total} channels the config "
            f"builds ({_pct(total - now, total)} removed); most were removed from "
            + ", ".join(f"{s['stage']} ({s['removed']} of {s['before']}, {_pct(s['removed'], s['before'])})" for s in losses[:3])
            + ". The cut below is a further step from its current widths."
        )
    rows = pruning_profile([g for g in e.groups if g.name in e.eligible], e.before, e.after)
    total = sum(r["before"] for r in rows)
    removed = sum(r["before"] - r["after"] for r in rows)
    lines.append(
        f"{e.criterion} at {e.budget} removes {removed} of the {total} channels "
        f"({_pct(removed, total)}) of the {len(rows)} groups of kinds {', '.join(e.kinds)}, "
        f"scored on {e.num_images} images of {e.dataset or 'the given batches'}."
    )
    losses = [s for s in stage_losses(rows) if s["removed"]]
    if losses:
        lines.append(
            "Channels removed per stage, most first: "
            + ", ".join(f"{s['stage']} {s['removed']} of {s['before']} ({_pct(s['removed'], s['before'])})" for s in losses)
            + "."
        )
    masks = {name: e.removed(name) for name in e.eligible}
    silent_removed = sum(int((e.apoz[n][m] >= NEAR_SILENT).sum()) for n, m in masks.items())
    silent_kept = sum(int((e.apoz[n][~m] >= NEAR_SILENT).sum()) for n, m in masks.items())
    kept = total - removed
    lines.append(
        f"{silent_removed} of the {removed} removed filters ({_pct(silent_removed, removed)}) were "
        f"near-silent on these images (non-positive, i.e. zero after the ReLU, at {NEAR_SILENT:.0%} "
        f"of positions or more); among the {kept} kept filters, {silent_kept} ({_pct(silent_kept, kept)})."
    )
    present = [k for k, n in enumerate(e.class_counts) if n]
    if e.information is not None and removed and present:
        split = information_split(e.information, masks)
        share = split["removed"] / split["total"].clamp(min=1e-12)
        overall = float(split["removed"][present].sum() / split["total"][present].sum().clamp(min=1e-12))
        order = sorted(present, key=lambda k: -float(share[k]))
        lines.append(
            f"The removed filters ({_pct(removed, total)} of the filters) carried {overall:.0%} of "
            f"the class information summed over the {len(present)} classes present in these images; "
            f"per class, from {float(share[order[-1]]):.0%} ({e.class_names[order[-1]]}) to "
            f"{float(share[order[0]]):.0%} ({e.class_names[order[0]]})."
        )
        lines.append(
            "Classes whose information dropped most: "
            + ", ".join(f"{e.class_names[k]} ({float(share[k]):.0%})" for k in order[:3])
            + ". Averaged over these classes, a removed filter carried "
            + _ratio(split["removed_mean"][present].sum(), split["kept_mean"][present].sum())
            + " the information of a kept one."
        )
    absent = [e.class_names[k] for k, n in enumerate(e.class_counts) if not n]
    if absent:
        lines.append(f"No object of {', '.join(absent)} is in these images: nothing is measured for them.")
    layer = e.layer
    for title, views in (("most", layer.most), ("least", layer.least)):
        labels = [h.label for v in views for h in v.hits]
        objects = [x for x in labels if x != "background"]
        common = max(set(objects), key=objects.count) if objects else None
        lines.append(
            f"In {_short(layer.group)}, the {len(views)} {title} important filters peak on an object in "
            f"{len(objects)} of their {len(labels)} top images"
            + (f" (most often {common}, {objects.count(common)} times)." if common else ".")
        )
    return lines


def _ratio(a, b) -> str:
    return f"{float(a) / float(b):.2f} times" if float(b) else "-"


def _image_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
img { max-width: 100%; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.note { color: #8a5a00; }
"""


def render_figures(e: Explanation) -> Dict[str, bytes]:
    """File name -> PNG of every figure of the report."""
    if e.pruned_checkpoint:
        rows, labels = pruning_profile(e.groups, e.reference, e.before), ("config", "checkpoint")
    else:
        rows, labels = pruning_profile(e.groups, e.before, e.after), ("before", "after the cut")
    figures = {"profile.png": plots.profile_chart(rows, labels)}
    figures["scores.png"] = plots.score_grid(
        [(name, e.scores[name].numpy(), e.removed(name).numpy()) for name in e.eligible], e.criterion
    )
    for title, views in (("most", e.layer.most), ("least", e.layer.least)):
        figures[f"filters_{title}.png"] = plots.filter_gallery(
            f"{title} important filters of {_short(e.layer.group)} by {e.criterion}",
            views, e.images, e.layer, e.class_names,
        )
    if e.information is not None:
        split = information_split(e.information, {n: e.removed(n) for n in e.eligible})
        figures["class_information.png"] = plots.information_chart(e.class_names, split)
    return figures


def report_html(e: Explanation, figures: Mapping[str, bytes]) -> str:
    """The report as one self-contained HTML page (figures embedded as base64 PNGs)."""
    esc = html.escape
    layer = e.layer
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>d2prune: what pruning removes</title>',
        f"<style>{_STYLE}</style></head><body>",
        "<h1>What pruning removes</h1>",
        "<p>"
        f"weights <code>{esc(e.weights or '(random initialisation)')}</code>; criterion "
        f"<code>{esc(e.criterion)}</code> at {esc(e.budget)}, kinds {esc(', '.join(e.kinds))}; "
        f"{e.num_images} images of <code>{esc(e.dataset)}</code>."
        "</p>",
    ]
    parts += [f'<p class="note">{esc(n)}</p>' for n in e.notes]
    parts += ['<h2 id="summary">Summary</h2>', "<ul>"]
    parts += [f"<li>{esc(line)}</li>" for line in summary(e)]
    parts += ["</ul>", '<h2 id="profile">Pruning profile</h2>']
    if e.pruned_checkpoint:
        parts.append("<p>Widths of every channel group: as the config builds them and in this pruned checkpoint.</p>")
        rows = pruning_profile(e.groups, e.reference, e.before)
    else:
        parts.append(f"<p>Widths of every channel group before and after the cut that {esc(e.criterion)} makes.</p>")
        rows = pruning_profile(e.groups, e.before, e.after)
    parts.append(_image_tag(figures["profile.png"], "pruning profile"))
    parts.append("<p>Per stage, over all its groups (its residual stream and the heads included):</p>")
    parts.append(
        _table(
            ["stage", "channels before", "removed", "removed share"],
            [[s["stage"], s["before"], s["removed"], _pct(s["removed"], s["before"])] for s in stage_losses(rows)],
        )
    )
    parts += [
        '<h2 id="scores">Score distributions</h2>',
        f"<p>{esc(e.criterion)} scores of the channels of every group of kinds "
        f"{esc(', '.join(e.kinds))}; red channels are removed, the dashed line is the cut.</p>",
        _image_tag(figures["scores.png"], "score distributions"),
        f'<h2 id="filters">Filters of {esc(_short(layer.group))}</h2>',
        "<p>"
        f"Feature map of <code>{esc(layer.module)}</code> (stride {layer.stride:g} px"
        + (f", theoretical receptive field {layer.receptive_field} px" if layer.receptive_field else "")
        + "). Each row is a filter: the images where it fires most, cropped around the peak "
        "(yellow: the peak's cell, green: ground-truth boxes), then its "
        + ("LRP relevance (red positive, blue negative)" if layer.heatmap == "relevance" else "activation")
        + " over the same images (dashed: the crop).</p>",
    ]
    for title in ("most", "least"):
        parts.append(_image_tag(figures[f"filters_{title}.png"], f"{title} important filters"))
    parts.append('<h2 id="information">Class information</h2>')
    if e.information is None:
        parts.append('<p class="note">Not available: the mi criterion is not installed.</p>')
    else:
        split = information_split(e.information, {n: e.removed(n) for n in e.eligible})
        parts += [
            "<p>Per class, the mutual information (nats) between each channel's binned activation "
            "and &ldquo;object of this class vs the rest&rdquo; at each position (from the "
            "<code>mi</code> statistics), summed over the kept and over the removed channels of "
            "the pruned kinds; a sum of per-channel values, which counts redundant channels twice.</p>",
            _image_tag(figures["class_information.png"], "class information"),
            _table(
                ["class", "objects", "total", "kept", "removed", "removed share", "mean per kept filter",
                 "mean per removed filter"],
                [
                    [
                        name, e.class_counts[k], f"{float(split['total'][k]):.3f}", f"{float(split['kept'][k]):.3f}",
                        f"{float(split['removed'][k]):.3f}", _pct(float(split["removed"][k]), float(split["total"][k])),
                        f"{float(split['kept_mean'][k]):.4f}", f"{float(split['removed_mean'][k]):.4f}",
                    ]
                    for k, name in enumerate(e.class_names)
                ],
            ),
        ]  # fmt: skip
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(e: Explanation, output_dir: str) -> str:
    """Write the figures as PNGs and `report.html` into `output_dir`, each atomically; return
    the report's path."""
    os.makedirs(output_dir, exist_ok=True)
    figures = render_figures(e)
    for name, png in figures.items():
        with atomic_open(os.path.join(output_dir, name), "wb") as f:
            f.write(png)
    path = os.path.join(output_dir, "report.html")
    atomic_write_text(path, report_html(e, figures))
    return path

