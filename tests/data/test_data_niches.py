"""Spatial graph and niche construction: padding, relative coordinates, unit invariance."""
from __future__ import annotations

import numpy as np
import pytest

from xscale.data.niches import build_niches, median_nn_distance, spatial_graph
from xscale.errors import XscaleInputError


def test_graph_is_per_slide_knn(starmap):
    coords = np.asarray(starmap.obsm["spatial"], dtype=np.float64)
    slides = starmap.obs["slice"].to_numpy()
    g = spatial_graph(coords, slides=slides, n_neighbors=6)
    assert g.shape == (starmap.n_obs, starmap.n_obs)
    assert np.all(np.diff(g.indptr) == 6) and g.diagonal().sum() == 0
    r, c = g.nonzero()
    assert np.all(slides[r] == slides[c])  # no edge crosses slides


def test_padding_and_relative_coordinates():
    # a centre with 3 neighbours on a unit grid, asked for niches of 6 cells
    coords = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [10, 10], [11, 10], [10, 11], [30, 30]])
    g = spatial_graph(coords, radius=3.5)  # median NN distance = 1 here
    assert median_nn_distance(coords) == pytest.approx(1.0)
    n = build_niches(g, coords, np.array([0]), max_cells=6)
    assert n.idx.tolist() == [[0, 1, 2, 3, -1, -1]]  # centre first, then nearest first
    assert n.pad_mask.tolist() == [[False, False, False, False, True, True]]
    np.testing.assert_allclose(n.rel_xy[0, :4], [[0, 0], [1, 0], [0, 2], [3, 0]])
    assert np.all(n.rel_xy[0, 4:] == 0) and n.rel_xy.dtype == np.float32
    # truncation keeps the nearest
    assert build_niches(g, coords, np.array([0]), max_cells=2).idx.tolist() == [[0, 1]]
    # an isolated cell is a niche of one
    iso = build_niches(g, coords, np.array([7]), max_cells=3)
    assert iso.idx.tolist() == [[7, -1, -1]] and iso.pad_mask[0, 1:].all()


@pytest.mark.parametrize("radius", [None, 2.5])
def test_unit_invariance(starmap, radius):
    coords = np.asarray(starmap.obsm["spatial"], dtype=np.float64)
    slides = starmap.obs["slice"].to_numpy()
    centres = np.arange(0, starmap.n_obs, 7)
    a = build_niches(spatial_graph(coords, slides=slides, radius=radius), coords, centres, max_cells=12, slides=slides)
    big = coords * 1000
    b = build_niches(spatial_graph(big, slides=slides, radius=radius), big, centres, max_cells=12, slides=slides)
    assert np.array_equal(a.idx, b.idx) and np.array_equal(a.pad_mask, b.pad_mask)
    np.testing.assert_allclose(a.rel_xy, b.rel_xy, rtol=1e-5, atol=1e-6)
    assert (a.idx[:, 0] == centres).all()


def test_bad_inputs():
    with pytest.raises(XscaleInputError, match=r"coords: expected shape \(n_cells, 2\)"):
        spatial_graph(np.zeros((5, 3)))
    with pytest.raises(XscaleInputError, match="radius: expected > 0"):
        spatial_graph(np.random.rand(5, 2), radius=0)


def test_a_radius_that_connects_almost_nothing_warns(starmap, caplog):
    """prepare --radius 0.0001 built a graph without edges and said nothing."""
    import logging

    coords = np.asarray(starmap.obsm["spatial"], dtype=np.float64)[:500]
    with caplog.at_level(logging.WARNING, logger="xscale.data.niches"):
        g = spatial_graph(coords, radius=1e-4)
    assert g.nnz == 0 and "500 of 500 cells have no neighbour within radius 0.0001" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xscale.data.niches"):
        assert spatial_graph(coords, radius=2.0).nnz > 0
    assert "no neighbour" not in caplog.text


def test_graph_build_is_quiet():
    """squidpy's per-slide INFO line does not reach users (its logger is raised to WARNING meanwhile)."""
    import logging

    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("spatialdata._logging")
    before = logger.level
    handler = Catch(level=logging.DEBUG)
    logger.addHandler(handler)
    try:
        spatial_graph(np.random.default_rng(0).random((40, 2)), slides=np.repeat([0, 1], 20), n_neighbors=4)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in seen if "Creating graph" in m]
    assert logger.level == before  # restored afterwards
