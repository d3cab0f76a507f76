"""var_names holding Ensembl IDs with the symbols in a var column (CELLxGENE's layout): read with
gene_symbols= / --gene-symbols; without it, the vocabulary error says what to pass."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

import xscale
from xscale.cli.main import main
from xscale.data.io import read_dataset
from xscale.data.prepare import prepare
from xscale.data.store import CellStore
from xscale.data.vocab import looks_like_ensembl
from xscale.errors import XscaleInputError
from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
from xscale.models.io import save_model


@pytest.fixture
def ensembl(tmp_path):
    """300 STARmap cells whose var_names are Ensembl-style IDs, symbols in var['feature_name']; its path and the
    AnnData with symbols as var_names."""
    a = xscale.datasets.load("starmap_mpfc")
    a = a[np.flatnonzero((a.obs["slice"] == "20180417_BZ5_control").to_numpy())[:300]].copy()
    del a.uns["xscale_dataset"]
    symbols = a.copy()
    a.var["feature_name"] = list(a.var_names)
    a.var_names = [f"ENSMUSG{i:011d}" for i in range(a.n_vars)]
    a.write_h5ad(tmp_path / "ens.h5ad")
    return tmp_path / "ens.h5ad", symbols


def test_gene_symbols_column_becomes_the_gene_names(ensembl, tmp_path):
    path, symbols = ensembl
    a = read_dataset(path, gene_symbols="feature_name")
    assert list(a.var_names) == list(symbols.var_names)
    assert list(a.var["xscale_var_id"])[:2] == ["ENSMUSG00000000000", "ENSMUSG00000000001"]
    np.testing.assert_array_equal(a.X.toarray(), read_dataset(path).X.toarray())
    with pytest.raises(XscaleInputError, match=r"gene_symbols='symbol': expected a var column of gene symbols.*"
                                               r"var columns: \['feature_name'\]"):
        read_dataset(path, gene_symbols="symbol")
    broken = read_dataset(path, validate=False)
    broken.var.loc[broken.var_names[:3], "feature_name"] = np.nan
    broken.var.loc[broken.var_names[3], "feature_name"] = " "
    broken.write_h5ad(tmp_path / "broken.h5ad")
    with pytest.raises(XscaleInputError, match=r"var\['feature_name'\]: expected a gene symbol for every gene, found 4 "
                                               r"missing or empty \(e.g. for \['ENSMUSG00000000000'"):
        read_dataset(tmp_path / "broken.h5ad", gene_symbols="feature_name")


def test_a_symbol_model_on_ensembl_ids_says_to_pass_gene_symbols(ensembl, tmp_path):
    path, symbols = ensembl
    assert looks_like_ensembl(["ENSG00000141510", "ENSMUSG00000059552.3", "Gad1"])
    assert not looks_like_ensembl(["Gad1", "Sst", "ENSG00000141510"]) and not looks_like_ensembl([])
    torch.manual_seed(0)
    model = GeneToCell(GeneToCellConfig.preset("tiny", genes=list(symbols.var_names)))
    with pytest.raises(XscaleInputError, match=r"shares 0 of its 166 genes.*var_names are Ensembl IDs.*"
                                               r"--gene-symbols COLUMN.*'feature_name'"):
        xscale.tl.embed_cells(read_dataset(path, spatial_key=None), model, copy=True, progress=False)
    # with the symbols: the same latents as the AnnData named by symbols
    got = xscale.tl.embed_cells(read_dataset(path, gene_symbols="feature_name"), model, copy=True, progress=False)
    want = xscale.tl.embed_cells(symbols, model, copy=True, progress=False)
    np.testing.assert_allclose(got.obsm["X_xscale_cell"], want.obsm["X_xscale_cell"], atol=1e-6)

    save_model(model, tmp_path / "ckpt" / "level1" / "model")
    assert main(["embed", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(path), "--out", str(tmp_path / "e"),
                 "--gene-symbols", "feature_name", "--no-progress"]) == 0
    cells = ad.read_zarr(tmp_path / "e" / "cells.zarr")
    np.testing.assert_allclose(cells.obsm["X_xscale_cell"], want.obsm["X_xscale_cell"], atol=1e-6)


def test_prepare_takes_gene_symbols_and_a_store_refuses_them_later(ensembl, tmp_path, capsys):
    path, symbols = ensembl
    assert main(["prepare", str(path), str(tmp_path / "s.zarr"), "--gene-symbols", "feature_name",
                 "--no-progress"]) == 0
    assert CellStore(tmp_path / "s.zarr").genes == list(symbols.var_names)
    mem = read_dataset(path)
    before = list(mem.var_names)
    prepare(mem, tmp_path / "m.zarr", gene_symbols="feature_name", progress=False)
    assert CellStore(tmp_path / "m.zarr").genes == list(symbols.var_names)
    assert list(mem.var_names) == before and "xscale_var_id" not in mem.var  # the caller's AnnData as it was
    capsys.readouterr()
    assert main(["run", "--data", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "r"),
                 "--gene-symbols", "feature_name", "--no-progress", "--no-report"]) == 2
    assert "--gene-symbols: " in capsys.readouterr().err


def test_a_vocabulary_over_ensembl_and_symbol_panels_warns(ensembl):
    import warnings

    from xscale.data.anndata_dataset import vocab_from_adatas

    path, symbols = ensembl
    ids = read_dataset(path)
    with pytest.warns(UserWarning, match=r"Panels \[1\] are named by Ensembl gene IDs and panels \[0\] by gene "
                                         r"symbols: they share no gene tokens.*--gene-symbols"):
        vocab = vocab_from_adatas([symbols, ids])
    assert len(vocab) == 2 * symbols.n_vars
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same kind of names everywhere: silent
        assert len(vocab_from_adatas([symbols, read_dataset(path, gene_symbols="feature_name")])) == symbols.n_vars
        vocab_from_adatas([ids, ids])


def test_pipeline_steps_read_gene_symbols(ensembl, tmp_path):
    """A pipeline step reading your file (here pca_embed) takes gene_symbols; a bundled dataset without that column
    stops with the column error."""
    from xscale.pipelines import run_pipeline
    from xscale.pipelines.steps import _read_data

    path, symbols = ensembl
    (tmp_path / "p.yaml").write_text(
        "name: pca\nvars: {data: x, gene_symbols: null}\nsteps:\n  - name: pca\n    uses: pca_embed\n"
        "    with: {data: \"${vars.data}\", n_components: 5, gene_symbols: \"${vars.gene_symbols}\"}\n")
    done = run_pipeline(tmp_path / "p.yaml", tmp_path / "run", variables={"data": str(path),
                                                                         "gene_symbols": "feature_name"})
    pca = ad.read_zarr(done["pca"]["outputs"]["store"]["path"])
    assert list(pca.var_names) == list(symbols.var_names) and pca.obsm["X_pca"].shape == (300, 5)
    with pytest.raises(XscaleInputError, match=r"gene_symbols='feature_name': expected a var column"):
        _read_data("starmap_mpfc", gene_symbols="feature_name")


def test_multi_dataset_training_reads_gene_symbols_per_dataset(ensembl, tmp_path, monkeypatch, capsys):
    """A bundled (symbol-named) set beside a CELLxGENE-style file: ``xscale fit`` (data.init_args.gene_symbols) and
    the fit_level1 pipeline step take one column per dataset, so both panels share their 166 gene tokens (the IDs
    alone would give 332 and a warning). A list of the wrong length is an error naming both counts."""
    from pathlib import Path

    from xscale.data.io import read_sources
    from xscale.models.io import load_model
    from xscale.pipelines import run_pipeline

    path, symbols = ensembl
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(root / "configs/model/level1/tiny.yaml"),
            "--config", str(root / "configs/data/starmap_mpfc.yaml"), "--save-dir", str(tmp_path / "m"),
            "trainer.max_steps=2", "trainer.logger=false", "trainer.enable_checkpointing=false",
            "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0", "data.init_args.batch_size=16",
            f"data.init_args.datasets=[starmap_mpfc,{path}]", "data.init_args.gene_symbols=[null,feature_name]"]
    assert main(args) == 0
    shared = sorted(g.upper() for g in symbols.var_names)  # the vocabulary normalises symbols to upper case
    assert sorted(load_model(tmp_path / "m").config.genes) == shared

    (tmp_path / "p.yaml").write_text(
        "name: pre\nsteps:\n  - name: l1\n    uses: fit_level1\n"
        f"    with: {{datasets: [starmap_mpfc, \"{path}\"], gene_symbols: [null, feature_name], preset: tiny, "
        "max_steps: 2, batch_size: 16}\n")
    done = run_pipeline(tmp_path / "p.yaml", tmp_path / "run")
    assert sorted(load_model(done["l1"]["outputs"]["checkpoint"]["path"]).config.genes) == shared

    with pytest.raises(XscaleInputError, match=r"gene_symbols: expected one entry per dataset \(2: .*found 1"):
        read_sources(["starmap_mpfc", str(path)], gene_symbols=["feature_name"])
    capsys.readouterr()
    assert main([*args[:-1], "data.init_args.gene_symbols=[feature_name]"]) == 2
    assert "expected one entry per dataset" in capsys.readouterr().err
