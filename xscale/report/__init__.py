"""A self-contained HTML report of an xscale run, readable by a biologist.

>>> from xscale.report import build_report
>>> build_report("xscale-demo/cells.zarr", "xscale-demo/metrics.json", "xscale-demo/report.html",
...              history="xscale-demo/logs")

Sections: summary, spatial domains (predicted beside annotated, held-out slide marked),
latent space (UMAP of cell and niche latents), xscale vs baselines (bar chart), metrics
table, training curves per level, reconstruction (observed vs decoded expression). Every
image is an embedded PNG; the file loads nothing from the network.
"""

from __future__ import annotations

from xscale.report.build import SECTION_IDS, build_report
from xscale.report.embedding import embed_2d
from xscale.report.expression import plot_gene_correlations, plot_reconstruction
from xscale.report.figures import (
    plot_embedding,
    plot_method_bars,
    plot_spatial_domains,
    plot_training_curves,
)
from xscale.report.logs import discover_histories, load_histories
from xscale.report.metrics import ComparisonGroup, comparison_groups, load_metrics

__all__ = [
    "SECTION_IDS",
    "ComparisonGroup",
    "build_report",
    "comparison_groups",
    "discover_histories",
    "embed_2d",
    "load_histories",
    "load_metrics",
    "plot_embedding",
    "plot_gene_correlations",
    "plot_method_bars",
    "plot_reconstruction",
    "plot_spatial_domains",
    "plot_training_curves",
]
