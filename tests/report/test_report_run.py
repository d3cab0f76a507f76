"""``xscale run`` writes DIR/report.html: domains, latents, scores beside baselines, training curves and
the expression decoded on one slide, with captions that say no slide was held out."""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from test_report_html import _assert_self_contained  # tests/report is on sys.path (rootdir conftest)

from xscale.cli.main import main
from xscale.report.run_report import decode_one_slide, run_metrics_for_report


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny `xscale run` of 450 STARmap cells (150 per slice), with both label keys."""
    import xscale

    a = xscale.datasets.load("starmap_mpfc")
    rng = np.random.default_rng(0)
    slices = a.obs["slice"].astype(str).to_numpy()
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(slices == s), 150, replace=False)
                                   for s in np.unique(slices)]))
    root = tmp_path_factory.mktemp("run_report")
    a[keep].copy().write_h5ad(root / "data.h5ad")
    out = root / "out"
    code = main(["run", "--data", str(root / "data.h5ad"), "--out", str(out), "--slide-key", "slice",
                 "--domain-key", "domain", "--cell-type-key", "cell_type", "--n-domains", "4",
                 "--preset", "tiny", "--max-steps", "3", "--no-progress"])
    assert code == 0
    return out


def test_run_writes_a_self_contained_report_with_every_section_drawn(run_dir):
    html = (run_dir / "report.html").read_text()
    pngs = _assert_self_contained(html)
    # domains, 2 latent maps, bars, curves, decoded maps, per-gene correlations
    assert len(pngs) == 7
    assert "No decoded expression" not in html and "No metrics given" not in html
    assert "No slide was held out" in html and "Scores are on held-out cells" not in html
    assert "framed in red is held out" not in html
    assert "expression decoded on slide" in html
    # the run's own outputs are as before: metrics.json keeps its layout, cells.zarr has no decoded layer
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"n_cells", "domains", "cell_types", "summary"}
    assert "xscale_expected" not in ad.read_zarr(run_dir / "cells.zarr").layers
    assert (run_dir / "logs" / "level1").is_dir() and (run_dir / "logs" / "level2").is_dir()


def test_run_no_report_writes_none(tmp_path, run_dir):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(run_dir, out, symlinks=True)  # finished stages are skipped
    (out / "report.html").unlink()
    code = main(["run", "--data", str(run_dir.parent / "data.h5ad"), "--out", str(out), "--slide-key", "slice",
                 "--preset", "tiny", "--max-steps", "3", "--no-progress", "--no-report"])
    assert code == 0 and not (out / "report.html").exists()


def test_decode_one_slide_keeps_the_layer_to_that_slide(run_dir):
    from xscale.models.io import load_model

    store = ad.read_zarr(run_dir / "cells.zarr")
    model = load_model(run_dir / "checkpoints" / "level1" / "model")
    slides = store.obs["slice"].astype(str).to_numpy()
    slide = decode_one_slide(store, model, slides, max_cells=100, seed=0, progress=False)
    assert slide == sorted(np.unique(slides))[0]  # equal sizes: the first of the smallest
    layer = store.layers["xscale_expected"]
    assert sp.issparse(layer) and layer.shape == store.shape
    rows = np.flatnonzero(np.diff(sp.csr_matrix(layer).indptr) > 0)
    assert rows.size == 100 and set(slides[rows]) == {slide}
    decoded = layer[rows].toarray()
    assert np.isfinite(decoded).all() and (decoded > 0).all()
    # the same cells decoded on their own give the same values
    import xscale.tl as tl

    alone = tl.reconstruct(store[rows].copy(), model, copy=True, progress=False).layers["xscale_expected"]
    np.testing.assert_allclose(decoded, alone, rtol=1e-6)


def test_run_metrics_become_comparison_groups():
    metrics = {"n_cells": 10,
               "domains": {"per_slide": {"A": {"n_domains": 2, "xscale_niche": {"ari": 0.5, "nmi": 0.4},
                                               "pca": {"ari": 0.3, "nmi": 0.2}}},
                           "xscale_domain": {"ari": 0.6, "nmi": 0.5}, "n_labelled": 10},
               "cell_types": {"knn_purity_xscale_cell": 0.7, "knn_purity_pca": 0.8, "n_labelled": 9}}
    out = run_metrics_for_report(metrics)
    assert out["domains"] == {"slide A": metrics["domains"]["per_slide"]["A"]}
    assert out["domains_written"] == {"xscale_domain": {"ari": 0.6, "nmi": 0.5}}
    assert out["cell_type"] == {"xscale_cell": {"knn_purity": 0.7}, "pca": {"knn_purity": 0.8}, "n_labelled": 9}
    assert run_metrics_for_report(None) == {}
