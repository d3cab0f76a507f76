"""Streaming torch datasets over a prepared store: :class:`CellStream` (level 1), :class:`NicheStream` (level 2).

Per epoch, the cell blocks of the store are visited in an order drawn from ``(seed,
epoch)``; their (selected) cells form one virtual sequence, which is cut into equal
contiguous ranges, one per shard (DDP rank × DataLoader worker). So every item is yielded
exactly once per epoch across all shards, shards differ by at most one item, and each
shard reads about ``n / shards / chunk_cells`` blocks. Items pass through a bounded shuffle
buffer (``buffer_size`` items). Call :meth:`set_epoch` before each epoch.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from xscale.data.batch import CellItem
from xscale.data.niches import build_niches
from xscale.data.store import CellStore
from xscale.errors import XscaleInputError

logger = logging.getLogger(__name__)


def shard_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(shard index, number of shards) of this process/worker: rank × workers + worker id."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = 0, 1
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * nw + wid, world_size * nw


def shard_plan(rows_per_chunk: list[np.ndarray], order: np.ndarray, shard: int, n_shards: int) -> list[tuple[int, np.ndarray]]:
    """This shard's (chunk, rows) pieces: a contiguous 1/n_shards of the chunks' rows in ``order``."""
    sizes = np.array([rows_per_chunk[c].size for c in order], dtype=np.int64)
    total = int(sizes.sum())
    lo, hi = total * shard // n_shards, total * (shard + 1) // n_shards
    ends = np.cumsum(sizes)
    starts = ends - sizes
    plan = []
    for c, s, e in zip(order, starts, ends, strict=True):
        a, b = max(lo, s), min(hi, e)
        if a < b:
            plan.append((int(c), rows_per_chunk[c][a - s : b - s]))
    return plan


class _StoreStream(IterableDataset):
    """Shared sharding, block order and shuffle buffer."""

    def __init__(self, store: str | Path | CellStore, *, rows: np.ndarray | None, shuffle: bool, seed: int,
                 buffer_size: int, rank: int | None, world_size: int | None) -> None:
        super().__init__()
        self.store = store if isinstance(store, CellStore) else CellStore(store)
        n = self.store.n_cells
        rows = np.arange(n, dtype=np.int64) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
        if rows.size and (rows[0] < 0 or rows[-1] >= n):
            raise XscaleInputError(f"rows: expected store rows in [0, {n}), found {rows[0]}..{rows[-1]}.")
        if buffer_size < 1:
            raise XscaleInputError(f"buffer_size: expected >= 1, found {buffer_size}.")
        cut = np.searchsorted(rows, np.arange(1, self.store.n_chunks) * self.store.chunk_cells)
        self.rows_per_chunk = np.split(rows, cut)
        self.n_items = int(rows.size)
        self.shuffle, self.seed, self.buffer_size = shuffle, seed, buffer_size
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Epoch for the (seed, epoch)-determined block order and shuffling."""
        self.epoch = int(epoch)

    def _plan(self) -> tuple[list[tuple[int, np.ndarray]], np.random.Generator]:
        shard, n_shards = shard_info(self.rank, self.world_size)
        order = np.arange(self.store.n_chunks)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        rng = np.random.default_rng([self.seed, self.epoch, shard, n_shards])
        return shard_plan(self.rows_per_chunk, order, shard, n_shards), rng

    def _buffered(self, items: Iterator[Any], rng: np.random.Generator) -> Iterator[Any]:
        if not self.shuffle:
            yield from items
            return
        buf: list[Any] = []
        for it in items:
            buf.append(it)
            if len(buf) >= self.buffer_size:
                j = int(rng.integers(len(buf)))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf


