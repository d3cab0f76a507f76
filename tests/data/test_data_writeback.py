"""Write-back: resume after a real SIGKILL gives identical output; AnnData and SpatialData round trips."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import pytest

from xscale.data.prepare import prepare
from xscale.data.store import CellStore
from xscale.data.writeback import (
    LatentWriter,
    latents_in_source_order,
    store_latent_writer,
    write_to_spatialdata,
)

# a deterministic "embedding" of a block of store rows: (b, 2, 3) from the counts
EMBED = """
import sys, time, numpy as np
from xscale.data.store import CellStore
from xscale.data.writeback import store_latent_writer
store = CellStore(sys.argv[1]); delay = float(sys.argv[2])
w = store_latent_writer(store, "X_test", (2, 3), fingerprint="model-v1")
for c in w.pending_chunks():
    a, b = w.chunk_range(c)
    x = store.read_rows(a, b).toarray()
    z = np.log1p(x[:, :6]).reshape(b - a, 2, 3) + c
    time.sleep(delay)
    w.write_chunk(c, z)
w.finalize()
"""


@pytest.fixture
def store(small_adata, tmp_path):
    return CellStore(prepare(small_adata, tmp_path / "s.zarr", chunk_cells=20))


def _run(store, delay):
    return subprocess.Popen([sys.executable, "-c", EMBED, str(store.path), str(delay)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_resume_after_sigkill_is_identical(store, tmp_path, monkeypatch):
    import runpy
    import shutil

    ref = tmp_path / "ref.zarr"
    shutil.copytree(store.path, ref)
    script = tmp_path / "embed.py"
    script.write_text(EMBED)
    monkeypatch.setattr(sys, "argv", ["embed.py", str(ref), "0"])
    runpy.run_path(str(script))  # the uninterrupted reference, in-process
    proc = _run(store, 0.3)
    state = store.path.with_name(f".{store.path.name}.obsm.X_test.partial") / "xscale_writer.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        if state.exists() and len(json.loads(state.read_text())["done"]) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(json.loads(state.read_text())["done"])
    assert 4 <= done < store.n_chunks  # really interrupted mid-way
    assert not (store.path / "obsm" / "X_test").exists()  # nothing looks complete
    assert _run(store, 0.0).wait(timeout=120) == 0  # same command resumes
    got = ad.read_zarr(store.path).obsm["X_test"]
    want = ad.read_zarr(ref).obsm["X_test"]
    assert got.shape == (store.n_cells, 2, 3)
    np.testing.assert_array_equal(got, want)
    assert not state.parent.exists()


def test_other_fingerprint_restarts(tmp_path):
    w = LatentWriter(tmp_path / "z", n_cells=10, cell_shape=(2,), chunk_cells=4, fingerprint="a")
    w.write_chunk(0, np.ones((4, 2)))
    assert LatentWriter(tmp_path / "z", n_cells=10, cell_shape=(2,), chunk_cells=4,
                        fingerprint="a").pending_chunks() == [1, 2]
    w2 = LatentWriter(tmp_path / "z", n_cells=10, cell_shape=(2,), chunk_cells=4, fingerprint="b")
    assert w2.pending_chunks() == [0, 1, 2]
    with pytest.raises(RuntimeError, match="3 block"):
        w2.finalize()


def test_damaged_partial_restarts_every_block(tmp_path, caplog):
    """A partial whose saved state lists block 0 as done but whose array no longer opens (killed
    while zarr wrote its metadata, a full disk) is discarded whole: block 0 was left as zeros."""
    import logging

    import zarr

    w = LatentWriter(tmp_path / "z", n_cells=10, cell_shape=(2,), chunk_cells=4, fingerprint="a")
    w.write_chunk(0, np.ones((4, 2)))
    (tmp_path / ".z.partial" / "zarr.json").unlink()
    with caplog.at_level(logging.WARNING, logger="xscale.data.writeback"):
        w = LatentWriter(tmp_path / "z", n_cells=10, cell_shape=(2,), chunk_cells=4, fingerprint="a")
    assert "they are unreadable" in caplog.text and "another computation" not in caplog.text
    assert w.pending_chunks() == [0, 1, 2]
    for c in w.pending_chunks():
        a, b = w.chunk_range(c)
        w.write_chunk(c, np.full((b - a, 2), 7.0))
    np.testing.assert_array_equal(zarr.open_array(w.finalize())[:], np.full((10, 2), 7.0))


def test_partial_beside_a_store_prepared_again_is_not_resumed(small_adata, tmp_path):
    """A killed store embed leaves its partial beside the store; after the store is prepared again in another
    order, the same embed starts over instead of resuming blocks of other cells."""
    store = CellStore(prepare(small_adata, tmp_path / "st.zarr", chunk_cells=50))
    w = store_latent_writer(store, "X_xscale_cell", (2,), fingerprint="model-v1")
    w.write_chunk(0, np.ones((50, 2)))  # killed after one block
    assert store_latent_writer(store, "X_xscale_cell", (2,), fingerprint="model-v1").pending_chunks()[0] == 1
    again = CellStore(prepare(small_adata, tmp_path / "st.zarr", chunk_cells=50, curve="random", overwrite=True))
    assert again.identity != store.identity
    assert store_latent_writer(again, "X_xscale_cell", (2,), fingerprint="model-v1").pending_chunks()[0] == 0


def test_latents_in_source_order_has_a_row_per_input_cell_when_the_last_were_dropped(small_adata, tmp_path):
    import scipy.sparse as sp

    a = small_adata.copy()
    x = a.X.toarray()
    x[-2:] = 0  # the input's last two cells: dropped by prepare
    a.X = sp.csr_matrix(x)
    with pytest.warns(UserWarning, match="Dropped 2 of"):
        store = CellStore(prepare(a, tmp_path / "st.zarr", chunk_cells=64))
    assert store.n_source == a.n_obs
    _embed(store, "X_xscale_cell", (3,), lambda lo, hi: np.ones((hi - lo, 3), np.float32))
    out = latents_in_source_order(store, "X_xscale_cell")
    assert out.shape == (a.n_obs, 3) and np.isnan(out[-2:]).all() and not np.isnan(out[:-2]).any()


def _embed(store, key, shape, fn):
    w = store_latent_writer(store, key, shape)
    for c in w.pending_chunks():
        a, b = w.chunk_range(c)
        w.write_chunk(c, fn(a, b))
    w.finalize()


def test_h5ad_store_anndata_with_latents(small_adata, tmp_path):
    p = tmp_path / "a.h5ad"
    small_adata.write_h5ad(p)
    store = CellStore(prepare(p, tmp_path / "st.zarr", chunk_cells=64))
    _embed(store, "X_xscale_cell", (4,), lambda a, b: np.arange(a, b)[:, None] * np.ones(4))
    back = ad.read_zarr(store.path)
    np.testing.assert_array_equal(back.obsm["X_xscale_cell"][:, 0], np.arange(store.n_cells))
    src_order = latents_in_source_order(store, "X_xscale_cell", small_adata.n_obs)
    # the cell at input row i got the latent of its store row
    np.testing.assert_array_equal(src_order[store.source_index(), 0], np.arange(store.n_cells))


@pytest.mark.parametrize("rows", [7, 64, 1000])
def test_out_of_core_reorder_equals_the_in_memory_reference(small_adata, tmp_path, rows, monkeypatch):
    """SourceOrderLatents.write_to (block by block through spill files) writes exactly latents_in_source_order
    (NaN for the cells prepare dropped), never builds an array of more than one output block, and leaves no
    spill directory."""
    import scipy.sparse as sp
    import zarr

    import xscale.data.reorder as reorder
    from xscale.data.reorder import SourceOrderLatents

    a = small_adata.copy()
    x = a.X.toarray()
    x[[5, 6, 150]] = 0  # zero-count cells: dropped by prepare, NaN rows in the input's order
    a.X = sp.csr_matrix(x)
    with pytest.warns(UserWarning, match="Dropped 3 of 300 cells with zero total counts"):
        store = CellStore(prepare(a, tmp_path / "st.zarr", chunk_cells=20))
    assert store.n_cells == a.n_obs - 3
    _embed(store, "X_xscale_cell", (2, 3), lambda lo, hi: np.random.default_rng(lo).normal(size=(hi - lo, 2, 3)))
    reference = latents_in_source_order(store, "X_xscale_cell", a.n_obs)
    sizes, full = [], np.full

    def spy_full(shape, *args, **kwargs):
        sizes.append(shape[0])
        return full(shape, *args, **kwargs)

    monkeypatch.setattr(reorder.np, "full", spy_full)
    group = zarr.open_group(tmp_path / "out.zarr", mode="w", zarr_format=3)
    lazy = SourceOrderLatents(store, "X_xscale_cell", a.n_obs, rows=rows)
    lazy.write_to(group, "obsm_key")
    monkeypatch.undo()
    got = group["obsm_key"][:]
    np.testing.assert_array_equal(got, reference)
    assert np.isnan(got[[5, 6, 150]]).all() and not np.isnan(np.delete(got, [5, 6, 150], axis=0)).any()
    assert max(sizes) <= min(rows, a.n_obs)  # every np.full (zarr's chunk fills too): one output block at most
    assert group["obsm_key"].attrs["encoding-type"] == "array"
    np.testing.assert_array_equal(np.asarray(lazy), reference)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".xscale-reorder-")]


def test_spatialdata_round_trip(small_adata, tmp_path, write_spatialdata):
    import spatialdata as sd

    path = write_spatialdata(small_adata, tmp_path / "s.zarr")
    store = CellStore(prepare(path, tmp_path / "st.zarr", chunk_cells=64))
    src = store.source_index()
    _embed(store, "X_xscale_cell", (2, 3), lambda a, b: np.repeat(src[a:b, None, None], 6, 1).reshape(-1, 2, 3))
    _embed(store, "X_xscale_niche", (5,), lambda a, b: -np.repeat(src[a:b, None], 5, 1).astype(np.float32))
    write_to_spatialdata(path, store, niche_key="X_xscale_niche")
    back = sd.read_zarr(path)
    table = back.tables["table"]
    assert table.obsm["X_xscale_cell"].shape == (small_adata.n_obs, 6)
    np.testing.assert_array_equal(table.obsm["X_xscale_cell"][:, 0], np.arange(small_adata.n_obs))
    assert np.array_equal(table.X.toarray(), small_adata.X.toarray())  # counts untouched
    niches = back.tables["table_niches"]
    assert niches.shape == (small_adata.n_obs, 5)
    assert (niches.obs["cell_id"].to_numpy() == table.obs["cell_id"].to_numpy()).all()
    np.testing.assert_array_equal(np.asarray(niches.X)[:, 0], -np.arange(small_adata.n_obs))
    assert niches.uns["spatialdata_attrs"]["region"] == "cells"


def test_spatialdata_niche_table_is_written_out_of_core(small_adata, tmp_path, write_spatialdata, monkeypatch):
    """The niche table's X is reordered and written block by block, as the cell latents are: the in-memory
    reorder is never called, and the table read back equals it (NaN rows for cells dropped at validation)."""
    import scipy.sparse as sp
    import spatialdata as sd

    from xscale.data import reorder

    a = small_adata.copy()
    x = a.X.toarray()
    x[[3, 40]] = 0  # two zero-count cells, dropped at validation
    a.X = sp.csr_matrix(x)
    path = write_spatialdata(a, tmp_path / "s.zarr")
    with pytest.warns(UserWarning, match="Dropped 2 of"):
        store = CellStore(prepare(path, tmp_path / "st.zarr", chunk_cells=16))
    src = store.source_index()
    _embed(store, "X_xscale_niche", (2, 2), lambda a_, b: np.repeat(src[a_:b, None, None], 4, 1).reshape(-1, 2, 2)
           .astype(np.float32))
    reference = latents_in_source_order(store, "X_xscale_niche", a.n_obs)

    def whole(*args, **kwargs):
        raise AssertionError("the niche latents were built whole in memory")

    monkeypatch.setattr(reorder.SourceOrderLatents, "__array__", whole)
    write_to_spatialdata(path, store, cell_key=None, niche_key="X_xscale_niche")
    monkeypatch.undo()
    niches = sd.read_zarr(path).tables["table_niches"]
    assert list(niches.var_names) == [f"niche_latent_{i}" for i in range(4)]
    np.testing.assert_array_equal(np.asarray(niches.X), reference)
    assert np.isnan(np.asarray(niches.X)[[3, 40]]).all()
    assert (niches.obs["cell_id"].to_numpy() == np.arange(a.n_obs)).all()


def test_spatialdata_write_back_matches_cells_by_name(small_adata, tmp_path, write_spatialdata):
    """Latents land on the table row of their own cell: rows re-sorted after prepare are matched by name; a table
    of other cells, another table of the store's source and a store prepared from another input are refused
    before anything is written."""
    import spatialdata as sd

    from xscale.data.zarr_settings import unsharded
    from xscale.errors import XscaleInputError

    path = write_spatialdata(small_adata, tmp_path / "s.zarr")
    store = CellStore(prepare(path, tmp_path / "st.zarr", chunk_cells=64))
    src = store.source_index()
    _embed(store, "X_xscale_cell", (2,), lambda a, b: np.repeat(src[a:b, None], 2, 1).astype(np.float32))
    sdata = sd.read_zarr(path)  # the user re-sorts the table after prepare
    sdata.tables["table"] = sdata.tables["table"][::-1].copy()
    with unsharded():
        sdata.write(tmp_path / "resorted.zarr")
    write_to_spatialdata(tmp_path / "resorted.zarr", store)
    table = sd.read_zarr(tmp_path / "resorted.zarr").tables["table"]
    want = small_adata.obs_names.get_indexer(table.obs_names)  # the input row of each (re-sorted) table row
    assert (want == np.arange(small_adata.n_obs)[::-1]).all()
    np.testing.assert_array_equal(np.asarray(table.obsm["X_xscale_cell"])[:, 0], want)

    other = small_adata[:200].copy()  # a table of other cells (fewer, renamed)
    other.obs_names = [f"other{i}" for i in range(other.n_obs)]
    write_spatialdata(other, tmp_path / "other.zarr")
    with pytest.raises(XscaleInputError, match=r"expected every cell of the store .* found 300 of 300 that are not"):
        write_to_spatialdata(tmp_path / "other.zarr", store)
    assert "X_xscale_cell" not in sd.read_zarr(tmp_path / "other.zarr").tables["table"].obsm

    relabelled = sd.read_zarr(path)  # same names, other instances: the table annotates other cells
    t = relabelled.tables["table"]
    t.obs["cell_id"] = t.obs["cell_id"].to_numpy() + 1000
    with unsharded():
        relabelled.write(tmp_path / "relabelled.zarr")
    with pytest.raises(XscaleInputError, match=r"300 of 300 whose obs\['cell_id'\] differs"):
        write_to_spatialdata(tmp_path / "relabelled.zarr", store)

    with pytest.raises(XscaleInputError, match=r"table_key: expected the table .* from, 'table', found 'x'"):
        write_to_spatialdata(path, store, table_key="x")

    h5ad_store = CellStore(prepare(small_adata[:150].copy(), tmp_path / "h.zarr", chunk_cells=64))
    _embed(h5ad_store, "X_xscale_cell", (2,), lambda a, b: np.zeros((b - a, 2), np.float32))
    renamed = small_adata.copy()
    renamed.obs_names = [f"c{i}" for i in range(renamed.n_obs)]
    write_spatialdata(renamed, tmp_path / "renamed.zarr")
    with pytest.raises(XscaleInputError, match="150 of 150 that are not"):
        write_to_spatialdata(tmp_path / "renamed.zarr", h5ad_store)


def test_write_back_removes_what_a_killed_write_back_left(small_adata, tmp_path, write_spatialdata):
    """A write-back killed midway leaves <name>_xscale_tmp_<pid> elements (an obsm array, a niche table) that
    spatialdata would list; the next write-back removes those of dead processes and keeps a live writer's."""
    import os
    import shutil
    import subprocess

    import spatialdata as sd

    path = write_spatialdata(small_adata, tmp_path / "s.zarr")
    store = CellStore(prepare(path, tmp_path / "st.zarr", chunk_cells=64))
    _embed(store, "X_xscale_cell", (2,), lambda a, b: np.ones((b - a, 2), np.float32))
    _embed(store, "X_xscale_niche", (3,), lambda a, b: np.ones((b - a, 3), np.float32))
    write_to_spatialdata(path, store, niche_key="X_xscale_niche")
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid: a process that no longer runs
    obsm = path / "tables" / "table" / "obsm"
    shutil.copytree(obsm / "X_xscale_cell", obsm / f"X_xscale_cell_xscale_tmp_{dead.pid}")
    shutil.copytree(path / "tables" / "table_niches", path / "tables" / f"table_niches_xscale_tmp_{dead.pid}")
    live = path / "tables" / f"table_niches_xscale_tmp_{os.getppid()}"  # a writer still at work
    shutil.copytree(path / "tables" / "table_niches", live)
    write_to_spatialdata(path, store, niche_key="X_xscale_niche")
    assert not (obsm / f"X_xscale_cell_xscale_tmp_{dead.pid}").exists()
    assert not (path / "tables" / f"table_niches_xscale_tmp_{dead.pid}").exists()
    assert live.exists()
    assert set(sd.read_zarr(path).tables) == {"table", "table_niches", live.name}


