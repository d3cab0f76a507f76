"""The report of a run folder (``xscale run``, ``xscale demo``): its logs linked, one slide decoded, the HTML written.

:func:`link_run_logs` links ``DIR/logs/<level>`` to the Lightning logs each stage wrote;
:func:`decode_one_slide` decodes the cells of one slide back to expression for the
report's reconstruction section; :func:`run_metrics_for_report` puts ``xscale run``'s
``metrics.json`` into the ``{method: {metric: number}}`` groups the report compares;
:func:`write_run_report` does all three and writes ``DIR/report.html``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Cells decoded for the reconstruction section at most (a random subset of the slide beyond this).
MAX_DECODED_CELLS = 20_000


def link_run_logs(out: str | Path) -> dict[str, str]:
    """Link ``DIR/logs/<level>`` to the Lightning logs each stage wrote; returns {level: newest metrics.csv}."""
    out = Path(out)
    sources = {"level1": out / "checkpoints" / "level1" / "logs",
               "level2": out / "checkpoints" / "level2" / "lightning" / "logs"}
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    found = {}
    for level, src in sources.items():
        if not src.exists():
            continue
        link = logs / level
        if link.is_symlink():
            link.unlink()
        if not link.exists():
            os.symlink(os.path.relpath(src, logs), link, target_is_directory=True)
        csvs = sorted(src.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
        if csvs:
            found[level] = str(csvs[-1])
    return found


def decode_one_slide(adata: Any, model: Any, slides: np.ndarray, *, slide: str | None = None,
                     max_cells: int = MAX_DECODED_CELLS, seed: int = 0, progress: bool = True) -> str:
    """Decode the cells of one slide into ``adata.layers["xscale_expected"]``.

    ``slides`` (n,) slide of each cell; ``slide`` None = the smallest slide (the cheapest whole
    map). Beyond ``max_cells`` cells a random subset of that slide is decoded. The layer is CSR
    (n, G) holding only the decoded rows (each row whole: NaN for genes the model does not
    decode), so its size does not grow with the other slides. Returns the slide.
    """
    import scipy.sparse as sp

    import xscale.tl as tl

    names, sizes = np.unique(slides, return_counts=True)
    if slide is None:
        slide = str(names[np.argmin(sizes)])
    rows = np.flatnonzero(slides == slide)
    if rows.size > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
    sub = adata[rows].copy()
    tl.reconstruct(sub, model, progress=progress)
    decoded = np.asarray(sub.layers["xscale_expected"], dtype=np.float32)  # (r, G)
    n, g = adata.shape
    per_row = np.zeros(n, dtype=np.int64)
    per_row[rows] = g
    indptr = np.concatenate([[0], np.cumsum(per_row)])
    indices = np.tile(np.arange(g, dtype=np.int32), rows.size)
    adata.layers["xscale_expected"] = sp.csr_matrix((decoded.ravel(), indices, indptr), shape=(n, g))
    log.info("decoded %d cells of slide %s for the report", rows.size, slide)
    return slide


def run_metrics_for_report(metrics: Mapping[str, Any] | None) -> dict:
    """``xscale run``'s metrics.json as the report's comparison groups (the file itself is unchanged).

    Domains: one group per slide (``{method: {"ari", "nmi"}}``) and the written domains;
    cell types: kNN purity of the cell latents beside that of PCA.
    """
    if not metrics:
        return {}
    out: dict = {"n_cells": metrics.get("n_cells")}
    domains = metrics.get("domains")
    if domains:
        out["domains"] = {f"slide {s}": scores for s, scores in domains.get("per_slide", {}).items()}
        out["domains_written"] = {"xscale_domain": domains["xscale_domain"]}
    cells = metrics.get("cell_types")
    if cells:
        out["cell_type"] = {"xscale_cell": {"knn_purity": cells["knn_purity_xscale_cell"]},
                            "pca": {"knn_purity": cells["knn_purity_pca"]}, "n_labelled": cells["n_labelled"]}
    return out


def write_run_report(out: str | Path, adata: Any, model: Any, metrics: Mapping[str, Any] | None, *,
                     slide_key: str | None, domain_key: str | None = None, cell_type_key: str | None = None,
                     title: str = "xscale run", seed: int = 0, progress: bool = True) -> Path:
    """``DIR/report.html`` of a finished ``xscale run``: domains, latents, scores (when labels were
    given), training curves and the expression decoded on one slide. ``adata`` is the run's
    AnnData; it is left as it was (the decoded layer is removed again)."""
    from threadpoolctl import threadpool_limits

    from xscale.report.build import build_report

    slides = (adata.obs[slide_key].astype(str).to_numpy() if slide_key else np.full(adata.n_obs, "all"))
    had_layer = "xscale_expected" in adata.layers
    previous = adata.layers["xscale_expected"] if had_layer else None
    try:
        slide = decode_one_slide(adata, model, slides, seed=seed, progress=progress)
        history = link_run_logs(out)
        with threadpool_limits(1):  # small sklearn / UMAP fits: threads only contend on shared cores
            return build_report(adata, run_metrics_for_report(metrics), Path(out) / "report.html",
                                history=history or None, cell_type_key=cell_type_key, domain_key=domain_key,
                                slide_key=slide_key, title=f"{title} (expression decoded on slide {slide})",
                                holdout=(), seed=seed)  # every slide trained on, whatever uns says
    finally:  # the caller's AnnData as it was
        if had_layer:
            adata.layers["xscale_expected"] = previous
        else:
            adata.layers.pop("xscale_expected", None)
