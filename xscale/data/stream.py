"""Streaming torch datasets over a prepared store: :class:`CellStream` (level 1) here,
:class:`~xscale.data.niche_stream.NicheStream` (level 2) in :mod:`xscale.data.niche_stream`.

Per epoch, the cell blocks of the store are visited in an order drawn from ``(seed,
epoch)``; their (selected) cells form one virtual sequence, which is cut into equal
contiguous ranges, one per shard (DDP rank × DataLoader worker). So every item is yielded
exactly once per epoch across all shards, shards differ by at most one item, and each
shard reads about ``n / shards / chunk_cells`` blocks. Items pass through a bounded shuffle
buffer (``buffer_size`` items). Call :meth:`set_epoch` before each epoch.
"""
from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from xscale.data.batch import CellBatch, CellItem, collate_cells
from xscale.data.store import CellStore
from xscale.data.stream_batch import PackedCells, compact_csr, index_dtype
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


def shard_plan(rows_per_chunk: Sequence[np.ndarray], order: np.ndarray, shard: int,
               n_shards: int) -> list[tuple[int, np.ndarray]]:
    """This shard's (chunk, rows) pieces: a contiguous 1/n_shards of the chunks' rows in ``order``."""
    sizes = np.array([len(rows_per_chunk[c]) for c in order], dtype=np.int64)
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


def single_decode_thread() -> None:
    """In a DataLoader worker: zarr decodes chunks in one thread instead of a pool of up to
    cpu_count + 4 started afresh in every worker (the workers already are the parallelism);
    measured ~8% less worker CPU for a pass of 100k cells. A ``threading.max_workers`` the
    user configured is kept."""
    import zarr

    if zarr.config.get("threading.max_workers", None) is None:
        zarr.config.set({"threading.max_workers": 1})


def setup_worker() -> None:
    """First thing a stream does in a DataLoader worker (a forked copy of the training process).

    :func:`single_decode_thread`, and ``gc.freeze()``: the objects the worker inherited (the
    parent's whole heap: torch, anndata, pandas, ... often 200k+ objects) move to the
    collector's permanent generation, so the worker's own collections never traverse them.
    Otherwise the first full collection in each worker, due soon after the fork whenever the
    parent was close to one, walked that heap (170-200 ms per worker measured on a 100k-cell
    pass that lasts ~0.2 s) and wrote to every object's header, copying the parent's pages
    into the worker. Affects only the worker process; its own new objects are collected as usual.
    """
    global _set_up_pid
    if _set_up_pid == os.getpid():  # persistent workers: once per process, not per epoch
        return
    _set_up_pid = os.getpid()
    single_decode_thread()
    gc.freeze()


_set_up_pid: int | None = None


class _ChunkRows:
    """Rows of each store block to stream: all of them, or those in a sorted selection."""

    def __init__(self, store: CellStore, rows: np.ndarray | None) -> None:
        self.store, self.rows = store, rows
        if rows is not None:
            self.cut = np.searchsorted(rows, np.arange(store.n_chunks + 1) * store.chunk_cells)

    def __len__(self) -> int:
        return self.store.n_chunks

    def __getitem__(self, c: int) -> np.ndarray:
        if self.rows is None:
            return np.arange(*self.store.chunk_range(int(c)), dtype=np.int64)
        return self.rows[self.cut[c] : self.cut[c + 1]]


