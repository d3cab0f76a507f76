"""Level 2 from a prepared store, out of core: niches streamed by
:class:`~xscale.data.niche_stream.NicheStream` over level-1 latents kept in zarr.

- :func:`collate_level2`: NicheStream items -> the level-2 :class:`~xscale.train.level2.NicheBatch`.
- :class:`NicheStreamDataModule`: train / validation loaders over NicheStreams.
- :func:`fit_level2_stream`: the same :class:`~xscale.models.cell_to_tissue.CellToTissue` and
  :class:`~xscale.train.level2.TissueModule` as :func:`~xscale.train.level2.fit_level2`, fed
  by the stream: neither the latents, the coordinates nor the graph are ever loaded whole.

The niches are those of the store's graph (built by ``prepare`` with ``n_neighbors``): a
store prepared with ``n_neighbors = max_cells - 1`` gives exactly the niches
:func:`~xscale.train.level2.make_niches` builds from the same coordinates.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Literal

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader

from xscale.data.niche_stream import NicheItem, NicheStream, collate_niches, open_latents
from xscale.data.store import CellStore
from xscale.data.stream import EpochCounter, EpochLoader
from xscale.errors import XscaleInputError
from xscale.models.cell_to_tissue import CellToTissue, CellToTissueConfig
from xscale.train.level2 import NicheBatch, TissueModule, train_tissue

log = logging.getLogger(__name__)


def collate_level2(items: list[NicheItem]) -> NicheBatch:
    """Stack streamed niches into a level-2 batch: cell_latents (B, C, K·D) (trailing latent
    dims flattened; zeros at padding), rel_xy (B, C, 2), pad_mask (B, C), cells (B, C) store rows."""
    if items[0].latents is None:
        raise XscaleInputError("NicheStream items carry no latents: expected NicheStream(store, latents=...) "
                               "for level 2, found a stream of raw counts.")
    nb = collate_niches(items)
    b, c = nb.idx.shape
    return NicheBatch(cell_latents=nb.latents.reshape(b, c, -1), rel_xy=nb.rel_xy, pad_mask=nb.pad_mask, cells=nb.idx)


def warn_if_short_niches(store: CellStore, max_cells: int) -> None:
    """Warn when the store's k-nearest graph is too small to fill niches of ``max_cells`` cells."""
    if store.radius is None and store.n_neighbors < max_cells - 1:
        log.warning("The store's graph has %d neighbours per cell: niches hold at most %d of max_cells=%d cells. "
                    "Prepare with n_neighbors=%d for full niches.", store.n_neighbors, store.n_neighbors + 1,
                    max_cells, max_cells - 1)


class NicheStreamDataModule(lightning.LightningDataModule):
    """Loaders of level-2 batches streamed from a prepared store.

    Parameters
    ----------
    store
        Prepared spatial store (path or :class:`CellStore`).
    latents
        (n, K, D) or (n, K·D) level-1 latents of every store cell in store order: a zarr
        array, its path (e.g. ``<store>/obsm/X_xscale_cell``), or a numpy array.
    max_cells
        C, cells per niche (the model config's ``max_cells``).
    rows, val_rows
        Store rows used as training / validation niche centres (None = all / no validation).
        Neighbours may be any cell of the same slide.
    batch_size, num_workers, seed, buffer_size, cache_chunks
        DataLoader and :class:`NicheStream` settings. With workers (or DDP), each shard drops
        its last incomplete batch, so no epoch has more steps than the trainer planned.
    """

    def __init__(self, store: str | os.PathLike | CellStore, latents: Any, *, max_cells: int,
                 rows: np.ndarray | None = None, val_rows: np.ndarray | None = None, batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0, buffer_size: int = 1024, cache_chunks: int = 8) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise XscaleInputError(f"batch_size >= 1 and num_workers >= 0 expected, "
                                   f"found {batch_size} and {num_workers}.")
        self.store = store if isinstance(store, CellStore) else CellStore(store)
        self.latents = open_latents(latents)
        self.max_cells, self.batch_size, self.num_workers, self.seed = max_cells, batch_size, num_workers, seed
        kw = dict(max_cells=max_cells, latents=self.latents, buffer_size=buffer_size, cache_chunks=cache_chunks)
        self.train = NicheStream(self.store, rows=rows, shuffle=True, seed=seed, **kw)
        self.val = None if val_rows is None else NicheStream(self.store, rows=val_rows, shuffle=False, **kw)
        self._epoch = EpochCounter(self)

    def _loader(self, stream: NicheStream, *, train: bool) -> DataLoader:
        shards = max(1, self.num_workers) * (self.trainer.world_size if self.trainer is not None else 1)
        drop_last = train and shards > 1
        if drop_last and len(stream) // shards < self.batch_size:
            raise XscaleInputError(
                f"batch_size={self.batch_size}: expected at most {len(stream) // shards} (each of {shards} data shards "
                f"holds about {len(stream) // shards} of {len(stream)} niche centres), found more. "
                "Lower batch_size or num_workers."
            )
        kw: dict[str, Any] = dict(batch_size=self.batch_size, collate_fn=collate_level2, num_workers=self.num_workers,
                                  drop_last=drop_last)
        return EpochLoader(stream, epoch=self._epoch, **kw) if train else DataLoader(stream, **kw)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val is None else self._loader(self.val, train=False)


