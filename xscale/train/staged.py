"""Staged training: level 1 → cell latents → level 2 → niche latents → domains.

Each stage writes its output under ``out_dir/checkpoints/<stage>`` and is *finished*
when that output is complete (written under a temporary name and renamed), so a
re-run skips finished stages and resumes an interrupted fit from its ``last.ckpt``:

=========  ====================================================  =====================
stage      output                                                finished when
=========  ====================================================  =====================
level1     ``checkpoints/level1/model`` (GeneToCell)             model dir renamed in
cells      ``checkpoints/cells/latents.npy`` (n, K·D)            dir marked complete
level2     ``checkpoints/level2/model`` (CellToTissue)           model dir renamed in
niches     ``checkpoints/niches/latents.npy`` (n, T·D)           dir marked complete
=========  ====================================================  =====================

Each finished stage also records the settings it was made with (``<stage>.settings.json``:
its own settings plus those of the stages before it); a re-run whose settings differ
stops with an error naming the changed keys instead of silently reusing stale output.
A stage records its settings as started (``<stage>.started.json``) before it runs, so an
interrupted stage is resumed from its checkpoint only with the same settings.

Domains (k-means on niche latents) take seconds and are recomputed on every run. The
result is ``out_dir/cells.zarr``: the input AnnData (same obs_names) with
``obsm["X_xscale_cell"]``, ``obsm["X_xscale_niche"]`` and ``obs["xscale_domain"]``.
Level 2 trains on an in-memory niche dataset built from the cell latents.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from xscale.errors import XscaleInputError
from xscale.train.stage_settings import check_settings, check_started, record_settings, started_file

if TYPE_CHECKING:
    import anndata as ad

    from xscale.models.cell_to_tissue import CellToTissue, CellToTissueConfig
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig

log = logging.getLogger(__name__)

STAGES = ("level1", "cells", "level2", "niches")
CELL_KEY = "X_xscale_cell"
NICHE_KEY = "X_xscale_niche"
DOMAIN_KEY = "xscale_domain"
LEVEL2_MAX_BATCH = 64  # niches per level-2 batch at most (each niche carries up to C cells): min(batch_size, this)
Preset = Literal["tiny", "small", "base"]


@dataclass
class StagedResult:
    """What :func:`run_staged` produced.

    adata: the AnnData with latents (and domains); level1 / level2: trained models;
    skipped: stages found finished and not re-run; seconds: wall time per stage run;
    store: path of ``cells.zarr``.
    """

    adata: ad.AnnData
    level1: GeneToCell
    level2: CellToTissue
    store: Path
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _train_mask(
    adata: ad.AnnData, train_mask: np.ndarray | None, train_slides: Sequence[str] | None, slide_key: str | None
) -> np.ndarray:
    n = adata.n_obs
    if train_mask is not None and train_slides is not None:
        raise XscaleInputError("Pass train_mask or train_slides, not both.")
    if train_slides is not None:
        if slide_key is None:
            raise XscaleInputError("train_slides needs slide_key= naming the obs column of slides.")
        slides = adata.obs[slide_key].astype(str).to_numpy()
        missing = sorted(set(map(str, train_slides)) - set(slides))
        if missing:
            raise XscaleInputError(
                f"train_slides {missing} not found in obs[{slide_key!r}]; available: {sorted(set(slides))}."
            )
        mask = np.isin(slides, [str(s) for s in train_slides])
    elif train_mask is not None:
        mask = np.asarray(train_mask, dtype=bool)
        if mask.shape != (n,):
            raise XscaleInputError(f"train_mask: expected a bool array of shape ({n},), found {mask.shape}.")
    else:
        mask = np.ones(n, dtype=bool)
    if not mask.any():
        raise XscaleInputError("No training cells: train_mask / train_slides selects none.")
    return mask


def _save_array(stage_dir: Path, values: np.ndarray) -> None:
    from xscale.utils.atomic import atomic_dir

    with atomic_dir(stage_dir) as tmp:
        np.save(tmp / "latents.npy", np.asarray(values, dtype=np.float32))


def _load_array(stage_dir: Path, n: int) -> np.ndarray | None:
    from xscale.utils.atomic import is_complete

    if not is_complete(stage_dir):
        return None
    values = np.load(stage_dir / "latents.npy")
    if values.shape[0] != n:
        raise XscaleInputError(
            f"{stage_dir} holds latents of {values.shape[0]} cells but the data has {n}; "
            "this out_dir belongs to another dataset: use a fresh --out directory."
        )
    return values


def _finished_model(path: Path):
    from xscale.models.io import load_model

    return load_model(path) if (path / "config.json").is_file() else None


def check_run_dir(out_dir: str | os.PathLike, option: str = "out_dir") -> None:
    """Raise :class:`XscaleInputError` if ``out_dir`` is an output another xscale command replaces as a whole
    (it holds the completion marker at its top: a ``xscale finetune`` output, a saved model). A run's files written
    into it would be deleted when that command runs again; a run folder itself never holds the marker."""
    from xscale.utils.atomic import COMPLETE_MARKER

    out = Path(out_dir)
    if not (out.is_dir() and (out / COMPLETE_MARKER).is_file()):
        return
    what = "an `xscale finetune` output" if (out / "finetune.json").is_file() else (
        "a saved model" if (out / "config.json").is_file() else "an output another xscale command writes whole")
    raise XscaleInputError(
        f"{option} {str(out)!r}: expected a new directory or an earlier run folder, found {what} (it holds "
        f"{COMPLETE_MARKER}). That command replaces its folder as a whole, so the run's files would be deleted "
        "with it: pass a new path (e.g. a sibling directory).")


def check_n_domains(n_domains: int | None, n_cells: int, option: str = "n_domains") -> None:
    """``n_domains`` must be None or 1..n_cells (checked before any training)."""
    if n_domains is None:
        return
    try:
        whole = not isinstance(n_domains, bool) and int(n_domains) == n_domains
    except (TypeError, ValueError):
        whole = False
    if not whole or not 1 <= int(n_domains) <= n_cells:
        raise XscaleInputError(f"{option}: expected a whole number 1..{n_cells} (the number of cells), found "
                               f"{n_domains!r}. Pass fewer domains (or None for no domains).")


def _data_digest(adata: ad.AnnData, coords: np.ndarray) -> str:
    """Identifies the cells a run was made from: their ids and order, genes, coordinates and
    per-cell total counts. Another file with as many cells no longer reuses finished stages
    (their latents would be attached to other cells)."""
    import hashlib

    h = hashlib.sha1()
    for names in (adata.obs_names, adata.var_names):
        h.update("\0".join(map(str, names)).encode())
    h.update(np.ascontiguousarray(coords, dtype=np.float64).tobytes())
    totals = np.asarray(adata.X.sum(axis=1), dtype=np.float64).ravel()
    h.update(totals.tobytes())
    return h.hexdigest()[:16]


def _mask_digest(mask: np.ndarray) -> str:
    import hashlib

    return hashlib.sha1(np.packbits(mask).tobytes()).hexdigest()[:16]


class Stages:
    """Runs the stages of a run folder: ``stages(name, load, make, save)`` loads a finished stage (after checking
    the settings it was made with, ``settings[name]``) or makes, saves and records it. ``skipped`` lists the
    stages loaded, ``seconds`` the time of each one made."""

    def __init__(self, ckpt: Path, settings: dict[str, dict]) -> None:
        self.ckpt, self.settings = ckpt, settings
        self.skipped: list[str] = []
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, load: Callable[[], Any], make: Callable[[], Any],
                 save: Callable[[Any], None]) -> Any:
        t0 = time.perf_counter()
        out = load()
        if out is not None:
            check_settings(self.ckpt, name, self.settings[name])
            self.skipped.append(name)
            log.info("Stage %s finished earlier (%s); skipping.", name, self.ckpt / name)
            return out
        check_started(self.ckpt, name, self.settings[name])
        out = make()
        save(out)
        record_settings(self.ckpt, name, self.settings[name])
        started_file(self.ckpt, name).unlink(missing_ok=True)
        self.seconds[name] = time.perf_counter() - t0
        return out


def run_staged(
    adata: ad.AnnData,
    out_dir: str | os.PathLike,
    *,
    level1_config: GeneToCellConfig | None = None,
    level1_preset: Preset = "small",
    level2_config: CellToTissueConfig | None = None,
    level2_preset: Preset = "small",
    level2_overrides: dict[str, object] | None = None,
    train_mask: np.ndarray | None = None,
    train_slides: Sequence[str] | None = None,
    slide_key: str | None = None,
    spatial_key: str = "spatial",
    n_domains: int | None = None,
    domain_method: Literal["kmeans", "gmm"] = "kmeans",
    domain_slide_center: bool = True,
    radius: float | None = None,
    level1_epochs: int = 20,
    level2_epochs: int = 30,
    level1_max_steps: int = -1,
    level2_max_steps: int = -1,
    batch_size: int = 128,
    seed: int = 0,
    accelerator: str = "cpu",
    progress: bool = True,
    write_store: bool = True,
) -> StagedResult:
    """Run the staged pipeline on one AnnData; finished stages are skipped on re-run.

    Parameters
    ----------
    adata
        Cells × genes with raw counts in ``X`` (validated, e.g. by
        ``xscale.data.validate.validate_adata``) and coordinates in ``obsm[spatial_key]``.
    out_dir
        Run directory: ``checkpoints/<stage>`` per stage, ``cells.zarr`` at the end.
    level1_config, level1_preset
        Level-1 config, or a preset built on the panel's genes.
    level2_config, level2_preset, level2_overrides
        Level-2 config, or a preset with ``in_dim`` = the level-1 latent width and
        ``level2_overrides`` (field -> value) applied.
    train_mask, train_slides
        Cells (bool (n,)) or slides (names in ``obs[slide_key]``) both levels train on
        (default: all). Every cell is embedded.
    slide_key
        ``obs`` column of slides: niches never cross slides.
    n_domains
        When given, ``obs["xscale_domain"]`` = k-means (or GMM) of the niche latents.
    domain_slide_center
        With ``slide_key``: centre each slide's niche latents before clustering domains
        (:func:`xscale.tl.domains`), so a slide-wide shift does not become a domain.
    radius
        Optional niche radius in median nearest-neighbour distances.
    level1_epochs, level2_epochs, level1_max_steps, level2_max_steps, batch_size, seed
        Training budget.
    write_store
        Write ``out_dir/cells.zarr`` (AnnData zarr, obs_names as the input).

    Returns
    -------
    :class:`StagedResult`; ``result.adata`` holds ``obsm["X_xscale_cell"]`` (n, K·D),
    ``obsm["X_xscale_niche"]`` (n, T·D) and, with ``n_domains``, ``obs["xscale_domain"]``.
    """
    from xscale.models.cell_to_tissue import CellToTissueConfig
    from xscale.models.io import save_model
    from xscale.tl.cells import embed_cells
    from xscale.tl.niches import domains, niche_embeddings
    from xscale.train.level1 import fit_level1
    from xscale.train.level2 import fit_level2
    from xscale.utils.atomic import atomic_write_text, check_replaceable, make_output_dir

    if spatial_key not in adata.obsm:
        raise XscaleInputError(
            f"spatial_key {spatial_key!r} not found in adata.obsm. Available: {sorted(adata.obsm)}. "
            "Pass spatial_key= (--spatial-key) naming the (n, 2) coordinates."
        )
    if slide_key is not None and slide_key not in adata.obs:
        raise XscaleInputError(
            f"slide_key {slide_key!r} not found in adata.obs. Available: {list(adata.obs.columns)}."
        )
    if slide_key is not None:  # before any stage: a missing label would become a slide named "nan"
        from xscale.data.validate import check_slides

        check_slides(adata, slide_key)
    mask = _train_mask(adata, train_mask, train_slides, slide_key)
    check_n_domains(n_domains, adata.n_obs)  # before any training: not after both levels
    check_run_dir(out_dir)  # never write a run into a folder another command replaces whole
    if write_store:  # before any training: the store written at the end must not replace the user's data
        check_replaceable(Path(out_dir) / "cells.zarr")
    out_dir = make_output_dir(out_dir)  # after the input checks: a bad input creates nothing
    ckpt = out_dir / "checkpoints"
    ckpt.mkdir(exist_ok=True)
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
    slides = adata.obs[slide_key].astype(str).to_numpy() if slide_key is not None else None
    n = adata.n_obs
    if level1_config is None:
        from xscale.data.anndata_dataset import vocab_from_adatas
        from xscale.models.gene_to_cell import GeneToCellConfig

        level1_config = GeneToCellConfig.preset(level1_preset, genes=vocab_from_adatas([adata]).genes)
    # What each stage's output depends on (its own settings and those of the stages before it).
    data = {"n_cells": n, "train_cells": _mask_digest(mask), "slide_key": slide_key, "spatial_key": spatial_key,
            "data_digest": _data_digest(adata, coords)}
    settings = {"level1": {**data, "level1_config": level1_config, "level1_epochs": level1_epochs,
                           "level1_max_steps": level1_max_steps, "batch_size": batch_size, "seed": seed}}
    settings["cells"] = dict(settings["level1"])
    settings["level2"] = {**settings["cells"], "level2_config": level2_config, "level2_preset": level2_preset,
                          "level2_overrides": level2_overrides or {}, "radius": radius,
                          "level2_epochs": level2_epochs, "level2_max_steps": level2_max_steps}
    if level2_config is None:  # the preset's values: a preset changed between versions is noticed
        preset_values = CellToTissueConfig.PRESETS.get(level2_preset, {})
        settings["level2"]["level2_preset_values"] = dict(preset_values)
    settings["niches"] = dict(settings["level2"])

    stage = Stages(ckpt, settings)
    skipped, seconds = stage.skipped, stage.seconds

    def make_level1() -> GeneToCell:  # fit_level1 saves the model itself
        train = adata[mask].copy() if not mask.all() else adata
        return fit_level1(
            train, level1_config, out_dir=ckpt / "level1", max_epochs=level1_epochs,
            max_steps=level1_max_steps, batch_size=batch_size, seed=seed, slide_key=slide_key,
            accelerator=accelerator, enable_progress_bar=progress,
        )

    def make_cells() -> np.ndarray:
        tmp = adata.copy()
        embed_cells(tmp, level1, key_added=CELL_KEY, progress=progress)
        return np.asarray(tmp.obsm[CELL_KEY], dtype=np.float32).reshape(n, -1)

    def make_level2() -> CellToTissue:
        config = level2_config or CellToTissueConfig.preset(
            level2_preset, in_dim=cells.shape[1], **(level2_overrides or {})
        )
        return fit_level2(
            cells, coords, config=config, train_cells=np.flatnonzero(mask), slides=slides, radius=radius,
            max_epochs=level2_epochs, max_steps=level2_max_steps,
            batch_size=min(batch_size, LEVEL2_MAX_BATCH), seed=seed,
            ckpt_dir=ckpt / "level2" / "lightning", accelerator=accelerator, progress=progress,
        )

    # level 1 -> cell latents of every cell -> level 2 on niches centred on the training cells -> niche latents
    level1 = stage("level1", lambda: _finished_model(ckpt / "level1" / "model"), make_level1, lambda _: None)
    cells = stage("cells", lambda: _load_array(ckpt / "cells", n), make_cells,
                  lambda values: _save_array(ckpt / "cells", values))
    adata.obsm[CELL_KEY] = cells
    level2 = stage("level2", lambda: _finished_model(ckpt / "level2" / "model"), make_level2,
                   lambda model: save_model(model, ckpt / "level2" / "model"))
    niches = stage("niches", lambda: _load_array(ckpt / "niches", n),
                   lambda: niche_embeddings(level2, cells, coords, slides=slides, radius=radius, progress=progress),
                   lambda values: _save_array(ckpt / "niches", values))
    adata.obsm[NICHE_KEY] = niches

    if n_domains is not None:
        domains(adata, n_domains, key_added=DOMAIN_KEY, use_rep=NICHE_KEY, method=domain_method,
                seed=seed, slide_key=slide_key if domain_slide_center else None)

    store = out_dir / "cells.zarr"
    if write_store:
        write_cells_zarr(adata, store, slide_key=slide_key, spatial_key=spatial_key)
    atomic_write_text(out_dir / "stages.json", json.dumps({"skipped": skipped, "seconds": seconds}, indent=2))
    return StagedResult(adata=adata, level1=level1, level2=level2, store=store, skipped=skipped, seconds=seconds)


def write_cells_zarr(
    adata: ad.AnnData, path: str | os.PathLike, *, slide_key: str | None = None, spatial_key: str = "spatial"
) -> Path:
    """Write ``adata`` as an AnnData zarr store at ``path`` atomically (temp name, then rename;
    :func:`~xscale.data.writeback.write_anndata_zarr`).

    ``uns["xscale"]`` records the slide and spatial keys for the query layer.
    """
    from xscale.data.writeback import write_anndata_zarr

    out = adata.copy()
    meta = dict(out.uns.get("xscale", {})) if isinstance(out.uns.get("xscale"), dict) else {}
    meta.update({"slide_key": slide_key or "", "spatial_key": spatial_key})
    out.uns["xscale"] = meta
    write_anndata_zarr(out, path)
    log.info("Wrote %s (%d cells)", path, out.n_obs)
    return Path(path)
