"""Spatial neighbour graphs and niches (a cell and its neighbours) for level 2.

The graph is built per slide with squidpy (``spatial_neighbors_knn`` / ``_radius``), so
no edge ever joins two slides. Distances are measured in units of the slide's median
nearest-neighbour distance, which makes niches independent of the coordinate units
(pixels, µm, rescaled): multiplying a slide's coordinates by 1000 gives identical niches.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from xscale.errors import XscaleInputError

logger = logging.getLogger(__name__)


@dataclass
class Niches:
    """A batch of B niches of at most C cells each.

    idx (B, C) int64 cell rows (-1 = padding; column 0 is the centre), rel_xy (B, C, 2)
    float32 position relative to the centre in units of the slide's median
    nearest-neighbour distance (0 at padding), pad_mask (B, C) bool (True = padding).
    """

    idx: np.ndarray
    rel_xy: np.ndarray
    pad_mask: np.ndarray

    def __len__(self) -> int:
        return self.idx.shape[0]


def _slide_codes(slides: np.ndarray | None, n: int) -> np.ndarray:
    if slides is None:
        return np.zeros(n, dtype=np.int64)
    slides = np.asarray(slides)
    if slides.shape != (n,):
        raise XscaleInputError(f"slides: expected shape ({n},) (one per cell), found {slides.shape}.")
    codes, _ = pd.factorize(slides, sort=True)
    if (codes < 0).any():
        raise XscaleInputError("slides: expected a slide for every cell, found missing values; fill or drop them.")
    return codes.astype(np.int64)


def _check_coords(coords: np.ndarray) -> np.ndarray:
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise XscaleInputError(f"coords: expected shape (n_cells, 2), found {coords.shape}.")
    if not np.isfinite(coords).all():
        raise XscaleInputError("coords: expected finite coordinates, found NaN/inf; drop those cells first.")
    return coords


def median_nn_distance(coords: np.ndarray) -> float:
    """Median distance from each cell to its nearest other cell. coords (n, 2) -> float (1.0 if undefined)."""
    coords = np.asarray(coords, dtype=np.float64)
    if coords.shape[0] < 2:
        return 1.0
    d, _ = cKDTree(coords).query(coords, k=2)
    nn = d[:, 1]
    med = float(np.median(nn))
    if med > 0:
        return med
    pos = nn[nn > 0]  # many cells stacked on one spot: fall back to the positive distances
    return float(np.median(pos)) if pos.size else 1.0


def slide_scales(coords: np.ndarray, slides: np.ndarray | None = None) -> np.ndarray:
    """Median nearest-neighbour distance of each cell's slide. coords (n, 2) -> (n,) float64."""
    coords = _check_coords(coords)
    codes = _slide_codes(slides, coords.shape[0])
    out = np.empty(coords.shape[0], dtype=np.float64)
    for s in np.unique(codes):
        m = codes == s
        out[m] = median_nn_distance(coords[m])
    return out


@contextlib.contextmanager
def _quiet_squidpy() -> Iterator[None]:
    """Silence squidpy's per-call INFO line ("Creating graph using ...", via spatialdata's logger)."""
    logger = logging.getLogger("spatialdata._logging")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def spatial_graph(
    coords: np.ndarray,
    *,
    slides: np.ndarray | None = None,
    n_neighbors: int = 10,
    radius: float | None = None,
) -> sp.csr_matrix:
    """Spatial neighbour graph, built per slide with squidpy.

    Parameters
    ----------
    coords
        (n, 2) coordinates.
    slides
        (n,) slide of each cell (any labels); None = one slide. No edge crosses slides.
    n_neighbors
        k of the k-nearest-neighbour graph (used when ``radius`` is None).
    radius
        Connect cells closer than ``radius`` × the slide's median nearest-neighbour distance.

    Returns
    -------
    (n, n) CSR float32 with 1.0 where column j is a neighbour of row i (no self loops).
    """
    import anndata as ad

    with warnings.catch_warnings():  # at import, docrep warns about squidpy's own docstrings
        warnings.filterwarnings("ignore", category=SyntaxWarning, module="docrep")
        import squidpy as sq

    coords = _check_coords(coords)
    n = coords.shape[0]
    if radius is None and n_neighbors < 1:
        raise XscaleInputError(f"n_neighbors: expected >= 1, found {n_neighbors}.")
    if radius is not None and not radius > 0:
        raise XscaleInputError(f"radius: expected > 0 (in median nearest-neighbour distances), found {radius}.")
    codes = _slide_codes(slides, n)
    rows, cols = [], []
    for s in np.unique(codes):
        members = np.flatnonzero(codes == s)
        m = members.size
        if m < 2:
            continue
        sub = ad.AnnData(obsm={"spatial": coords[members]}, shape=(m, 0))
        with _quiet_squidpy():
            if radius is None:
                res = sq.gr.spatial_neighbors_knn(sub, n_neighs=min(n_neighbors, m - 1), copy=True)
            else:
                r = radius * median_nn_distance(coords[members])
                res = sq.gr.spatial_neighbors_radius(sub, radius=r, copy=True)
        conn = sp.coo_matrix(res.connectivities)
        keep = conn.row != conn.col
        rows.append(members[conn.row[keep]])
        cols.append(members[conn.col[keep]])
    if rows:
        r_all, c_all = np.concatenate(rows), np.concatenate(cols)
    else:
        r_all = c_all = np.zeros(0, dtype=np.int64)
    data = np.ones(r_all.shape[0], dtype=np.float32)
    graph = sp.csr_matrix((data, (r_all, c_all)), shape=(n, n))
    graph.sum_duplicates()
    graph.data[:] = 1.0
    graph.sort_indices()
    alone = int((np.diff(graph.indptr) == 0).sum())
    if radius is not None and n > 1 and alone > n // 2:
        logger.warning("spatial_graph: %d of %d cells have no neighbour within radius %g (x the median nearest-"
                       "neighbour distance): their niches hold the cell alone. A radius of about 1.5-3 connects "
                       "most cells.", alone, n, radius)
    return graph


