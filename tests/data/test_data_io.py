"""Readers: formats detected from content, lazy reads, and clear errors for bad files."""
from __future__ import annotations

import numpy as np
import pytest

import xscale
from xscale.data.io import detect_format, read_dataset
from xscale.data.zarr_settings import unsharded, zarr_format_2
from xscale.errors import XscaleInputError


def test_h5ad_eager_and_lazy_agree():
    p = xscale.datasets.path("starmap_mpfc")
    eager = read_dataset(p, slide_key="slice")
    lazy = read_dataset(p, backed=True)
    assert type(lazy.X).__module__.startswith("dask")
    assert np.array_equal(lazy.X.compute().toarray(), eager.X.toarray())
    assert eager.uns["xscale_source"]["format"] == "h5ad"


def test_anndata_zarr(small_adata, tmp_path):
    with zarr_format_2():  # anndata's current default, made explicit (no notice)
        small_adata.write_zarr(tmp_path / "a.zarr")
    assert detect_format(tmp_path / "a.zarr") == "anndata-zarr"
    a = read_dataset(tmp_path / "a.zarr", backed=True)
    assert np.array_equal(a.X.compute().toarray(), small_adata.X.toarray())
    assert np.allclose(a.obsm["spatial"], small_adata.obsm["spatial"])


def test_spatialdata_centroids_become_coordinates(small_adata, tmp_path, write_spatialdata):
    write_spatialdata(small_adata, tmp_path / "s.zarr")
    a = read_dataset(tmp_path / "s.zarr")
    assert a.uns["xscale_source"]["table_key"] == "table"
    np.testing.assert_allclose(a.obsm["spatial"], small_adata.obsm["spatial"])


def test_spatialdata_table_read_lazily_and_prepared_without_a_whole_read(small_adata, tmp_path, write_spatialdata,
                                                                         monkeypatch):
    """backed=True (what prepare reads with): the table's X is a dask array of chunk_rows-cell blocks and spatialdata's
    own table reader, which reads a table whole, is never used (made to fail here); counts and the centroid
    coordinates equal the eager read's, and prepare of the store equals prepare of the same AnnData."""
    import spatialdata._io.io_table as io_table

    from xscale.data.prepare import prepare
    from xscale.data.store import CellStore

    path = write_spatialdata(small_adata, tmp_path / "s.zarr")
    eager = read_dataset(path)

    def whole(*args, **kwargs):
        raise AssertionError("the whole table was read")

    monkeypatch.setattr(io_table, "read_anndata_zarr", whole)
    with pytest.raises(XscaleInputError, match="the whole table was read"):
        read_dataset(path)  # the spy sees an eager read
    lazy = read_dataset(path, backed=True, chunk_rows=64)
    assert type(lazy.X).__module__.startswith("dask") and lazy.X.chunks[0][:2] == (64, 64)
    np.testing.assert_array_equal(lazy.X.compute().toarray(), eager.X.toarray())
    np.testing.assert_allclose(lazy.obsm["spatial"], eager.obsm["spatial"])
    assert list(lazy.obs_names) == list(eager.obs_names) and lazy.uns["xscale_source"]["table_key"] == "table"
    prepare(path, tmp_path / "store.zarr", chunk_cells=128)
    prepare(eager, tmp_path / "ref.zarr", chunk_cells=128)
    got, ref = CellStore(tmp_path / "store.zarr"), CellStore(tmp_path / "ref.zarr")
    assert got.n_cells == ref.n_cells == small_adata.n_obs
    np.testing.assert_array_equal(got.read_rows(0, got.n_cells).toarray(), ref.read_rows(0, ref.n_cells).toarray())
    np.testing.assert_array_equal(got.source_index(), ref.source_index())


def test_spatialdata_instance_ids_that_match_no_shape(small_adata, tmp_path, write_spatialdata):
    """Instance ids offset from the shapes' index: one error naming the instance_key and both id ranges
    (was "found NaN/inf for 300 cell(s) ... drop those cells", as if the coordinates were bad)."""
    import spatialdata as sd

    path = write_spatialdata(small_adata, tmp_path / "s.zarr")
    sdata = sd.read_zarr(path)
    table = sdata.tables["table"]
    table.obs["cell_id"] = table.obs["cell_id"] + 100000
    sdata.tables["table"] = table
    from xscale.data.zarr_settings import unsharded

    sdata.delete_element_from_disk("table")
    with unsharded():
        sdata.write_element("table")
    with pytest.raises(XscaleInputError, match=r"obs\['cell_id'\] \(the instance_key\) names 300 of 300 cells of "
                                               r"region 'cells' .* e.g. \[100000, 100001, 100002\].* \[0, 1, 2\]"):
        read_dataset(path)


def test_not_anndata_file(tmp_path):
    p = tmp_path / "cells.csv"
    p.write_text("cell,gene\n1,2\n")
    with pytest.raises(XscaleInputError, match=r"cells.csv: expected AnnData .*found a file that is neither"):
        read_dataset(p)
    (tmp_path / "dir").mkdir()
    with pytest.raises(XscaleInputError, match=r"directory without zarr metadata"):
        read_dataset(tmp_path / "dir")
    with pytest.raises(XscaleInputError, match=r"found nothing at this path"):
        read_dataset(tmp_path / "missing.h5ad")


