"""The staged run on a store from ``xscale prepare``, out of core: ``xscale run --data STORE``.

The same stages as :func:`xscale.train.staged.run_staged`, each reading the store block by
block instead of an AnnData in memory:

=========  =================================================================  ==========================
stage      how                                                                output
=========  =================================================================  ==========================
level1     :func:`~xscale.train.level1.fit_level1` on the store (streamed)    ``checkpoints/level1/model``
cells      :func:`~xscale.tl.store_embed.embed_store_cells`                   ``STORE/obsm/X_xscale_cell``
level2     :func:`~xscale.train.niche_stream_data.fit_level2_stream`          ``checkpoints/level2/model``
niches     :func:`~xscale.tl.store_embed.embed_store_niches`                  ``STORE/obsm/X_xscale_niche``
domains    k-means of the niche latents (:func:`store_domains`)               ``STORE/obs/xscale_domain``
=========  =================================================================  ==========================

Results go into the store itself (as ``xscale embed`` does for a store); the run folder holds
the checkpoints, the settings each stage was made with and ``stages.json``. A re-run skips
finished stages (a latent array is finished when written whole by the same model) and
resumes an interrupted one. Level 2's niches are those of the store's graph (``xscale prepare
--n-neighbors`` / ``--radius``). The domains need the niche latents in memory (n × T·D
float32), nothing else; every other stage holds a few blocks at a time.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from xscale.data.store import CellStore
from xscale.errors import XscaleInputError
from xscale.train.staged import CELL_KEY, DOMAIN_KEY, LEVEL2_MAX_BATCH, NICHE_KEY, Preset, Stages

log = logging.getLogger(__name__)


@dataclass
class StoreRunResult:
    """What :func:`run_store` made: the trained models, the store now holding the results, and the stages
    skipped (finished earlier) with the seconds of those made."""

    level1: Any
    level2: Any
    store: Path
    skipped: list[str]
    seconds: dict[str, float]


def store_domains(store: str | os.PathLike | CellStore, n_domains: int, *, key: str = NICHE_KEY,
                  key_added: str = DOMAIN_KEY, slide_center: bool = True, method: Literal["kmeans", "gmm"] = "kmeans",
                  seed: int = 0) -> np.ndarray:
    """Cluster a store's niche latents (``obsm[key]``) into ``n_domains`` and write ``obs[key_added]``.

    As :func:`xscale.tl.domains` (each slide's latents centred first when ``slide_center`` and the
    store has several slides); reads only the latents. Returns the (n,) domain labels in store order.
    """
    import anndata as ad
    import pandas as pd

    from xscale.data.writeback import read_store_latents, write_store_obs
    from xscale.tl.niches import domains

    store = store if isinstance(store, CellStore) else CellStore(store)
    latents = np.asarray(read_store_latents(store, key)[:], dtype=np.float32).reshape(store.n_cells, -1)
    slides = store.slide_names[store.slide_codes()].astype(str)
    cells = ad.AnnData(obs=pd.DataFrame({"slide": slides}, index=pd.RangeIndex(store.n_cells).astype(str)),
                       obsm={key: latents})
    centre = "slide" if slide_center and len(store.slide_names) > 1 else None
    domains(cells, n_domains, key_added=key_added, use_rep=key, method=method, seed=seed, slide_key=centre)
    labels = cells.obs[key_added].to_numpy()
    write_store_obs(store, key_added, cells.obs[key_added].values)
    return labels


def _store_settings(store: CellStore) -> dict:
    """What identifies the store's cells: its path, size, and a digest of its genes, of the input row of
    each cell and of each cell's number of non-zero counts (another dataset prepared into the same path
    does not reuse finished stages)."""
    import hashlib

    h = hashlib.sha1("\0".join(store.genes).encode())
    h.update(np.ascontiguousarray(store.source_index()).tobytes())
    h.update(np.ascontiguousarray(store.array("X/indptr")[:], dtype=np.int64).tobytes())
    return {"store": str(store.path.resolve()), "n_cells": store.n_cells, "data_digest": h.hexdigest()[:16]}


def run_store(
    store: str | os.PathLike | CellStore,
    out_dir: str | os.PathLike,
    *,
    level1_preset: Preset = "small",
    level2_preset: Preset = "small",
    n_domains: int | None = None,
    domain_slide_center: bool = True,
    level1_epochs: int = 20,
    level2_epochs: int = 30,
    level1_max_steps: int = -1,
    level2_max_steps: int = -1,
    batch_size: int = 128,
    num_workers: int = 0,
    seed: int = 0,
    accelerator: str = "cpu",
    progress: bool = True,
) -> StoreRunResult:
    """Train both levels on a prepared store and write the latents and domains into it (module docstring).

    Parameters mean what they mean for :func:`~xscale.train.staged.run_staged`; ``num_workers``
    DataLoader processes read the store for both levels' training.
    """
    import json

    from xscale.data.writeback import read_store_latents
    from xscale.models.cell_to_tissue import CellToTissueConfig
    from xscale.models.gene_to_cell import GeneToCellConfig
    from xscale.models.io import save_model
    from xscale.tl.store_embed import embed_store_cells, embed_store_niches, is_embedded
    from xscale.train.level1 import fit_level1
    from xscale.train.niche_stream_data import fit_level2_stream
    from xscale.train.staged import _finished_model
    from xscale.utils.atomic import atomic_write_text, make_output_dir

    store = store if isinstance(store, CellStore) else CellStore(store)
    if not store.spatial:
        raise XscaleInputError(f"{store.path}: expected a spatial store (coordinates and a neighbour graph) for "
                               "level 2, found one prepared with spatial_key=None. Prepare it with --spatial-key.")
    out = make_output_dir(out_dir)
    ckpt = out / "checkpoints"
    ckpt.mkdir(exist_ok=True)
    from xscale.data.vocab import GeneVocab

    level1_config = GeneToCellConfig.preset(level1_preset, genes=GeneVocab.union([store.genes]).genes)
    data = _store_settings(store)
    settings = {"level1": {**data, "level1_config": level1_config, "level1_epochs": level1_epochs,
                           "level1_max_steps": level1_max_steps, "batch_size": batch_size, "seed": seed}}
    settings["cells"] = dict(settings["level1"])
    settings["level2"] = {**settings["cells"], "level2_preset": level2_preset,
                          "level2_preset_values": dict(CellToTissueConfig.PRESETS.get(level2_preset, {})),
                          "level2_epochs": level2_epochs, "level2_max_steps": level2_max_steps}
    settings["niches"] = dict(settings["level2"])
    stage = Stages(ckpt, settings)

    level1 = stage("level1", lambda: _finished_model(ckpt / "level1" / "model"),
                   lambda: fit_level1(store, level1_config, out_dir=ckpt / "level1", max_epochs=level1_epochs,
                                      max_steps=level1_max_steps, batch_size=batch_size, seed=seed,
                                      num_workers=num_workers, accelerator=accelerator, enable_progress_bar=progress),
                   lambda _: None)
    # latents in the store are finished when written whole by this very model (their fingerprint); latents
    # of another model (an earlier run, xscale embed) are replaced: this run writes the store's results
    stage("cells", lambda: True if is_embedded(store, level1, seed=seed) else None,
          lambda: embed_store_cells(store, level1, seed=seed, overwrite=True, progress=progress), lambda _: None)
    cells = read_store_latents(store, CELL_KEY)

    def make_level2():
        config = CellToTissueConfig.preset(level2_preset, in_dim=int(np.prod(cells.shape[1:])))
        return fit_level2_stream(store, cells, config=config, max_epochs=level2_epochs, max_steps=level2_max_steps,
                                 batch_size=min(batch_size, LEVEL2_MAX_BATCH), seed=seed,
                                 ckpt_dir=ckpt / "level2" / "lightning", num_workers=num_workers,
                                 accelerator=accelerator, progress=progress)

    level2 = stage("level2", lambda: _finished_model(ckpt / "level2" / "model"), make_level2,
                   lambda model: save_model(model, ckpt / "level2" / "model"))
    stage("niches", lambda: True if is_embedded(store, level2) else None,
          lambda: embed_store_niches(store, level2, overwrite=True, progress=progress), lambda _: None)
    if n_domains is not None:
        store_domains(store, n_domains, slide_center=domain_slide_center, seed=seed)
    atomic_write_text(out / "stages.json", json.dumps({"skipped": stage.skipped, "seconds": stage.seconds},
                                                      indent=2))
    return StoreRunResult(level1=level1, level2=level2, store=store.path, skipped=stage.skipped,
                          seconds=stage.seconds)
