"""Matplotlib figures of a report, each returned as an inline PNG (a data: URI).

Figures are built with matplotlib's object API (matplotlib.figure.Figure), which draws with
the Agg canvas without pyplot: no global backend is switched and no window can open.
"""
from __future__ import annotations

import base64
import io
import math

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from mpokit.report.collect import CheckpointRecord
from mpokit.report.points import Point, pareto_front

__all__ = ["to_data_uri", "breakdown_figure", "heatmap_figure", "quality_figure", "decode_figure", "heatmap_panels"]

DPI = 100
_ANNOTATE_MAX_CELLS = 160  # cell values are written in the cells up to this many cells per panel
# heatmap panel -> LayerInfo attribute
_PANELS = {"rank (largest bond)": "rank", "bits": "bits", "stored / dense bytes": "kept_bytes",
           "relative error": "rel_error"}


def to_data_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _mib(b: float) -> str:
    return f"{b / 2**20:.3g} MiB" if b >= 2**20 / 10 else f"{b / 1024:.3g} KiB"


def breakdown_figure(ck: CheckpointRecord) -> Figure | None:
    """Stored bytes by layer type and by module kind, as horizontal bars with shares."""
    if not ck.bytes_by_type:
        return None
    fig = Figure(figsize=(11, max(2.5, 0.32 * max(len(ck.bytes_by_type), len(ck.bytes_by_module)) + 1.2)))
    total = sum(ck.bytes_by_type.values())
    unit, scale = ("MiB", 2**20) if total >= 2**20 else ("KiB", 1024)
    for ax, (title, data) in zip(fig.subplots(1, 2), [("by layer type", ck.bytes_by_type),
                                                     ("by module", ck.bytes_by_module)]):
        items = sorted(data.items(), key=lambda kv: kv[1])
        y = np.arange(len(items))
        ax.barh(y, [v / scale for _, v in items], color=colormaps["tab10"](y % 10))
        ax.set_yticks(y, [k for k, _ in items], fontsize=8)
        for yi, (_, v) in zip(y, items):
            ax.text(v / scale, yi, f" {_mib(v)} ({100 * v / total:.1f}%)", va="center", fontsize=7)
        ax.set_xlabel(f"stored {unit}")
        ax.set_title(f"{title} (total {_mib(total)})", fontsize=10)
        ax.margins(x=0.35)
    fig.tight_layout()
    return fig


def heatmap_panels(ck: CheckpointRecord) -> list[str]:
    """Which per-layer quantities the heatmap shows (only those some layer has)."""
    blocked = [li for li in ck.layers if li.block is not None]
    if not blocked:
        return []
    panels = ["layout"]
    for name, attr in _PANELS.items():
        if any(getattr(li, attr) is not None for li in blocked):
            panels.append(name)
    return panels


def heatmap_figure(ck: CheckpointRecord) -> Figure | None:
    """Per-layer layout, rank, bits, kept fraction and error over depth (block x module kind)."""
    panels = heatmap_panels(ck)
    if not panels:
        return None
    blocked = [li for li in ck.layers if li.block is not None]
    blocks = sorted({li.block for li in blocked})
    kinds = list(dict.fromkeys(li.kind for li in blocked))
    at = {(li.block, li.kind): li for li in blocked}
    fig = Figure(figsize=(3.2 * len(panels) + 1, max(3.0, 0.2 * len(blocks) + 2.2)))
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    for ax, name in zip(axes, panels):
        if name == "layout":
            _layout_panel(fig, ax, blocks, kinds, at)
        else:
            grid = np.full((len(blocks), len(kinds)), np.nan)
            for (b, k), li in at.items():
                v = getattr(li, _PANELS[name])
                grid[blocks.index(b), kinds.index(k)] = np.nan if v is None else v
            cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
            im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, interpolation="nearest")
            fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
            if grid.size <= _ANNOTATE_MAX_CELLS:
                _annotate(ax, im, grid)
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(kinds)), [k.rsplit(".", 1)[-1] for k in kinds], rotation=60, fontsize=7)
    axes[0].set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    axes[0].set_ylabel("block (depth)")
    fig.suptitle(f"{ck.label}: per-layer choices over depth (grey: not known or not compressed)", fontsize=10)
    fig.tight_layout()
    return fig


def _layout_panel(fig, ax, blocks, kinds, at) -> None:
    names = sorted({li.layout for li in at.values()})
    grid = np.full((len(blocks), len(kinds)), np.nan)
    for (b, k), li in at.items():
        grid[blocks.index(b), kinds.index(k)] = names.index(li.layout)
    cmap = ListedColormap([colormaps["Set2"](i % 8) for i in range(len(names))]).with_extremes(bad="#dddddd")
    norm = BoundaryNorm(np.arange(len(names) + 1) - 0.5, len(names))
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    bar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, ticks=range(len(names)))
    bar.ax.set_yticklabels(names, fontsize=7)


def _annotate(ax, im, grid) -> None:
    for (i, j), v in np.ndenumerate(grid):
        if not math.isnan(v):
            r, g, b, _ = im.cmap(im.norm(v))
            dark = 0.299 * r + 0.587 * g + 0.114 * b > 0.5  # dark text on light cells
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6, color="black" if dark else "white")


def quality_figure(pts: list[Point], unit: str, kind: str, colors: dict[str, int] | None = None) -> Figure:
    """Quality against size: one colour per series (`colors`: series -> index, the same in every
    figure), its Pareto front dashed."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    _scatter(ax, pts, "quality", colors)
    values = [p.quality for p in pts]
    if kind == "perplexity" and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
    fields = sorted({p.quality_field for p in pts})
    better = "higher" if pts[0].higher_better else "lower"
    ax.set_ylabel(f"{kind} ({', '.join(fields)}; {better} is better)")
    ax.set_xlabel(f"size ({unit}; {', '.join(sorted({p.size_field for p in pts}))})")
    ax.set_title(f"{kind} vs size", fontsize=11)
    fig.tight_layout()
    return fig


def decode_figure(pts: list[Point], unit: str, colors: dict[str, int] | None = None) -> Figure:
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    _scatter(ax, pts, "decode", colors)
    ax.set_ylabel("decode speed (tokens/s; higher is better)")
    ax.set_xlabel(f"size ({unit}; {', '.join(sorted({p.size_field for p in pts}))})")
    ax.set_title("decode speed vs size", fontsize=11)
    fig.tight_layout()
    return fig


def _scatter(ax, pts: list[Point], value: str, colors: dict[str, int] | None) -> None:
    series = list(dict.fromkeys(p.series for p in pts))
    colors = colors or {s: i for i, s in enumerate(series)}
    for s in series:
        group = [p for p in pts if p.series == s]
        higher = value == "decode" or group[0].higher_better
        front = pareto_front(group, value, higher)
        c = colormaps["tab10"](colors[s] % 10)
        ax.scatter([p.size for p in group], [getattr(p, value) for p in group], color=c, label=s, s=28, zorder=3)
        if len(front) > 1:
            ax.plot([p.size for p in front], [getattr(p, value) for p in front], "--", color=c, lw=1, zorder=2)
        if len(group) <= 12:
            for p in group:
                ax.annotate(p.label, (p.size, getattr(p, value)), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
