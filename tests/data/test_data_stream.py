"""CellStream / NicheStream: exactly-once sharding, determinism, content, niche locality."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import xscale
from xscale.data.batch import collate_cells
from xscale.data.niche_stream import NicheStream, chunks_per_niche, collate_niches
from xscale.data.niches import build_niches
from xscale.data.prepare import prepare
from xscale.data.store import CellStore
from xscale.data.stream import CellStream, shard_plan


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "starmap.zarr"
    return CellStore(prepare(xscale.datasets.path("starmap_mpfc"), out, slide_key="slice", chunk_cells=200))


def _indices(ds, workers: int) -> list[int]:
    collate = collate_cells if isinstance(ds, CellStream) else collate_niches
    dl = DataLoader(ds, batch_size=64, num_workers=workers, collate_fn=collate)
    key = "index" if isinstance(ds, CellStream) else "centre"
    return [int(i) for b in dl for i in getattr(b, key)]


def test_exactly_once_2_workers_x_2_ranks(store):
    torch.set_num_threads(1)
    rows = np.flatnonzero(store.slide_codes() != 2)  # e.g. training slides only
    per_rank = []
    for rank in range(2):
        ds = CellStream(store, rows=rows, seed=3, buffer_size=100, rank=rank, world_size=2)
        ds.set_epoch(1)
        per_rank.append(_indices(ds, workers=2))
    seen = per_rank[0] + per_rank[1]
    assert len(seen) == rows.size and sorted(seen) == rows.tolist()
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 2  # balanced shards


def test_niche_stream_exactly_once_sharded(store):
    seen = []
    for rank in range(2):
        ds = NicheStream(store, max_cells=8, seed=0, rank=rank, world_size=2)
        seen += _indices(ds, workers=2)
    assert sorted(seen) == list(range(store.n_cells))


def test_shard_plan_covers_every_row_once():
    rng = np.random.default_rng(0)
    chunks = [np.arange(i * 10, i * 10 + rng.integers(0, 11)) for i in range(9)]
    order = rng.permutation(9)
    for n_shards in (1, 3, 4, 7):
        got = np.concatenate([r for s in range(n_shards) for _, r in shard_plan(chunks, order, s, n_shards)])
        assert sorted(got.tolist()) == sorted(np.concatenate(chunks).tolist())


def test_deterministic_under_seed_and_epoch(store):
    def order(seed, epoch):
        ds = CellStream(store, seed=seed, buffer_size=300)
        ds.set_epoch(epoch)
        return [it.index for it in ds]

    a = order(0, 0)
    assert a == order(0, 0)
    assert a != order(0, 1) and a != order(1, 0)
    assert sorted(a) == list(range(store.n_cells))
    assert a != sorted(a)  # shuffled


def test_items_hold_the_cells_counts(store, starmap):
    src = store.source_index()
    ids = np.arange(store.n_genes) * 2  # a vocabulary mapping
    ids[5] = -1  # a gene outside the vocabulary is dropped
    ds = CellStream(store, gene_ids=ids, shuffle=False, dataset=4)
    dense = starmap.X.toarray()
    for it in list(ds)[::97]:
        assert it.dataset == 4 and it.gene_ids.shape == (store.n_genes - 1,) and 10 not in it.gene_ids
        np.testing.assert_array_equal(it.counts, np.delete(dense[src[it.index]], 5))
    batch = collate_cells(list(ds)[:8], max_genes=50)
    assert batch.gene_ids.shape == (8, 50)


def test_niche_items_with_latents(store, tmp_path):
    lat = np.random.default_rng(0).normal(size=(store.n_cells, 3, 4)).astype(np.float32)
    ds = NicheStream(store, max_cells=12, latents=lat, shuffle=False)
    items = list(ds)[:50]
    ref = build_niches(store.graph(), store.coords(), np.array([i.centre for i in items]), max_cells=12,
                       slides=store.slide_codes())
    batch = collate_niches(items)
    assert batch.latents.shape == (50, 12, 3, 4) and batch.counts is None
    np.testing.assert_array_equal(batch.idx.numpy(), ref.idx)
    np.testing.assert_allclose(batch.rel_xy.numpy(), ref.rel_xy, rtol=1e-5, atol=1e-6)
    valid = ref.idx >= 0
    np.testing.assert_array_equal(batch.latents.numpy()[valid], lat[ref.idx[valid]])
    assert (batch.latents.numpy()[~valid] == 0).all()
    counts = next(iter(NicheStream(store, max_cells=12, shuffle=False)))
    np.testing.assert_array_equal(counts.counts[0], store.read_rows(0, 1).toarray()[0])


def test_spatial_order_keeps_niches_in_few_blocks(store, tmp_path):
    shuffled = CellStore(prepare(xscale.datasets.path("starmap_mpfc"), tmp_path / "rand.zarr",
                                 slide_key="slice", chunk_cells=200, curve="random"))
    def cpn(s):
        nich = build_niches(s.graph(), s.coords(), np.arange(s.n_cells), max_cells=16, scale=s.cell_scale())
        return chunks_per_niche(nich.idx, s.chunk_cells)
    spatial, rand = cpn(store), cpn(shuffled)
    assert spatial * 2.5 < rand, (spatial, rand)


def test_batched_mode_matches_collate_and_covers_once(store):
    ref = collate_cells(list(CellStream(store, shuffle=False))[:100])
    got = next(iter(CellStream(store, shuffle=False, batch_size=100)))
    for name in ("gene_ids", "counts", "values", "pad_mask", "library", "index", "dataset", "slide"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    seen = []
    for rank in range(2):
        ds = CellStream(store, seed=1, buffer_size=300, batch_size=64, rank=rank, world_size=2)
        seen += [int(i) for b in DataLoader(ds, batch_size=None, num_workers=2) for i in b.index]
    assert sorted(seen) == list(range(store.n_cells)) and seen != sorted(seen)


def test_batches_from_workers_equal_in_process_batches(store):
    """Worker batches travel packed (CSR) and unpack to exactly the in-process CellBatch."""
    ds = CellStream(store, shuffle=False, batch_size=128)
    ref = list(ds)
    got = list(DataLoader(ds, batch_size=None, num_workers=1))
    assert len(got) == len(ref) and type(got[0]) is type(ref[0])
    for a, b in zip(got, ref, strict=True):
        for name in ("gene_ids", "counts", "values", "pad_mask", "library", "index", "dataset", "slide"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def _freeze_probe(stream_class: type) -> type:
    """``stream_class`` yielding, after its own shard planning (where a worker is set up), the
    collector's frozen-object count."""

    class Probe(stream_class):
        def __iter__(self):
            self._plan()
            yield gc.get_freeze_count()

    return Probe


