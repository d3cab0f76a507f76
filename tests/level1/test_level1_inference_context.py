"""At inference a cell's gene context (panels longer than the model's context) is a rule of the cell
alone: latents do not depend on batch size, cell order, store chunking or in-memory vs store."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import xscale.tl as tl
from xscale.data.batch import CellItem, collate_cells
from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig

KEY = "X_xscale_cell"


@pytest.fixture(scope="module", params=[8, 48])
def short_context_model(request, starmap):
    """A tiny model over all 166 STARmap genes with a context of 8 (every cell expresses more genes:
    top counts kept) or 48 (some cells express fewer: zeros fill the rest)."""
    torch.manual_seed(0)
    cfg = GeneToCellConfig.preset("tiny", genes=[str(g) for g in starmap.var_names], max_genes=request.param)
    model = GeneToCell(cfg).eval()
    assert model.config.inference_context == request.param < starmap.n_vars
    return model


@pytest.fixture(scope="module")
def cells(starmap_small):
    return starmap_small[:90].copy()


def test_embedding_does_not_depend_on_batch_size_or_cell_order(cells, short_context_model):
    a = tl.embed_cells(cells, short_context_model, batch_size=7, seed=0, copy=True, progress=False).obsm[KEY]
    b = tl.embed_cells(cells, short_context_model, batch_size=64, seed=1, copy=True, progress=False).obsm[KEY]
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    perm = np.random.default_rng(1).permutation(cells.n_obs)
    c = tl.embed_cells(cells[perm].copy(), short_context_model, batch_size=13, copy=True, progress=False).obsm[KEY]
    np.testing.assert_allclose(c, a[perm], atol=1e-6, rtol=0)
    one = tl.embed_cells(cells[5:6].copy(), short_context_model, batch_size=1, copy=True, progress=False).obsm[KEY]
    np.testing.assert_allclose(one[0], a[5], atol=1e-6, rtol=0)
    # decoding encodes through the same context
    r7 = tl.reconstruct(cells[:30].copy(), short_context_model, batch_size=7, copy=True, progress=False)
    r30 = tl.reconstruct(cells[:30].copy(), short_context_model, batch_size=30, copy=True, progress=False)
    np.testing.assert_allclose(r7.layers["xscale_expected"], r30.layers["xscale_expected"], rtol=1e-5, atol=1e-6)


def test_store_embedding_equals_in_memory(cells, short_context_model, tmp_path):
    from xscale.data.anndata_dataset import map_panel
    from xscale.data.prepare import prepare
    from xscale.data.store import CellStore
    from xscale.tl.dask_embed import embed_rows
    from xscale.tl.store_embed import embed_store_cells

    mem = tl.embed_cells(cells, short_context_model, batch_size=64, copy=True, progress=False).obsm[KEY]
    store = CellStore(prepare(cells, tmp_path / "s.zarr", slide_key="slice", chunk_cells=40, n_neighbors=5))
    embed_store_cells(store, short_context_model, batch_size=16, seed=3, progress=False)
    import anndata as ad

    stored = np.asarray(ad.read_zarr(store.path).obsm[KEY])
    np.testing.assert_allclose(stored, mem[store.source_index()], atol=1e-6, rtol=0)
    # the dask / reference row path, at other offsets and batch sizes
    m = map_panel(list(cells.var_names), short_context_model.vocab)
    counts = sp.csr_matrix(cells.X)
    rows = np.concatenate([
        embed_rows(short_context_model, counts[:33], m.columns, m.gene_ids, start=0, batch_size=5, seed=0),
        embed_rows(short_context_model, counts[33:], m.columns, m.gene_ids, start=33, batch_size=64, seed=9),
    ])
    np.testing.assert_allclose(rows, mem, atol=1e-6, rtol=0)


def test_inference_context_rule():
    from xscale.data.batch import inference_context, panel_order

    order = np.array([5, 2, 7, 0, 9, 1, 3, 8, 6, 4])
    counts = np.array([0, 3, 0, 0, 1, 0, 0, 2, 0, 0], dtype=np.float32)  # expressed: 1, 4, 7
    # they fit: all kept, the rest are zeros in the fixed order (5, 2, 0, ...)
    np.testing.assert_array_equal(inference_context(counts, 5, order), [1, 2, 4, 5, 7])
    np.testing.assert_array_equal(inference_context(counts, 3, order), [1, 4, 7])
    # they do not fit: the highest counts
    np.testing.assert_array_equal(inference_context(counts, 2, order), [1, 7])
    # ties are broken by the fixed order, not by position
    tied = np.array([1, 0, 1, 0, 0, 0, 0, 1, 0, 1], dtype=np.float32)  # 0, 2, 7, 9 tie; order: 2, 7, 0, 9
    np.testing.assert_array_equal(inference_context(tied, 2, order), [2, 7])
    # a panel that fits is read whole
    np.testing.assert_array_equal(inference_context(counts, 10, order), np.arange(10))
    np.testing.assert_array_equal(inference_context(counts, 50, order), np.arange(10))

    # the context depends on the cell only: not on the batch, its position or an rng
    rng = np.random.default_rng(0)
    ids = rng.permutation(1000)[:60].astype(np.int64)
    cell = np.zeros(60, dtype=np.float32)
    cell[rng.choice(60, 4, replace=False)] = rng.integers(1, 5, 4)
    others = [CellItem(gene_ids=ids, counts=rng.poisson(0.5, 60).astype(np.float32), index=i) for i in range(20)]
    target = CellItem(gene_ids=ids, counts=cell, index=99)
    want = inference_context(cell, 12, panel_order(ids))
    assert want.size == 12 and set(np.flatnonzero(cell)) <= set(want)
    zeros = np.setdiff1d(want, np.flatnonzero(cell))
    assert zeros.max() - zeros.min() > 12  # zeros spread over the panel, not its first genes
    for batch, at in (([target], 0), (others[:7] + [target] + others[7:], 7), (others + [target], 20)):
        for seed in (0, 1):
            b = collate_cells(batch, max_genes=12, rng=np.random.default_rng(seed), deterministic=True)
            np.testing.assert_array_equal(b.gene_ids[at].numpy(), ids[want])
            np.testing.assert_array_equal(b.counts[at].numpy(), cell[want])
    # the same genes in another column order get the same genes in the context
    p = rng.permutation(60)
    again = inference_context(cell[p], 12, panel_order(ids[p]))
    np.testing.assert_array_equal(np.sort(ids[p][again]), np.sort(ids[want]))
    # training keeps sampling at random
    train = [collate_cells([target], max_genes=12, rng=np.random.default_rng(s)).gene_ids[0].numpy()
             for s in range(5)]
    assert len({tuple(t) for t in train}) > 1
