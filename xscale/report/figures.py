"""Figures of the report, each a ``matplotlib.figure.Figure`` built without pyplot.

No global matplotlib state is touched (no ``pyplot``, no backend switch), so these
functions are safe inside notebooks, servers and worker processes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from xscale.report.logs import loss_columns
from xscale.report.metrics import (
    ComparisonGroup,
    format_value,
    is_xscale,
    method_label,
    metric_label,
)
from xscale.utils.colors import palette

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

XSCALE_COLOR = "#d95f02"
BASELINE_COLOR = "#7f8fa6"
HOLDOUT_COLOR = "#c0392b"
STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 100,
}


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def styled(fn: _Fn) -> _Fn:
    """Run a plotting function under the report's matplotlib style (axes pick it up when created)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure with the report's style."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def point_size(n: int) -> float:
    """Marker area for a scatter of ``n`` cells: small for dense slides, large for sparse ones."""
    return float(np.clip(12000.0 / max(n, 1), 0.3, 14.0))


def _mark_holdout(ax: Axes) -> None:
    for s in ax.spines.values():
        s.set_visible(True)
        s.set_edgecolor(HOLDOUT_COLOR)
        s.set_linewidth(3)


def _scatter_categories(
    ax: Axes, xy: np.ndarray, labels: np.ndarray, colors: Mapping[str, str], *, size: float
) -> None:
    # Draw the biggest category first so small ones stay visible on top.
    cats, counts = np.unique(labels, return_counts=True)
    for c in cats[np.argsort(-counts)]:
        m = labels == c
        ax.scatter(
            xy[m, 0], xy[m, 1], s=size, c=colors.get(c, "#bbbbbb"), linewidths=0, rasterized=True
        )


def _legend(fig: Figure, ax: Axes, colors: Mapping[str, str], title: str) -> None:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], marker="o", ls="", color=c, markersize=7, label=k) for k, c in colors.items()
    ]
    ncol = 1 if len(handles) <= 12 else 2
    ax.legend(
        handles=handles,
        title=title,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
        ncol=ncol,
    )


@styled
def plot_spatial_domains(
    coords: np.ndarray,
    slides: np.ndarray,
    predicted: np.ndarray | None,
    annotated: np.ndarray | None,
    *,
    holdout: Sequence[str] = (),
    pred_colors: Mapping[str, str] | None = None,
    annot_colors: Mapping[str, str] | None = None,
    scores: Mapping[str, float] | None = None,
) -> Figure:
    """Spatial maps, one row per slide: annotated domains (left) beside predicted ones (right).

    Parameters
    ----------
    coords
        (n, 2) cell positions, in the data's units.
    slides
        (n,) slide name of every cell.
    predicted, annotated
        (n,) domain labels as strings, or None when missing (that column is left out).
    holdout
        Slides never trained on: framed in red and titled "held out".
    pred_colors, annot_colors
        Colour per label; predicted colours usually matched to annotated ones.
    scores
        ARI per slide, written in the title of the predicted panel.
    """
    cols = [
        (name, lab, colors)
        for name, lab, colors in (
            ("annotated", annotated, annot_colors),
            ("xscale", predicted, pred_colors),
        )
        if lab is not None
    ]
    order = sorted(set(slides.tolist()), key=lambda s: (s in holdout, s))
    nrow, ncol = len(order), len(cols)
    spans = []
    for s in order:
        xy = coords[slides == s]
        spans.append(np.ptp(xy[:, 1]) / max(np.ptp(xy[:, 0]), 1e-9))
    aspect = float(np.clip(np.median(spans), 0.3, 1.5))
    fig = new_figure(4.6 * ncol + 2.4, max(2.6, 4.2 * aspect) * nrow + 0.3)
    axes = np.atleast_2d(fig.subplots(nrow, ncol, squeeze=False))
    for i, s in enumerate(order):
        m = slides == s
        xy = coords[m]
        for j, (name, lab, colors) in enumerate(cols):
            ax = axes[i, j]
            _scatter_categories(ax, xy, lab[m], colors or {}, size=point_size(int(m.sum())))
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            tag = "  [HELD OUT]" if s in holdout else ""
            if name == "annotated":
                title = f"{s}{tag}\nannotated domains"
            else:
                sc = f" (ARI {scores[s]:.2f})" if scores and s in scores else ""
                title = f"{s}{tag}\nxscale domains{sc}"
            ax.set_title(title, color=HOLDOUT_COLOR if s in holdout else "black", fontsize=10)
            if s in holdout:
                _mark_holdout(ax)
            else:
                ax.set_frame_on(False)
            if i == 0:
                _legend(
                    fig,
                    ax,
                    colors or {},
                    "annotated domain" if name == "annotated" else "xscale domain",
                )
    return fig