@pytest.mark.parametrize("stream", ["cells", "niches"])
def test_workers_freeze_the_inherited_heap_and_the_parent_does_not(store, stream):
    """In a DataLoader worker the stream moves the heap it inherited to the permanent generation
    (the worker's collections then never walk it); the training process itself is untouched."""
    before = gc.get_freeze_count()
    ds = _freeze_probe(CellStream)(store, batch_size=64) if stream == "cells" else _freeze_probe(NicheStream)(store)
    (frozen,) = list(DataLoader(ds, batch_size=None, num_workers=1))
    assert frozen > 1000  # torch, numpy, scipy, zarr, ... objects of the parent
    assert gc.get_freeze_count() == before
    assert list(ds) == [before]  # in-process (no worker): nothing frozen


def test_batched_selection_exactly_once_and_equal_to_collate(store):
    """Batched mode over selected rows and a vocabulary subset: every selected row once over 2 ranks x
    2 workers (shards split blocks: only their part is read), and each batch equals collate_cells
    of its cells' items."""
    rng = np.random.default_rng(5)
    rows = np.flatnonzero(rng.random(store.n_cells) < 0.7)
    ids = np.arange(store.n_genes) + 7
    ids[[3, 40]] = -1  # genes outside the vocabulary are dropped
    items = {it.index: it for it in CellStream(store, rows=rows, gene_ids=ids, shuffle=False, dataset=2)}
    got = []
    for rank in range(2):
        ds = CellStream(store, rows=rows, gene_ids=ids, seed=4, buffer_size=150, batch_size=50, dataset=2,
                        rank=rank, world_size=2)
        got += list(DataLoader(ds, batch_size=None, num_workers=2))
    seen = [int(i) for b in got for i in b.index]
    assert sorted(seen) == rows.tolist() and seen != sorted(seen)
    for batch in got[::5]:
        ref = collate_cells([items[int(i)] for i in batch.index])
        for name in ("gene_ids", "counts", "values", "pad_mask", "library", "index", "dataset", "slide"):
            assert torch.equal(getattr(batch, name), getattr(ref, name)), name