class CellStream(_StoreStream):
    """Level-1 stream of :class:`~xscale.data.batch.CellItem` (collate with ``collate_cells``).

    Parameters
    ----------
    store
        Prepared store (path or :class:`CellStore`).
    gene_ids
        (G,) vocabulary id of each store gene (-1 = not in the vocabulary: dropped);
        None = 0..G-1.
    rows
        Store rows to stream (e.g. the training slides); None = all.
    dataset
        Dataset code written into each item.
    shuffle, seed, buffer_size
        Block order and bounded shuffle buffer; deterministic under (seed, epoch).
    rank, world_size
        DDP position; None = from ``torch.distributed`` (or a single process).
    """

    def __init__(self, store: str | Path | CellStore, *, gene_ids: np.ndarray | None = None,
                 rows: np.ndarray | None = None, dataset: int = 0, shuffle: bool = True, seed: int = 0,
                 buffer_size: int = 4096, rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__(store, rows=rows, shuffle=shuffle, seed=seed, buffer_size=buffer_size,
                         rank=rank, world_size=world_size)
        g = self.store.n_genes
        ids = np.arange(g, dtype=np.int64) if gene_ids is None else np.asarray(gene_ids, dtype=np.int64)
        if ids.shape != (g,):
            raise XscaleInputError(f"gene_ids: expected ({g},) ids, one per store gene, found shape {ids.shape}.")
        self.keep_genes = np.flatnonzero(ids >= 0)
        if self.keep_genes.size == 0:
            raise XscaleInputError("gene_ids: expected at least one gene in the vocabulary, found none (all -1).")
        self.gene_ids = ids[self.keep_genes]
        self.dataset = dataset
        self._slides = self.store.slide_codes()

    def __len__(self) -> int:
        return self.n_items

    def _items(self, plan: list[tuple[int, np.ndarray]]) -> Iterator[CellItem]:
        for c, rows in plan:
            a, b = self.store.chunk_range(c)
            block = self.store.read_rows(a, b)[rows - a][:, self.keep_genes].toarray()  # (b, G)
            for r, counts in zip(rows, block, strict=True):
                yield CellItem(gene_ids=self.gene_ids, counts=counts, index=int(r), dataset=self.dataset,
                               slide=int(self._slides[r]))

    def __iter__(self) -> Iterator[CellItem]:
        plan, rng = self._plan()
        return self._buffered(self._items(plan), rng)


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

    def __init__(self, read_block, chunk_cells: int, n_cells: int, capacity: int) -> None:
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
                out = np.zeros((rows.size,) + vals.shape[1:], dtype=np.float32)
            out[sel] = vals
        return out


def open_latents(latents: np.ndarray | str | Path | Any) -> Any:
    """An (n, ...) latent array: numpy, a zarr array, or the path of a zarr array/obsm written by writeback."""
    if isinstance(latents, (str, Path)):
        import zarr

        try:
            return zarr.open_array(Path(latents), mode="r")
        except Exception as err:
            raise XscaleInputError(f"{latents}: expected a zarr array of latents (n_cells, ...), could not open it ({err}).") from err
    return latents


class NicheStream(_StoreStream):
    """Level-2 stream of :class:`NicheItem` (collate with :func:`collate_niches`).

    Each item is the niche centred on one store row: the centre and its nearest
    ``max_cells - 1`` neighbours from the stored graph, with relative positions in units of
    the slide's median nearest-neighbour distance. With ``latents`` (n, ...) in store order,
    items carry the latents of the niche's cells; otherwise their raw counts.
    Parameters as in :class:`CellStream`; ``rows`` selects the niche centres;
    ``cache_chunks`` blocks of neighbour rows are kept per worker.
    """

    def __init__(self, store: str | Path | CellStore, *, max_cells: int = 32, latents: Any = None,
                 rows: np.ndarray | None = None, shuffle: bool = True, seed: int = 0, buffer_size: int = 1024,
                 cache_chunks: int = 8, rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__(store, rows=rows, shuffle=shuffle, seed=seed, buffer_size=buffer_size,
                         rank=rank, world_size=world_size)
        if max_cells < 1:
            raise XscaleInputError(f"max_cells: expected >= 1, found {max_cells}.")
        self.max_cells, self.cache_chunks = max_cells, cache_chunks
        self.latents = open_latents(latents) if latents is not None else None
        if self.latents is not None and self.latents.shape[0] != self.store.n_cells:
            raise XscaleInputError(
                f"latents: expected one row per store cell ({self.store.n_cells}), found {self.latents.shape[0]}. "
                "Embed the same store (rows in store order)."
            )
        self.graph = self.store.graph()
        self.coords = self.store.coords()
        self.scale = self.store.cell_scale()
        self.slides = self.store.slide_codes()

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

    def _items(self, plan: list[tuple[int, np.ndarray]]) -> Iterator[NicheItem]:
        cache = self._cache()
        for _, centres in plan:
            nich = build_niches(self.graph, self.coords, centres, max_cells=self.max_cells, scale=self.scale)
            flat = nich.idx.ravel()
            valid = flat >= 0
            vals = cache.get(flat[valid])  # (n_valid, ...)
            full = np.zeros((flat.size,) + vals.shape[1:], dtype=np.float32)
            full[valid] = vals
            full = full.reshape(nich.idx.shape + vals.shape[1:])  # (B, C, ...)
            for i, centre in enumerate(centres):
                yield NicheItem(
                    centre=int(centre), idx=nich.idx[i], rel_xy=nich.rel_xy[i], pad_mask=nich.pad_mask[i],
                    slide=int(self.slides[centre]),
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
