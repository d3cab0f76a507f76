"""Two-dimensional views of latents for the report: UMAP, or PCA when UMAP is unavailable.

UMAP's own neighbour search (pynndescent) costs 30-60 s of numba compilation per process on
a small CPU; here the neighbour graph comes from faiss (exact) and UMAP only lays it out,
which brings a first call on ~3,000 cells to a few seconds.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

EmbeddingMethod = Literal["auto", "umap", "pca"]


def _pca(X: np.ndarray, n: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    n = min(n, X.shape[0], X.shape[1])
    return PCA(n_components=n, random_state=seed).fit_transform(X).astype(np.float32)


def _standardise(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    sd = X.std(axis=0)
    return (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def embed_2d(
    X: np.ndarray,
    *,
    method: EmbeddingMethod = "auto",
    n_neighbors: int = 15,
    n_pcs: int = 30,
    seed: int = 0,
) -> tuple[np.ndarray, Literal["UMAP", "PC"]]:
    """2-D coordinates of the rows of ``X``.

    Parameters
    ----------
    X
        (n, F) latents (flattened).
    method
        ``"umap"``: UMAP on the top ``n_pcs`` principal components, faiss kNN graph;
        ``"pca"``: the first two principal components; ``"auto"``: UMAP when umap-learn
        imports, PCA otherwise.

    Returns
    -------
    (n, 2) float32 coordinates and the axis name (``"UMAP"`` or ``"PC"``).
    """
    Z = _standardise(X.reshape(len(X), -1))
    if method == "pca" or len(Z) < max(n_neighbors + 2, 10):
        return _pca(Z, 2, seed), "PC"
    try:
        import umap
    except ImportError:
        if method == "umap":
            raise
        log.warning("umap-learn is not installed; showing PCA instead of UMAP")
        return _pca(Z, 2, seed), "PC"
    from xscale.eval.metrics import knn_indices

    t0 = time.perf_counter()
    P = _pca(Z, n_pcs, seed)
    idx = knn_indices(P, n_neighbors)  # (n, k), self first
    dist = np.linalg.norm(P[idx] - P[:, None, :], axis=-1).astype(np.float32)  # (n, k)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_jobs/random_state and precomputed-knn notices
        reducer = umap.UMAP(
            n_neighbors=n_neighbors,
            precomputed_knn=(idx, dist, None),
            init="pca",
            random_state=seed,
            low_memory=True,
            n_epochs=200 if len(P) <= 10_000 else 100,
        )
        xy = reducer.fit_transform(P).astype(np.float32)
    log.info("UMAP of %d cells in %.1f s", len(P), time.perf_counter() - t0)
    return xy, "UMAP"