def test_batched_shuffle_buffer_is_bounded(store):
    """The pool holds at most buffer_size rows plus one block: the first batches come from the first block."""
    ds = CellStream(store, seed=0, buffer_size=100, batch_size=50)
    first_block = ds._plan()[0][0][1]  # rows of the first block this (single) shard reads
    batches = list(ds)
    early = np.concatenate([b.index.numpy() for b in batches[:2]])  # 100 = 200-row block - 100 kept
    assert np.isin(early, first_block).all()
    assert not np.isin(np.concatenate([b.index.numpy() for b in batches[2:6]]), first_block).all()


def test_batched_counts_beyond_uint16_stay_exact(small_adata, tmp_path):
    """A block holding a count >= 65536 keeps float32 counts in the pool (mixed with uint16 blocks)."""
    import scipy.sparse as sp

    x = sp.lil_matrix(small_adata.X, dtype=np.float32)
    x[7, 3] = 70001.0  # one huge count: its block is float32, the others uint16
    small_adata.X = x.tocsr()
    store = CellStore(prepare(small_adata, tmp_path / "big.zarr", slide_key="slice", chunk_cells=64))
    items = {it.index: it for it in CellStream(store, shuffle=False)}
    assert max(it.counts.max() for it in items.values()) == 70001.0
    for workers in (0, 1):
        batches = list(DataLoader(CellStream(store, seed=0, buffer_size=40, batch_size=32), batch_size=None,
                                  num_workers=workers))
        assert sorted(int(i) for b in batches for i in b.index) == sorted(items)
        for batch in batches:
            ref = collate_cells([items[int(i)] for i in batch.index])
            for name in ("counts", "values", "library"):
                assert torch.equal(getattr(batch, name), getattr(ref, name)), name


