"""Figures comparing measured with decoded expression (reconstruction section of the report)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from xscale.report.figures import HOLDOUT_COLOR, XSCALE_COLOR, new_figure, point_size, styled

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@styled
def plot_reconstruction(
    coords: np.ndarray,
    observed: np.ndarray,
    decoded: np.ndarray,
    genes: Sequence[str],
    *,
    slide: str,
    held_out: bool,
) -> Figure:
    """Observed vs decoded expression of a few genes on one slide.

    One row per gene: observed map, decoded map (same colour scale), and a scatter of
    decoded against observed per cell with Pearson r. Inputs are log-normalised values.

    Parameters
    ----------
    coords
        (n, 2) positions of the slide's cells.
    observed, decoded
        (n, len(genes)) log1p(count / library × 10⁴) observed and decoded (expected) values.
    """
    n = len(genes)
    span = np.ptp(coords[:, 1]) / max(np.ptp(coords[:, 0]), 1e-9)
    fig = new_figure(13.0, max(2.6, 3.6 * float(np.clip(span, 0.35, 1.2))) * n + 0.4)
    axes = fig.subplots(n, 3, squeeze=False, width_ratios=[1.3, 1.3, 1.0])
    size = point_size(len(coords))
    tag = " [held out]" if held_out else ""
    for i, g in enumerate(genes):
        o, d = observed[:, i], decoded[:, i]
        vmax = float(np.quantile(np.concatenate([o, d]), 0.99)) or 1.0
        for j, (vals, what) in enumerate(((o, "observed"), (d, "decoded by xscale"))):
            ax = axes[i, j]
            sc = ax.scatter(
                coords[:, 0],
                coords[:, 1],
                c=vals,
                s=size,
                cmap="magma",
                vmin=0,
                vmax=vmax,
                linewidths=0,
                rasterized=True,
            )
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(
                f"{g}: {what}{tag if j == 0 else ''}",
                color=HOLDOUT_COLOR if held_out and j == 0 else "black",
            )
            if j == 1:
                fig.colorbar(sc, ax=ax, shrink=0.8, label="log1p(norm. counts)")
        ax = axes[i, 2]
        ax.scatter(o, d, s=4, alpha=0.4, color=XSCALE_COLOR, linewidths=0, rasterized=True)
        ax.plot([0, vmax], [0, vmax], color="#555555", lw=0.8, ls="--")
        r = float(np.corrcoef(o, d)[0, 1]) if o.std() > 0 and d.std() > 0 else float("nan")
        ax.set_title(f"{g}: Pearson r = {r:.2f}")
        ax.set_xlabel("observed")
        ax.set_ylabel("decoded")
    fig.suptitle(f"slide {slide}{tag}", fontsize=11)
    return fig


@styled
def plot_gene_correlations(r: np.ndarray, *, slide: str) -> Figure:
    """Histogram of per-gene Pearson r between observed and decoded expression (all genes)."""
    fig = new_figure(6.0, 2.8)
    ax = fig.subplots()
    finite = r[np.isfinite(r)]
    ax.hist(finite, bins=30, color=XSCALE_COLOR, alpha=0.85)
    if len(finite):
        ax.axvline(
            float(np.median(finite)),
            color="black",
            lw=1,
            ls="--",
            label=f"median {np.median(finite):.2f}",
        )
        ax.legend(frameon=False)
    ax.set_xlabel("Pearson r, observed vs decoded, across cells")
    ax.set_ylabel("number of genes")
    ax.set_title(f"All {len(finite)} genes, slide {slide}")
    return fig
