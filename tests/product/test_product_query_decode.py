"""Decoding a hit for a few genes, transfer_labels' panel advice and key_added guard, and the
low-gene-overlap warning of embed_cells."""
from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest

from xscale.errors import XscaleInputError


@pytest.fixture(scope="module")
def starmap_small(starmap_sample):
    """90 STARmap cells (30 per slice)."""
    return starmap_sample(30)


@pytest.fixture(scope="module")
def tiny_level1(starmap_small, tmp_path_factory):
    """(saved directory, model): an untrained tiny level-1 model over the STARmap panel."""
    from xscale.models.gene_to_cell import GeneToCell
    from xscale.models.gene_to_cell_config import GeneToCellConfig
    from xscale.models.io import save_model

    model = GeneToCell(GeneToCellConfig.preset("tiny", genes=list(starmap_small.var_names))).eval()
    path = tmp_path_factory.mktemp("l1") / "model"
    save_model(model, path)
    return path, model


# ------------------------------------------------------------------ 1. decode_hit(genes=)
def test_decode_hit_genes_select_from_the_whole_panel_decode_like_the_cli(starmap_small, tiny_level1, tmp_path,
                                                                          capsys):
    import xscale.tl
    from xscale.cli.main import main
    from xscale.data.writeback import write_anndata_zarr
    from xscale.query import LatentIndex, decode_hit
    from xscale.query.decode import decode_latent

    model_dir, model = tiny_level1
    adata = starmap_small.copy()
    xscale.tl.embed_cells(adata, model, progress=False)
    adata.uns["xscale"] = {"slide_key": "slice"}
    store = write_anndata_zarr(adata, tmp_path / "cells.zarr")
    index = LatentIndex.open(store, level="cell")
    cid = str(index.store.ids[0])

    full = decode_hit(index, cid, model_dir, library=1e4)
    assert len(full) == 166 and np.isclose(full.sum(), 1e4, rtol=1e-3)
    one = decode_hit(index, cid, model_dir, genes=["GAD1"])
    assert list(one.index) == ["GAD1"]
    # the old decode gave the one gene the whole library (10000) whatever the latent
    np.testing.assert_allclose(one["GAD1"], full["GAD1"], rtol=1e-5)
    assert one["GAD1"] < 1e4 / 2
    two = decode_hit(index, cid, model_dir, genes=["Gad1", "SST"])  # symbols as passed, any case
    assert list(two.index) == ["Gad1", "SST"]
    np.testing.assert_allclose(two.to_numpy(), full[["GAD1", "SST"]].to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(decode_latent(model, index.store.latents[index.row(cid)], genes=["Sst"]).to_numpy(),
                               [full["SST"]], rtol=1e-5)
    with pytest.raises(XscaleInputError, match=r"genes: \['NOPE'\] are not in the level-1 model's vocabulary of 166"):
        decode_hit(index, cid, model_dir, genes=["GAD1", "NOPE"])

    capsys.readouterr()
    assert main(["query", "--store", str(store), "--cell", cid, "--k", "2", "--decode", str(model_dir),
                 "--genes", "Gad1"]) == 0
    hits = json.loads(capsys.readouterr().out)
    for hit in hits:
        printed = hit["expected"]["Gad1"]
        mine = decode_hit(index, hit["id"], model_dir, genes=["Gad1"])["Gad1"]
        assert printed == pytest.approx(mine, abs=1e-3), (printed, mine)
        assert mine == pytest.approx(decode_hit(index, hit["id"], model_dir)["GAD1"], rel=1e-5)


# ------------------------------------------------------------------ 2. transfer_labels
def _latent_adata(var_names, n, shift, seed):
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    a = ad.AnnData(np.zeros((n, len(var_names)), dtype=np.float32),
                   obs=pd.DataFrame({"cell_type": rng.choice(["a", "b", "c"], n)},
                                    index=[f"c{seed}_{i}" for i in range(n)]),
                   var=pd.DataFrame(index=list(var_names)))
    a.obsm["X_xscale_cell"] = (rng.normal(size=(n, 8)) + shift).astype(np.float32)
    return a


def test_transfer_labels_far_warning_compares_normalised_symbols(starmap_small, caplog):
    import xscale.tl

    genes = list(starmap_small.var_names)  # 166 mouse-case symbols (Acss1, ...)
    ref = _latent_adata(genes, 60, 0.0, 0)
    query_genes = [g.upper() for g in genes[:25]] + [f"OTHER{i}" for i in range(935)]  # 960, 25 shared
    query = _latent_adata(query_genes, 30, 50.0, 1)
    with caplog.at_level(logging.WARNING, logger="xscale.tl.transfer"):
        xscale.tl.transfer_labels(query, ref, key="cell_type")
    msg = caplog.text
    assert "not in one latent space" in msg
    assert "Their panels differ (25 genes shared of the query's 960 and the reference's 166)" in msg, msg
    assert "stripped, upper-case" in msg and "e.g. ['ACSS1', 'ADCYAP1'" in msg and "from those 25 genes" in msg
    # the advised recipe selects those 25 genes from both
    shared = set(query.var_names.str.strip().str.upper()) & set(ref.var_names.str.strip().str.upper())
    for a in (query, ref):
        assert a[:, a.var_names.str.strip().str.upper().isin(shared)].n_vars == 25

    # panels that differ only by case are one panel: the advice is about the model, not the genes
    caplog.clear()
    same = _latent_adata([g.upper() for g in genes], 30, 50.0, 2)
    with caplog.at_level(logging.WARNING, logger="xscale.tl.transfer"):
        xscale.tl.transfer_labels(same, ref, key="cell_type")
    assert "not in one latent space" in caplog.text and "panels differ" not in caplog.text
    assert "Check that both were embedded with the same model" in caplog.text

    caplog.clear()
    none = _latent_adata([f"OTHER{i}" for i in range(50)], 30, 50.0, 3)
    with caplog.at_level(logging.WARNING, logger="xscale.tl.transfer"):
        xscale.tl.transfer_labels(none, ref, key="cell_type")
    assert "Their panels differ (0 genes shared of the query's 50 and the reference's 166)" in caplog.text
    assert "they share no gene" in caplog.text


def test_transfer_labels_warns_before_replacing_a_column_it_did_not_write(starmap_small):
    import xscale.tl

    genes = list(starmap_small.var_names)
    ref, query = _latent_adata(genes, 60, 0.0, 0), _latent_adata(genes, 30, 0.0, 1)
    query.obs["mine"] = "my annotation"
    with pytest.warns(UserWarning, match=r"key_added='mine' names an existing query.obs column \(object, e.g. "
                                         r"\['my annotation'\]\) that xscale did not write; it is replaced by the "
                                         r"labels transferred from reference.obs\['cell_type'\]\. Pass another "
                                         r"key_added="):
        xscale.tl.transfer_labels(query, ref, key="cell_type", key_added="mine")
    assert set(query.obs["mine"].astype(str)) <= {"a", "b", "c"}  # written, as scanpy does
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xscale.tl.transfer_labels(query, ref, key="cell_type", key_added="mine")  # a rerun: xscale wrote it
        xscale.tl.transfer_labels(query, ref, key="cell_type")  # a new column
        xscale.tl.transfer_labels(query, ref, key="cell_type")  # and its rerun
        query.obs["xscale_label"] = "x"
        xscale.tl.transfer_labels(query, ref, key="cell_type", key_added="xscale_label")
    assert "xscale_label" in query.obs and set(query.obs["xscale_label"].astype(str)) <= {"a", "b", "c"}


# ------------------------------------------------------------------ 3. low gene overlap
def test_low_overlap_rule():
    from xscale.tl.cells import low_overlap

    assert low_overlap(12, 166, 166)  # lowoverlap.h5ad: 12 of 166 model genes
    assert low_overlap(25, 960, 166)  # 25 of a 960-gene panel
    assert not low_overlap(166, 166, 166)  # the model's own panel
    assert not low_overlap(150, 960, 166)  # a larger panel holding most of the model's genes
    assert not low_overlap(166, 166, 1500)  # one panel of a model trained on several


def _counts_adata(var_names, n=40, seed=0):
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    return ad.AnnData(rng.poisson(2.0, size=(n, len(var_names))).astype(np.float32),
                      obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]), var=pd.DataFrame(index=list(var_names)))


