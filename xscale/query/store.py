"""Read the parts of a latent store (``cells.zarr``) that the query layer needs.

A latent store is an AnnData written to zarr (``adata.write_zarr``) by ``xscale demo``,
``xscale run`` or ``xscale embed``. The query layer reads, without touching ``X``:

- ``obsm["X_xscale_cell"]``: cell latents, (n, K, D) or flattened (n, K*D);
- ``obsm["X_xscale_niche"]``: niche latents (the niche centred on each cell), (n, T, D) or (n, T*D);
- ``obsm["spatial"]``: coordinates, (n, 2) (optional; needed for region queries);
- ``obs``: cell ids (index) and annotations, among them the slide column.

The slide column is ``uns["xscale"]["slide_key"]`` when the writer recorded it, otherwise
the first of :data:`SLIDE_KEY_CANDIDATES` present in ``obs``; pass ``slide_key`` to choose.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from xscale.errors import XscaleInputError

log = logging.getLogger(__name__)

Level = Literal["cell", "niche"]
LATENT_KEYS: dict[str, str] = {"cell": "X_xscale_cell", "niche": "X_xscale_niche"}
SPATIAL_KEY = "spatial"
SLIDE_KEY_CANDIDATES = ("slide", "slice", "embryo", "sample", "library_id", "section", "fov_slide")


@dataclass
class LatentStore:
    """Latents, coordinates and annotations of one store, in memory.

    Attributes
    ----------
    latents
        (n, F) float32, one flattened latent per cell (F = K*D or T*D).
    latent_shape
        Per-cell shape before flattening, e.g. ``(K, D)``; ``(F,)`` when stored flat.
    obs
        Annotations, indexed by cell id (n rows).
    coords
        (n, 2) float64 coordinates, or None when the store has no ``obsm["spatial"]``.
    slide_key
        Column of ``obs`` naming each cell's slide, or None (one slide).
    level
        ``"cell"`` or ``"niche"``.
    path
        Where the store was read from (None when built in memory).
    """

    latents: np.ndarray
    latent_shape: tuple[int, ...]
    obs: pd.DataFrame
    coords: np.ndarray | None
    slide_key: str | None
    level: Level
    path: Path | None = None

    @property
    def n(self) -> int:
        return self.latents.shape[0]

    @property
    def ids(self) -> pd.Index:
        return self.obs.index

    @property
    def slides(self) -> np.ndarray | None:
        """(n,) slide name of each cell as strings, or None."""
        if self.slide_key is None:
            return None
        return self.obs[self.slide_key].astype(str).to_numpy()

    @classmethod
    def from_adata(
        cls, adata, *, level: Level = "cell", slide_key: str | None = None, use_rep: str | None = None
    ) -> LatentStore:
        """Build a store from an in-memory AnnData (reads ``adata.obsm[use_rep]``)."""
        key = use_rep or LATENT_KEYS[level]
        if key not in adata.obsm:
            raise XscaleInputError(
                f"Latents {key!r} not found in adata.obsm. Available: {sorted(adata.obsm)}. "
                "Embed the cells first (xscale.tl.embed_cells / embed_niches) or pass use_rep=."
            )
        lat = np.asarray(adata.obsm[key])
        coords = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2] if SPATIAL_KEY in adata.obsm else None
        obs = adata.obs.copy()
        return cls._build(lat, obs, coords, _resolve_slide_key(obs, slide_key, dict(adata.uns)), level, None)

    @classmethod
    def _build(cls, lat, obs, coords, slide_key, level, path) -> LatentStore:
        lat = np.asarray(lat)
        shape = tuple(int(s) for s in lat.shape[1:])
        flat = np.ascontiguousarray(lat.reshape(lat.shape[0], -1), dtype=np.float32)
        if not np.isfinite(flat).all():
            raise XscaleInputError(
                f"Latents of level {level!r} contain NaN or inf values ({int((~np.isfinite(flat)).any(1).sum())} "
                "cells). Re-run the embedding step that wrote the store."
            )
        if not obs.index.is_unique:
            dup = obs.index[obs.index.duplicated()].unique()
            raise XscaleInputError(
                f"Cell ids (obs_names) must be unique to query cells by id; found {len(dup)} repeated, e.g. "
                f"{list(map(str, dup[:5]))} (e.g. anndata.concat of slides numbered alike). Make them unique "
                "first: adata.obs_names_make_unique(), or anndata.concat(..., index_unique='-')."
            )
        return cls(flat, shape, obs, coords, slide_key, level, path)


def _resolve_slide_key(obs: pd.DataFrame, slide_key: str | None, uns: dict) -> str | None:
    if slide_key is not None:
        if slide_key not in obs.columns:
            raise XscaleInputError(
                f"Slide key {slide_key!r} not found in the store's obs. Available: {list(obs.columns)}. "
                "Pass one of these as the slide key."
            )
        return slide_key
    meta = uns.get("xscale", {}) if isinstance(uns, dict) else {}
    recorded = meta.get("slide_key") if hasattr(meta, "get") else None
    if isinstance(recorded, str) and recorded in obs.columns:
        return recorded
    for cand in SLIDE_KEY_CANDIDATES:
        if cand in obs.columns:
            return cand
    return None


def open_store(path: str | Path, *, level: Level = "cell", slide_key: str | None = None) -> LatentStore:
    """Read a store's latents of one level, its coordinates and its ``obs`` (not ``X``).

    Parameters
    ----------
    path
        ``cells.zarr`` written by ``xscale demo`` / ``run`` / ``embed``.
    level
        ``"cell"`` reads ``obsm["X_xscale_cell"]``, ``"niche"`` reads ``obsm["X_xscale_niche"]``.
    slide_key
        Column of ``obs`` holding the slide; detected when None (see module docstring).
    """
    import zarr
    from anndata.io import read_elem

    path = Path(path)
    if not path.exists():
        raise XscaleInputError(f"Store {str(path)!r} does not exist. "
                               "Pass the cells.zarr written by xscale demo/run/embed.")
    if level not in LATENT_KEYS:
        raise XscaleInputError(f"Unknown level {level!r}; expected one of {list(LATENT_KEYS)}.")
    try:
        root = zarr.open_group(str(path), mode="r")
        obs = read_elem(root["obs"])
        obsm_keys = list(root["obsm"].keys()) if "obsm" in root else []
    except Exception as err:  # zarr raises many types for a damaged store
        raise XscaleInputError(
            f"Could not read {str(path)!r} as an AnnData zarr store ({type(err).__name__}: {err}). "
            "Check the path points at a complete cells.zarr; re-run the step that wrote it."
        ) from err
    key = LATENT_KEYS[level]
    if key not in obsm_keys:
        raise XscaleInputError(
            f"Store {str(path)!r} has no obsm[{key!r}] for level {level!r}. Available obsm: {obsm_keys}. "
            + ("Niche latents come from level 2 (xscale run / demo)." if level == "niche"
               else "Run xscale embed first.")
        )
    lat = read_elem(root["obsm"][key])
    coords = None
    if SPATIAL_KEY in obsm_keys:
        coords = np.asarray(read_elem(root["obsm"][SPATIAL_KEY]), dtype=np.float64)[:, :2]
    uns: dict = {}
    if "uns" in root and "xscale" in root["uns"]:
        uns = {"xscale": read_elem(root["uns"]["xscale"])}
    store = LatentStore._build(lat, obs, coords, _resolve_slide_key(obs, slide_key, uns), level, path)
    log.info("opened %s: %d cells, level %s, latent %s, slide key %s", path, store.n, level, store.latent_shape,
             store.slide_key)
    return store
