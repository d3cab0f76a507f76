"""prepare(): round trips, spatial order, validation through prepare, bounded memory."""
from __future__ import annotations

import tracemalloc

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import xscale
from xscale.cli.main import main as cli_main
from xscale.data.prepare import DEFAULT_NEIGHBORS, prepare
from xscale.data.sfc import hilbert_key, sfc_order
from xscale.data.store import CellStore
from xscale.errors import XscaleInputError


@pytest.fixture(scope="module")
def starmap_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "starmap.zarr"
    return prepare(xscale.datasets.path("starmap_mpfc"), out, slide_key="slice", chunk_cells=256)


def test_h5ad_store_anndata_round_trip(starmap_store, starmap):
    back = ad.read_zarr(starmap_store)
    src = back.obs["xscale_source_index"].to_numpy()
    assert sorted(src) == list(range(starmap.n_obs))
    assert np.array_equal(back.X.toarray(), starmap.X.toarray()[src])
    assert (back.obs_names == starmap.obs_names[src]).all()
    assert (back.obs["cell_type"].to_numpy() == starmap.obs["cell_type"].to_numpy()[src]).all()
    np.testing.assert_allclose(back.obsm["spatial"], starmap.obsm["spatial"][src])
    assert list(back.var_names) == list(starmap.var_names)
    g = back.obsp["spatial_connectivities"]
    assert DEFAULT_NEIGHBORS == 15  # the niche size of the small level-2 preset, minus its centre
    assert g.shape == (starmap.n_obs, starmap.n_obs) and np.all(np.diff(g.indptr) == DEFAULT_NEIGHBORS)


def test_block_reads_open_each_array_once_and_match_the_store(starmap_store, monkeypatch):
    import pickle

    import zarr

    s = CellStore(starmap_store)
    back = ad.read_zarr(starmap_store)  # the naive reference: the whole store read by anndata
    opened = []
    get = zarr.Group.__getitem__
    monkeypatch.setattr(zarr.Group, "__getitem__", lambda g, key: opened.append(key) or get(g, key))
    for a, b in [(0, 256), (256, 700), (3000, s.n_cells)]:
        assert np.array_equal(s.read_rows(a, b).toarray(), back.X[a:b].toarray())
        np.testing.assert_array_equal(s.read_coords(a, b), back.obsm["spatial"][a:b])
        ptr, nbrs = s.graph_rows(a, b)
        g = back.obsp["spatial_connectivities"][a:b]
        assert np.array_equal(ptr, g.indptr) and np.array_equal(nbrs, g.indices)
    assert sorted(opened) == sorted(["X/indptr", "X/data", "X/indices", "obsm/spatial",
                                     "obsp/spatial_connectivities/indptr", "obsp/spatial_connectivities/indices"])
    clone = pickle.loads(pickle.dumps(s))  # a spawned worker: reopens, holds no parent handles
    assert clone._arrays == {} and np.array_equal(clone.read_rows(5, 9).toarray(), back.X[5:9].toarray())


