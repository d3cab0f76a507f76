"""prepare options: radius graph, curve order, SpatialData coordinates in the table, --table-key."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial import cKDTree

from xscale.cli.main import main as cli_main
from xscale.data.io import read_dataset
from xscale.data.prepare import prepare
from xscale.data.store import CellStore

RADIUS, BITS = 2.0, 16


@pytest.fixture(scope="module")
def cells(starmap):
    """450 real cells, about 150 per slide."""
    keep = np.sort(np.random.default_rng(1).choice(starmap.n_obs, 450, replace=False))
    return starmap[keep].copy()


@pytest.fixture(scope="module")
def stores(cells, tmp_path_factory):
    """The same cells prepared with the default curve and a radius graph, and with the Morton curve."""
    d = tmp_path_factory.mktemp("stores")
    kw = dict(slide_key="slice", chunk_cells=64, progress=False)
    return {"hilbert": prepare(cells, d / "r.zarr", radius=RADIUS, **kw),
            "morton": prepare(cells, d / "m.zarr", curve="morton", **kw)}


def _edges(g: sp.spmatrix, names: np.ndarray) -> set:
    r, c = sp.coo_matrix(g).nonzero()
    return {(names[i], names[j]) for i, j in zip(r, c, strict=True) if i != j}


def test_radius_graph_equals_squidpys_per_slide(cells, stores):
    """The stored graph (in input rows) is squidpy's radius graph of each slide at radius x the slide's
    median nearest-neighbour distance: same edges, none across slides."""
    import squidpy as sq

    store = CellStore(stores["hilbert"])
    assert store.radius == RADIUS
    got = _edges(store.graph(), store.source_index())
    xy = np.asarray(cells.obsm["spatial"], dtype=np.float64)
    slides = cells.obs["slice"].astype(str).to_numpy()
    want, near_boundary = set(), 0
    for s in np.unique(slides):
        rows = np.flatnonzero(slides == s)
        tree = cKDTree(xy[rows])
        r = RADIUS * np.median(tree.query(xy[rows], k=2)[0][:, 1])
        sub = ad.AnnData(obsm={"spatial": xy[rows]}, shape=(rows.size, 0))
        res = sq.gr.spatial_neighbors(sub, coord_type="generic", radius=r, copy=True)
        want |= _edges(res.connectivities, rows)
        near_boundary += len(tree.query_pairs(1.1 * r)) - len(tree.query_pairs(r))
    assert near_boundary > 10  # a 10% error in the radius would change the graph
    assert len(want) > 2 * cells.n_obs  # a real graph, not a few stray edges
    assert got == want


def _quantize(xy: np.ndarray) -> np.ndarray:
    """Grid cells in [0, 2^16): the bounding box's longer side spans the grid (sfc.py's documented rule)."""
    lo = xy.min(axis=0)
    side = (1 << BITS) - 1
    return np.floor((xy - lo) / (xy.max(axis=0) - lo).max() * side + 0.5).astype(np.int64)


def _morton(x: int, y: int) -> int:
    """Z-order: bit b of x goes to bit 2b, bit b of y to bit 2b + 1."""
    return sum((((x >> b) & 1) << (2 * b)) | (((y >> b) & 1) << (2 * b + 1)) for b in range(BITS))


def _hilbert(x: int, y: int) -> int:
    """The textbook xy2d (Wikipedia, "Hilbert curve") on a 2^16 grid."""
    n, d, s = 1 << BITS, 0, 1 << (BITS - 1)
    while s > 0:
        rx, ry = int(x & s > 0), int(y & s > 0)
        d += s * s * ((3 * rx) ^ ry)
        if ry == 0:
            if rx == 1:
                x, y = n - 1 - x, n - 1 - y
            x, y = y, x
        s //= 2
    return d


@pytest.mark.parametrize("curve", ["hilbert", "morton"])
def test_cells_grouped_by_slide_then_in_curve_order(cells, stores, curve):
    """Store rows: slides in sorted name order, each a contiguous block; within a slide, the order of
    the curve key of the slide's own quantised grid (ties in input order). Hilbert is the default."""
    key_of = {"hilbert": _hilbert, "morton": _morton}[curve]
    store = CellStore(stores[curve])
    back = ad.read_zarr(stores[curve])
    assert back.uns["xscale"]["curve"] == curve
    slides = cells.obs["slice"].astype(str).to_numpy()
    assert list(store.slide_names) == sorted(set(slides))
    src = store.source_index()
    assert sorted(src) == list(range(cells.n_obs))
    xy = np.asarray(cells.obsm["spatial"], dtype=np.float64)
    for name, a, b in zip(store.slide_names, store.slide_start, store.slide_stop, strict=True):
        rows = np.flatnonzero(slides == name)
        assert sorted(src[a:b]) == list(rows)
        q = _quantize(xy[rows])
        keys = np.array([key_of(int(i), int(j)) for i, j in q], dtype=np.uint64)
        want = rows[np.lexsort((rows, keys))]
        assert len(set(keys.tolist())) > 0.9 * rows.size  # the key decides, not the tie-break
        np.testing.assert_array_equal(src[a:b], want)
    np.testing.assert_allclose(store.coords(), xy[src])