def test_spatialdata_without_table(small_adata, tmp_path, write_spatialdata):
    write_spatialdata(small_adata, tmp_path / "s.zarr", with_table=False)
    with pytest.raises(XscaleInputError, match=r"found no table \(elements: \['cells'\]\).*TableModel"):
        read_dataset(tmp_path / "s.zarr")


def test_corrupted_zarr(small_adata, tmp_path):
    store = tmp_path / "a.zarr"
    with zarr_format_2():
        small_adata.write_zarr(store)
    meta = store / "zarr.json" if (store / "zarr.json").exists() else store / ".zattrs"
    meta.write_text(meta.read_text()[:25])  # truncated metadata
    with pytest.raises(XscaleInputError, match=r"a.zarr: expected a readable zarr store, found a corrupted"):
        read_dataset(store)


def test_corrupted_zarr_chunk(small_adata, tmp_path):
    store = tmp_path / "b.zarr"
    with zarr_format_2():
        small_adata.write_zarr(store)
    chunks = [p for p in (store / "X" / "data").rglob("*") if p.is_file() and not p.name.startswith((".", "zarr"))]
    assert chunks
    chunks[0].write_bytes(b"garbage-bytes")
    with pytest.raises(XscaleInputError, match=r"corrupted or incompletely written"):
        read_dataset(store)


def test_lazy_read_lists_layers_in_message(small_adata, tmp_path):
    import scipy.sparse as sp

    small_adata.layers["counts"] = small_adata.X.copy()
    small_adata.X = sp.csr_matrix(np.log1p(small_adata.X.toarray()))
    small_adata.write_h5ad(tmp_path / "n.h5ad")
    with pytest.raises(XscaleInputError, match=r"--counts-layer NAME\)\. Layers present: \['counts'\]"):
        read_dataset(tmp_path / "n.h5ad", backed=True)
    a = read_dataset(tmp_path / "n.h5ad", backed=True, counts_layer="counts")
    assert np.array_equal(a.X.compute().toarray(), small_adata.layers["counts"].toarray())


def test_csc_counts(small_adata, tmp_path, caplog):
    """CSC X (stored by gene) can't be read by blocks of cells: a clear error with the conversion,
    not scipy's "Only the major axis can be chunked"; read eagerly it works. A CSC layer reads
    lazily (with a warning that it is slow) and equals the eager values."""
    import logging

    import scipy.sparse as sp

    from xscale.data.prepare import prepare

    counts = small_adata.X.copy()
    small_adata.X = sp.csc_matrix(counts)
    small_adata.write_h5ad(tmp_path / "csc.h5ad")
    assert np.array_equal(read_dataset(tmp_path / "csc.h5ad").X.toarray(), counts.toarray())
    for call in (lambda: read_dataset(tmp_path / "csc.h5ad", backed=True),
                 lambda: prepare(tmp_path / "csc.h5ad", tmp_path / "s.zarr", progress=False)):
        with pytest.raises(XscaleInputError, match=r"X: expected counts stored by cell .* CSC .* a.X = a.X.tocsr"):
            call()
    assert not (tmp_path / "s.zarr").exists()
    small_adata.X = sp.csr_matrix(np.log1p(counts.toarray()))
    small_adata.layers["counts"] = sp.csc_matrix(counts)
    small_adata.write_h5ad(tmp_path / "layer.h5ad")
    with caplog.at_level(logging.WARNING, logger="xscale.data.io"):
        a = read_dataset(tmp_path / "layer.h5ad", backed=True, counts_layer="counts")
    assert "layers/counts is stored as CSC" in caplog.text
    assert np.array_equal(np.asarray(a.X.compute().todense()), counts.toarray())


def test_spatialdata_points_and_table_key(small_adata, tmp_path):
    import pandas as pd
    import spatialdata as sd
    from spatialdata.models import PointsModel, TableModel

    xy = np.asarray(small_adata.obsm["spatial"], dtype=np.float64)
    points = PointsModel.parse(pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]}))
    t = small_adata.copy()
    del t.obsm["spatial"]
    t.obs["region"] = pd.Categorical(["spots"] * t.n_obs)
    t.obs["pid"] = np.arange(t.n_obs)[::-1]  # table rows in another order than the points
    t.X = t.X[::-1]
    tables = {k: TableModel.parse(t.copy(), region="spots", region_key="region", instance_key="pid") for k in "ab"}
    with unsharded():
        sd.SpatialData(points={"spots": points}, tables=tables).write(tmp_path / "p.zarr")
    with pytest.raises(XscaleInputError, match=r"found 2 tables: \['a', 'b'\]\. Pass table_key="):
        read_dataset(tmp_path / "p.zarr")
    a = read_dataset(tmp_path / "p.zarr", table_key="b")
    np.testing.assert_allclose(a.obsm["spatial"], xy[::-1])
