"""Metrics and simple baselines shared by pipelines, benchmarks and the report.

All functions take plain numpy arrays; labels may be strings. Neighbour searches use
faiss (exact L2), never a hand-written search.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_f32(X: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(X, dtype=np.float32))


def knn_indices(X: np.ndarray, k: int, *, query: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k nearest rows of ``X`` for each row of ``query`` (default ``X``). (n, k) int64.

    When ``query`` is ``X`` the point itself is included (distance 0, usually column 0).
    """
    import faiss

    base = _as_f32(X)
    q = base if query is None else _as_f32(query)
    index = faiss.IndexFlatL2(base.shape[1])
    index.add(base)
    _, idx = index.search(q, min(k, base.shape[0]))
    return idx.astype(np.int64)


#: probe_scores settings that fit the logistic regression to convergence (its optimum is unique), not to wherever the
#: solver stopped on this machine.
CONVERGED_PROBE: dict[str, float] = {"tol": 1e-6, "max_iter": 20_000}


def probe_scores(
    X_train: np.ndarray, y_train: Sequence, X_test: np.ndarray, y_test: Sequence, *, max_iter: int = 2000,
    seed: int = 0, tol: float = 1e-4,
) -> dict[str, float]:
    """Logistic regression on standardised features: fit on train, score on test.

    ``tol`` is the solver's stopping tolerance (scikit-learn's default 1e-4). With it, lbfgs may
    stop short of the optimum, and where it stops depends on the machine's floating point: the
    same STARmap embedding scored macro-F1 0.697 here and 0.688 on another machine, and 0.691
    fitted to convergence (``tol=1e-6``, 453 iterations instead of 107). Pass
    ``**CONVERGED_PROBE`` for the optimum itself, which is unique, so the score no longer hangs on
    where the solver stopped (``xscale evaluate`` and the cell-level benchmark do).

    Returns ``{"macro_f1": float, "accuracy": float}`` on the test set.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, tol=tol, random_state=seed))
    clf.fit(np.asarray(X_train), np.asarray(y_train))
    pred = clf.predict(np.asarray(X_test))
    return {
        "macro_f1": float(f1_score(y_test, pred, average="macro")),
        "accuracy": float(accuracy_score(y_test, pred)),
    }


def cluster_scores(
    X: np.ndarray, labels: Sequence, n_clusters: int, *, seeds: Sequence[int] = (0, 1, 2)
) -> dict[str, float]:
    """k-means on ``X`` (standardised per feature), ARI and NMI against ``labels``, mean over seeds."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    Z = _standardise(X)
    aris, nmis = [], []
    for s in seeds:
        pred = KMeans(n_clusters=n_clusters, n_init=10, random_state=s).fit_predict(Z)
        aris.append(adjusted_rand_score(labels, pred))
        nmis.append(normalized_mutual_info_score(labels, pred))
    return {"ari": float(np.mean(aris)), "nmi": float(np.mean(nmis))}