def _embedding_axes(ax: Axes, title: str, axis_label: str) -> None:
    """Title and ``UMAP 1`` / ``UMAP 2`` (or ``PC``) axis names; no ticks (embedding units mean nothing)."""
    ax.set_title(title)
    ax.set_xlabel(f"{axis_label} 1")
    ax.set_ylabel(f"{axis_label} 2")
    ax.set_xticks([])
    ax.set_yticks([])


@styled
def plot_embedding(
    xy: np.ndarray,
    panels: Sequence[tuple[str, np.ndarray, Mapping[str, str]]],
    *,
    axis_label: str,
) -> Figure:
    """2-D embedding (UMAP or PCA) coloured by several annotations, one panel each.

    Parameters
    ----------
    xy
        (n, 2) embedding coordinates.
    panels
        ``(title, labels (n,), colours)`` per panel.
    axis_label
        ``"UMAP"`` or ``"PC"``: the axes read ``UMAP 1`` / ``UMAP 2``.
    """
    n = len(panels)
    fig = new_figure(5.6 * n, 4.6)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (title, labels, colors) in zip(axes, panels, strict=True):
        _scatter_categories(ax, xy, labels, colors, size=point_size(len(xy)) * 0.6)
        _embedding_axes(ax, title, axis_label)
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], marker="o", ls="", color=c, markersize=6, label=k)
            for k, c in colors.items()
        ]
        ax.legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.08),
            frameon=False,
            ncol=min(4, max(1, len(handles))),
            fontsize=8,
        )
    return fig


@styled
def plot_correction(
    before_xy: np.ndarray, after_xy: np.ndarray, slides: np.ndarray, *, axis_label: str, titles: tuple[str, str],
    cell_types: np.ndarray | None = None,
) -> Figure:
    """The same cells before and after a slide correction: two panels coloured by slide and, with
    ``cell_types``, two more below coloured by cell type (None / NaN drawn grey as "unlabelled").

    before_xy, after_xy (n, 2) coordinates of each embedding (laid out separately); slides (n,);
    cell_types (n,) or None.
    """
    import pandas as pd

    rows = [("slide", np.asarray(slides).astype(str))]
    if cell_types is not None:
        known = pd.notna(cell_types)
        rows.append(("cell type", np.where(known, np.asarray(cell_types, dtype=object).astype(str), "unlabelled")))
    wide_legend = max(len(set(labels)) for _, labels in rows) > 12  # _legend lays it out in two columns
    fig = new_figure(9.6 + (4.0 if wide_legend else 0.0), 4.4 * len(rows))
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for r, (name, labels) in enumerate(rows):
        names = sorted(set(labels) - {"unlabelled"})
        colors = dict(zip(names, palette(len(names)), strict=True))
        if "unlabelled" in set(labels):
            colors["unlabelled"] = "#cccccc"
        for ax, xy, title in zip(axes[r], (before_xy, after_xy), titles, strict=True):
            _scatter_categories(ax, xy, labels, colors, size=point_size(len(xy)) * 2.0)
            _embedding_axes(ax, title if r == 0 else "", axis_label)
        _legend(fig, axes[r, 1], colors, name)
    return fig


