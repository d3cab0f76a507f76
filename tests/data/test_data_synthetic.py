"""tile_tissue: large tissues built from real STARmap cells (thinned counts, jittered rotated tiles)."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from scipy.spatial import cKDTree

from xscale.data.synthetic import tile_tissue

N, TILES, KEEP_MIN, JITTER, CHUNK = 2500, 2, 0.5, 0.25, 600  # 3 tiles (last one cut), 5 blocks of 600


def _tile(src, **kw):
    args = dict(slide_key="slice", tiles_per_slide=TILES, keep_min=KEEP_MIN, jitter=JITTER,
                seed=3, chunk_cells=CHUNK, progress=False)
    return tile_tissue(src, N, **{**args, **kw})


@pytest.fixture(scope="module")
def tiled(starmap):
    return _tile(starmap)


def _source_rows(starmap, out):
    """Row of each output cell's source cell in the input (obs['source_cell'] holds its obs name)."""
    rows = starmap.obs_names.get_indexer(out.obs["source_cell"].astype(str))
    assert (rows >= 0).all()
    return rows


def test_counts_are_a_binomial_thinning_of_the_source_cell(starmap, tiled):
    """Gene by gene an output cell holds at most its source cell's molecules (whole numbers), no cell is
    empty, and the kept fraction matches the mean keep probability (keep_min + 1) / 2."""
    assert tiled.shape == (N, starmap.n_vars) and list(tiled.var_names) == list(starmap.var_names)
    out = tiled.X.toarray()
    src = starmap.X.toarray()[_source_rows(starmap, tiled)]
    assert (out >= 0).all() and (out <= src).all() and np.array_equal(out, np.round(out))
    assert (out.sum(axis=1) > 0).all()
    assert out.sum() / src.sum() == pytest.approx((KEEP_MIN + 1) / 2, abs=0.02)
    ratio = out.sum(axis=1) / src.sum(axis=1)  # per-cell keep probabilities spread over [keep_min, 1]
    assert ratio.mean() == pytest.approx((KEEP_MIN + 1) / 2, abs=0.02)
    assert np.quantile(ratio, 0.1) < 0.62 and np.quantile(ratio, 0.9) > 0.88


def test_a_cell_thinned_to_nothing_keeps_one_molecule(starmap):
    """Sparse sources (8 genes) and keep_min=0.02 empty many cells: each keeps one molecule of its top
    gene instead of becoming an empty, unreal cell."""
    few = starmap[:, :8].copy()
    few = few[np.asarray(few.X.sum(axis=1)).ravel() > 0].copy()
    out = tile_tissue(few, 1500, keep_min=0.02, seed=1, progress=False)
    x = out.X.toarray()
    src = few.X.toarray()[_source_rows(few, out)]
    p = np.linspace(0.02, 1, 200)[:, None]  # without the rescue, E[cells thinned to zero] is large
    assert ((1 - p) ** src.sum(axis=1)).mean(axis=0).sum() > 50
    assert (x.sum(axis=1) > 0).all() and (x <= src).all()


def test_tiles_are_jittered_rotated_copies_of_source_slides(starmap, tiled):
    """Each tile is one source slide moved by a rigid quarter-turn rotation plus a shift, with Gaussian
    noise of sd jitter x that slide's median nearest-neighbour distance; tiles of a slide don't overlap."""
    rows = _source_rows(starmap, tiled)
    tile = np.array([name.split("_", 1)[0] for name in tiled.obs_names])
    xy_src = np.asarray(starmap.obsm["spatial"], dtype=np.float64)[rows]
    xy = np.asarray(tiled.obsm["spatial"])
    slide_src = starmap.obs["slice"].astype(str).to_numpy()[rows]
    boxes = {}
    for t in np.unique(tile):
        m = tile == t
        assert len(set(slide_src[m])) == 1 and len(set(rows[m])) == m.sum()  # one slide, each cell once
        whole = np.asarray(starmap.obsm["spatial"])[starmap.obs["slice"].astype(str) == slide_src[m][0]]
        sd = JITTER * np.median(cKDTree(whole).query(whole, k=2)[0][:, 1])
        fits = []
        for k in range(4):
            rot = np.linalg.matrix_power(np.array([[0, -1], [1, 0]]), k)
            res = xy[m] - xy_src[m] @ rot.T
            fits.append((res - res.mean(axis=0)).std(axis=0).max())
        best = int(np.argmin(fits))
        assert 0.85 < fits[best] / sd < 1.15, (t, fits, sd)  # noise of the documented size
        assert sorted(fits)[1] > 20 * sd  # the other rotations don't fit: a rigid copy, not a reshuffle
        boxes.setdefault(str(tiled.obs["slide"][m].iloc[0]), []).append((xy[m].min(axis=0), xy[m].max(axis=0)))
    assert len(np.unique(tile)) == 3
    for tiles in boxes.values():  # side by side
        for i in range(len(tiles)):
            for j in range(i):
                (lo1, hi1), (lo2, hi2) = tiles[i], tiles[j]
                assert ((hi1 < lo2) | (hi2 < lo1)).any()


def test_slides_group_tiles_per_slide_tiles(tiled):
    """obs['slide'] names synthetic slides of tiles_per_slide tiles each, in tile order."""
    tile = np.array([int(name.split("_", 1)[0][1:]) for name in tiled.obs_names])
    slide = tiled.obs["slide"].astype(str).to_numpy()
    assert sorted(set(slide)) == ["tile_slide0", "tile_slide1"]
    for t in np.unique(tile):
        assert set(slide[tile == t]) == {f"tile_slide{t // TILES}"}
    assert (np.diff(tile) >= 0).all()
    assert tiled.obs_names.is_unique


def test_same_seed_same_tissue_other_seed_another(starmap, tiled):
    """A seed fixes counts, coordinates and cells; another seed changes counts and coordinates."""
    again = _tile(starmap)
    assert np.array_equal(again.X.toarray(), tiled.X.toarray())
    np.testing.assert_array_equal(again.obsm["spatial"], tiled.obsm["spatial"])
    assert (again.obs_names == tiled.obs_names).all()
    other = _tile(starmap, seed=4)
    assert not np.array_equal(other.obsm["spatial"], tiled.obsm["spatial"])
    assert other.shape != tiled.shape or not np.array_equal(other.X.toarray(), tiled.X.toarray())


def test_store_on_disk_equals_the_in_memory_tissue(starmap, tiled, tmp_path):
    """out=... writes (block by block) the same cells as the in-memory result, readable by anndata."""
    path = _tile(starmap, out=tmp_path / "t.zarr")
    assert path == tmp_path / "t.zarr"
    back = ad.read_zarr(path)
    assert back.shape == tiled.shape
    assert np.array_equal(back.X.toarray(), tiled.X.toarray())
    np.testing.assert_array_equal(back.obsm["spatial"], tiled.obsm["spatial"])
    assert (back.obs_names == tiled.obs_names).all() and (back.var_names == tiled.var_names).all()
    for col in ("slide", "source_cell", "cell_type"):
        assert (back.obs[col].astype(str).to_numpy() == tiled.obs[col].astype(str).to_numpy()).all()
    assert back.uns["xscale_synthetic"]["seed"] == 3 and back.uns["xscale_synthetic"]["n_tiles"] == 3
    assert {k: back.uns["xscale_synthetic"][k] for k in tiled.uns["xscale_synthetic"]} == tiled.uns["xscale_synthetic"]