def test_write_back_never_replaces_a_users_table_named_like_the_niche_table(small_adata, tmp_path,
                                                                            write_spatialdata):
    import spatialdata as sd

    from xscale.data.zarr_settings import unsharded
    from xscale.errors import XscaleInputError

    path = write_spatialdata(small_adata, tmp_path / "s.zarr")
    store = CellStore(prepare(path, tmp_path / "st.zarr", chunk_cells=64))
    _embed(store, "X_xscale_cell", (2,), lambda a, b: np.ones((b - a, 2), np.float32))
    _embed(store, "X_xscale_niche", (3,), lambda a, b: np.ones((b - a, 3), np.float32))
    sdata = sd.read_zarr(path)
    sdata.tables["table_niches"] = ad.AnnData(np.zeros((5, 2), np.float32))  # the user's own
    with unsharded():
        sdata.write_element("table_niches")
    with pytest.raises(XscaleInputError, match="table 'table_niches' is there already and was not written by xscale"):
        write_to_spatialdata(path, store, niche_key="X_xscale_niche")
    back = sd.read_zarr(path)
    assert back.tables["table_niches"].shape == (5, 2)
    assert "X_xscale_cell" not in back.tables["table"].obsm  # refused before any write
    write_to_spatialdata(path, store, niche_key="X_xscale_niche", niche_table="niches_xscale")
    assert sd.read_zarr(path).tables["niches_xscale"].shape == (small_adata.n_obs, 3)


