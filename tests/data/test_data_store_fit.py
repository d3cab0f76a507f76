"""fit_level1 on a store from xscale prepare: streamed block by block, with the same input standardisation as
the in-memory fit, control probes left out, a clear error for a path that is no store."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import xscale
from xscale.data.anndata_dataset import AnnDataCellDataset, vocab_from_adatas
from xscale.data.prepare import prepare
from xscale.data.store import CellStore
from xscale.errors import XscaleInputError
from xscale.train.level1 import fit_level1
from xscale.train.level1_store import store_data, store_gene_stats


@pytest.fixture(scope="module")
def probe_store(tmp_path_factory):
    """STARmap's 3190 cells with two control-probe columns, prepared into 200-cell blocks."""
    a = xscale.datasets.load("starmap_mpfc")
    probes = sp.csr_matrix(np.random.default_rng(0).poisson(0.2, size=(a.n_obs, 2)).astype(np.float32))
    data = ad.AnnData(X=sp.hstack([a.X, probes], format="csr"), obs=a.obs.copy(), obsm=dict(a.obsm),
                      var=pd.DataFrame(index=[*a.var_names, "NegPrb1", "BLANK_0001"]))
    out = tmp_path_factory.mktemp("fit_store") / "starmap.zarr"
    return a, CellStore(prepare(data, out, slide_key="slice", chunk_cells=200, progress=False))


def test_store_gene_stats_equal_the_in_memory_ones(probe_store):
    a, store = probe_store
    vocab = vocab_from_adatas([a])
    want = AnnDataCellDataset(a, vocab, report_panel=False).gene_stats()
    got = store_gene_stats(store, vocab, n_cells=store.n_cells)  # every cell: the same statistics
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-9)  # cells in store order: another summation order
    sample = store_gene_stats(store, vocab, n_cells=1000, seed=0)  # a sample: within sampling error
    assert (np.abs(sample[2] - want[2]) <= 4 * want[3] / np.sqrt(1000) + 1e-6).all()


def test_fit_level1_streams_a_store_and_learns(probe_store, tmp_path):
    a, store = probe_store
    torch.set_num_threads(1)
    dm = store_data(store, vocab_from_adatas([a]), val_fraction=0.1, max_genes=None, batch_size=64)
    train = [int(i) for b in dm.train_dataloader() for i in b.index]
    val = [int(i) for b in dm.val_dataloader() for i in b.index]
    assert sorted(train + val) == list(range(store.n_cells)) and 250 < len(val) < 400  # disjoint, all cells
    assert val == [int(i) for b in dm.val_dataloader() for i in b.index]  # validation: the same every epoch

    model = fit_level1(store.path, "small", out_dir=tmp_path / "fit", max_steps=60, batch_size=64, lr=3e-3,
                       seed=0, logger="csv", enable_progress_bar=False, accelerator="cpu")
    assert model.config.genes == vocab_from_adatas([a]).genes  # the probes are no tokens
    # the input standardisation is that of the training cells (not the untrained mean 0 / sd 1)
    cells = a[np.sort(store.source_index()[train])]
    _, _, mean, std = AnnDataCellDataset(cells, model.vocab, report_panel=False).gene_stats()
    ids = model.vocab.index(list(a.var_names))
    np.testing.assert_allclose(model.value_mean[ids].numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(model.value_std[ids].numpy(), np.maximum(std, 0.1), rtol=1e-5)
    losses = pd.read_csv(next((tmp_path / "fit" / "logs").rglob("metrics.csv")))["train/loss"].dropna().to_numpy()
    assert losses[-1] < 0.85 * losses[0], losses  # logged every 10 steps
    assert (tmp_path / "fit" / "model" / "model.safetensors").is_file()


def test_fit_level1_refuses_a_path_that_is_no_store(tmp_path):
    a = xscale.datasets.load("starmap_mpfc")[:50].copy()
    a.write_h5ad(tmp_path / "x.h5ad")
    with pytest.raises(XscaleInputError, match=r"x.h5ad: expected AnnData object\(s\) or a store written by xscale "
                                               r"prepare.*anndata.read_h5ad"):
        fit_level1(tmp_path / "x.h5ad", "tiny", out_dir=tmp_path / "o", max_steps=1)