def _low_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "xscale.tl.cells" and r.levelno >= logging.WARNING and "genes it knows" in r.getMessage()]


def test_embed_cells_warns_on_low_gene_overlap(starmap_small, tiny_level1, caplog):
    import xscale.tl

    _, model = tiny_level1
    genes = list(starmap_small.var_names)
    low = starmap_small[:40].copy()
    low.var_names = genes[:12] + [f"FAKE{i}" for i in range(12, 166)]
    with caplog.at_level(logging.INFO, logger="xscale.tl.cells"):
        xscale.tl.embed_cells(low, model, progress=False)
    (msg,) = _low_warnings(caplog)
    assert "The model uses only 12 of the 166 genes it knows (7%; 12 of this panel's 166 genes" in msg
    assert "latents from so few genes are unreliable" in msg and "at least 25% of the model's genes" in msg

    caplog.clear()
    big = _counts_adata(genes[:25] + [f"OTHER{i}" for i in range(935)])
    with caplog.at_level(logging.WARNING, logger="xscale.tl.cells"):
        xscale.tl.embed_cells(big, model, progress=False)
    (msg,) = _low_warnings(caplog)
    assert "uses only 25 of the 166 genes it knows" in msg and "25 of this panel's 960 genes" in msg

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xscale.tl.cells"):
        xscale.tl.embed_cells(starmap_small[:40].copy(), model, progress=False)  # its own panel
        xscale.tl.embed_cells(_counts_adata(genes[:150] + [f"OTHER{i}" for i in range(810)]), model, progress=False)
    assert _low_warnings(caplog) == []


@pytest.mark.parametrize("name", ["starmap_mpfc", "cosmx_nsclc_profast", "merfish_lung_tessera",
                                  "pbmc3k_subset_profast", "seqfish_embryo_wsir"])
def test_bundled_datasets_with_their_own_model_do_not_warn(name, caplog):
    """As tests and the demo do: a model over a dataset's vocabulary (control probes left out) embeds it quietly."""
    import xscale
    from xscale.data.anndata_dataset import vocab_from_adatas
    from xscale.models.gene_to_cell import GeneToCell
    from xscale.models.gene_to_cell_config import GeneToCellConfig

    adata = xscale.datasets.load(name)[:30].copy()
    model = GeneToCell(GeneToCellConfig.preset("tiny", genes=vocab_from_adatas([adata]).genes))
    with caplog.at_level(logging.WARNING, logger="xscale.tl.cells"):
        xscale.tl.embed_cells(adata, model, progress=False)
    assert _low_warnings(caplog) == []
