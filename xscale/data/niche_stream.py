"""Level-2 streaming: :class:`NicheStream` yields niches (a centre and its nearest neighbours)
of a prepared store, with their cells' level-1 latents or raw counts, out of core.

Sharding, block order and the shuffle buffer are those of :mod:`xscale.data.stream`.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xscale.data.niches import Niches, gather_niches
from xscale.data.store import CellStore
from xscale.data.stream import _StoreStream
from xscale.errors import XscaleInputError

logger = logging.getLogger(__name__)

_GATHER = 256  # niche centres whose values are gathered together


@dataclass
class NicheItem:
    """One niche of C cells (column 0 = centre).

    idx (C,) int64 store rows (-1 = pad); rel_xy (C, 2) float32; pad_mask (C,) bool;
    counts (C, G) float32 raw counts (zeros at pad) when streaming counts, else None;
    latents (C, *L) float32 level-1 latents (zeros at pad) when given, else None.
    """

    centre: int
    idx: np.ndarray
    rel_xy: np.ndarray
    pad_mask: np.ndarray
    slide: int
    counts: np.ndarray | None = None
    latents: np.ndarray | None = None


@dataclass
class NicheBatch:
    """Stacked niches: idx (B, C), rel_xy (B, C, 2), pad_mask (B, C), centre (B,), slide (B,),
    counts (B, C, G) or None, latents (B, C, *L) or None."""

    idx: torch.Tensor
    rel_xy: torch.Tensor
    pad_mask: torch.Tensor
    centre: torch.Tensor
    slide: torch.Tensor
    counts: torch.Tensor | None
    latents: torch.Tensor | None

    def __len__(self) -> int:
        return self.idx.shape[0]


def collate_niches(items: list[NicheItem]) -> NicheBatch:
    """Stack niche items (all have the same C) into a :class:`NicheBatch`."""
    def stack(name: str) -> torch.Tensor | None:
        vals = [getattr(it, name) for it in items]
        return None if vals[0] is None else torch.from_numpy(np.stack(vals))

    return NicheBatch(
        idx=stack("idx"), rel_xy=stack("rel_xy"), pad_mask=stack("pad_mask"),
        centre=torch.tensor([it.centre for it in items], dtype=torch.long),
        slide=torch.tensor([it.slide for it in items], dtype=torch.long),
        counts=stack("counts"), latents=stack("latents"),
    )


class _RowCache:
    """Reads rows of a per-cell array (store counts or latents) block by block, keeping a few blocks."""

    def __init__(self, read_block: Callable[[int, int], np.ndarray], chunk_cells: int, n_cells: int,
                 capacity: int) -> None:
        self.read_block, self.chunk, self.n, self.capacity = read_block, chunk_cells, n_cells, capacity
        self.blocks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.reads = 0

    def get(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), ...) values of the given rows."""
        which = rows // self.chunk
        out = None
        for c in np.unique(which):
            if c not in self.blocks:
                self.blocks[c] = self.read_block(c * self.chunk, min((c + 1) * self.chunk, self.n))
                self.reads += 1
                if len(self.blocks) > self.capacity:
                    self.blocks.popitem(last=False)
            else:
                self.blocks.move_to_end(c)
            blk = self.blocks[c]
            sel = which == c
            vals = blk[rows[sel] - c * self.chunk]
            if out is None:
                out = np.zeros((rows.size,) + vals.shape[1:], dtype=vals.dtype)
            out[sel] = vals
        return out


def open_latents(latents: np.ndarray | str | Path | Any) -> Any:
    """An (n, ...) latent array: numpy, a zarr array, or the path of a zarr array/obsm written by writeback."""
    if isinstance(latents, (str, Path)):
        import zarr

        try:
            return zarr.open_array(Path(latents), mode="r")
        except Exception as err:
            raise XscaleInputError(
                f"{latents}: expected a zarr array of latents (n_cells, ...), could not open it ({err})."
            ) from err
    return latents


