from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import xscale.tl as tl
from xscale.errors import XscaleInputError
from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig


@pytest.fixture(scope="module")
def model_first_panel(starmap):
    """A tiny model whose vocabulary is STARmap's first 120 genes (trained a few steps on one batch)."""
    torch.manual_seed(0)
    cfg = GeneToCellConfig.preset("tiny", genes=list(starmap.var_names[:120]), max_genes=48)
    return GeneToCell(cfg).eval()


def test_level1_embed_other_panel_uses_overlap(starmap_small, model_first_panel, caplog):
    other = starmap_small[:60, 80:].copy()  # genes 80..165: 40 shared with the model
    with caplog.at_level(logging.INFO, logger="xscale.tl.cells"):
        tl.embed_cells(other, model_first_panel, batch_size=32)
    assert "uses 40 of the 86 genes" in caplog.text
    emb = other.obsm["X_xscale_cell"]
    assert emb.shape == (60, model_first_panel.config.embedding_dim) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    assert other.uns["X_xscale_cell_params"]["genes_used"] == 40
    far = starmap_small[:10, 150:].copy()  # 16 genes, none in the vocabulary
    with pytest.raises(XscaleInputError, match="shares 0 of its 16 genes"):
        tl.embed_cells(far, model_first_panel)


def test_level1_cells_empty_over_the_model_genes_are_named(starmap_small, model_first_panel, caplog):
    """Cells with counts on genes the model does not know (panel columns 120..) but none on the 40 it
    shares are embedded as empty cells: a warning names them and uns counts them."""
    other = starmap_small[:60, 80:].copy()  # columns 0..39 are the model's genes 80..119
    X = other.X.toarray()
    X[:2, :40] = 0
    X[:2, 50] = 5  # still counts over the whole panel: a whole-panel filter would keep them
    other.X = sp.csr_matrix(X)
    empty = np.flatnonzero(X[:, :40].sum(1) == 0)  # the two above, and any real cell of that kind
    assert 2 <= len(empty) < 10
    with caplog.at_level(logging.WARNING, logger="xscale.tl.cells"):
        tl.embed_cells(other, model_first_panel, progress=False)
    named = list(other.obs_names[empty[:3]])
    assert f"{len(empty)} of 60 cells (e.g. {named}) have no counts over the 40 genes" in caplog.text
    assert other.uns["X_xscale_cell_params"]["empty_cells"] == len(empty)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xscale.tl.cells"):
        tl.embed_cells(other[np.setdiff1d(np.arange(60), empty)].copy(), model_first_panel, progress=False)
    assert "have no counts" not in caplog.text


def test_level1_normalised_data_is_an_error_naming_the_counts_layer(starmap_small, model_first_panel):
    """scanpy's normalize_total + log1p done in place on X: a clear error from embed_cells, reconstruct and
    finetune (not a log line a notebook never shows); the raw counts kept in a layer work."""
    from xscale.train.finetune import finetune

    adata = starmap_small[:40].copy()
    adata.layers["counts"] = adata.X.copy()
    x = adata.X.toarray()
    adata.X = sp.csr_matrix(np.log1p(x / x.sum(1, keepdims=True) * 1e4))
    for call in (lambda: tl.embed_cells(adata, model_first_panel), lambda: tl.reconstruct(adata, model_first_panel),
                 lambda: finetune(model_first_panel, adata, task="cell_type", label_key="cell_type", max_epochs=1,
                                  progress=False)):
        with pytest.raises(XscaleInputError, match=r"adata\.X: expected .*counts.*counts_layer"):
            call()
    tl.embed_cells(adata, model_first_panel, counts_layer="counts")
    assert np.isfinite(adata.obsm["X_xscale_cell"]).all()


def test_level1_backed_anndata_embeds_as_in_memory(starmap_small, model_first_panel, tmp_path):
    """An AnnData opened with read_h5ad(backed="r") (sparse X on disk) embeds like the same data in memory."""
    import anndata as ad

    path = tmp_path / "cells.h5ad"
    starmap_small[:50].copy().write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    tl.embed_cells(backed, model_first_panel)
    memory = tl.embed_cells(ad.read_h5ad(path), model_first_panel, copy=True)
    np.testing.assert_array_equal(backed.obsm["X_xscale_cell"], memory.obsm["X_xscale_cell"])
    backed.file.close()