@pytest.mark.parametrize("n_genes", [3, 300, 70000])
def test_packed_cells_round_trip(n_genes):
    """Compact CSR -> pickle -> CellBatch equals collate_cells of the dense rows (every index dtype)."""
    import pickle

    import scipy.sparse as sp

    from xscale.data.batch import CellItem
    from xscale.data.stream_batch import PackedCells

    rng = np.random.default_rng(0)
    counts = sp.random(5, n_genes, density=0.5, random_state=0, format="csr", dtype=np.float32)
    counts.data = np.round(counts.data * 9) + 1
    if n_genes == 300:
        counts.data[0] = 70000.0  # beyond uint16: sent as float32
    counts = sp.csr_matrix(sp.diags(np.array([1.0, 1, 1, 0, 1], dtype=np.float32)) @ counts)  # cell 3: library 0
    counts.eliminate_zeros()
    ids, rows, slides = rng.permutation(n_genes), np.arange(10, 15), np.array([0, 0, 1, 1, 2])
    packed = PackedCells.from_csr(ids, rows, 3, slides, counts)
    assert packed.data.dtype == (np.float32 if n_genes == 300 else np.uint16)
    got = pickle.loads(pickle.dumps(packed))
    dense = counts.toarray()
    ref = collate_cells([CellItem(ids, dense[i], int(rows[i]), 3, int(slides[i])) for i in range(5)])
    for name in ("gene_ids", "counts", "values", "pad_mask", "library", "index", "dataset", "slide"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
        assert torch.equal(getattr(packed.unpack(), name), getattr(ref, name)), name


def test_niche_stream_out_of_core_equals_whole_graph_niches(store, monkeypatch):
    """Per block of centres only graph rows and touched coordinates are read; niches are identical."""
    rng = np.random.default_rng(0)
    rows = np.flatnonzero(rng.random(store.n_cells) < 0.6)
    lat = rng.normal(size=(store.n_cells, 6)).astype(np.float32)
    reads = []
    graph_rows, read_coords = CellStore.graph_rows, CellStore.read_coords

    def spy(fn):
        def wrapped(self, a, b):
            reads.append(b - a)
            return fn(self, a, b)
        return wrapped

    def whole(self):
        raise AssertionError("NicheStream must not load a per-cell array of the whole store")

    for name in ("graph", "coords", "cell_scale", "slide_codes"):
        monkeypatch.setattr(CellStore, name, whole)
    monkeypatch.setattr(CellStore, "graph_rows", spy(graph_rows))
    monkeypatch.setattr(CellStore, "read_coords", spy(read_coords))
    ds = NicheStream(store, max_cells=16, latents=lat, rows=rows, seed=2, buffer_size=50, cache_chunks=1)
    items = list(ds)
    monkeypatch.undo()
    assert reads and max(reads) <= store.chunk_cells
    centres = np.array([it.centre for it in items])
    assert sorted(centres.tolist()) == rows.tolist() and centres.tolist() != rows.tolist()
    ref = build_niches(store.graph(), store.coords(), centres, max_cells=16, scale=store.cell_scale())
    batch = collate_niches(items)
    np.testing.assert_array_equal(batch.idx.numpy(), ref.idx)
    np.testing.assert_array_equal(batch.rel_xy.numpy(), ref.rel_xy)
    np.testing.assert_array_equal(batch.pad_mask.numpy(), ref.pad_mask)
    np.testing.assert_array_equal(batch.slide.numpy(), store.slide_codes()[centres])
    valid = ref.idx >= 0
    np.testing.assert_array_equal(batch.latents.numpy()[valid], lat[ref.idx[valid]])


def test_level1_datamodule_trains_from_batched_stream(store, tmp_path):
    """A batched CellStream in CellDataModule: ready CellBatches, every cell once per epoch, new order
    each epoch, and a level-1 model trains on them (loss falls); a max_genes mismatch is refused."""
    import lightning

    from xscale.errors import XscaleInputError
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.train.level1 import CellDataModule, GeneCellModule

    torch.set_num_threads(1)
    stream = CellStream(store, seed=0, buffer_size=100, batch_size=64, max_genes=None)
    dm = CellDataModule(stream, batch_size=8, max_genes=None, num_workers=1)
    epochs = [[b for b in dm.train_dataloader()] for _ in range(2)]
    assert all(len(b) <= 64 for b in epochs[0]) and max(len(b) for b in epochs[0]) == 64  # the stream's size
    order = [[int(i) for b in e for i in b.index] for e in epochs]
    assert sorted(order[0]) == sorted(order[1]) == list(range(store.n_cells))
    assert order[0] != order[1]
    with pytest.raises(XscaleInputError, match="max_genes=None.*max_genes is 512"):
        CellDataModule(stream, max_genes=512).train_dataloader()

    torch.manual_seed(0)
    model = GeneToCell(GeneToCellConfig.preset("tiny", genes=[f"g{i}" for i in range(store.n_genes)]))
    module = GeneCellModule(model, lr=3e-3)

    def loss() -> float:  # same batch, same objective draws
        with torch.no_grad():
            return float(module.model.eval().loss(epochs[0][0], torch.Generator().manual_seed(0)).total)

    first = loss()
    trainer = lightning.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=CellDataModule(stream, max_genes=None, num_workers=0))
    assert loss() < 0.9 * first  # measured 10.4 -> 5.7


def test_level1_datamodule_streams_new_order_each_epoch(store):
    """CellDataModule over a CellStream sets the stream's epoch: every cell once per epoch, new order."""
    from xscale.train.level1 import CellDataModule

    dm = CellDataModule(CellStream(store, seed=0, buffer_size=50), batch_size=64, max_genes=None, num_workers=1)
    epochs = [[int(i) for b in dm.train_dataloader() for i in b.index] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(store.n_cells))
    assert epochs[0] != epochs[1]