class _StoreStream(IterableDataset):
    """Shared sharding, block order and shuffle buffer."""

    def __init__(self, store: str | Path | CellStore, *, rows: np.ndarray | None, shuffle: bool, seed: int,
                 buffer_size: int, rank: int | None, world_size: int | None) -> None:
        super().__init__()
        self.store = store if isinstance(store, CellStore) else CellStore(store)
        n = self.store.n_cells
        rows_all = rows is None  # all rows: ranges made on the fly, no O(n) array per worker
        rows = np.zeros(0, dtype=np.int64) if rows_all else np.unique(np.asarray(rows, dtype=np.int64))
        if rows.size and (rows[0] < 0 or rows[-1] >= n):
            raise XscaleInputError(f"rows: expected store rows in [0, {n}), found {rows[0]}..{rows[-1]}.")
        if buffer_size < 1:
            raise XscaleInputError(f"buffer_size: expected >= 1, found {buffer_size}.")
        self.rows_per_chunk = _ChunkRows(self.store, None if rows_all else rows)
        self.n_items = int(rows.size) if not rows_all else n
        self.shuffle, self.seed, self.buffer_size = shuffle, seed, buffer_size
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Epoch for the (seed, epoch)-determined block order and shuffling."""
        self.epoch = int(epoch)

    def _plan(self) -> tuple[list[tuple[int, np.ndarray]], np.random.Generator]:
        if get_worker_info() is not None:
            setup_worker()
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
    batch_size
        None: yield :class:`CellItem` (DataLoader ``collate_fn=collate_cells``). An int:
        yield ready :class:`~xscale.data.batch.CellBatch` es of that many cells, built from
        each block with array operations (DataLoader ``batch_size=None``) — the same values
        ``collate_cells`` would give, many times faster; the shuffle buffer holds rows.
        ``gene_ids`` and ``pad_mask`` are then broadcast (stride-0) views: read-only, call
        ``.contiguous()`` before writing into them. In a DataLoader worker the batch leaves as
        its CSR counts (:class:`~xscale.data.stream_batch.PackedCells`) and arrives in the main
        process as the identical ``CellBatch``: a fraction of the bytes, no shared-memory segment.
    max_genes
        Gene context per cell in batched mode (as ``collate_cells(max_genes=)``).
    """

    def __init__(self, store: str | Path | CellStore, *, gene_ids: np.ndarray | None = None,
                 rows: np.ndarray | None = None, dataset: int = 0, shuffle: bool = True, seed: int = 0,
                 buffer_size: int = 4096, rank: int | None = None, world_size: int | None = None,
                 batch_size: int | None = None, max_genes: int | None = None) -> None:
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
        if batch_size is not None and batch_size < 1:
            raise XscaleInputError(f"batch_size: expected >= 1 or None, found {batch_size}.")
        self.batch_size, self.max_genes = batch_size, max_genes

    def __len__(self) -> int:
        """Cells, or (batched mode) batches, this stream yields per epoch over all shards (approx. for batches)."""
        return self.n_items if self.batch_size is None else -(-self.n_items // self.batch_size)

    def _read(self, rows: np.ndarray) -> sp.csr_matrix:
        """Counts (b, G) CSR of the sorted store rows (b,) of one block, on the stream's genes."""
        a, b = int(rows[0]), int(rows[-1]) + 1  # only the span of this shard's rows (a split block: part of it)
        m = self.store.read_rows(a, b)
        if rows.size != b - a:  # a selection of rows
            m = m[rows - a]
        if self.keep_genes.size != m.shape[1]:
            m = m[:, self.keep_genes]
        return m

    def _blocks(self, plan: list[tuple[int, np.ndarray]]) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        for _, rows in plan:
            yield rows, compact_csr(self._read(rows))  # (b, G) CSR, uint16 counts

    def _make_batch(self, rows: np.ndarray, counts: sp.csr_matrix, rng: np.random.Generator) -> CellBatch:
        """The batch of store rows (B,) with CSR counts (B, G) longer than max_genes, through collate_cells."""
        slides = self.store.slide_of(rows)
        items = [CellItem(self.gene_ids, cnt, int(r), self.dataset, int(s))
                 for r, cnt, s in zip(rows, counts.toarray().astype(np.float32), slides, strict=True)]
        return collate_cells(items, max_genes=self.max_genes, rng=rng)

    def _cut(self, rows: np.ndarray, counts: sp.csr_matrix, rng: np.random.Generator,
             packed: bool) -> Iterator[CellBatch | PackedCells]:
        """Batches of consecutive rows (B,) of ``counts`` (n, G): views of its arrays, unpacked unless ``packed``."""
        bs = self.batch_size
        if self.max_genes is not None and counts.shape[1] > self.max_genes:
            for i in range(0, rows.size, bs):
                yield self._make_batch(rows[i : i + bs], counts[i : i + bs], rng)
            return
        slides = self.store.slide_of(rows)
        indices = counts.indices.astype(index_dtype(counts.shape[1]))  # once per cut, not per batch
        ptr = counts.indptr
        for i in range(0, rows.size, bs):
            j = min(i + bs, rows.size)
            p0, p1 = ptr[i], ptr[j]
            batch = PackedCells(self.gene_ids, rows[i:j], self.dataset, slides[i:j], counts.data[p0:p1],
                                indices[p0:p1], ptr[i : j + 1] - p0)
            yield batch if packed else batch.unpack()

    def _batches(self, plan: list[tuple[int, np.ndarray]],
                 rng: np.random.Generator) -> Iterator[CellBatch | PackedCells]:
        bs = self.batch_size
        keep = self.buffer_size if self.shuffle else 0
        packed = get_worker_info() is not None  # in a worker: batches leave compact, unpack in the main process
        pool_rows, pool = np.zeros(0, dtype=np.int64), None
        for rows, block in self._blocks(plan):
            pool_rows = np.concatenate([pool_rows, rows])
            pool = block if pool is None else _stack_rows(pool, block)
            n_out = (pool_rows.size - keep) // bs * bs
            if n_out <= 0:
                continue
            # one draw per block: n_out random rows of the pool leave as batches (one gather), the rest stays
            perm = rng.permutation(pool_rows.size) if self.shuffle else np.arange(pool_rows.size)
            yield from self._cut(pool_rows[perm[:n_out]], pool[perm[:n_out]], rng, packed)
            pool_rows, pool = pool_rows[perm[n_out:]], pool[perm[n_out:]]
        if pool is not None and pool_rows.size:
            perm = rng.permutation(pool_rows.size) if self.shuffle else np.arange(pool_rows.size)
            yield from self._cut(pool_rows[perm], pool[perm], rng, packed)

    def _items(self, plan: list[tuple[int, np.ndarray]]) -> Iterator[CellItem]:
        for _, rows in plan:
            block = self._read(rows).toarray()  # (b, G)
            slides = self.store.slide_of(rows)  # rows are grouped by slide
            for r, counts, s in zip(rows.tolist(), block, slides.tolist(), strict=True):
                yield CellItem(gene_ids=self.gene_ids, counts=counts, index=r, dataset=self.dataset, slide=s)

    def __iter__(self) -> Iterator[CellItem | CellBatch | PackedCells]:
        plan, rng = self._plan()
        if self.batch_size is not None:
            return self._batches(plan, rng)
        return self._buffered(self._items(plan), rng)


def _stack_rows(a: sp.csr_matrix, b: sp.csr_matrix) -> sp.csr_matrix:
    """Rows of ``a`` then ``b`` (same columns): concatenated arrays, none of scipy's general stacking."""
    indptr = np.concatenate([a.indptr, b.indptr[1:] + a.indptr[-1]])
    return sp.csr_matrix((np.concatenate([a.data, b.data]), np.concatenate([a.indices, b.indices]), indptr),
                         shape=(a.shape[0] + b.shape[0], a.shape[1]))


_NICHE_NAMES = ("NicheItem", "NicheBatch", "NicheStream", "collate_niches", "open_latents", "chunks_per_niche")


def __getattr__(name: str) -> Any:
    """The level-2 stream moved to :mod:`xscale.data.niche_stream`; its names stay importable from here."""
    if name in _NICHE_NAMES:
        from xscale.data import niche_stream

        return getattr(niche_stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class EpochCounter:
    """The epoch a streamed loader should use: ``owner.trainer.current_epoch`` when a Lightning
    trainer is attached to ``owner`` (a DataModule), else the number of earlier calls."""

    def __init__(self, owner: Any) -> None:
        self.owner, self.calls = owner, 0

    def __call__(self) -> int:
        trainer = getattr(self.owner, "trainer", None)
        if trainer is not None:
            return trainer.current_epoch
        self.calls += 1
        return self.calls - 1


class EpochLoader(DataLoader):
    """A DataLoader that sets its stream's epoch (``dataset.set_epoch``) whenever an epoch
    starts. Workers must not be persistent (they are started per epoch, so they see it):
    a new block order and shuffle every epoch.

    Its position survives a checkpoint: Lightning saves :meth:`state_dict` (the epoch and how
    many of its batches were trained on) and calls :meth:`load_state_dict` on resume; the
    resumed epoch reads the same stream (its order depends only on seed, epoch and shards) and
    skips the batches already trained on, so the run continues bit-identical to an
    uninterrupted one. Skipped batches are read and dropped, not trained on. The workers' base
    seed, which a DataLoader draws at every epoch's start, comes from (the stream's seed, epoch)
    unless a ``generator`` is given, not from the global generator: a resumed epoch must not
    shift the draws the model makes from it.
    """

    def __init__(self, dataset: IterableDataset, *, epoch: Callable[[], int], **kwargs: Any) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError("EpochLoader: persistent workers would keep the first epoch's order; "
                             "pass persistent_workers=False.")
        self._epoch = epoch
        self._own_generator = kwargs.get("generator") is None
        super().__init__(dataset, **kwargs)
        self._current_epoch: int | None = None
        self._handed, self._exhausted = 0, False  # batches of this epoch handed out (skipped ones included)
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip) from a checkpoint
        self._progress: Callable[[], tuple[int, int]] | None = None

    def bind_progress(self, progress: Callable[[], tuple[int, int]]) -> None:
        """``progress()`` -> (batches of the current epoch training has taken, batches in the epoch), as
        Lightning counts them (its fetcher takes batches ahead of training)."""
        self._progress = progress

    def __iter__(self) -> Iterator[Any]:
        # All of it at the first batch, not at iter(): Lightning may create the iterator before it restores a
        # checkpoint (the epoch and the loader's state), and the workers copy the stream with its epoch.
        epoch = self._epoch()
        self.dataset.set_epoch(epoch)
        if self._own_generator:  # iter() draws the workers' base seed: from (seed, epoch), not the global generator
            key = np.random.SeedSequence([int(getattr(self.dataset, "seed", 0)), epoch]).generate_state(1)[0]
            self.generator = torch.Generator().manual_seed(int(key))
        resume, self._resume = self._resume, None
        skip = resume[1] if resume is not None and resume[0] == epoch else 0
        self._current_epoch, self._handed, self._exhausted = epoch, skip, False
        for i, batch in enumerate(super().__iter__()):
            if i < skip:
                continue
            self._handed = i + 1
            yield batch
        self._exhausted = True

    def state_dict(self) -> dict[str, Any]:
        if self._progress is not None:
            consumed = int(self._progress()[0])
        else:  # Lightning's fetcher runs one batch ahead until the epoch's end
            consumed = self._handed if self._exhausted else max(self._handed - 1, 0)
        return {"version": 1, "epoch": self._current_epoch, "consumed": consumed, "num_workers": self.num_workers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("epoch") is None or "consumed" not in state:
            return  # saved before any epoch started: nothing to skip
        if state.get("num_workers") != self.num_workers:
            logger.warning("The checkpoint's stream was read by %s DataLoader worker(s), now by %d: the resumed "
                           "epoch's order differs, so the run will not be bit-identical to an uninterrupted one.",
                           state.get("num_workers"), self.num_workers)
        self._resume = (int(state["epoch"]), int(state["consumed"]))
