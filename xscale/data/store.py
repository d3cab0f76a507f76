"""The prepared store's layout, and :class:`CellStore`, which reads it block by block.

:func:`xscale.data.prepare.prepare` writes it. The store is an AnnData zarr (v3) store, so
``anndata.read_zarr`` opens it as is:

- ``X``: raw counts as CSR (float32 data, int32 indices, int64 indptr), cells in store order;
  one cell block = ``chunk_cells`` consecutive rows.
- cells ordered by slide, then along a space-filling curve (:mod:`xscale.data.sfc`);
  ``obs['xscale_source_index']`` is each cell's row in the input.
- ``obsm['spatial']`` (n, 2); ``obsp['spatial_connectivities']``: the per-slide neighbour
  graph (:func:`xscale.data.niches.spatial_graph`) in store order.
- ``var``: the gene list; ``uns['xscale']``: per-slide metadata (name, first/last row,
  median nearest-neighbour distance), chunking and how the store was built.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from xscale.errors import XscaleInputError

STORE_VERSION = 1
SOURCE_INDEX = "xscale_source_index"


def is_prepared_store(path: str | Path) -> bool:
    """True for a zarr group written by :func:`~xscale.data.prepare.prepare` (complete or not: :class:`CellStore`
    says which)."""
    import zarr

    if not Path(path).is_dir():
        return False
    try:
        return "xscale_store" in zarr.open_group(path, mode="r").attrs
    except Exception:  # not a zarr group
        return False


class CellStore:
    """Read access to a prepared store, block by block. Cheap to pickle (reopens in each worker).

    Attributes: ``n_cells``, ``n_genes``, ``genes`` (list), ``chunk_cells``, ``n_chunks``,
    ``slide_names`` (S,), ``slide_start`` / ``slide_stop`` (S,) row ranges, ``slide_median_nn`` (S,),
    ``n_neighbors`` / ``radius`` (None = k nearest) of the stored graph.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(os.path.abspath(path))  # absolute: "." names its directory (partials go beside it)
        self._root = None
        self._arrays: dict[str, Any] = {}
        self._identity: str | None = None
        root = self.root
        info = root.attrs.get("xscale_store")
        if not info or not info.get("complete"):
            raise XscaleInputError(
                f"{self.path}: expected a complete xscale store (written by xscale prepare), found "
                f"{'an incomplete one' if info else 'a zarr store without xscale_store metadata'}. Run xscale prepare."
            )
        from anndata.io import read_elem

        meta = read_elem(root["uns"]["xscale"])
        self.chunk_cells = int(meta["chunk_cells"])
        self.spatial = bool(meta["spatial"])
        self.slide_names = np.array([str(s) for s in meta["slide_names"]], dtype=object)
        self.slide_start = np.asarray(meta["slide_start"], dtype=np.int64)
        self.slide_stop = np.asarray(meta["slide_stop"], dtype=np.int64)
        self.slide_median_nn = np.asarray(meta["slide_median_nn"], dtype=np.float64)
        self.n_neighbors = int(meta["n_neighbors"])  # the stored graph: k nearest, or within a radius
        self.radius = None if float(meta["radius"]) < 0 else float(meta["radius"])
        # what it was prepared from (a path, its format and table): where --write-back writes results
        self.source = str(meta.get("source", ""))
        self.source_format = str(meta.get("source_format", ""))
        self.source_table_key = str(meta.get("source_table_key", "")) or None
        self.n_cells, self.n_genes = (int(v) for v in root["X"].attrs["shape"])
        self.n_chunks = -(-self.n_cells // self.chunk_cells)

    @property
    def root(self):
        # Opened once per process that unpickled the store (spawned workers). Forked DataLoader
        # workers keep the parent's open group: zarr resets its event loop after a fork, and
        # re-reading the metadata in each worker cost ~5 ms of CPU at every worker start.
        if self._root is None:
            import zarr

            try:
                self._root = zarr.open_group(self.path, mode="r")
            except Exception as err:
                raise XscaleInputError(
                    f"{self.path}: expected an xscale zarr store, could not open it ({err}). Run xscale prepare."
                ) from err
        return self._root

    def array(self, key: str) -> Any:
        """The zarr array at ``key`` (e.g. ``"X/data"``), opened once per process like :attr:`root`:
        an open reads metadata from disk, and opening X's arrays for every block was ~1/5 of a pass."""
        arr = self._arrays.get(key)
        if arr is None:
            arr = self._arrays[key] = self.root[key]
        return arr

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_root": None, "_arrays": {}}

    @property
    def genes(self) -> list[str]:
        from anndata.io import read_elem

        return list(read_elem(self.root["var"]).index.astype(str))

    def chunk_range(self, i: int) -> tuple[int, int]:
        """Rows [start, stop) of cell block ``i``."""
        return i * self.chunk_cells, min((i + 1) * self.chunk_cells, self.n_cells)

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Counts of rows [start, stop) as CSR float32 (stop - start, G); reads only their chunks."""
        ptr = self.array("X/indptr")[start : stop + 1]
        p0, p1 = int(ptr[0]), int(ptr[-1])
        return sp.csr_matrix((self.array("X/data")[p0:p1], self.array("X/indices")[p0:p1], ptr - p0),
                             shape=(stop - start, self.n_genes))

    def read_selected(self, rows: np.ndarray) -> sp.csr_matrix:
        """Counts of the sorted store rows ``rows`` (r,) as CSR float32 (r, G), reading only the blocks that
        hold them, one at a time."""
        rows = np.asarray(rows, dtype=np.int64)
        blocks = []
        for c in np.unique(rows // self.chunk_cells):
            a, b = self.chunk_range(int(c))
            blocks.append(self.read_rows(a, b)[rows[(rows >= a) & (rows < b)] - a])
        return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, self.n_genes), dtype=np.float32)

    def slide_codes(self) -> np.ndarray:
        """(n,) int64 slide code of each row (rows are grouped by slide)."""
        return np.repeat(np.arange(len(self.slide_names)), self.slide_stop - self.slide_start)

    def cell_scale(self) -> np.ndarray:
        """(n,) median nearest-neighbour distance of each row's slide."""
        return np.repeat(self.slide_median_nn, self.slide_stop - self.slide_start)

    def coords(self) -> np.ndarray:
        """(n, 2) float64 coordinates in store order."""
        if not self.spatial:
            raise XscaleInputError(f"{self.path}: expected a spatial store, found one prepared with spatial_key=None.")
        return np.asarray(self.root["obsm"]["spatial"][:], dtype=np.float64)

    def graph(self) -> sp.csr_matrix:
        """(n, n) CSR neighbour graph in store order."""
        from anndata.io import read_elem

        if not self.spatial:
            raise XscaleInputError(f"{self.path}: expected a spatial store (with a graph), found a non-spatial one.")
        return sp.csr_matrix(read_elem(self.root["obsp"]["spatial_connectivities"]))

    def slide_of(self, rows: np.ndarray) -> np.ndarray:
        """(B,) int64 slide code of the given rows, from the per-slide row ranges (no per-cell array)."""
        return np.searchsorted(self.slide_stop, np.asarray(rows, dtype=np.int64), side="right")

    def scale_of(self, rows: np.ndarray) -> np.ndarray:
        """(B,) median nearest-neighbour distance of the given rows' slides."""
        return self.slide_median_nn[self.slide_of(rows)]

    def read_coords(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, 2) float64 coordinates of rows [start, stop); reads only their chunks."""
        if not self.spatial:
            raise XscaleInputError(f"{self.path}: expected a spatial store, found one prepared with spatial_key=None.")
        return np.asarray(self.array("obsm/spatial")[start:stop], dtype=np.float64)

    def graph_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Neighbour lists of rows [start, stop) from the stored graph, reading only that slice.

        Returns indptr (stop - start + 1,) int64 starting at 0 and neighbours (nnz,) int64
        rows: the neighbours of row ``start + i`` are ``neighbours[indptr[i]:indptr[i + 1]]``.
        """
        if not self.spatial:
            raise XscaleInputError(f"{self.path}: expected a spatial store (with a graph), found a non-spatial one.")
        graph = "obsp/spatial_connectivities"
        ptr = np.asarray(self.array(f"{graph}/indptr")[start : stop + 1], dtype=np.int64)
        p0, p1 = int(ptr[0]), int(ptr[-1])
        return ptr - p0, np.asarray(self.array(f"{graph}/indices")[p0:p1], dtype=np.int64)

    def source_index(self) -> np.ndarray:
        """(n,) row of each store cell in the input dataset."""
        return np.asarray(self.root["obs"][SOURCE_INDEX][:], dtype=np.int64)

    @property
    def n_source(self) -> int:
        """Rows of the input the store was prepared from: its cells plus those dropped at validation
        (zero total counts)."""
        from anndata.io import read_elem

        dropped = int(read_elem(self.root["uns"]["xscale"]).get("n_dropped_zero", 0))
        return self.n_cells + dropped

    def obs_names(self) -> np.ndarray:
        """(n,) the input's name of each store cell, in store order (only obs's index is read)."""
        obs = self.root["obs"]
        return np.asarray(obs[obs.attrs.get("_index", "_index")][:]).astype(object).astype(str)

    @property
    def identity(self) -> str:
        """A digest of what the store holds (its cells' input rows and names, counts per cell, genes,
        blocks): a store prepared again differently (another order, input or chunk size) has another.
        Resumable writes beside the store keep it, so they never resume into a store that changed."""
        if self._identity is None:
            import hashlib

            h = hashlib.sha1()
            h.update(f"{self.n_cells} {self.n_genes} {self.chunk_cells}".encode())
            h.update(self.source_index().tobytes())
            h.update(np.asarray(self.array("X/indptr")[:], dtype=np.int64).tobytes())
            h.update("\n".join(self.obs_names()).encode())
            h.update("\n".join(self.genes).encode())
            self._identity = h.hexdigest()[:16]
        return self._identity


def iter_store_blocks(store: CellStore) -> Any:
    """Yield ``(start, csr block)`` over the store in order (the raw-read baseline)."""
    for i in range(store.n_chunks):
        a, b = store.chunk_range(i)
        yield a, store.read_rows(a, b)


__all__ = ["is_prepared_store", "CellStore", "iter_store_blocks"]