class NicheStream(_StoreStream):
    """Level-2 stream of :class:`NicheItem` (collate with :func:`collate_niches`).

    Each item is the niche centred on one store row: the centre and its nearest
    ``max_cells - 1`` neighbours from the stored graph, with relative positions in units of
    the slide's median nearest-neighbour distance. With ``latents`` (n, ...) in store order,
    items carry the latents of the niche's cells; otherwise their raw counts.
    Parameters as in :class:`CellStream`; ``rows`` selects the niche centres.

    Nothing per cell is held: for each block of centres the stream reads that slice of the
    stored graph (indptr + indices) and, through caches of ``cache_chunks`` store blocks per
    worker, the coordinates and latents / counts of the cells its niches touch (in a
    spatially ordered store, a few neighbouring blocks). The niches equal
    :func:`~xscale.data.niches.build_niches` on the whole graph.
    """

    def __init__(self, store: str | Path | CellStore, *, max_cells: int = 32, latents: Any = None,
                 rows: np.ndarray | None = None, shuffle: bool = True, seed: int = 0, buffer_size: int = 1024,
                 cache_chunks: int = 8, rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__(store, rows=rows, shuffle=shuffle, seed=seed, buffer_size=buffer_size,
                         rank=rank, world_size=world_size)
        if max_cells < 1:
            raise XscaleInputError(f"max_cells: expected >= 1, found {max_cells}.")
        if cache_chunks < 1:
            raise XscaleInputError(f"cache_chunks: expected >= 1 store blocks to keep, found {cache_chunks}.")
        self.max_cells, self.cache_chunks = max_cells, cache_chunks
        self.latents = open_latents(latents) if latents is not None else None
        if self.latents is not None and self.latents.shape[0] != self.store.n_cells:
            raise XscaleInputError(
                f"latents: expected one row per store cell ({self.store.n_cells}), found {self.latents.shape[0]}. "
                "Embed the same store (rows in store order)."
            )
        if not self.store.spatial:
            raise XscaleInputError(f"{self.store.path}: expected a spatial store (niches need coordinates and a "
                                   "graph), found one prepared with spatial_key=None.")
        # nothing per cell is loaded here: each block of centres reads its graph rows, and the
        # coordinates / values of the cells its niches touch, through small block caches

    def __len__(self) -> int:
        return self.n_items

    def _cache(self) -> _RowCache:
        if self.latents is not None:
            lat = self.latents

            def read(a: int, b: int) -> np.ndarray:
                return np.asarray(lat[a:b], dtype=np.float32)
        else:
            def read(a: int, b: int) -> np.ndarray:
                return self.store.read_rows(a, b).toarray()
        return _RowCache(read, self.store.chunk_cells, self.store.n_cells, self.cache_chunks)

    def _niches(self, centres: np.ndarray, coords: _RowCache) -> Niches:
        """Niches of sorted centres in one store block, reading only their graph rows and touched coordinates."""
        first = int(centres[0])
        ptr, nbrs = self.store.graph_rows(first, int(centres[-1]) + 1)
        starts, stops = ptr[centres - first], ptr[centres - first + 1]
        indptr = np.zeros(centres.size + 1, dtype=np.int64)
        np.cumsum(stops - starts, out=indptr[1:])
        neighbours = nbrs[np.repeat(starts - indptr[:-1], stops - starts) + np.arange(indptr[-1])]
        touched = np.unique(np.concatenate([centres, neighbours]))  # (m,) sorted rows
        return gather_niches(centres, indptr, neighbours, coords.get(touched), self.store.scale_of(centres),
                             max_cells=self.max_cells, rows=touched)

    def _items(self, plan: list[tuple[int, np.ndarray]]) -> Iterator[NicheItem]:
        cache = self._cache()
        coords = _RowCache(self.store.read_coords, self.store.chunk_cells, self.store.n_cells, self.cache_chunks)
        for _, block_centres in plan:
            # values are gathered for a few hundred centres at a time: an item is a view into its
            # group's (b, C, ...) array, so memory follows the shuffle buffer, not the block size
            for lo in range(0, block_centres.size, _GATHER):
                centres = block_centres[lo : lo + _GATHER]
                nich = self._niches(centres, coords)
                slides = self.store.slide_of(centres)
                flat = nich.idx.ravel()
                valid = flat >= 0
                vals = cache.get(flat[valid])  # (n_valid, ...)
                full = np.zeros((flat.size,) + vals.shape[1:], dtype=np.float32)
                full[valid] = vals
                full = full.reshape(nich.idx.shape + vals.shape[1:])  # (b, C, ...)
                for i, centre in enumerate(centres):
                    yield NicheItem(
                        centre=int(centre), idx=nich.idx[i], rel_xy=nich.rel_xy[i], pad_mask=nich.pad_mask[i],
                        slide=int(slides[i]),
                        counts=full[i] if self.latents is None else None,
                        latents=full[i] if self.latents is not None else None,
                    )

    def __iter__(self) -> Iterator[NicheItem]:
        plan, rng = self._plan()
        return self._buffered(self._items(plan), rng)


def chunks_per_niche(idx: np.ndarray, chunk_cells: int) -> float:
    """Mean number of distinct store blocks holding a niche's cells. idx (B, C) (-1 = pad) -> float."""
    blocks = np.where(idx >= 0, idx // chunk_cells, -1)
    s = np.sort(blocks, axis=1)
    distinct = (np.diff(s, axis=1) != 0).sum(axis=1) + 1 - (s[:, 0] < 0)
    return float(distinct.mean())
