"""Scale-up generator: large tissues built from real cells (never pure noise).

:func:`tile_tissue` lays copies ("tiles") of real slides side by side on a grid, each tile
rotated by a multiple of 90°, its cells jittered by a fraction of the slide's median
nearest-neighbour distance, and its counts resampled by binomial thinning (each molecule
kept with a per-cell probability in ``[keep_min, 1]``). Tiles are grouped into synthetic
slides of ``tiles_per_slide`` tiles. The matrix is produced block by block with dask and
appended to an AnnData zarr store, so n_cells can exceed memory.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from xscale.data.niches import median_nn_distance
from xscale.errors import XscaleInputError
from xscale.utils.atomic import atomic_dir

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)


def _thin_block(x: sp.csr_matrix, rows: np.ndarray, keep: np.ndarray, seed: tuple[int, ...]) -> sp.csr_matrix:
    """Binomial thinning of source rows; a cell thinned to zero keeps one molecule of its top gene."""
    rng = np.random.default_rng(seed)
    m = x[rows].tocsr().astype(np.float32)  # (b, G)
    p = np.repeat(keep, np.diff(m.indptr))
    m.data = rng.binomial(m.data.astype(np.int64), p).astype(np.float32)
    filled = np.flatnonzero(np.diff(m.indptr) > 0)
    lost = filled[np.add.reduceat(m.data, m.indptr[filled]) == 0] if filled.size else filled
    for i in lost:  # rare: keep the cell real rather than empty
        m.data[m.indptr[i] + int(np.argmax(x[rows[i]].data))] = 1.0
    m.eliminate_zeros()
    return m


def tile_tissue(
    adata: ad.AnnData,
    n_cells: int,
    *,
    out: str | Path | None = None,
    seed: int = 0,
    slide_key: str | None = None,
    spatial_key: str = "spatial",
    tiles_per_slide: int = 16,
    jitter: float = 0.25,
    keep_min: float = 0.7,
    chunk_cells: int = 8192,
    overwrite: bool = False,
    progress: bool = True,
) -> Path | ad.AnnData:
    """Build an ``n_cells`` tissue from the real cells of ``adata`` (raw counts in X, coordinates in obsm).

    Parameters
    ----------
    adata
        Source of real cells: counts in ``X`` (CSR), coordinates in ``obsm[spatial_key]``.
    n_cells
        Cells to generate (the last tile is cut along its slide's curve order).
    out
        AnnData zarr store to write (temp name + rename); None = return an in-memory AnnData.
    slide_key
        Source slides to tile (cycled); None = the whole input is one slide.
    tiles_per_slide
        Tiles per synthetic slide (laid on a square grid); ``obs['slide']`` names them.
    jitter
        Standard deviation of the coordinate noise, in source median NN distances.
    keep_min
        Lowest per-cell binomial thinning probability.
    chunk_cells
        Rows per generated block.
    overwrite
        Replace an existing store at ``out``.
    progress
        Show a progress bar while blocks are written (``out`` given).

    Returns
    -------
    The store path when ``out`` is given, else an AnnData with X (n, G) CSR float32,
    ``obsm['spatial']``, ``obs['slide']``, ``obs['source_cell']`` and the source obs columns.
    """
    import anndata as ad_mod
    import dask
    import zarr
    from tqdm.auto import tqdm

    from xscale.data.sfc import sfc_order
    from xscale.data.zarr_settings import write_unsharded

    if n_cells < 1:
        raise XscaleInputError(f"n_cells: expected >= 1, found {n_cells}.")
    if not 0 < keep_min <= 1:
        raise XscaleInputError(f"keep_min: expected in (0, 1], found {keep_min}.")
    x = sp.csr_matrix(adata.X)
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
    labels = adata.obs[slide_key].astype(str).to_numpy() if slide_key else np.zeros(adata.n_obs, dtype=str)
    rng = np.random.default_rng(seed)
    src_slides = []
    for name in pd.unique(labels):
        rows = np.flatnonzero(labels == name)
        c = coords[rows] - coords[rows].min(axis=0)
        rows = rows[sfc_order(c)]  # a truncated tile is a compact region
        src_slides.append((rows, coords[rows] - coords[rows].min(axis=0), median_nn_distance(coords[rows])))
    span = max(float(c.max()) for _, c, _ in src_slides) * 1.05 + 1.0
    side = int(np.ceil(np.sqrt(tiles_per_slide)))

    # plan: per output cell its source row, tile and position (O(n) small vectors)
    src_rows, tiles, xy = [], [], []
    total, t = 0, 0
    while total < n_cells:
        rows, c, nn = src_slides[t % len(src_slides)]
        take = min(rows.size, n_cells - total)
        k = int(rng.integers(4))
        rot = np.linalg.matrix_power(np.array([[0, -1], [1, 0]]), k)  # k quarter turns
        centred = (c[:take] - span / 2) @ rot.T + span / 2
        g = t % tiles_per_slide
        offset = np.array([g % side, g // side]) * span
        xy.append(centred + offset + rng.normal(0, jitter * nn, size=(take, 2)))
        src_rows.append(rows[:take])
        tiles.append(np.full(take, t, dtype=np.int64))
        total += take
        t += 1
    src_rows, tiles, xy = np.concatenate(src_rows), np.concatenate(tiles), np.concatenate(xy)
    keep = rng.uniform(keep_min, 1.0, size=n_cells)

    obs = adata.obs.iloc[src_rows].reset_index(drop=True)
    obs["slide"] = pd.Categorical([f"tile_slide{i}" for i in tiles // tiles_per_slide])
    obs["source_cell"] = np.asarray(adata.obs_names)[src_rows]
    obs.index = pd.Index([f"t{a}_{b}" for a, b in zip(tiles, obs["source_cell"], strict=True)])
    blocks = [(a, min(a + chunk_cells, n_cells)) for a in range(0, n_cells, chunk_cells)]
    tasks = [dask.delayed(_thin_block)(x, src_rows[a:b], keep[a:b], (seed, i)) for i, (a, b) in enumerate(blocks)]
    var = pd.DataFrame(index=pd.Index(adata.var_names.astype(str)))
    settings = {"seed": seed, "n_tiles": t, "tiles_per_slide": tiles_per_slide, "jitter": jitter, "keep_min": keep_min}

    if out is None:
        m = sp.vstack(dask.compute(*tasks, scheduler="threads", num_workers=2), format="csr")
        return ad_mod.AnnData(X=m, obs=obs, var=var, obsm={"spatial": xy}, uns={"xscale_synthetic": settings})

    out = Path(out)
    if out.exists() and not overwrite:
        raise XscaleInputError(f"{out}: already exists. Pass overwrite=True or another path.")
    # an earlier store stays whole until this one is in place; a failure removes the temporary
    with atomic_dir(out, marker=False) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        xg = root.create_group("X")
        chunk_nnz = max(4096, chunk_cells * 64)
        data = xg.create_array("data", shape=(0,), chunks=(chunk_nnz,), dtype="float32")
        indices = xg.create_array("indices", shape=(0,), chunks=(chunk_nnz,), dtype="int32")
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        with tqdm(total=len(tasks), desc="tile_tissue", unit="block", leave=False, disable=not progress) as bar:
            for i in range(0, len(tasks), 2):  # two blocks at a time, built in parallel, appended in order
                for (a, b), m in zip(blocks[i : i + 2],
                                     dask.compute(*tasks[i : i + 2], scheduler="threads", num_workers=2), strict=True):
                    data.append(m.data)
                    indices.append(m.indices.astype(np.int32))
                    indptr[a + 1 : b + 1] = indptr[a] + m.indptr[1:]
                    bar.update(1)
        xg.create_array("indptr", shape=indptr.shape, chunks=(1 << 16,), dtype="int64")[:] = indptr
        xg.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_cells, x.shape[1]]})
        write_unsharded(root, "obs", obs)
        write_unsharded(root, "var", var)
        write_unsharded(root, "obsm", {"spatial": xy})
        for key in ("layers", "obsp", "varm", "varp"):
            write_unsharded(root, key, {})
        write_unsharded(root, "uns", {"xscale_synthetic": settings})
        root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    logger.info("tile_tissue: %d cells in %d tiles -> %s", n_cells, t, out)
    return out