def test_store_order_slides_then_curve(starmap_store):
    s = CellStore(starmap_store)
    assert list(s.slide_stop - s.slide_start) == [1049, 1053, 1088]
    codes = s.slide_codes()
    assert np.all(np.diff(codes) >= 0)  # grouped by slide
    coords = s.coords()
    for a, b in zip(s.slide_start, s.slide_stop, strict=True):
        assert (sfc_order(coords[a:b]) == np.arange(b - a)).all()  # already in curve order
    # spatial order: a cell's graph neighbours lie in few blocks
    gi = s.graph()
    r, c = gi.nonzero()
    assert np.mean(r // s.chunk_cells == c // s.chunk_cells) > 0.7


def test_hilbert_is_a_local_bijection():
    g = np.array([(x, y) for x in range(16) for y in range(16)])
    k = hilbert_key(g[:, 0], g[:, 1], bits=4)
    assert sorted(k) == list(range(256))
    steps = np.abs(np.diff(g[np.argsort(k)], axis=0)).sum(axis=1)
    assert (steps == 1).all()


def test_prepare_validates_and_drops_zero_cells(small_adata, tmp_path):
    x = small_adata.X.toarray()
    x[[4, 9]] = 0
    small_adata.X = sp.csr_matrix(x)
    with pytest.warns(UserWarning, match="Dropped 2 of 300 cells with zero total counts"):
        p = prepare(small_adata, tmp_path / "z.zarr", chunk_cells=64)
    back = ad.read_zarr(p)
    assert back.n_obs == 298 and not np.isin([4, 9], back.obs["xscale_source_index"]).any()
    small_adata.X = sp.csr_matrix(np.log1p(x))
    with pytest.raises(XscaleInputError, match="counts_layer"):
        prepare(small_adata, tmp_path / "bad.zarr", chunk_cells=64)
    assert not list(tmp_path.glob("*bad.zarr*"))  # nothing partial left (no store, no temporary)


def test_prepare_drops_cells_with_counts_on_control_probes_only(small_adata, tmp_path):
    import pandas as pd

    x = small_adata.X.toarray()
    x[[4, 9]] = 0
    probes = np.zeros((300, 1), dtype=np.float32)
    probes[[4, 50]] = 3  # cell 4: only a probe count
    var = pd.DataFrame(index=[*small_adata.var_names, "NegControlProbe_1"])
    data = ad.AnnData(X=sp.csr_matrix(np.hstack([x, probes])), obs=small_adata.obs.copy(),
                      obsm=dict(small_adata.obsm), var=var)
    with pytest.warns(UserWarning, match=r"Dropped 2 of 300 cells with zero total counts in adata.X \(counts of the 1 "
                                         r"control probes aside\)"):
        p = prepare(data, tmp_path / "z.zarr", chunk_cells=64)
    back = ad.read_zarr(p)
    assert back.n_obs == 298 and not np.isin([4, 9], back.obs["xscale_source_index"]).any()


def test_killed_prepare_leaves_a_temporary_the_next_prepare_removes(tmp_path):
    """SIGKILL (no Python cleanup) just before the store is published leaves the whole temporary
    store; the next prepare of that output removes it (it had a name nothing looked for)."""
    import os
    import subprocess
    import sys

    code = (
        "import os, signal\n"
        "import xscale, xscale.data.prepare as p\n"
        "p._publish = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"p.prepare(xscale.datasets.path('starmap_mpfc'), {str(tmp_path / 's.zarr')!r}, progress=False)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = [q.name for q in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith("s.zarr.tmp-"), left
    prepare(xscale.datasets.path("starmap_mpfc"), tmp_path / "s.zarr", progress=False)
    assert [q.name for q in tmp_path.iterdir()] == ["s.zarr"]


def test_cli_prepare_and_user_error(tmp_path, capsys):
    src = str(xscale.datasets.path("starmap_mpfc"))
    assert cli_main(["prepare", src, str(tmp_path / "c.zarr"), "--slide-key", "slice", "--chunk-cells", "512"]) == 0
    assert "3190 cells x 166 genes, 3 slide(s), 7 blocks" in capsys.readouterr().out
    assert cli_main(["prepare", src, str(tmp_path / "d.zarr"), "--spatial-key", "xy"]) == 2
    assert "obsm keys present: ['spatial']" in capsys.readouterr().err


def test_prepare_memory_stays_below_matrix(tmp_path, monkeypatch):
    """A 36k-cell x 960-gene input read lazily, converted in 1,500-cell blocks: the whole
    matrix (even as CSR) is never in memory, and no block larger than the cap is ever read."""
    import xscale.data.prepare as prepare_mod
    from xscale.data.synthetic import tile_tissue

    src = xscale.datasets.load("cosmx_nsclc_profast")
    big = tile_tissue(src, 36_000, out=tmp_path / "big.zarr", seed=0, chunk_cells=6000)
    whole = ad.read_zarr(big)
    csr_bytes = whole.X.data.nbytes + whole.X.indices.nbytes + whole.X.indptr.nbytes
    del whole
    prepare(src[:200].copy(), tmp_path / "warm.zarr")  # imports (squidpy...) outside the measure
    seen = []
    scatter, gather = prepare_mod._scatter_block, prepare_mod._gather_block

    def spy_scatter(block, *args):
        seen.append(block.shape[0])
        return scatter(block, *args)

    def spy_gather(*args):
        out = gather(*args)
        seen.append(out.shape[0])
        return out

    peaks = {}
    graph = prepare_mod.spatial_graph

    def spy_graph(*args, **kwargs):
        # the O(n k) neighbour graph is not the count matrix: measure it apart
        peaks["counts"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        out = graph(*args, **kwargs)
        peaks["graph"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        return out

    monkeypatch.setattr(prepare_mod, "_scatter_block", spy_scatter)
    monkeypatch.setattr(prepare_mod, "_gather_block", spy_gather)
    monkeypatch.setattr(prepare_mod, "spatial_graph", spy_graph)
    tracemalloc.start()
    prepare(big, tmp_path / "big_store.zarr", chunk_cells=1500, n_neighbors=6, slide_key="slide")
    peaks["after"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert max(seen) <= 1500 and len(seen) == 2 * 24
    # everything but the graph (reading, checking, scattering, writing counts; obs) stays
    # below the size of the matrix held once as CSR (measured: ~0.7 of it, mostly obs strings)
    assert max(peaks["counts"], peaks["after"]) < 0.85 * csr_bytes, (peaks, csr_bytes)
    back = CellStore(tmp_path / "big_store.zarr")
    assert back.n_cells == 36_000 and back.read_rows(0, 10).shape == (10, 960)


def test_default_graph_fills_the_niches_of_the_default_level2_presets(starmap_store, caplog):
    import logging

    from xscale.models.cell_to_tissue import CellToTissueConfig
    from xscale.train.niche_stream_data import warn_if_short_niches

    store = CellStore(starmap_store)  # prepared with the defaults
    with caplog.at_level(logging.WARNING, logger="xscale.train.niche_stream_data"):
        for preset in ("tiny", "small"):
            warn_if_short_niches(store, CellToTissueConfig.preset(preset, in_dim=8).max_cells)
        assert caplog.records == []
        warn_if_short_niches(store, CellToTissueConfig.preset("base", in_dim=8).max_cells)
    assert "Prepare with n_neighbors=31" in caplog.text