def latent_sample(latents: Any, rows: np.ndarray | None, n_cells: int, *, n: int = 20_000, seed: int = 0) -> np.ndarray:
    """(m, K·D) float32 latents of at most ``n`` random rows of ``rows`` (None = all cells),
    read by orthogonal selection: only the chunks holding them, never the whole array."""
    pool = np.arange(n_cells) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    pick = np.sort(np.random.default_rng(seed).choice(pool, size=min(n, pool.size), replace=False))
    values = latents.oindex[pick] if hasattr(latents, "oindex") else np.asarray(latents)[pick]
    return np.asarray(values, dtype=np.float32).reshape(pick.size, -1)


def fit_level2_stream(
    store: str | os.PathLike | CellStore,
    latents: Any,
    *,
    config: CellToTissueConfig | None = None,
    preset: Literal["tiny", "small", "base"] = "small",
    rows: np.ndarray | None = None,
    max_epochs: int = 20,
    max_steps: int = -1,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    ckpt_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    n_scale: int = 20_000,
    accelerator: str = "cpu",
    progress: bool = True,
) -> CellToTissue:
    """Fit a level-2 model on niches streamed from a store (see the module docstring).

    Parameters
    ----------
    store
        Prepared spatial store (path or :class:`CellStore`).
    latents
        (n, K, D) or (n, K·D) level-1 latents of every store cell in store order (zarr array,
        its path, or numpy), e.g. written by :func:`xscale.data.writeback.store_latent_writer`.
    config, preset
        The model config; when None, ``CellToTissueConfig.preset(preset, in_dim=K·D)``.
    rows
        Store rows used as niche centres (default: all), e.g. the training slides.
    max_epochs, max_steps, batch_size, lr, seed
        Training budget and optimiser settings, as in :func:`~xscale.train.level2.fit_level2`.
    ckpt_dir
        Where Lightning checkpoints go; a re-run resumes from ``last.ckpt`` there.
    num_workers
        DataLoader worker processes reading the store.
    n_scale
        Rows sampled (from ``rows``) to set the model's latent standardisation.

    Returns
    -------
    The trained :class:`CellToTissue` in eval mode.
    """
    store = store if isinstance(store, CellStore) else CellStore(store)
    lat = open_latents(latents)
    if lat.shape[0] != store.n_cells:
        raise XscaleInputError(f"latents: expected one row per store cell ({store.n_cells}), found {lat.shape[0]}. "
                               "Embed the same store (rows in store order).")
    in_dim = int(np.prod(lat.shape[1:]))
    if config is None:
        config = CellToTissueConfig.preset(preset, in_dim=in_dim)
    elif config.in_dim != in_dim:
        raise XscaleInputError(f"config.in_dim: expected the latent width K·D = {in_dim}, found {config.in_dim}.")
    if rows is not None and np.asarray(rows).size == 0:
        raise XscaleInputError("rows is empty: level 2 needs at least one niche centre to train on.")
    warn_if_short_niches(store, config.max_cells)
    lightning.seed_everything(seed, workers=True, verbose=False)
    data = NicheStreamDataModule(store, lat, max_cells=config.max_cells, rows=rows, batch_size=batch_size,
                                 num_workers=num_workers, seed=seed)
    model = CellToTissue(config)
    model.set_latent_scaling(torch.from_numpy(latent_sample(lat, rows, store.n_cells, n=n_scale, seed=seed)))
    log.info("Level 2 (streamed from %s): %d niche centres of <= %d cells, in_dim %d", store.path,
             len(data.train), config.max_cells, config.in_dim)
    return train_tissue(TissueModule(model, lr=lr), data, ckpt_dir=ckpt_dir, max_epochs=max_epochs,
                        max_steps=max_steps, accelerator=accelerator, progress=progress)
