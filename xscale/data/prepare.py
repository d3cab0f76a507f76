"""``prepare``: any supported input -> one chunked zarr store per dataset.

The store's layout is described in :mod:`xscale.data.store`, whose :class:`~xscale.data.store.CellStore`
reads it.

Counts are moved in two passes over cell blocks, each block read once (dask tasks):
pass 1 checks a source block (:func:`~xscale.data.validate.check_counts`) and scatters its
rows into per-destination-block pieces on disk; pass 2 assembles each destination block in
store order and writes it. Neither the input nor the output matrix is ever held whole.
The store is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from xscale.data.niches import median_nn_distance, spatial_graph
from xscale.data.sfc import CURVES, Curve, sfc_order
from xscale.data.store import SOURCE_INDEX, STORE_VERSION, is_prepared_store
from xscale.data.validate import (
    _empty_error,
    check_counts,
    check_names,
    check_slides,
    check_spatial,
    counts_matrix,
    gene_columns,
    raw_shape_of,
    warn_zero_count,
)
from xscale.errors import XscaleInputError
from xscale.utils.atomic import check_replaceable, remove_stale_temps, replace_dir, temp_path

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

DEFAULT_NEIGHBORS = 15  # k of the stored graph: max_cells - 1 of the default (small) level-2 preset


class _Opaque:
    """Hides a (dask) matrix from dask's argument traversal."""

    def __init__(self, x: Any) -> None:
        self.x = x


def _read_block(source: _Opaque, start: int, stop: int, label: str) -> Any:
    """Rows [start, stop) of the source counts; a read failure is a damaged input, not a bug here."""
    try:
        block = source.x[start:stop]
        return block.compute(scheduler="synchronous") if type(block).__module__.startswith("dask") else block
    except XscaleInputError:
        raise
    except Exception as err:  # codecs, zarr and h5py raise many types for damaged data
        raise XscaleInputError(
            f"{label}: expected readable counts, found a corrupted or incompletely written block of cells "
            f"{start}..{stop - 1} ({type(err).__name__}: {err}). Re-create or re-download the input."
        ) from err


def _scatter_block(block: Any, start: int, rank: np.ndarray, chunk_cells: int, piece_dir: Path,
                   where: str, layers: list[str], genes: np.ndarray | None,
                   raw_shape: tuple[int, int] | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """Pass 1 on one source block: check it, split its rows by destination block, save the pieces.
    Returns the block's first row, each row's total over ``genes`` (None: all columns) and its non-zeros.
    ``raw_shape``: that of ``adata.raw``, for the messages of :func:`~xscale.data.validate.check_counts`."""
    summary = check_counts(block, where=where, layers=layers, row_offset=start, total_columns=genes,
                           raw_shape=raw_shape)
    csr = sp.csr_matrix(block, dtype=np.float32)
    ranks = rank[start : start + csr.shape[0]]
    dest = ranks // chunk_cells
    for d in np.unique(dest):
        rows = np.flatnonzero(dest == d)
        sub = csr[rows]
        np.savez(piece_dir / f"{int(d)}_{start}.npz", data=sub.data, indices=sub.indices,
                 indptr=sub.indptr, rank=ranks[rows], n_genes=csr.shape[1])
    return start, summary.totals, np.diff(csr.indptr)


def _gather_block(d: int, piece_dir: Path, keep_by_rank: np.ndarray) -> sp.csr_matrix:
    """Pass 2 on one destination block: its rows, kept cells only, in store order."""
    mats, ranks = [], []
    for p in sorted(piece_dir.glob(f"{d}_*.npz")):
        z = np.load(p)
        n_rows = z["rank"].shape[0]
        mats.append(sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=(n_rows, int(z["n_genes"]))))
        ranks.append(z["rank"])
    m = sp.vstack(mats, format="csr")
    r = np.concatenate(ranks)
    order = np.argsort(r, kind="stable")
    order = order[keep_by_rank[r[order]]]
    return m[order]


def _prepare_source(source: str | Path | ad.AnnData, table_key: str | None, spatial_key: str | None,
                    counts_layer: str | None, chunk_rows: int, gene_symbols: str | None = None) -> ad.AnnData:
    import anndata

    from xscale.data.io import read_dataset
    from xscale.data.validate import use_gene_symbols

    if isinstance(source, (str, Path)):
        return read_dataset(source, table_key=table_key, spatial_key=spatial_key,
                            counts_layer=counts_layer, backed=True, validate=False,
                            chunk_rows=chunk_rows, gene_symbols=gene_symbols)
    if gene_symbols is not None:  # the caller's AnnData stays as it was: a new one sharing its arrays
        source = anndata.AnnData(X=source.X, obs=source.obs, var=source.var.copy(), obsm=dict(source.obsm),
                                 layers=dict(source.layers), uns=dict(source.uns), raw=source.raw)
        use_gene_symbols(source, gene_symbols)
    return source