def test_level1_duplicated_gene_names_are_an_error(starmap_small, model_first_panel):
    adata = starmap_small[:20].copy()
    names = list(adata.var_names)
    names[1] = names[0]
    adata.var_names = names  # anndata warns about non-unique names; embedding must refuse them
    with pytest.raises(XscaleInputError, match=r"adata\.var_names: expected unique gene names, found 1 duplicated"):
        tl.embed_cells(adata, model_first_panel)


def test_level1_embedding_deterministic_under_seed(starmap_small, model_first_panel):
    a = tl.embed_cells(starmap_small[:70].copy(), model_first_panel, batch_size=32, seed=3, copy=True)
    b = tl.embed_cells(starmap_small[:70].copy(), model_first_panel, batch_size=32, seed=3, copy=True)
    np.testing.assert_array_equal(a.obsm["X_xscale_cell"], b.obsm["X_xscale_cell"])
    # the panel (120 known genes) is longer than max_genes=48: each cell's context depends on the cell only,
    # not on the seed or the batch it is in
    c = tl.embed_cells(starmap_small[:70].copy(), model_first_panel, batch_size=7, seed=4, copy=True)
    np.testing.assert_allclose(a.obsm["X_xscale_cell"], c.obsm["X_xscale_cell"], atol=1e-6)


def test_level1_inference_context_reads_whole_panel(starmap_small, model_first_panel):
    """inference_max_genes >= the panel: every gene is read, so the context seed no longer matters;
    embed_cells, encode_cells and the store / dask path (embed_rows) all use the same context."""
    import dataclasses

    from xscale.data.anndata_dataset import map_panel
    from xscale.tl.dask_embed import embed_rows
    from xscale.train.finetune import encode_cells

    net = GeneToCell(dataclasses.replace(model_first_panel.config, inference_max_genes=128))
    net.load_state_dict(model_first_panel.state_dict())
    net.eval()
    assert net.config.inference_context == 128 and model_first_panel.config.inference_context == 48
    ad = starmap_small[:50].copy()
    a = tl.embed_cells(ad, net, batch_size=16, seed=3, copy=True).obsm["X_xscale_cell"]
    b = tl.embed_cells(ad, net, batch_size=16, seed=4, copy=True).obsm["X_xscale_cell"]
    np.testing.assert_array_equal(a, b)
    old = tl.embed_cells(ad, model_first_panel, batch_size=16, seed=3, copy=True).obsm["X_xscale_cell"]
    assert not np.allclose(a, old, atol=1e-4)  # 120 genes vs a 48-gene sampled context
    np.testing.assert_allclose(encode_cells(net, ad, batch_size=16, seed=9).reshape(50, -1), a, atol=1e-5)
    m = map_panel(list(ad.var_names), net.vocab)
    counts = sp.csr_matrix(ad.X)
    rows = embed_rows(net, counts, m.columns, m.gene_ids, start=0, batch_size=16, seed=5)
    np.testing.assert_allclose(rows, a, atol=1e-5)
    with pytest.raises(ValueError, match="inference_max_genes must be a positive integer or None; got 0"):
        dataclasses.replace(model_first_panel.config, inference_max_genes=0)


def test_level1_reconstruct_writes_expected_counts(starmap_small, model_first_panel):
    ad = starmap_small[:40].copy()
    out = tl.reconstruct(ad, model_first_panel, batch_size=16, copy=True)
    assert "xscale_expected" not in ad.layers
    rec = out.layers["xscale_expected"]
    assert rec.shape == ad.shape and rec.dtype == np.float32
    modelled = out.var["xscale_expected_modelled"].to_numpy()
    assert modelled.sum() == 120 and np.isnan(rec[:, ~modelled]).all()
    lib = np.asarray(ad.X[:, :120].sum(1)).ravel()
    np.testing.assert_allclose(rec[:, modelled].sum(1), lib, rtol=1e-4)  # NB mean sums to the library


def test_level1_embed_compiled_equals_eager(starmap_small, model_first_panel):
    """torch.compile is an option of embed_cells: same latents as the eager model."""
    eager = tl.embed_cells(starmap_small, model_first_panel, copy=True).obsm["X_xscale_cell"]
    compiled = tl.embed_cells(starmap_small, model_first_panel, copy=True, compile=True).obsm["X_xscale_cell"]
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)
