"""Fixtures for the product tests: a latent store built from real STARmap cells.

Until a trained model is needed, latents are PCA of log-normalised expression (cell level)
and its spatial neighbourhood mean (niche level), shaped (n, K, D) like real latents.
"""
from __future__ import annotations

import numpy as np
import pytest


def pca_latents(adata, n_comp: int = 32) -> np.ndarray:
    from sklearn.decomposition import PCA

    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    lib = X.sum(1, keepdims=True)
    Z = np.log1p(X / np.maximum(lib, 1) * 1e4)
    return PCA(n_comp, random_state=0).fit_transform(Z).astype(np.float32)


def starmap_per_slice(n: int):
    """Real STARmap cells, ``n`` drawn per slice (seed 0), in the dataset's order."""
    import xscale

    adata = xscale.datasets.load("starmap_mpfc")
    rng = np.random.default_rng(0)
    keep = np.concatenate([rng.choice(np.flatnonzero((adata.obs["slice"] == s).to_numpy()), n, replace=False)
                           for s in sorted(adata.obs["slice"].unique())])
    return adata[np.sort(keep)].copy()


@pytest.fixture(scope="session")
def starmap_sample():
    """:func:`starmap_per_slice` for the tests of this directory (a function of n)."""
    return starmap_per_slice


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """2 shared cores: BLAS/OpenMP oversubscription makes sklearn 100x slower under load."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="session")
def starmap_store(tmp_path_factory):
    """(path to cells.zarr, AnnData) with obsm X_xscale_cell (n, 4, 8) and X_xscale_niche (n, 2, 16)."""
    import xscale
    from xscale.eval.metrics import spatial_mean

    adata = xscale.datasets.load("starmap_mpfc")
    pcs = pca_latents(adata, 32)
    niche = np.zeros_like(pcs)
    for s in adata.obs["slice"].unique():
        m = (adata.obs["slice"] == s).to_numpy()
        niche[m] = spatial_mean(pcs[m], adata.obsm["spatial"][m], k=10)
    adata.obsm["X_xscale_cell"] = pcs.reshape(-1, 4, 8)
    adata.obsm["X_xscale_niche"] = niche.reshape(-1, 2, 16)
    adata.uns["xscale"] = {"slide_key": "slice"}
    from xscale.data.writeback import write_anndata_zarr

    path = write_anndata_zarr(adata, tmp_path_factory.mktemp("store") / "cells.zarr")
    return path, adata


@pytest.fixture(scope="session")
def starmap_subset_h5ad(tmp_path_factory):
    """600 real STARmap cells (200 per slice, coordinates and labels kept) as an .h5ad file."""
    path = tmp_path_factory.mktemp("subset") / "starmap_subset.h5ad"
    starmap_per_slice(200).write_h5ad(path)
    return path
