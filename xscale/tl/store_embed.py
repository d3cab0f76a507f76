"""Embed a prepared store out of core, resumably: latents written block by block into the store.

- :func:`embed_store_cells`: level-1 latents of every store cell -> ``<store>/obsm/X_xscale_cell``.
- :func:`embed_store_niches`: level-2 latents of the niche around every cell (niches read
  through the store's graph by :class:`~xscale.data.niche_stream.NicheStream` from the cell
  latents already in the store) -> ``<store>/obsm/X_xscale_niche``.

Only one block of cells (and the blocks its niches touch) is in memory at a time. Each
block is written by :class:`~xscale.data.writeback.LatentWriter`: an interrupted run
(killed, out of time) resumes with the missing blocks on the next call with the same
model and options, and gives the same array as an uninterrupted run. Results appear in
``anndata.read_zarr(store).obsm`` only once complete.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from xscale.data.store import CellStore
from xscale.data.writeback import read_store_latents, store_latent_writer
from xscale.errors import XscaleInputError
from xscale.models.levels import as_level_model

log = logging.getLogger(__name__)

CELL_KEY = "X_xscale_cell"
NICHE_KEY = "X_xscale_niche"


def _fingerprint(model: torch.nn.Module, **options: Any) -> str:
    """Identifies a computation: the model's weights and config, and the options."""
    h = hashlib.sha1(repr(sorted(options.items())).encode())
    h.update(repr(model.config).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def _already_made(store: CellStore, key: str, fingerprint: str) -> bool:
    """True when ``obsm[key]`` is complete and was made by this very computation (same model,
    options and inputs): a re-run after an interruption skips it. False when there is none; made
    by another computation: :class:`~xscale.errors.XscaleInputError` (replace with ``overwrite``)."""
    path = store.path / "obsm" / key
    if not path.exists():
        return False
    if _made_by(read_store_latents(store, key)) == fingerprint:
        log.info("%s: obsm[%r] is complete from this model and these options; skipping it", store.path, key)
        return True
    raise XscaleInputError(
        f"{store.path}: obsm[{key!r}] already holds latents made by another model or with other options. "
        "Pass overwrite=True (CLI: --overwrite) to replace them."
    )


def _made_by(array: Any) -> str:
    """The fingerprint of the computation that wrote a store's latent array ('' for older stores), so
    niche partials made from other cell latents (re-embedded with --overwrite) are not resumed."""
    return str(getattr(array, "attrs", {}).get("xscale_fingerprint", ""))


#: Attribute of a store's niche latents: the fingerprint of the cell latents they were computed from.
CELLS_MADE_BY = "xscale_cells_fingerprint"


def stale_niche_latents(store: str | os.PathLike | CellStore, key: str = NICHE_KEY, cell_key: str = CELL_KEY) -> bool:
    """True when the store's niche latents ``obsm[key]`` were computed from other cell latents than those now in
    ``obsm[cell_key]`` (the cells were embedded again since, e.g. with another level-1 model); False when they
    match, or when either is absent or the niche latents predate this record."""
    store = store if isinstance(store, CellStore) else CellStore(store)
    if not ((store.path / "obsm" / key).exists() and (store.path / "obsm" / cell_key).exists()):
        return False
    made_from = str(read_store_latents(store, key).attrs.get(CELLS_MADE_BY, ""))
    return bool(made_from) and made_from != _made_by(read_store_latents(store, cell_key))


def _cells_fingerprint(model: torch.nn.Module, seed: int) -> str:
    return _fingerprint(model, seed=seed, what="cells")


def _niches_fingerprint(model: torch.nn.Module, cell_key: str, latents: Any) -> str:
    return _fingerprint(model, what="niches", cells=cell_key, cell_latents=_made_by(latents))


def is_embedded(store: str | os.PathLike | CellStore, model, *, seed: int = 0, key: str | None = None,
                cell_key: str = CELL_KEY) -> bool:
    """True when the store's latents of ``model``'s level (``obsm[key]``, default ``X_xscale_cell`` for a
    level-1 model, ``X_xscale_niche`` for level 2) are complete and were made by this very model and
    options (for level 2: from the cell latents now in ``obsm[cell_key]``); False when absent or made
    otherwise."""
    from xscale.models.gene_to_cell import GeneToCell

    store = store if isinstance(store, CellStore) else CellStore(store)
    cells = isinstance(model, GeneToCell)
    key = key or (CELL_KEY if cells else NICHE_KEY)
    if not (store.path / "obsm" / key).exists():
        return False
    if cells:
        want = _cells_fingerprint(model, seed)
    else:
        if not (store.path / "obsm" / cell_key).exists():
            return False
        want = _niches_fingerprint(model, cell_key, read_store_latents(store, cell_key))
    return _made_by(read_store_latents(store, key)) == want


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="block", disable=not enabled)


