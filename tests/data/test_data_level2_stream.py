"""Level 2 trained from a store through NicheStream: niches equal make_niches, the loss falls."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import xscale
from xscale.data.prepare import prepare
from xscale.data.store import CellStore

MAX_CELLS = 11  # the tiny preset's C; the store's graph has C - 1 neighbours


@pytest.fixture(scope="module")
def l2store(tmp_path_factory):
    out = tmp_path_factory.mktemp("level2_stream") / "starmap.zarr"
    return CellStore(prepare(xscale.datasets.path("starmap_mpfc"), out, slide_key="slice", chunk_cells=512,
                             n_neighbors=MAX_CELLS - 1))


@pytest.fixture(scope="module")
def latents(l2store, tmp_path_factory):
    """Real, cheap level-1 stand-ins in store order: 16 principal components of the
    log-normalised counts, shaped (n, K=2, D=8), in a chunked zarr array."""
    import zarr

    from xscale.data.transforms import log_normalize

    counts = l2store.read_rows(0, l2store.n_cells).toarray()
    x = log_normalize(counts, counts.sum(axis=1))
    x -= x.mean(axis=0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    pcs = (u[:, :16] * s[:16]).astype(np.float32).reshape(-1, 2, 8)
    arr = zarr.create_array(tmp_path_factory.mktemp("latents") / "cell.zarr", shape=pcs.shape, chunks=(512, 2, 8),
                            dtype="float32")
    arr[:] = pcs
    return arr


def _train_rows(store):
    holdout = list(store.slide_names).index(xscale.datasets.info("starmap_mpfc").holdout)
    return np.flatnonzero(store.slide_codes() != holdout)


def test_streamed_niches_equal_make_niches(l2store, latents, starmap):
    from xscale.train.level2 import make_niches
    from xscale.train.niche_stream_data import NicheStreamDataModule

    rows = _train_rows(l2store)
    data = NicheStreamDataModule(l2store, latents, max_cells=MAX_CELLS, rows=rows, batch_size=64, seed=0)
    batches = list(data.train_dataloader())
    cells = torch.cat([b.cells for b in batches]).numpy()  # (n, C) store rows
    centres = cells[:, 0]
    assert sorted(centres.tolist()) == rows.tolist()
    # make_niches on the input AnnData (its own row order), mapped to store rows
    src = l2store.source_index()
    to_store = np.empty(src.size, dtype=np.int64)
    to_store[src] = np.arange(src.size)
    ref = make_niches(np.asarray(starmap.obsm["spatial"], dtype=np.float64), src[centres], max_cells=MAX_CELLS,
                      slides=starmap.obs["slice"].to_numpy())
    ref_idx = np.where(ref.idx >= 0, to_store[np.maximum(ref.idx, 0)], -1)
    np.testing.assert_array_equal(cells, ref_idx)
    rel = torch.cat([b.rel_xy for b in batches]).numpy()
    np.testing.assert_allclose(rel, ref.rel_xy, rtol=1e-6, atol=1e-6)
    lat = torch.cat([b.cell_latents for b in batches]).numpy()  # (n, C, K·D)
    flat = np.asarray(latents[:]).reshape(l2store.n_cells, -1)
    valid = ref_idx >= 0
    assert lat.shape == (rows.size, MAX_CELLS, 16)  # k = C - 1 neighbours: no padding here
    np.testing.assert_array_equal(lat[valid], flat[ref_idx[valid]])
    again = torch.cat([b.cells[:, 0] for b in data.train_dataloader()]).numpy()
    assert sorted(again.tolist()) == rows.tolist() and not np.array_equal(again, centres)  # a new epoch order


def test_workers_cover_each_centre_at_most_once(l2store, latents):
    from xscale.train.niche_stream_data import NicheStreamDataModule

    rows = _train_rows(l2store)
    data = NicheStreamDataModule(l2store, latents, max_cells=MAX_CELLS, rows=rows, batch_size=64, num_workers=2)
    seen = torch.cat([b.cells[:, 0] for b in data.train_dataloader()]).numpy()
    assert np.unique(seen).size == seen.size and set(seen.tolist()) <= set(rows.tolist())
    assert seen.size > rows.size - 2 * 64  # each worker drops at most its last incomplete batch


def test_fit_level2_stream_loss_falls(l2store, latents, tmp_path):
    import lightning

    from xscale.data.niche_stream import NicheStream
    from xscale.models.cell_to_tissue import CellToTissue, CellToTissueConfig
    from xscale.train.niche_stream_data import collate_level2, fit_level2_stream

    torch.set_num_threads(1)
    config = CellToTissueConfig.preset("tiny", in_dim=16)
    rows = _train_rows(l2store)
    model = fit_level2_stream(l2store, latents, config=config, rows=rows, max_epochs=10, max_steps=60,
                              batch_size=64, lr=3e-3, seed=0, progress=False, ckpt_dir=tmp_path)
    assert (tmp_path / "last.ckpt").exists()  # resumable, as fit_level2
    held_out = np.setdiff1d(np.arange(l2store.n_cells), rows)
    batch = collate_level2(list(NicheStream(l2store, max_cells=MAX_CELLS, latents=latents, rows=held_out[:256],
                                            shuffle=False)))
    lightning.seed_everything(0, verbose=False)
    untrained = CellToTissue(config).eval()  # the initial weights of the fit (same seed)
    untrained.latent_mean.copy_(model.latent_mean)
    untrained.latent_std.copy_(model.latent_std)
    assert not torch.allclose(model.latent_mean, torch.zeros(16))  # scaling set from a sample of rows
    with torch.no_grad():
        before = untrained.loss(batch.cell_latents, batch.rel_xy, batch.pad_mask, mask=False).reconstruction
        after = model.loss(batch.cell_latents, batch.rel_xy, batch.pad_mask, mask=False).reconstruction
    assert after < 0.8 * before, (float(before), float(after))


def test_latent_width_mismatch_is_a_clear_error(l2store, latents):
    from xscale.errors import XscaleInputError
    from xscale.models.cell_to_tissue import CellToTissueConfig
    from xscale.train.niche_stream_data import fit_level2_stream

    with pytest.raises(XscaleInputError, match=r"config.in_dim: expected the latent width K·D = 16, found 8"):
        fit_level2_stream(l2store, latents, config=CellToTissueConfig.preset("tiny", in_dim=8), max_steps=1)
    with pytest.raises(XscaleInputError, match="expected one row per store cell"):
        fit_level2_stream(l2store, np.zeros((5, 16), dtype=np.float32), max_steps=1)
    from xscale.data.niche_stream import NicheStream

    with pytest.raises(XscaleInputError, match="cache_chunks: expected >= 1 store blocks to keep, found 0"):
        NicheStream(l2store, max_cells=MAX_CELLS, latents=latents, cache_chunks=0)  # was a KeyError mid-epoch
    one = NicheStream(l2store, max_cells=MAX_CELLS, latents=latents, cache_chunks=1, shuffle=False)
    assert len(list(one)) == l2store.n_cells  # a cache of one block still serves every niche
