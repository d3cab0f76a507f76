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
--n-neighbors`` / ``--radius``). Every stage holds a few blocks at a time; the domains also hold
the (up to ``DOMAIN_FIT_CELLS``) cells their clustering is fitted on and the (n,) labels.
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


#: Cells the domain clustering is fitted on at most (a random sample beyond this; every cell is then assigned).
DOMAIN_FIT_CELLS = 100_000


def store_domains(store: str | os.PathLike | CellStore, n_domains: int, *, key: str = NICHE_KEY,
                  key_added: str = DOMAIN_KEY, slide_center: bool = True, method: Literal["kmeans", "gmm"] = "kmeans",
                  seed: int = 0, fit_cells: int = DOMAIN_FIT_CELLS) -> np.ndarray:
    """Cluster a store's niche latents (``obsm[key]``) into ``n_domains`` block by block; write ``obs[key_added]``.

    The clustering of :func:`xscale.tl.domains` (each slide's latents centred on the slide's mean when
    ``slide_center`` and the store has several slides, each feature standardised, k-means with 10
    restarts or a diagonal Gaussian mixture), with the means and variances summed over blocks, the
    clustering fitted on ``fit_cells`` cells (all of them when the store has no more: then the labels
    are those of ``xscale.tl.domains``; else a random sample) and every cell assigned to its nearest
    domain block by block. Memory: a block of latents, the sample and the (n,) labels.
    Returns the (n,) int labels in store order.
    """
    import pandas as pd

    from xscale.data.writeback import read_store_latents, write_store_obs

    store = store if isinstance(store, CellStore) else CellStore(store)
    n = store.n_cells
    if isinstance(n_domains, bool) or int(n_domains) != n_domains or not 1 <= n_domains <= n:
        raise XscaleInputError(f"n_domains: expected a whole number in 1..{n} (the store's cells), "
                               f"found {n_domains!r}.")
    k = int(n_domains)
    from xscale.tl.store_embed import stale_niche_latents

    if stale_niche_latents(store, key):
        raise XscaleInputError(
            f"{store.path}: obsm[{key!r}] was computed from earlier cell latents (obsm['X_xscale_cell'] has been "
            "embedded again since), so its domains would describe the old embedding. Embed the niches again "
            "(xscale embed --checkpoint RUN --data STORE --overwrite, with the level-2 model) and cluster those.")
    latents = read_store_latents(store, key)
    centre = slide_center and len(store.slide_names) > 1
    groups = list(zip(store.slide_start, store.slide_stop, strict=True)) if centre else [(0, n)]

    def blocks(a: int, b: int):  # (first row, (rows, F) float64) over the rows [a, b) of one group
        for i in range(int(a), int(b), store.chunk_cells):
            j = min(i + store.chunk_cells, int(b))
            yield i, np.asarray(latents[i:j], dtype=np.float64).reshape(j - i, -1)

    # pass 1: each group's mean; pass 2: the variance of the centred latents, and the rows the fit uses
    means = [sum(x.sum(axis=0) for _, x in blocks(a, b)) / (b - a) for a, b in groups]
    fit_rows = np.arange(n) if n <= fit_cells else np.sort(np.random.default_rng(seed).choice(n, fit_cells,
                                                                                              replace=False))
    squares, sample = 0.0, []
    for (a, b), mu in zip(groups, means, strict=True):
        for i, x in blocks(a, b):
            centred = x - mu
            squares = squares + (centred**2).sum(axis=0)
            lo, hi = np.searchsorted(fit_rows, [i, i + len(x)])
            sample.append(centred[fit_rows[lo:hi] - i])
    sd = np.sqrt(squares / n)
    if not (np.isfinite(sd).all() and all(np.isfinite(m).all() for m in means)):
        raise XscaleInputError(f"{store.path}: obsm[{key!r}] has NaN or inf values; re-embed the niches.")
    sd = np.where(sd > 0, sd, 1.0)
    Z = np.concatenate(sample) / sd  # (m, F) standardised latents of the fitted cells
    if method == "kmeans":
        from sklearn.cluster import KMeans

        model = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(Z)
    elif method == "gmm":
        from sklearn.mixture import GaussianMixture

        model = GaussianMixture(n_components=k, covariance_type="diag", random_state=seed).fit(Z)
    else:
        raise XscaleInputError(f"method: expected 'kmeans' or 'gmm', found {method!r}.")
    # pass 3: every cell to its domain
    labels = np.empty(n, dtype=np.int64)
    for (a, b), mu in zip(groups, means, strict=True):
        for i, x in blocks(a, b):
            labels[i : i + len(x)] = model.predict((x - mu) / sd)
    write_store_obs(store, key_added, pd.Categorical.from_codes(labels, categories=[str(i) for i in range(k)]))
    log.info("Wrote %d domains to obs[%r] of %s (fitted on %d cells%s)", k, key_added, store.path, len(Z),
             ", latents centred per slide" if centre else "")
    return labels


#: Cells of a store drawn into the report of ``xscale run --data STORE`` at most.
REPORT_CELLS = 50_000


def store_sample(store: str | os.PathLike | CellStore, n_cells: int = REPORT_CELLS, *, seed: int = 0) -> Any:
    """An in-memory AnnData of at most ``n_cells`` random cells of a store (all when it has no more), in store
    order: their counts, ``obs`` (with ``obs["slide"]``, the store's slide of each cell), ``obsm["spatial"]``
    and the latents in ``obsm``. Counts and latents are read only from the blocks that hold the cells; the
    ``obs`` table is read whole."""
    import anndata as ad
    import pandas as pd
    from anndata.io import read_elem

    store = store if isinstance(store, CellStore) else CellStore(store)
    n = store.n_cells
    rows = np.arange(n) if n <= n_cells else np.sort(np.random.default_rng(seed).choice(n, n_cells, replace=False))
    obs = read_elem(store.root["obs"]).iloc[rows].copy()
    obs["slide"] = pd.Categorical(store.slide_names[store.slide_of(rows)].astype(str))
    obsm = {key: np.asarray(store.array(f"obsm/{key}").oindex[rows]).reshape(rows.size, -1)
            for key in ("spatial", CELL_KEY, NICHE_KEY) if key in store.root["obsm"]}
    return ad.AnnData(X=store.read_selected(rows), obs=obs, var=pd.DataFrame(index=store.genes), obsm=obsm)


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
                          "level2_epochs": level2_epochs, "level2_max_steps": level2_max_steps,
                          # the niches level 2 reads: a store prepared again with another graph retrains it
                          "graph": {"n_neighbors": store.n_neighbors, "radius": store.radius}}
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