def embed_store_cells(store: str | os.PathLike | CellStore, model, *, key: str = CELL_KEY, batch_size: int = 256,
                      seed: int = 0, overwrite: bool = False, progress: bool = True) -> Path:
    """Level-1 latents of every cell of a prepared store, written into ``<store>/obsm/<key>``.

    Parameters
    ----------
    store
        A store written by ``xscale prepare`` (path or :class:`~xscale.data.store.CellStore`).
    model
        A trained :class:`~xscale.models.gene_to_cell.GeneToCell`, or the directory it was saved to.
    key
        ``obsm`` key written (n_cells, K·D), rows in store order.
    batch_size, seed
        Cells per forward pass; ``seed`` is kept for compatibility (it is part of the
        resume fingerprint) and does not change the latents: panels longer than the model's
        context are cut per cell by :func:`xscale.data.batch.inference_context`, so blocks,
        resumed runs and in-memory :func:`xscale.tl.embed_cells` give the same latents.
    overwrite
        Replace an existing ``obsm[key]``.

    Returns
    -------
    Path of the written array.
    """
    from xscale.data.anndata_dataset import map_panel
    from xscale.tl.dask_embed import embed_rows

    model = as_level_model(model, 1, "embed_store_cells")
    store = store if isinstance(store, CellStore) else CellStore(store)
    mapping = map_panel(store.genes, model.vocab, what=str(store.path))
    log.info("Embedding %d cells of %s with %d of %d panel genes", store.n_cells, store.path, mapping.n_used,
             mapping.n_panel)
    model = model.eval()
    fingerprint = _cells_fingerprint(model, seed)
    if not overwrite and _already_made(store, key, fingerprint):
        return store.path / "obsm" / key
    writer = store_latent_writer(store, key, (model.config.embedding_dim,), overwrite=overwrite,
                                 fingerprint=fingerprint)
    pending = writer.pending_chunks()
    with _progress(writer.n_chunks, "cells", progress) as bar:
        bar.update(writer.n_chunks - len(pending))
        for i in pending:
            a, b = writer.chunk_range(i)
            writer.write_chunk(i, embed_rows(model, store.read_rows(a, b), mapping.columns, mapping.gene_ids,
                                             start=a, batch_size=batch_size, seed=seed))
            bar.update(1)
    return writer.finalize()


def embed_store_niches(store: str | os.PathLike | CellStore, model, *, cell_key: str = CELL_KEY,
                       key: str = NICHE_KEY, batch_size: int = 256, overwrite: bool = False,
                       progress: bool = True) -> Path:
    """Level-2 latents of the niche centred on every store cell, into ``<store>/obsm/<key>``.

    Niches come from the store's graph (``xscale prepare --n-neighbors``; prepare with
    ``max_cells - 1`` neighbours for full niches) and the cell latents in ``obsm[cell_key]``
    (:func:`embed_store_cells`). ``model`` is a trained
    :class:`~xscale.models.cell_to_tissue.CellToTissue` or the directory it was saved to.
    Returns the written array's path.
    """
    from xscale.data.niche_stream import NicheStream
    from xscale.train.niche_stream_data import collate_level2, warn_if_short_niches

    model = as_level_model(model, 2, "embed_store_niches")
    store = store if isinstance(store, CellStore) else CellStore(store)
    if not store.spatial:  # before anything is written
        raise XscaleInputError(
            f"{store.path}: niche embedding needs coordinates, found a store prepared without them (spatial_key "
            "None). Embed the cells only (the level-1 model: RUN/checkpoints/level1/model), or prepare again "
            "with coordinates (--spatial-key KEY).")
    try:
        latents = read_store_latents(store, cell_key)
    except Exception as err:
        raise XscaleInputError(
            f"{store.path}: expected cell latents in obsm[{cell_key!r}] for niche embedding, found none ({err}). "
            "Embed the cells first (embed_store_cells / xscale embed)."
        ) from err
    width = int(np.prod(latents.shape[1:]))
    if width != model.config.in_dim:
        raise XscaleInputError(f"obsm[{cell_key!r}] has width {width}; the level-2 model expects in_dim="
                               f"{model.config.in_dim} (K·D of the level-1 model it was trained on).")
    warn_if_short_niches(store, model.config.max_cells)
    model = model.eval()
    fingerprint = _niches_fingerprint(model, cell_key, latents)
    if not overwrite and _already_made(store, key, fingerprint):
        return store.path / "obsm" / key
    writer = store_latent_writer(store, key, (model.config.n_tissue_latents * model.config.dim,),
                                 overwrite=overwrite, fingerprint=fingerprint,
                                 attrs={CELLS_MADE_BY: _made_by(latents)})  # stale once the cells are re-embedded
    pending = writer.pending_chunks()
    with _progress(writer.n_chunks, "niches", progress) as bar, torch.inference_mode():
        bar.update(writer.n_chunks - len(pending))
        for i in pending:
            a, b = writer.chunk_range(i)
            stream = NicheStream(store, max_cells=model.config.max_cells, latents=latents,
                                 rows=np.arange(a, b), shuffle=False)  # centres a..b-1 in store order
            loader = DataLoader(stream, batch_size=batch_size, collate_fn=collate_level2)
            writer.write_chunk(i, np.concatenate([_embed_niches(model, batch) for batch in loader]))
            bar.update(1)
    return writer.finalize()


def _embed_niches(model, batch) -> np.ndarray:
    return model.embed(batch.cell_latents, batch.rel_xy, batch.pad_mask).numpy()  # (B, T·D)


__all__ = ["embed_store_cells", "embed_store_niches"]