@styled
def plot_training_curves(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Loss per training step, one panel per level (per-step values light, smoothed line dark).

    ``histories`` maps a level name to a Lightning ``metrics.csv`` table (``step``, loss columns).
    """
    n = len(histories)
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol)
    fig = new_figure(5.0 * ncol, 3.6 * nrow)
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax, (name, df) in zip(axes, histories.items(), strict=False):
        cols = loss_columns(df)
        x_key = "step" if "step" in df.columns else None
        colors = palette(max(len(cols), 1))
        positive = True
        for c, color in zip(cols, colors, strict=False):
            d = df[[c] + ([x_key] if x_key else [])].dropna(subset=[c])
            if d.empty:
                continue
            x = d[x_key].to_numpy() if x_key else np.arange(len(d))
            y = d[c].to_numpy(dtype=float)
            positive &= bool((y > 0).all())
            if len(y) > 20:  # per-step values: show raw lightly, a running mean on top
                w = max(3, len(y) // 20)
                smooth = np.convolve(y, np.ones(w) / w, mode="valid")
                ax.plot(x, y, color=color, alpha=0.25, lw=0.8)
                ax.plot(x[w - 1 :], smooth, color=color, lw=1.8, label=c)
            else:
                ax.plot(
                    x,
                    y,
                    color=color,
                    lw=1.8,
                    marker="o",
                    ms=3,
                    label=c,
                    ls="--" if c.lower().startswith("val") else "-",
                )
        ys = [df[c].dropna().to_numpy(dtype=float) for c in cols]
        ys = [y for y in ys if len(y)]
        if positive and ys and max(y.max() for y in ys) / max(min(y.min() for y in ys), 1e-12) > 20:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("training step" if x_key else "logged row")
        ax.set_ylabel("loss")
        ax.legend(frameon=False, fontsize=8)
    return fig


@styled
def plot_method_bars(groups: Sequence[ComparisonGroup], *, max_panels: int = 8) -> Figure:
    """Horizontal bars per group and metric: xscale methods in orange, baselines in grey.

    Only groups comparing two methods or more are drawn (one panel per metric, at most
    ``max_panels``); each row of panels is as tall as its longest list of methods.
    """
    panels = [(g, m) for g in groups if len(g.methods) > 1 for m in g.metric_names][:max_panels]
    if not panels:
        raise ValueError("no group compares two methods or more")
    ncol = 2 if len(panels) > 1 else 1
    nrow = math.ceil(len(panels) / ncol)
    rows = [panels[i * ncol : (i + 1) * ncol] for i in range(nrow)]
    heights = [0.36 * max(len(g.methods) for g, _ in row) + 1.3 for row in rows]  # inches per row
    fig = new_figure(6.2 * ncol, sum(heights))
    fig.get_layout_engine().set(h_pad=0.12)
    axes = fig.subplots(nrow, ncol, squeeze=False, height_ratios=heights).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, (g, metric) in zip(axes, panels, strict=False):
        items = [(k, v[metric]) for k, v in g.methods.items() if metric in v]
        names = [method_label(k) for k, _ in items][::-1]
        vals = np.array([v for _, v in items][::-1], dtype=float)
        colors = [XSCALE_COLOR if is_xscale(k) else BASELINE_COLOR for k, _ in items][::-1]
        ax.barh(np.arange(len(vals)), vals, color=colors, height=0.7)
        ax.set_yticks(np.arange(len(vals)), names)
        best = g.best(metric)
        lo = min(0.0, float(np.nanmin(vals)))
        hi = float(np.nanmax(vals)) if len(vals) else 1.0
        ax.set_xlim(lo, hi * 1.18 if hi > 0 else 1.0)
        for i, (v, (k, _)) in enumerate(zip(vals, items[::-1], strict=True)):
            ax.text(
                v, i, f" {format_value(v)}" + (" ★" if k == best else ""), va="center", fontsize=8
            )
        ax.set_xlabel(metric_label(metric))
        ax.set_title(g.title, fontsize=10, fontweight="bold")
        ax.spines["left"].set_visible(False)
        ax.tick_params(axis="y", length=0)
    return fig
