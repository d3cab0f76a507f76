"""Store latents back in the input's row order, out of core.

A prepared store orders cells by slide and space-filling curve; results written back to the input
(a SpatialData table) need the input's order. :class:`SourceOrderLatents` writes that reordering
into a zarr array block by block: store blocks are read in order and each row is spilled to a file
per output block (``rows`` input rows), then every output block is assembled from its file. Memory
holds one store block and one output block, never the whole array; the disk holds one extra copy
while it runs. :func:`~xscale.data.writeback.latents_in_source_order` is the in-memory reference.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from xscale.data.store import CellStore

#: input rows per output block (and per chunk of the array written)
REORDER_ROWS = 16384


class SourceOrderLatents:
    """``obsm[key]`` of a prepared store, as (n_source, width) float32 in the input's row order (NaN for
    cells dropped at validation), flattened per cell. ``write_to(group, name)`` streams it into a zarr
    group; ``np.asarray(...)`` builds it in memory (small arrays, e.g. a niche table's X)."""

    def __init__(self, store: CellStore, key: str, n_source: int, *, rows: int = REORDER_ROWS,
                 targets: np.ndarray | None = None) -> None:
        from xscale.data.writeback import read_store_latents

        self.store, self.key, self.rows = store, key, rows
        self.latents = read_store_latents(store, key)  # a clear error when the key is missing, before any write
        self.width = int(np.prod(self.latents.shape[1:]))
        self.shape = (int(n_source), self.width)
        # (n_store,) the output row of each store cell: its input row unless given (e.g. matched by name)
        self.targets = store.source_index() if targets is None else np.asarray(targets, dtype=np.int64)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.full(self.shape, np.nan, dtype=np.float32)
        for i in range(self.store.n_chunks):
            a, b = self.store.chunk_range(i)
            out[self.targets[a:b]] = np.asarray(self.latents[a:b], dtype=np.float32).reshape(b - a, self.width)
        return out if dtype is None else out.astype(dtype)

    def write_to(self, group: Any, name: str) -> None:
        """Create ``group[name]`` (an AnnData-encoded dense array, chunks of ``rows`` rows) and fill it."""
        n, width = self.shape
        out = group.create_array(name, shape=self.shape, chunks=(min(self.rows, max(n, 1)), width),
                                 dtype="float32", fill_value=np.nan)
        out.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        src = self.targets
        n_blocks = -(-n // self.rows)
        beside = self.store.path.parent  # the spill (one copy of the latents) beside the store, else in TMPDIR
        with tempfile.TemporaryDirectory(prefix=".xscale-reorder-",
                                         dir=beside if os.access(beside, os.W_OK) else None) as tmp:
            spill = Path(tmp)
            for i in range(self.store.n_chunks):  # pass 1: each store block's rows to their output block's file
                a, b = self.store.chunk_range(i)
                values = np.asarray(self.latents[a:b], dtype=np.float32).reshape(b - a, width)
                target = src[a:b].astype(np.int64)
                block = target // self.rows
                order = np.argsort(block, kind="stable")
                bounds = np.searchsorted(block[order], np.arange(n_blocks + 1))
                for o in np.flatnonzero(np.diff(bounds)):
                    sel = order[bounds[o] : bounds[o + 1]]
                    with open(spill / f"{o}.rows", "ab") as fh:
                        target[sel].tofile(fh)
                    with open(spill / f"{o}.values", "ab") as fh:
                        values[sel].tofile(fh)
            for o in range(n_blocks):  # pass 2: each output block from its file
                lo, hi = o * self.rows, min((o + 1) * self.rows, n)
                block_values = np.full((hi - lo, width), np.nan, dtype=np.float32)
                if (spill / f"{o}.rows").exists():
                    rows = np.fromfile(spill / f"{o}.rows", dtype=np.int64)
                    block_values[rows - lo] = np.fromfile(spill / f"{o}.values", dtype=np.float32).reshape(-1, width)
                out[lo:hi] = block_values
