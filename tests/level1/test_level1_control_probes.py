"""Control probes (Xenium NegControlProbe_*, CosMx NegPrb*, MERSCOPE Blank-*, ...) are not genes:
vocabularies built from data leave them out, so they are neither tokens nor part of a cell's library."""
from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import xscale.tl as tl
from xscale.data.anndata_dataset import AnnDataCellDataset, vocab_from_adatas
from xscale.data.vocab import GeneVocab, control_probes, is_control_probe
from xscale.errors import XscaleInputError
from xscale.train.level1 import fit_level1

CONTROLS = ["NegControlProbe_00042", "NegControlCodeword_0500", "UnassignedCodeword_0001",
            "DeprecatedCodeword_0003", "Intergenic_Region_12", "BLANK_0006", "NegPrb3", "SystemControl12",
            "Blank-7", "negprb20"]
LOOKALIKES = ["NEGR1", "BLNK", "Negr1", "SYT1", "UNC5A", "Gad1", "Intergenic", "BLANKET"]


def test_control_probe_names_of_each_platform_match_and_real_genes_do_not():
    assert [n for n in CONTROLS if not is_control_probe(n)] == []
    assert [n for n in LOOKALIKES if is_control_probe(n)] == []
    assert control_probes(["Gad1", "NegPrb1", "Sst"]) == ["NegPrb1"]


def _with_controls(adata: ad.AnnData, names: list[str], seed: int = 0) -> ad.AnnData:
    """``adata`` with control-probe columns of background counts (Poisson 0.3) put between its genes."""
    rng = np.random.default_rng(seed)
    extra = sp.csr_matrix(rng.poisson(0.3, size=(adata.n_obs, len(names))).astype(np.float32))
    half = adata.n_vars // 2
    X = sp.hstack([adata.X[:, :half], extra, adata.X[:, half:]], format="csr")
    var_names = [*adata.var_names[:half], *names, *adata.var_names[half:]]
    return ad.AnnData(X=X, obs=adata.obs.copy(), var=pd.DataFrame(index=var_names), obsm=dict(adata.obsm))


def test_vocabulary_leaves_control_probes_out_and_says_so(starmap_small, caplog):
    data = _with_controls(starmap_small, CONTROLS[:4])
    with caplog.at_level(logging.INFO, logger="xscale.data.vocab"):
        vocab = vocab_from_adatas([data])
    assert vocab.genes == vocab_from_adatas([starmap_small]).genes  # the genes, in their order
    assert "Left 4 control probe(s) out of the gene vocabulary" in caplog.text
    kept = vocab_from_adatas([data], keep_control_probes=True)
    assert len(kept) == starmap_small.n_vars + 4 and "NEGPRB3" not in kept and "NEGCONTROLPROBE_00042" in kept
    with pytest.raises(XscaleInputError, match=r"expected gene symbols, found only control probes \(3"):
        GeneVocab.union([["NegPrb1", "NegPrb2", "Blank-1"]])


def test_control_probes_change_neither_training_nor_embedding(starmap_small, tmp_path, caplog):
    """A fit on the panel with control probes trains the very model of the panel without them (same
    seed), and embedding either panel gives identical latents; the panel report counts the probes."""
    data = _with_controls(starmap_small, CONTROLS)
    fits = {}
    for name, adata in (("plain", starmap_small), ("controls", data)):
        fits[name] = fit_level1(adata, "tiny", out_dir=tmp_path / name, max_steps=3, batch_size=32, seed=0,
                                val_fraction=0.0, logger="none", enable_progress_bar=False)
    plain, with_controls = fits["plain"], fits["controls"]
    assert with_controls.config.genes == plain.config.genes
    for (k, a), (_, b) in zip(plain.state_dict().items(), with_controls.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    with caplog.at_level(logging.INFO, logger="xscale.data.anndata_dataset"):
        ds = AnnDataCellDataset(data, plain.vocab)
    assert ds.mappings[0].n_controls == len(CONTROLS) and ds.mappings[0].unknown == []
    assert f"using 166 of 176 panel genes (vocabulary 166); {len(CONTROLS)} control probe(s) left out" in caplog.text
    a = tl.embed_cells(starmap_small, plain, copy=True, progress=False).obsm["X_xscale_cell"]
    b = tl.embed_cells(data, plain, copy=True, progress=False).obsm["X_xscale_cell"]
    np.testing.assert_array_equal(a, b)