def _rewrite_table(path, table) -> None:
    import spatialdata as sd

    from xscale.data.zarr_settings import unsharded

    sdata = sd.read_zarr(path)
    sdata.tables["table"] = table
    sdata.delete_element_from_disk("table")
    with unsharded():
        sdata.write_element("table")


def test_spatialdata_coordinates_in_the_table_obsm(cells, tmp_path, write_spatialdata):
    """A table with obsm['spatial'] gives those coordinates (not the centroids of the shapes it annotates),
    to read_dataset and through prepare into the store."""
    import spatialdata as sd

    path = write_spatialdata(cells, tmp_path / "s.zarr", coords_in_table=True)
    table = sd.read_zarr(path).tables["table"]
    own = np.asarray(cells.obsm["spatial"])[:, ::-1] * 3.0 + 1000.0  # unlike the circles' centres
    table.obsm["spatial"] = own
    _rewrite_table(path, table)
    a = read_dataset(path, slide_key="slice")
    np.testing.assert_allclose(a.obsm["spatial"], own)
    store = CellStore(prepare(path, tmp_path / "p.zarr", slide_key="slice", progress=False))
    assert store.n_cells == cells.n_obs
    np.testing.assert_allclose(store.coords(), own[store.source_index()])


@pytest.fixture
def two_tables(cells, tmp_path):
    """A SpatialData store of circles 'cells' and two tables: 'a' (all cells) and 'b' (every third cell,
    doubled counts)."""
    import pandas as pd
    import spatialdata as sd
    from spatialdata.models import ShapesModel, TableModel

    from xscale.data.zarr_settings import unsharded

    xy = np.asarray(cells.obsm["spatial"], dtype=np.float64)
    circles = ShapesModel.parse(xy, geometry=0, radius=np.ones(cells.n_obs), index=np.arange(cells.n_obs))
    tables = {}
    for name, rows, scale in (("a", np.arange(cells.n_obs), 1), ("b", np.arange(0, cells.n_obs, 3), 2)):
        t = cells[rows].copy()
        del t.obsm["spatial"]
        t.X = t.X * scale
        t.obs["region"] = pd.Categorical(["cells"] * t.n_obs)
        t.obs["cell_id"] = rows
        tables[name] = TableModel.parse(t, region="cells", region_key="region", instance_key="cell_id")
    with unsharded():
        sd.SpatialData(shapes={"cells": circles}, tables=tables).write(tmp_path / "two.zarr")
    return tmp_path / "two.zarr"


def test_cli_prepare_table_key_picks_the_named_table(cells, two_tables, tmp_path, capsys):
    """`xscale prepare --table-key b` stores table b's cells, counts and shape centroids; a wrong or missing
    --table-key exits 2 with one line naming the tables present, and writes nothing."""
    args = ["--slide-key", "slice", "--chunk-cells", "64", "--no-progress"]
    assert cli_main(["prepare", str(two_tables), str(tmp_path / "b.zarr"), "--table-key", "b", *args]) == 0
    store = CellStore(tmp_path / "b.zarr")
    rows = np.arange(0, cells.n_obs, 3)[store.source_index()]
    assert store.n_cells == rows.size
    assert np.array_equal(store.read_rows(0, store.n_cells).toarray(), 2 * cells.X.toarray()[rows])
    np.testing.assert_allclose(store.coords(), np.asarray(cells.obsm["spatial"])[rows])
    capsys.readouterr()
    for extra in (["--table-key", "nope"], []):
        assert cli_main(["prepare", str(two_tables), str(tmp_path / "x.zarr"), *extra, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("xscale prepare: error:") and err.count("\n") == 1
        assert "'a'" in err and "'b'" in err and "table" in err
        assert ("'nope'" in err) == bool(extra)
        assert not (tmp_path / "x.zarr").exists()


def test_cli_prepare_refuses_both_radius_and_n_neighbors(tmp_path, capsys):
    """--radius makes a radius graph, where --n-neighbors was silently ignored: both is an error, before any work."""
    argv = ["prepare", "starmap_mpfc", str(tmp_path / "s.zarr"), "--radius", "3", "--n-neighbors", "7"]
    assert cli_main(argv) == 2
    assert "expected one of them (a radius graph, or k nearest neighbours), found both" in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()