def _files(path):
    """{relative path: bytes} of every file under ``path``."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_spatialdata_write_back_touches_only_what_changes(small_adata, tmp_path, write_spatialdata, monkeypatch):
    """Writing latents (and obs columns) back never reads the table's counts or the store's elements (spatialdata's
    readers fail here) nor rewrites them: X, var and the other tables' files are byte for byte as before. A write that
    fails midway leaves the earlier latents and no temporary."""
    import spatialdata as sd
    import spatialdata._io.io_table as io_table

    import xscale.data.zarr_settings as zs
    from xscale.data.writeback import write_adata_to_spatialdata

    path = write_spatialdata(small_adata, tmp_path / "s.zarr")
    table_dir = path / "tables" / "table"
    untouched = {part: _files(table_dir / part) for part in ("X", "var")}
    reader = io_table.read_anndata_zarr

    def whole(*args, **kwargs):
        raise AssertionError("the whole table was read")

    monkeypatch.setattr(io_table, "read_anndata_zarr", whole)
    monkeypatch.setattr(sd, "read_zarr", whole)  # nor the shapes: only the table's obs and uns are read
    a = small_adata.copy()
    a.obsm["X_xscale_cell"] = np.arange(a.n_obs * 4, dtype=np.float32).reshape(a.n_obs, 4)
    a.obs["xscale_domain"] = (np.arange(a.n_obs) % 3).astype(str)
    table = write_adata_to_spatialdata(path, a[::-1].copy(), obs_keys=("xscale_domain",))  # rows matched by name
    np.testing.assert_array_equal(table.obsm["X_xscale_cell"], a.obsm["X_xscale_cell"])
    assert {part: _files(table_dir / part) for part in ("X", "var")} == untouched

    def dies_midway(group, key, elem):  # writes part of the element, then the disk fills up
        group.create_array(key + "/partial", shape=(1,), dtype="f4")
        raise OSError("disk full")

    monkeypatch.setattr(zs, "write_unsharded", dies_midway)
    b = a.copy()
    b.obsm["X_xscale_cell"] = -b.obsm["X_xscale_cell"]
    with pytest.raises(OSError, match="disk full"):
        write_adata_to_spatialdata(path, b)
    monkeypatch.setattr(io_table, "read_anndata_zarr", reader)
    monkeypatch.undo()
    back = sd.read_zarr(path).tables["table"]
    np.testing.assert_array_equal(back.obsm["X_xscale_cell"], a.obsm["X_xscale_cell"])  # the earlier latents
    assert list(back.obs["xscale_domain"].astype(str)) == list(a.obs["xscale_domain"])
    np.testing.assert_array_equal(back.X.toarray(), small_adata.X.toarray())
    assert not [p for p in table_dir.rglob("*") if "xscale_tmp" in p.name]


def test_write_anndata_zarr_is_format_2_quiet_and_atomic(small_adata, tmp_path, monkeypatch):
    import warnings

    from xscale.data.writeback import write_anndata_zarr

    path = tmp_path / "cells.zarr"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ad.settings.override(zarr_write_format=3):  # a user's setting does not change xscale's stores
            write_anndata_zarr(small_adata, path)
    assert not [w for w in caught if "zarr v2" in str(w.message)], [str(w.message) for w in caught]
    assert (path / ".zgroup").is_file() and not (path / "zarr.json").exists()  # format 2
    back = ad.read_zarr(path)
    assert list(back.obs_names) == list(small_adata.obs_names)
    assert ad.settings.zarr_write_format == 2  # restored (anndata's default here)

    def broken(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_zarr", broken)
    with pytest.raises(OSError, match="disk full"):
        write_anndata_zarr(small_adata[:3].copy(), path)
    assert ad.read_zarr(path).n_obs == small_adata.n_obs  # the earlier store, whole
    assert [p.name for p in tmp_path.iterdir()] == ["cells.zarr"]  # no temporary left


def test_spatialdata_table_survives_a_failed_write_back(small_adata, tmp_path, write_spatialdata, monkeypatch):
    import spatialdata as sd

    path = write_spatialdata(small_adata, tmp_path / "s.zarr")
    store = CellStore(prepare(path, tmp_path / "st.zarr", chunk_cells=64))
    _embed(store, "X_xscale_cell", (2, 3), lambda a, b: np.ones((b - a, 2, 3), np.float32))
    write_to_spatialdata(path, store)  # first write-back: the table now holds latents
    _embed(store, "X_xscale_niche", (5,), lambda a, b: np.zeros((b - a, 5), np.float32))
    original = sd.SpatialData.write_element

    def dies_midway(self, name, *a, **k):  # writes part of the element, then the disk fills up
        import shutil
        from pathlib import Path

        original(self, name, *a, **k)
        shutil.rmtree(Path(self.path) / "tables" / name / "obs")  # the part it never wrote
        raise OSError("disk full")

    monkeypatch.setattr(sd.SpatialData, "write_element", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        write_to_spatialdata(path, store, niche_key="X_xscale_niche")
    monkeypatch.undo()
    back = sd.read_zarr(path)  # the user's table as it was: counts, obs, the first latents
    table = back.tables["table"]
    assert np.array_equal(table.X.toarray(), small_adata.X.toarray())
    assert table.obsm["X_xscale_cell"].shape == (small_adata.n_obs, 6)
    assert not [p.name for p in (path / "tables").iterdir() if "xscale_tmp" in p.name]
    write_to_spatialdata(path, store, niche_key="X_xscale_niche")  # and a retry succeeds
    again = sd.read_zarr(path)
    assert set(again.tables) == {"table", "table_niches"}
    assert again.tables["table_niches"].shape == (small_adata.n_obs, 5)
