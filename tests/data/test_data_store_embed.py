"""Out-of-core, resumable embedding of a prepared store (xscale.tl.store_embed)."""
from __future__ import annotations

import contextlib

import anndata as ad
import numpy as np
import pytest
import torch

import xscale
from xscale.data.prepare import prepare
from xscale.data.store import CellStore
from xscale.models.cell_to_tissue import CellToTissue, CellToTissueConfig
from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
from xscale.tl.store_embed import embed_store_cells, embed_store_niches


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    adata = xscale.datasets.load("starmap_mpfc")
    l1 = GeneToCell(GeneToCellConfig.preset("tiny", genes=[str(g) for g in adata.var_names])).eval()
    l2 = CellToTissue(CellToTissueConfig.preset("tiny", in_dim=l1.config.embedding_dim)).eval()  # max_cells 11
    return adata, l1, l2


def _store(tmp_path):
    # n_neighbors = max_cells - 1: the store's niches are the ones make_niches builds
    return CellStore(prepare(xscale.datasets.path("starmap_mpfc"), tmp_path / "s.zarr", slide_key="slice",
                             chunk_cells=400, n_neighbors=10))


def test_store_embedding_equals_in_memory_and_resumes(models, tmp_path, monkeypatch, interrupt_after_two_blocks):
    torch.set_num_threads(1)
    adata, l1, l2 = models
    store = _store(tmp_path)
    order = store.source_index()  # store row -> input row

    # interrupted after two blocks: nothing in obsm yet, a re-run finishes the rest only
    from xscale.data.writeback import LatentWriter

    real_write = interrupt_after_two_blocks(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        embed_store_cells(store, l1, progress=False)
    assert "X_xscale_cell" not in ad.read_zarr(store.path).obsm
    monkeypatch.setattr(LatentWriter, "write_chunk", real_write)
    resumed_calls = []
    monkeypatch.setattr(LatentWriter, "write_chunk",
                        lambda self, i, v: (resumed_calls.append(i), real_write(self, i, v)))
    embed_store_cells(store, l1, progress=False)
    assert sorted(resumed_calls) == list(range(2, store.n_chunks))  # only the missing blocks

    cells = ad.read_zarr(store.path).obsm["X_xscale_cell"]
    mem = xscale.tl.embed_cells(adata, l1, copy=True).obsm["X_xscale_cell"]
    np.testing.assert_allclose(cells, mem[order], atol=1e-5)

    embed_store_niches(store, l2, progress=False)
    niches = ad.read_zarr(store.path).obsm["X_xscale_niche"]
    adata.obsm["X_xscale_cell"] = mem
    ref = xscale.tl.embed_niches(adata, l2, slide_key="slice", copy=True).obsm["X_xscale_niche"]
    np.testing.assert_allclose(niches, ref[order], atol=1e-4)

    path = store.path / "obsm" / "X_xscale_cell" / "zarr.json"
    before = path.stat().st_mtime_ns
    embed_store_cells(store, l1, progress=False)  # the same model again: complete, skipped
    assert path.stat().st_mtime_ns == before
    import copy

    other = copy.deepcopy(l1)
    with torch.no_grad():
        next(other.parameters()).add_(0.1)
    with pytest.raises(xscale.errors.XscaleInputError, match="already holds latents made by another model"):
        embed_store_cells(store, other, progress=False)


def test_niche_partial_from_other_cell_latents_is_not_resumed(models, tmp_path, monkeypatch,
                                                             interrupt_after_two_blocks):
    """Niches interrupted, then the cell latents re-embedded with another model (--overwrite): the
    niche partial was made from the old latents and is discarded, not resumed into a mix of both."""
    import copy

    from xscale.data.writeback import LatentWriter

    torch.set_num_threads(1)
    _, l1, l2 = models
    store = _store(tmp_path)
    embed_store_cells(store, l1, progress=False)
    real_write = interrupt_after_two_blocks(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        embed_store_niches(store, l2, progress=False)
    monkeypatch.setattr(LatentWriter, "write_chunk", real_write)
    other = copy.deepcopy(l1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05)
    embed_store_cells(store, other, overwrite=True, progress=False)
    embed_store_niches(store, l2, progress=False)
    resumed = ad.read_zarr(store.path).obsm["X_xscale_niche"]
    fresh = CellStore(prepare(xscale.datasets.path("starmap_mpfc"), tmp_path / "f.zarr", slide_key="slice",
                              chunk_cells=400, n_neighbors=10))
    embed_store_cells(fresh, other, progress=False)
    embed_store_niches(fresh, l2, progress=False)
    np.testing.assert_allclose(resumed, ad.read_zarr(fresh.path).obsm["X_xscale_niche"], atol=1e-6)


def test_store_niche_embedding_needs_cell_latents(models, tmp_path):
    _, _, l2 = models
    with pytest.raises(xscale.errors.XscaleInputError, match=r"obsm\['X_xscale_cell'\]"):
        embed_store_niches(_store(tmp_path), l2, progress=False)


def test_cli_embed_prepared_store_in_place(models, tmp_path, capsys):
    from xscale.cli.main import main
    from xscale.models.io import save_model

    _, l1, l2 = models
    save_model(l1, tmp_path / "ckpt" / "level1" / "model")
    save_model(l2, tmp_path / "ckpt" / "level2" / "model")
    store = _store(tmp_path)
    assert main(["embed", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(store.path)]) == 0
    out = capsys.readouterr().out
    assert "cell latents" in out and "niche latents" in out
    a = ad.read_zarr(store.path)
    assert a.obsm["X_xscale_cell"].shape == (store.n_cells, l1.config.embedding_dim)
    assert a.obsm["X_xscale_niche"].shape == (store.n_cells, l2.config.n_tissue_latents * l2.config.dim)
    # a re-run with the same models (e.g. after an interruption during the niches) skips what is complete
    keys = ("X_xscale_cell", "X_xscale_niche")
    written = {k: (store.path / "obsm" / k / "zarr.json").stat().st_mtime_ns for k in keys}
    assert main(["embed", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(store.path)]) == 0
    assert {k: (store.path / "obsm" / k / "zarr.json").stat().st_mtime_ns for k in written} == written
    # another model refuses to replace them silently; --overwrite replaces them
    other = l1.__class__(l1.config)
    save_model(other, tmp_path / "ckpt2" / "level1" / "model")
    assert main(["embed", "--checkpoint", str(tmp_path / "ckpt2"), "--data", str(store.path)]) == 2
    assert "already holds latents made by another model" in capsys.readouterr().err
    assert main(["embed", "--checkpoint", str(tmp_path / "ckpt2"), "--data", str(store.path), "--overwrite"]) == 0
    # the niche latents were made from the replaced cell latents: said, and domains refuses them until re-embedded
    assert "X_xscale_niche was computed from the earlier cell latents" in capsys.readouterr().out
    assert main(["domains", "--store", str(store.path), "--n-domains", "3"]) == 2
    assert "was computed from earlier cell latents" in capsys.readouterr().err
    assert main(["embed", "--checkpoint", str(tmp_path / "ckpt2"), "--level2", str(tmp_path / "ckpt" / "level2"),
                 "--data", str(store.path), "--overwrite"]) == 0
    # domains on the store, as the --n-domains error suggests: only obs changes, it stays a prepared store
    assert main(["domains", "--store", str(store.path), "--n-domains", "3"]) == 0
    assert "wrote obs['xscale_domain'] into" in capsys.readouterr().out
    again = CellStore(store.path)
    assert again.n_cells == store.n_cells
    back = ad.read_zarr(store.path)
    assert set(back.obs["xscale_domain"].astype(str)) == {"0", "1", "2"} and "X_xscale_niche" in back.obsm
    assert main(["domains", "--store", str(store.path), "--n-domains", "2"]) == 0  # re-clustered in place
    assert set(ad.read_zarr(store.path).obs["xscale_domain"].astype(str)) == {"0", "1"}
    capsys.readouterr()
    for extra, says in ((["--dask", "local"], "embed_store_dask(store"), (["--n-domains", "3"], "xscale domains"),
                        (["--slide-key", "slice", "--counts-layer", "c"], "none of --slide-key, --counts-layer"),
                        (["--table-key", "t"], "--table-key (without --write-back)"),
                        (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, found 0")):
        with pytest.raises(SystemExit) if extra[0] == "--batch-size" else contextlib.nullcontext() as exited:
            assert main(["embed", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(store.path), *extra]) == 2
        assert exited is None or exited.value.code == 2
        assert says in capsys.readouterr().err


def test_cli_embed_write_back_puts_latents_into_the_spatialdata_table(models, small_adata, write_spatialdata,
                                                                       tmp_path, capsys):
    """``xscale embed --data x.sdata.zarr --write-back``: cell latents in the table's obsm (by cell, NaN for a
    cell dropped at validation), niche latents in a second table annotating the same shapes; the same values
    as DIR/cells.zarr; counts untouched."""
    import spatialdata as sd

    from xscale.cli.main import main
    from xscale.models.io import save_model

    _, l1, l2 = models
    save_model(l1, tmp_path / "ckpt" / "level1" / "model")
    save_model(l2, tmp_path / "ckpt" / "level2" / "model")
    x = small_adata.X.tolil()
    x[5] = 0  # a zero-count cell: dropped at validation, NaN in the table
    small_adata.X = x.tocsr()
    path = write_spatialdata(small_adata, tmp_path / "x.sdata.zarr")
    args = ["embed", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(path), "--out", str(tmp_path / "o")]
    with pytest.warns(UserWarning, match="Dropped 1 of 300 cells with zero total counts"):
        assert main([*args, "--write-back", "--n-domains", "3"]) == 0
    assert "into the table of" in capsys.readouterr().out
    back = sd.read_zarr(path)
    table, niches = back.tables["table"], back.tables["table_niches"]
    cells = ad.read_zarr(tmp_path / "o" / "cells.zarr")
    assert cells.n_obs == small_adata.n_obs - 1 and small_adata.obs_names[5] not in cells.obs_names
    lat = np.asarray(table.obsm["X_xscale_cell"])
    assert lat.shape == (small_adata.n_obs, l1.config.embedding_dim) and np.isnan(lat[5]).all()
    keep = np.arange(small_adata.n_obs) != 5
    np.testing.assert_array_equal(lat[keep], cells.obsm["X_xscale_cell"])
    np.testing.assert_array_equal(np.asarray(niches.X)[keep], cells.obsm["X_xscale_niche"])
    assert (niches.obs["cell_id"].to_numpy() == table.obs["cell_id"].to_numpy()).all()
    assert np.array_equal(table.X.toarray(), small_adata.X.toarray())  # counts untouched
    domain = table.obs["xscale_domain"]
    assert domain.isna().to_numpy()[5] and (domain[keep].astype(str).to_numpy()
                                            == cells.obs["xscale_domain"].astype(str).to_numpy()).all()
    # not SpatialData: refused before any work
    assert main(["embed", "--checkpoint", str(tmp_path / "ckpt"), "--data", "starmap_mpfc", "--out",
                 str(tmp_path / "p"), "--write-back"]) == 2
    assert "expected --data to be a SpatialData zarr store, found a bundled dataset" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_cli_embed_of_a_store_prepared_from_spatialdata_writes_back_into_it(models, small_adata, write_spatialdata,
                                                                            tmp_path, capsys):
    """``xscale embed --data STORE --write-back``: the store records the SpatialData store it was prepared from (path,
    format, table), so the latents embedded out of core go into that table (in its row order, NaN for a dropped
    cell) and a niche table; a store prepared from an .h5ad is refused before any embedding, as is one whose source
    has gone."""
    import shutil

    import spatialdata as sd

    from xscale.cli.main import main
    from xscale.data.writeback import latents_in_source_order
    from xscale.models.io import save_model

    _, l1, l2 = models
    save_model(l1, tmp_path / "ckpt" / "level1" / "model")
    save_model(l2, tmp_path / "ckpt" / "level2" / "model")
    x = small_adata.X.tolil()
    x[7] = 0  # dropped when the store is prepared: NaN in the table
    small_adata.X = x.tocsr()
    path = write_spatialdata(small_adata, tmp_path / "x.sdata.zarr")
    with pytest.warns(UserWarning, match="Dropped 1 of 300 cells"):
        store = CellStore(prepare(path, tmp_path / "x.xscale.zarr", chunk_cells=64))
    assert (store.source, store.source_format, store.source_table_key) == (str(path.resolve()), "spatialdata-zarr",
                                                                          "table")
    args = ["embed", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(store.path), "--no-progress"]
    assert main([*args, "--write-back"]) == 0
    assert "into the table of" in capsys.readouterr().out
    back = sd.read_zarr(path)
    lat = np.asarray(back.tables["table"].obsm["X_xscale_cell"])
    np.testing.assert_array_equal(lat, latents_in_source_order(store, "X_xscale_cell", small_adata.n_obs))
    assert np.isnan(lat[7]).all() and not np.isnan(np.delete(lat, 7, axis=0)).any()
    np.testing.assert_array_equal(np.asarray(back.tables["table_niches"].X),
                                  latents_in_source_order(store, "X_xscale_niche", small_adata.n_obs))

    small_adata.write_h5ad(tmp_path / "x.h5ad")
    with pytest.warns(UserWarning, match="Dropped 1 of 300 cells"):
        other = prepare(tmp_path / "x.h5ad", tmp_path / "h.xscale.zarr", chunk_cells=64)
    assert main([*args[:4], str(other), "--write-back"]) == 2
    assert "a prepared store made from" in capsys.readouterr().err
    assert not (other / "obsm" / "X_xscale_cell").exists()  # refused before any embedding
    shutil.rmtree(path)  # the source has gone
    assert main([*args, "--write-back", "--overwrite"]) == 2
    assert "which no longer exists" in capsys.readouterr().err


def test_cli_run_write_back_into_the_spatialdata_table(small_adata, write_spatialdata, tmp_path, capsys):
    import spatialdata as sd

    from xscale.cli.main import main

    path = write_spatialdata(small_adata, tmp_path / "x.sdata.zarr")
    assert main(["run", "--data", str(path), "--out", str(tmp_path / "r"), "--preset", "tiny", "--max-steps", "2",
                 "--n-domains", "3", "--no-progress", "--no-report", "--write-back"]) == 0
    assert "into the table of" in capsys.readouterr().out
    table = sd.read_zarr(path).tables["table"]
    cells = ad.read_zarr(tmp_path / "r" / "cells.zarr")
    np.testing.assert_array_equal(np.asarray(table.obsm["X_xscale_cell"]), cells.obsm["X_xscale_cell"])
    assert list(table.obs["xscale_domain"].astype(str)) == list(cells.obs["xscale_domain"].astype(str))
    assert sd.read_zarr(path).tables["table_niches"].shape == cells.obsm["X_xscale_niche"].shape
    # the niche table written back is not a table of cells: later commands still find the one table without
    # --table-key (they stopped with "found 2 tables"), and a second write-back updates both
    ckpt = tmp_path / "r" / "checkpoints"
    assert main(["embed", "--checkpoint", str(ckpt), "--data", str(path), "--out", str(tmp_path / "e"),
                 "--write-back", "--no-progress"]) == 0
    capsys.readouterr()
    assert sorted(sd.read_zarr(path).tables) == ["table", "table_niches"]
    assert main(["run", "--data", "starmap_mpfc", "--out", str(tmp_path / "q"), "--write-back"]) == 2
    assert "found a bundled dataset" in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_cli_embed_refuses_what_it_cannot_do_before_any_work(models, tmp_path, capsys, monkeypatch):
    """A store without coordinates with a level-2 model, --spatial-key none with a level-2 model and an --out that
    is a zarr store are refused before anything is written; a store given as "." embeds (partials beside it)."""
    from xscale.cli.main import main
    from xscale.models.io import save_model

    adata, l1, l2 = models
    save_model(l1, tmp_path / "ckpt" / "level1" / "model")
    save_model(l2, tmp_path / "ckpt" / "level2" / "model")
    flat = CellStore(prepare(adata[:300].copy(), tmp_path / "flat.zarr", spatial_key=None, chunk_cells=100))
    assert main(["embed", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(flat.path)]) == 2
    assert "was prepared without coordinates: niche embedding" in capsys.readouterr().err
    assert not (flat.path / "obsm" / "X_xscale_cell").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    with pytest.raises(xscale.errors.XscaleInputError, match="found a store prepared without them"):
        embed_store_niches(flat, l2, progress=False)

    assert main(["embed", "--checkpoint", str(tmp_path / "ckpt"), "--data", "starmap_mpfc", "--out",
                 str(tmp_path / "o"), "--spatial-key", "none"]) == 2
    assert "--spatial-key none: niche embedding" in capsys.readouterr().err

    user = tmp_path / "mine.zarr"
    adata[:50].copy().write_zarr(user)
    assert main(["embed", "--checkpoint", str(tmp_path / "ckpt" / "level1" / "model"), "--data", "starmap_mpfc",
                 "--out", str(user)]) == 2
    assert "expected an output directory (xscale writes its files and stores inside it), found a zarr store" \
        in capsys.readouterr().err
    assert not (user / "cells.zarr").exists()

    monkeypatch.chdir(flat.path)  # the store as "."
    assert main(["embed", "--checkpoint", str(tmp_path / "ckpt" / "level1" / "model"), "--data", "."]) == 0
    assert ad.read_zarr(flat.path).obsm["X_xscale_cell"].shape == (300, l1.config.embedding_dim)


def test_cli_embed_takes_a_folder_holding_the_model_in_model(models, tmp_path):
    """``xscale finetune --out OUT`` saves OUT/model; ``embed --checkpoint OUT`` finds it there."""
    from xscale.cli.main import main
    from xscale.models.io import save_model

    _, l1, _ = models
    save_model(l1, tmp_path / "ft" / "model")
    store = CellStore(prepare(xscale.datasets.load("starmap_mpfc")[:200].copy(), tmp_path / "s.zarr",
                              chunk_cells=100))
    assert main(["embed", "--checkpoint", str(tmp_path / "ft"), "--data", str(store.path)]) == 0
    assert ad.read_zarr(store.path).obsm["X_xscale_cell"].shape == (200, l1.config.embedding_dim)
