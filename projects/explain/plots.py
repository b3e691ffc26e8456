"""The figures of the pruning explanation (`d2prune.explain`), each returned as PNG bytes.

Drawn with matplotlib's object interface, so no pyplot state or display backend is involved.
"""

import io
import math
from typing import Mapping, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from d2prune.explain import short_name

KEPT, REMOVED, BEFORE = "#4c72b0", "#dd5144", "#c9d3e6"


def _png(fig: Figure, tight: bool = False) -> bytes:
    """The figure as PNG; `tight` crops to its contents, at the cost of a second draw."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight" if tight else None)
    return buffer.getvalue()


def profile_chart(rows: Sequence[Mapping], labels: Tuple[str, str]) -> bytes:
    """Horizontal bars per group: the width before (light) with the width after on top (dark)."""
    fig = Figure(figsize=(8, 0.28 * len(rows) + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    before = [r["before"] for r in rows]
    after = [r["after"] for r in rows]
    ax.barh(y, before, color=BEFORE, label=labels[0])
    ax.barh(y, after, height=0.5, color=KEPT, label=labels[1])
    for yi, b, a in zip(y, before, after):
        text = f"{a}/{b}" if a != b else str(b)
        ax.text(b, yi, f" {text}", va="center", fontsize=7)
    ax.set_yticks(y, [f"{short_name(r['group'])} ({r['kind']})" for r in rows], fontsize=7)
    ax.set_xlabel("channels")
    ax.set_xlim(0, max(before) * 1.15)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Channels per group")
    return _png(fig, tight=True)  # the group names set the left margin


def score_grid(groups: Sequence[Tuple[str, np.ndarray, np.ndarray]], criterion: str) -> bytes:
    """Small multiples, one per group (name, scores, removed mask): histograms of the kept and
    the removed channels' scores and the cut between them."""
    columns = min(4, len(groups)) or 1
    rows = math.ceil(len(groups) / columns) or 1
    fig = Figure(figsize=(3.2 * columns, 2.3 * rows))
    # Constrained layout costs seconds on a busy CPU; fixed spacing does as well here.
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.08, top=1 - 0.6 / fig.get_figheight(), hspace=0.45, wspace=0.25)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (name, scores, removed) in zip(axes, groups):
        bins = np.histogram_bin_edges(scores, bins=20)
        kept = np.histogram(scores[~removed], bins)[0]
        # Stacked: all channels in red, the kept ones drawn over them in blue.
        ax.stairs(kept + np.histogram(scores[removed], bins)[0], bins, fill=True, color=REMOVED)
        ax.stairs(kept, bins, fill=True, color=KEPT)
        if removed.any() and (~removed).any():
            ax.axvline((scores[removed].max() + scores[~removed].min()) / 2, color="k", ls="--", lw=1)
        ax.set_title(f"{short_name(name)}  -{int(removed.sum())}/{len(scores)}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(f"{criterion} scores, relative to each layer's mean: kept (blue), removed (red)", fontsize=10)
    return _png(fig)


def _boxes(ax, view, class_names, color="lime") -> None:
    for (x0, y0, x1, y1), k in zip(view.boxes, view.classes):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=color, lw=1))
        name = class_names[k] if k < len(class_names) else str(k)
        ax.text(x0, y0, name, color=color, fontsize=5, va="bottom", clip_on=True)


def filter_gallery(title: str, filters, images: Mapping, layer, class_names: Sequence[str]) -> bytes:
    """One row per filter: crops around its peak on its top images, then its heat maps there."""
    per_filter = max(len(f.hits) for f in filters)
    columns = 2 * per_filter
    fig = Figure(figsize=(1.6 * columns, 1.8 * len(filters)))
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.02, top=1 - 0.7 / fig.get_figheight(), hspace=0.4, wspace=0.08)
    axes = fig.subplots(len(filters), columns, squeeze=False)
    signed = layer.heatmap == "relevance"
    for row, view in zip(axes, filters):
        state = "removed" if view.removed else "kept"
        row[0].set_ylabel(f"ch {view.channel}\nscore {view.score:.3g}\n{state}", fontsize=7,
                          color=REMOVED if view.removed else KEPT)
        for i, hit in enumerate(view.hits):
            image = images[hit.image]
            x0, y0, x1, y1 = hit.box
            ax = row[i]
            ax.imshow(image.rgb[y0:y1, x0:x1], extent=(x0, x1, y1, y0))
            _boxes(ax, image, class_names)
            s = layer.stride
            ax.add_patch(Rectangle((hit.x * s, hit.y * s), s, s, fill=False, ec="yellow", lw=1.2))
            ax.set_xlim(x0, x1)
            ax.set_ylim(y1, y0)
            ax.set_title(f"img {hit.image}: {hit.value:.2g}\n{hit.label}", fontsize=6)

            ax = row[per_filter + i]
            height, width = image.rgb.shape[:2]
            ax.imshow(image.rgb.mean(2), cmap="gray", vmin=0, vmax=255)
            h, w = hit.heatmap.shape
            extent = (0, w * s, h * s, 0)
            if signed:
                limit = float(np.abs(hit.heatmap).max()) or 1.0
                ax.imshow(hit.heatmap, cmap="bwr", vmin=-limit, vmax=limit, alpha=0.6, extent=extent)
            else:
                ax.imshow(hit.heatmap, cmap="inferno", alpha=0.6, extent=extent)
            _boxes(ax, image, class_names)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", ls="--", lw=1))
            ax.set_xlim(0, width)
            ax.set_ylim(height, 0)
            ax.set_title(f"img {hit.image}: {layer.heatmap}", fontsize=6)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in row[len(view.hits):per_filter].tolist() + row[per_filter + len(view.hits):].tolist():
            ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def information_chart(class_names: Sequence[str], split: Mapping) -> bytes:
    """Per class: summed information of the kept and the removed filters (grouped bars), and
    the removed share beside the share of filters removed."""
    fig = Figure(figsize=(max(8, 1.3 * len(class_names) + 4), 3.4))
    fig.subplots_adjust(wspace=0.3)
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    x = np.arange(len(class_names))
    left.bar(x - 0.2, split["kept"].numpy(), 0.4, color=KEPT, label="kept filters")
    left.bar(x + 0.2, split["removed"].numpy(), 0.4, color=REMOVED, label="removed filters")
    left.set_xticks(x, class_names, rotation=30, ha="right", fontsize=8)
    left.set_ylabel("information, summed over filters (nats)")
    left.legend(fontsize=8)
    share = (split["removed"] / split["total"].clamp(min=1e-12)).numpy()
    filters = split["removed_channels"] / max(split["removed_channels"] + split["kept_channels"], 1)
    right.bar(x, share, color=REMOVED)
    right.axhline(filters, color="k", ls="--", lw=1, label=f"share of filters removed ({filters:.0%})")
    right.set_xticks(x, class_names, rotation=30, ha="right", fontsize=8)
    right.set_ylim(0, 1)
    right.set_ylabel("share of the class's information removed")
    right.legend(fontsize=8)
    fig.suptitle("Class information of kept and removed filters", fontsize=10)
    return _png(fig, tight=True)
