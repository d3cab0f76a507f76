"""Dask embedding on a 2-worker LocalCluster equals single-process embedding, one model load per worker."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import xscale
from xscale.errors import XscaleInputError


@pytest.fixture(scope="module")
def store_and_model(tmp_path_factory):
    from xscale.data.writeback import write_anndata_zarr
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.io import save_model

    tmp = tmp_path_factory.mktemp("dask_embed")
    adata = xscale.datasets.load("starmap_mpfc")[:700].copy()
    store = write_anndata_zarr(adata, tmp / "cells.zarr")
    torch.manual_seed(0)
    genes = [str(g) for g in adata.var_names][5:]  # the model knows all but 5 panel genes
    model = GeneToCell(GeneToCellConfig.preset("tiny", genes=genes, max_genes=128))  # 161 genes > 128: sampling
    save_model(model, tmp / "model")
    return adata, store, tmp / "model", tmp


def test_dask_two_workers_equal_single_process(store_and_model):
    import anndata as ad
    import zarr

    from xscale.query.store import open_store
    from xscale.tl.dask_embed import embed_store, embed_store_dask

    adata, store, model_dir, tmp = store_and_model
    out = embed_store_dask(store, model_dir, tmp / "latents.zarr", client_or_address="local", n_workers=2,
                           chunk_rows=128, batch_size=50)
    ref = embed_store(store, model_dir, chunk_rows=128, batch_size=50)
    got = ad.read_zarr(out)
    lat = np.asarray(got.obsm["X_xscale_cell"])
    assert lat.shape == (700, 4 * 32) and np.isfinite(lat).all()
    np.testing.assert_array_equal(lat, ref)  # bit-identical to the in-process run
    assert list(got.obs_names) == list(adata.obs_names)
    np.testing.assert_array_equal(got.obsm["spatial"], adata.obsm["spatial"])
    info = zarr.open_group(out, mode="r").attrs["xscale_dask"]
    assert info["chunks"] == 6 and len(info["worker_pids"]) == 2, info
    assert set(info["model_loads_per_worker"].values()) == {1}, info
    # The query layer reads it as a latent store.
    assert open_store(out).latents.shape == (700, 128)
    assert [p.name for p in tmp.iterdir() if ".tmp" in p.name] == []  # no temporary left beside the output
    assert not (out / ".xscale-complete").exists()  # a zarr store gets no marker file (zarr would warn on it)


def test_store_embedding_equals_tl_embed_cells(store_and_model):
    """Same cells, same context sampling (seeded by batch start) as the in-memory xscale.tl.embed_cells."""
    from xscale.models.io import load_model
    from xscale.tl.cells import embed_cells
    from xscale.tl.dask_embed import embed_store

    adata, store, model_dir, _ = store_and_model
    model = load_model(model_dir)
    a = adata.copy()
    embed_cells(a, model, batch_size=50)
    ours = embed_store(store, model_dir, chunk_rows=100, batch_size=50)  # chunk a multiple of the batch
    np.testing.assert_allclose(ours, a.obsm["X_xscale_cell"], rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors(store_and_model, tmp_path):
    from xscale.tl.dask_embed import embed_store_dask

    _, store, model_dir, tmp = store_and_model
    with pytest.raises(XscaleInputError, match="does not exist"):
        embed_store_dask(tmp_path / "nope.zarr", model_dir, tmp_path / "o.zarr")
    (tmp_path / "exists.zarr").mkdir()
    with pytest.raises(XscaleInputError, match="exists"):
        embed_store_dask(store, model_dir, tmp_path / "exists.zarr")
    with pytest.raises(XscaleInputError, match="client_or_address"):
        embed_store_dask(store, model_dir, tmp_path / "o.zarr", client_or_address=3)
