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


def test_resolve_maps_a_bundled_name_to_its_file_and_slide_key(tmp_path):
    path, key = xscale.datasets.resolve("starmap_mpfc")
    assert path == str(xscale.datasets.path("starmap_mpfc")) and key == "slice"
    assert xscale.datasets.resolve("starmap_mpfc", "my_key") == (path, "my_key")  # a given key wins
    other = str(tmp_path / "mine.h5ad")
    assert xscale.datasets.resolve(other) == (other, None) and xscale.datasets.resolve(other, "s") == (other, "s")


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


def test_neighbour_metrics_never_count_the_cell_itself_even_among_exact_duplicates():
    """faiss breaks distance-0 ties by row id, so for the later of two identical rows the twin comes first
    and the row itself second: dropping column 0 kept the cell as its own neighbour (half the rows here)."""
    from xscale.eval import metrics

    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 8)).astype(np.float32)
    X = np.concatenate([base, base])  # every cell has an exact twin
    labels = np.array(["a"] * 200 + ["b"] * 200)  # twins carry different labels
    idx = metrics.knn_indices(X, 2)
    assert (idx[:, 0] != np.arange(400)).sum() > 0  # the case: some rows are not listed first
    others = metrics.knn_others(X, 1)
    assert (others[:, 0] != np.arange(400)).all()
    np.testing.assert_array_equal(others[:, 0], (np.arange(400) + 200) % 400)  # each row's twin
    assert metrics.knn_purity(X, labels, k=1) == 0.0  # the only neighbour is the twin: other label
    d = ((X[:, None] - X[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    ref = np.sort(d, axis=1)[:, :5]
    got = np.sort(((X[:, None] - X[metrics.knn_others(X, 5)]) ** 2).sum(-1), axis=1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)  # the 5 nearest others, brute force


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


def _naive_preservation(before, after, groups, k):
    """Per group, brute-force neighbour lists (Python sorting of all distances), then set overlaps."""
    kept = []

    def neighbours(X, i, rows):
        d = [(float(((X[i] - X[j]) ** 2).sum()), j) for j in rows if j != i]
        return {j for _, j in sorted(d)[:k]}

    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        if rows.size <= k:
            continue
        kept += [len(neighbours(before, i, rows) & neighbours(after, i, rows)) / k for i in rows]
    return float(np.mean(kept))


def test_neighbourhood_preservation_equals_naive_reference_and_ignores_moving_whole_groups():
    from xscale.eval.metrics import neighbourhood_preservation

    rng = np.random.default_rng(0)
    groups = np.array(["a"] * 40 + ["b"] * 30 + ["c"] * 5)  # c has no more cells than k: left out
    before = rng.normal(size=(75, 6))
    after = before + 0.6 * rng.normal(size=(75, 6))
    k = 7
    assert neighbourhood_preservation(before, after, groups, k=k) == pytest.approx(
        _naive_preservation(before, after, groups, k))
    # each group shifted and rotated on its own: every within-group neighbourhood kept
    moved = before.copy()
    for g, shift in (("a", 5.0), ("b", -3.0)):
        q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
        moved[groups == g] = before[groups == g] @ q + shift
    assert neighbourhood_preservation(before, moved, groups, k=k) == pytest.approx(1.0)
    shuffled = before[rng.permutation(75)]
    assert neighbourhood_preservation(before, shuffled, k=k) < 0.3  # reshuffled: about k / n
    with pytest.raises(ValueError, match="same cells; found 75 and 3"):
        neighbourhood_preservation(before, after[:3])
    with pytest.raises(ValueError, match="more than k=15 cells"):
        neighbourhood_preservation(before[:10], after[:10])
