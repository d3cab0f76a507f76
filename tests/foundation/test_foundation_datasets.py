"""Bundled datasets load as promised; the eval metrics behave on known cases."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import xscale
from xscale.errors import XscaleInputError

EXPECTED = {
    "starmap_mpfc": (3190, 166, 15, ("slice", 3)),
    "seqfish_embryo_wsir": (11441, 351, 24, ("embryo", 3)),
    "cosmx_nsclc_profast": (2814, 960, 20, None),
    "merfish_lung_tessera": (3177, 479, 7, None),
    "pbmc3k_subset_profast": (2700, 400, None, None),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_load_returns_raw_counts_coords_and_labels(name):
    n_cells, n_genes, n_types, slides = EXPECTED[name]
    adata = xscale.datasets.load(name)
    meta = xscale.datasets.info(name)
    assert adata.shape == (n_cells, n_genes)
    assert sp.isspmatrix_csr(adata.X) or sp.issparse(adata.X)
    data = adata.X.data
    assert np.all(data >= 0) and np.allclose(data, np.round(data)), "X must hold raw integer counts"
    assert (np.asarray(adata.X.sum(axis=1)).ravel() > 0).mean() > 0.95
    assert adata.var_names.is_unique and adata.obs_names.is_unique
    assert meta.label_key in adata.obs
    if n_types is not None:
        assert adata.obs[meta.label_key].nunique() == n_types
    if meta.spatial:
        xy = adata.obsm["spatial"]
        assert xy.shape == (n_cells, 2) and np.isfinite(xy).all()
    else:
        assert "spatial" not in adata.obsm
    if slides is not None:
        key, n = slides
        assert meta.slide_key == key and adata.obs[key].nunique() == n
        assert meta.holdout in set(adata.obs[key].astype(str))
    assert "Wang" in xscale.datasets.source("starmap_mpfc")


def test_unknown_dataset_lists_available():
    with pytest.raises(XscaleInputError, match="Available: .*starmap_mpfc"):
        xscale.datasets.load("nope")


def test_metrics_on_known_cases():
    from xscale.eval import metrics

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 50)
    X = rng.normal(size=(150, 4)) + labels[:, None] * 10.0  # well separated
    assert metrics.cluster_scores(X, labels, 3)["ari"] > 0.99
    assert metrics.knn_purity(X, labels, k=10) > 0.99
    s = metrics.probe_scores(X[::2], labels[::2], X[1::2], labels[1::2])
    assert s["macro_f1"] > 0.99
    # Slides fully separated -> no mixing; random slide labels -> near-perfect mixing.
    assert metrics.slide_mixing(X, labels, k=10) < 0.05
    assert metrics.slide_mixing(X, rng.integers(0, 2, 150), k=10) > 0.8
    coords = np.arange(10, dtype=float)[:, None].repeat(2, 1)
    sm = metrics.spatial_mean(np.arange(10.0)[:, None], coords, k=2)
    assert sm[5, 0] == pytest.approx(5.0) and sm.shape == (10, 1)


def test_mean_cell_pearson_equals_corrcoef_per_row():
    from xscale.eval.metrics import mean_cell_pearson

    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(30, 12)), rng.normal(size=(30, 12))
    B[:10] += 3 * A[:10]  # some correlated rows
    A[5] = 2.0  # a constant row: no correlation defined, left out
    ok = [i for i in range(30) if i != 5]
    expected = np.mean([np.corrcoef(A[i], B[i])[0, 1] for i in ok])
    assert mean_cell_pearson(A, B) == pytest.approx(expected, rel=1e-12)
    assert mean_cell_pearson(A[ok], 2 * A[ok] + 1) == pytest.approx(1.0)