def prepare(
    source: str | Path | ad.AnnData,
    out: str | Path,
    *,
    table_key: str | None = None,
    spatial_key: str | None = "spatial",
    counts_layer: str | None = None,
    slide_key: str | None = None,
    chunk_cells: int = 8192,
    curve: Curve | Literal["random"] = "hilbert",
    n_neighbors: int = DEFAULT_NEIGHBORS,
    radius: float | None = None,
    n_workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
    gene_symbols: str | None = None,
) -> Path:
    """Convert a dataset to an xscale zarr store (see the module docstring for the layout).

    Parameters
    ----------
    source
        Path of an .h5ad / AnnData zarr / SpatialData zarr (read lazily), or an AnnData
        (its ``X`` may be in memory, backed or dask).
    out
        Store to create (a directory, e.g. ``data.xscale.zarr``).
    table_key, spatial_key, counts_layer, slide_key
        As in :func:`xscale.data.io.read_dataset`; ``spatial_key=None`` for non-spatial data
        (input order kept, no graph).
    chunk_cells
        Cells per block: the unit of reading, writing and streaming.
    curve
        Space-filling curve of the cell order; ``"random"`` shuffles cells within each slide
        (a baseline for benchmarks: niches then spread over many blocks).
    n_neighbors, radius
        Spatial graph (see :func:`xscale.data.niches.spatial_graph`). The default 15 fills the
        niches of the level-2 presets ``tiny`` (11 cells) and ``small`` (16; each niche takes its
        centre's nearest ``max_cells - 1`` neighbours); ``base`` (32 cells) needs 31.
    n_workers
        Dask threads for pass 1.
    overwrite
        Replace an existing store at ``out``.
    progress
        Show progress bars for the read and write passes.
    gene_symbols
        ``var`` column of gene symbols when ``var_names`` hold IDs (CELLxGENE: ``"feature_name"``);
        they become the store's genes (:func:`~xscale.data.validate.use_gene_symbols`).

    Returns
    -------
    The path of the complete store.
    """
    import dask
    import zarr
    from tqdm.auto import tqdm

    from xscale.data.zarr_settings import write_unsharded

    out = Path(out)
    if chunk_cells < 1:
        raise XscaleInputError(f"chunk_cells: expected >= 1, found {chunk_cells}.")
    if out.exists() and not overwrite:
        what = "a store" if is_prepared_store(out) else "a file" if out.is_file() else "something"
        raise XscaleInputError(f"{out}: expected a path for a new store, found {what} already there. "
                               "Pass overwrite=True (CLI: --overwrite) to replace a store, or another path.")
    check_replaceable(out)  # --overwrite replaces an earlier store, never a file or a folder of other things
    if isinstance(source, (str, os.PathLike)):
        src = Path(source).resolve()
        if src == out.resolve() or out.resolve() in src.parents or src in out.resolve().parents:
            raise XscaleInputError(f"{out}: expected an output path apart from the input {source}, found the "
                                   "same path (or one inside the other): the input would be replaced. "
                                   "Pass another output path.")
    adata = _prepare_source(source, table_key, spatial_key, counts_layer, chunk_cells, gene_symbols)
    source_info = dict(adata.uns.get("xscale_source", {})) if isinstance(source, (str, os.PathLike)) else {}
    n, g = adata.shape
    if n == 0 or g == 0:
        raise _empty_error(n, g, 1, "")
    layers = list(adata.layers.keys())
    x, where = counts_matrix(adata, counts_layer)  # before any block is read: X may be absent
    raw_shape = raw_shape_of(adata)
    check_names(adata)
    coords = check_spatial(adata, spatial_key) if spatial_key is not None else None
    if slide_key is not None:
        check_slides(adata, slide_key)
        slides = adata.obs[slide_key].astype(str).to_numpy()
    else:
        slides = np.full(n, "slide0", dtype=object)
    if curve not in (*CURVES, "random"):
        raise XscaleInputError(f"curve: expected one of {[*CURVES, 'random']}, found {curve!r}.")
    slide_codes = pd.factorize(slides, sort=True)[0]
    if coords is not None and curve != "random":
        order_all = sfc_order(coords, slides=slides, curve=curve)
    else:
        tie = np.random.default_rng(0).permutation(n) if curve == "random" else np.arange(n)
        order_all = np.lexsort((tie, slide_codes))
    rank = np.empty(n, dtype=np.int64)
    rank[order_all] = np.arange(n)

    remove_stale_temps(out)  # those of an earlier prepare that was killed (they can be as large as the data)
    tmp = temp_path(out)  # <name>.tmp-<pid>-<hex>: found by remove_stale_temps if this run is killed
    piece_dir = tmp / "_pieces"
    piece_dir.mkdir(parents=True)
    try:
        # pass 1: read each source block once, check it, scatter its rows by destination block
        if type(x).__module__.startswith("dask"):
            bounds = np.concatenate([[0], np.cumsum(x.chunks[0])])
        else:
            bounds = np.append(np.arange(0, n, chunk_cells), n)
        label = str(source) if isinstance(source, (str, Path)) else "the input AnnData"
        genes = gene_columns(adata.var_names)  # a cell's total leaves control probes aside
        source_x = _Opaque(x)  # dask must not compute the whole (lazy) matrix as a task argument
        tasks = [
            dask.delayed(_scatter_block)(dask.delayed(_read_block)(source_x, int(a), int(b), label), int(a), rank,
                                         chunk_cells, piece_dir, where, layers, genes, raw_shape)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        totals = np.zeros(n)
        nnz_src = np.zeros(n, dtype=np.int64)
        batch = max(1, n_workers) * 2  # bounded number of blocks in flight
        for i in tqdm(range(0, len(tasks), batch), desc="prepare: read", unit="block-batch", leave=False,
                      disable=not progress):
            for start, tot, nnz in dask.compute(*tasks[i : i + batch], scheduler="threads", num_workers=n_workers):
                totals[start : start + tot.shape[0]] = tot
                nnz_src[start : start + tot.shape[0]] = nnz
        keep = totals > 0
        n_zero = int((~keep).sum())
        if n_zero:
            warn_zero_count(n_zero, n, where, n_controls=0 if genes is None else g - genes.size)
        order = order_all[keep[order_all]]  # (n',) source rows in store order
        n_out = order.size
        if n_out == 0:
            raise _empty_error(0, g, 1, f" after dropping {n_zero} zero-count cells")
        indptr = np.zeros(n_out + 1, dtype=np.int64)
        np.cumsum(nnz_src[order], out=indptr[1:])
        nnz = int(indptr[-1])
        chunk_nnz = int(max(4096, min(nnz, chunk_cells * max(1, nnz // n_out))))

        root = zarr.open_group(tmp / "store", mode="w", zarr_format=3)
        xg = root.create_group("X")
        xg.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_out, g]})
        data = xg.create_array("data", shape=(nnz,), chunks=(chunk_nnz,), dtype="float32")
        indices = xg.create_array("indices", shape=(nnz,), chunks=(chunk_nnz,), dtype="int32")
        xg.create_array("indptr", shape=(n_out + 1,), chunks=(max(chunk_cells, 1 << 16),), dtype="int64")[:] = indptr

        # pass 2: assemble each destination block in store order and write it
        keep_by_rank = keep[order_all]
        pos = 0
        for d in tqdm(range(-(-n // chunk_cells)), desc="prepare: write", unit="block", leave=False,
                      disable=not progress):
            block = _gather_block(d, piece_dir, keep_by_rank)
            p0, p1 = indptr[pos], indptr[pos + block.shape[0]]
            data[p0:p1] = block.data
            indices[p0:p1] = block.indices.astype(np.int32)
            pos += block.shape[0]
        assert pos == n_out, (pos, n_out)
        shutil.rmtree(piece_dir)

        obs = adata.obs.iloc[order].copy()
        obs[SOURCE_INDEX] = order
        write_unsharded(root, "obs", obs)
        var = adata.var.copy()  # its columns too (with gene_symbols: the former var_names in xscale_var_id)
        var.index = pd.Index(adata.var_names.astype(str))
        write_unsharded(root, "var", var)
        slides_out = slides[order]
        names, first = np.unique(slides_out, return_index=True)
        first_sorted = np.sort(first)
        names = slides_out[first_sorted]
        stops = np.append(first_sorted[1:], n_out)
        obsm, obsp, nn = {}, {}, np.ones(len(names))
        if coords is not None:
            c = coords[order]
            obsm["spatial"] = c
            obsp["spatial_connectivities"] = spatial_graph(c, slides=slides_out, n_neighbors=n_neighbors, radius=radius)
            nn = np.array([median_nn_distance(c[a:b]) for a, b in zip(first_sorted, stops, strict=True)])
        write_unsharded(root, "obsm", obsm)
        write_unsharded(root, "obsp", obsp)
        for key in ("layers", "varm", "varp"):
            write_unsharded(root, key, {})
        meta = {
            "version": STORE_VERSION, "chunk_cells": chunk_cells, "curve": curve if coords is not None else "none",
            "n_neighbors": n_neighbors, "radius": -1.0 if radius is None else float(radius),
            "spatial": coords is not None, "slide_key": slide_key or "", "n_dropped_zero": n_zero,
            "slide_names": np.asarray(names, dtype=str), "slide_start": first_sorted.astype(np.int64),
            "slide_stop": stops.astype(np.int64), "slide_median_nn": nn,
            "source": str(Path(source).resolve()) if isinstance(source, (str, Path)) else "AnnData",
            "source_format": str(source_info.get("format", "")),
            "source_table_key": str(source_info.get("table_key", "")),
        }
        write_unsharded(root, "uns", {"xscale": meta})
        root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0",
                           "xscale_store": {"version": STORE_VERSION, "complete": True}})
        _publish(tmp / "store", out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("prepared %s: %d cells x %d genes, %d slides, %d blocks", out, n_out, g, len(names),
                -(-n_out // chunk_cells))
    return out


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename a complete store into place (an old one is removed only after the swap)."""
    if overwrite:
        replace_dir(tmp, out)
    else:
        os.replace(tmp, out)


__all__ = ["prepare"]