def build_niches(
    graph: sp.csr_matrix,
    coords: np.ndarray,
    centres: np.ndarray,
    *,
    max_cells: int,
    slides: np.ndarray | None = None,
    scale: np.ndarray | float | None = None,
) -> Niches:
    """Gather each centre's neighbours into a padded niche, nearest first.

    Parameters
    ----------
    graph
        (n, n) CSR neighbour graph (row i = neighbours of cell i), e.g. :func:`spatial_graph`.
    coords
        (n, 2) coordinates.
    centres
        (B,) rows of the niche centres.
    max_cells
        C: cells per niche including the centre; the nearest C - 1 neighbours are kept.
    slides
        (n,) slide of each cell, for the per-slide distance unit; None = one slide.
    scale
        Distance unit(s) to use instead of recomputing them: a float, or (n,) per cell
        (e.g. :func:`slide_scales` computed once for a whole store).

    Returns
    -------
    :class:`Niches` with idx (B, C), rel_xy (B, C, 2), pad_mask (B, C).
    """
    if max_cells < 1:
        raise XscaleInputError(f"max_cells: expected >= 1, found {max_cells}.")
    coords = np.asarray(coords, dtype=np.float64)
    graph = sp.csr_matrix(graph)
    n = coords.shape[0]
    if graph.shape != (n, n):
        raise XscaleInputError(f"graph: expected shape ({n}, {n}) to match coords, found {graph.shape}.")
    centres = np.asarray(centres, dtype=np.int64).ravel()
    if centres.size and (centres.min() < 0 or centres.max() >= n):
        raise XscaleInputError(f"centres: expected rows in [0, {n}), found {centres.min()}..{centres.max()}.")
    if scale is None:
        unit = slide_scales(coords, slides)[centres]  # (B,)
    elif np.isscalar(scale):
        unit = np.full(centres.size, float(scale))
    else:
        unit = np.asarray(scale, dtype=np.float64)[centres]
    sub = graph[centres]  # (B, n) neighbour lists of the centres
    return gather_niches(centres, sub.indptr, sub.indices, coords, unit, max_cells=max_cells)


def gather_niches(
    centres: np.ndarray,
    indptr: np.ndarray,
    neighbours: np.ndarray,
    coords: np.ndarray,
    unit: np.ndarray,
    *,
    max_cells: int,
    rows: np.ndarray | None = None,
) -> Niches:
    """Niches from the centres' neighbour lists (the core of :func:`build_niches`).

    Parameters
    ----------
    centres
        (B,) rows of the niche centres.
    indptr, neighbours
        CSR lists: the neighbours of ``centres[i]`` are ``neighbours[indptr[i]:indptr[i + 1]]`` (rows).
    coords
        Coordinates of ``rows`` (m, 2), or of every row when ``rows`` is None.
    unit
        (B,) distance unit of each niche (its slide's median nearest-neighbour distance).
    max_cells
        C: cells per niche including the centre.
    rows
        (m,) sorted rows whose coordinates ``coords`` holds (all the centres and their
        neighbours), so that a streamed block needs only the coordinates it touches.

    Returns
    -------
    :class:`Niches` with idx (B, C) (rows), rel_xy (B, C, 2), pad_mask (B, C).
    """
    b = centres.size

    def xy(r: np.ndarray) -> np.ndarray:
        return coords[r] if rows is None else coords[np.searchsorted(rows, r)]

    counts = np.diff(indptr)
    row = np.repeat(np.arange(b), counts)
    nb = np.asarray(neighbours, dtype=np.int64)
    not_self = nb != centres[row]
    row, nb = row[not_self], nb[not_self]
    centre_xy = xy(centres)  # (B, 2)
    d2 = ((xy(nb) - centre_xy[row]) ** 2).sum(axis=1)
    order = np.lexsort((nb, d2, row))  # by centre, then distance (ties by index: deterministic)
    row, nb = row[order], nb[order]
    starts = np.searchsorted(row, np.arange(b))
    pos = np.arange(row.size) - starts[row] + 1  # column 0 holds the centre
    keep = pos < max_cells
    row, nb, pos = row[keep], nb[keep], pos[keep]

    idx = np.full((b, max_cells), -1, dtype=np.int64)
    idx[:, 0] = centres
    idx[row, pos] = nb
    pad_mask = idx < 0
    safe = np.where(pad_mask, centres[:, None], idx)
    rel = (xy(safe.ravel()).reshape(b, max_cells, 2) - centre_xy[:, None, :]) / unit[:, None, None]  # (B, C, 2)
    rel[pad_mask] = 0.0
    return Niches(idx=idx, rel_xy=rel.astype(np.float32), pad_mask=pad_mask)