def _standardise(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    sd = X.std(axis=0)
    return (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def spatial_mean(X: np.ndarray, coords: np.ndarray, *, k: int = 10) -> np.ndarray:
    """Mean of ``X`` over each cell and its ``k`` nearest spatial neighbours. (n, d) -> (n, d).

    Call it per slide: neighbours are searched among the rows given.
    """
    idx = knn_indices(coords, k + 1)  # (n, k+1), self included
    return np.asarray(X, dtype=np.float64)[idx].mean(axis=1)


def knn_others(X: np.ndarray, k: int) -> np.ndarray:
    """Indices (n, k) of each row's k nearest other rows: the row itself is removed wherever the
    search placed it (among exact duplicates faiss may list a twin first, so it is not always
    column 0); if it is not among the k + 1 found, the farthest of them goes instead."""
    idx = knn_indices(X, k + 1)  # (n, k+1), usually self first
    n = idx.shape[0]
    drop = idx == np.arange(n)[:, None]
    drop[~drop.any(axis=1), -1] = True
    return idx[~drop].reshape(n, idx.shape[1] - 1)


def knn_purity(X: np.ndarray, labels: Sequence, *, k: int = 15) -> float:
    """Mean fraction of each cell's k nearest neighbours (self excluded) sharing its label."""
    y = np.asarray(labels)
    idx = knn_others(X, k)
    return float((y[idx] == y[:, None]).mean())


def slide_mixing(X: np.ndarray, slides: Sequence, *, k: int = 15) -> float:
    """Mean per-cell entropy of slide labels among its k nearest neighbours, divided by log(#slides).

    1 = every neighbourhood holds the slides in equal shares, 0 = every neighbour from one slide.
    With slides of unequal size, an embedding that ignores slides entirely scores the entropy of the
    slide proportions over log(#slides) (e.g. 0.47 for a 90 / 10 split), not 1: compare scores of the
    same cells (before / after a correction), not across datasets.
    """
    s = np.asarray(slides)
    cats, codes = np.unique(s, return_inverse=True)
    if len(cats) < 2:
        raise ValueError("slide_mixing needs at least two slides.")
    idx = knn_others(X, k)
    counts = np.stack([(codes[idx] == c).sum(axis=1) for c in range(len(cats))], axis=1) / idx.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(counts > 0, counts * np.log(counts), 0.0), axis=1)
    return float(ent.mean() / np.log(len(cats)))


def neighbourhood_preservation(before: np.ndarray, after: np.ndarray, groups: Sequence | None = None, *,
                               k: int = 15) -> float:
    """Mean fraction of each cell's k nearest neighbours in ``before`` that are still among its k nearest in ``after``.

    before (n, F) and after (n, F') embed the same cells (e.g. latents before and after a slide
    correction). With ``groups`` (n,) (slides), neighbours are searched among the cells of the
    same group only, so aligning whole groups costs nothing and what counts is whether each
    group's own neighbourhoods survived. Needs no labels: 1 = every neighbourhood kept, ~k/n =
    reshuffled at random. Groups of k cells or fewer are left out.
    """
    b, a = np.asarray(before), np.asarray(after)
    if len(b) != len(a):
        raise ValueError(f"before and after must embed the same cells; found {len(b)} and {len(a)} rows.")
    g = np.zeros(len(b), dtype=int) if groups is None else np.asarray(groups)
    kept = []
    for name in np.unique(g):
        rows = np.flatnonzero(g == name)
        if rows.size <= k:
            continue
        nb = knn_others(b[rows], k)  # self excluded
        na = knn_others(a[rows], k)
        kept.append((nb[:, :, None] == na[:, None, :]).any(axis=2).sum(axis=1) / k)  # (n_group,)
    if not kept:
        raise ValueError(f"neighbourhood_preservation needs a group with more than k={k} cells.")
    return float(np.concatenate(kept).mean())


def mean_cell_pearson(A: np.ndarray, B: np.ndarray) -> float:
    """Mean over cells (rows) of the Pearson correlation between ``A[i]`` and ``B[i]``. (n, G), (n, G).

    Rows constant in either matrix (no correlation defined) are left out of the mean.
    """
    a = np.asarray(A, dtype=np.float64)
    b = np.asarray(B, dtype=np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    norms = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))  # (n,)
    ok = norms > 0
    return float(((a * b).sum(axis=1)[ok] / norms[ok]).mean())


def log_normalized(X, *, target: float = 1e4) -> np.ndarray:
    """Dense log1p(counts / library × target) of a (sparse) count matrix. (n, G) float32."""
    import scipy.sparse as sp

    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    lib = X.sum(axis=1, keepdims=True)
    return np.log1p(X / np.maximum(lib, 1e-8) * target).astype(np.float32)


def pca(X_fit: np.ndarray, X_apply: Sequence[np.ndarray] = (), *, n_components: int = 30, seed: int = 0):
    """PCA fitted on ``X_fit``; returns the transform of ``X_fit`` followed by each of ``X_apply``."""
    from sklearn.decomposition import PCA

    model = PCA(n_components=min(n_components, *X_fit.shape), random_state=seed).fit(X_fit)
    return [model.transform(X_fit), *(model.transform(x) for x in X_apply)]
