"""Write-back of results: latents written chunk by chunk while embedding, resumable, then exposed.

:class:`LatentWriter` writes (n, *L) latents into a zarr array one cell block at a time
(never the whole array in memory). It writes to a partial location beside the target and
records which blocks are done; a writer re-opened after an interruption with the same
fingerprint continues with the missing blocks only, and since each block is a pure
function of its inputs, the result is identical to an uninterrupted run. :meth:`finalize`
renames the partial array into place.

Exposure:

- the store itself is an AnnData zarr store: :func:`store_latent_writer` targets
  ``<store>/obsm/<key>``, so ``anndata.read_zarr(store).obsm[key]`` holds the result;
- :func:`latents_in_source_order` maps store rows back to the input's rows (NaN for cells
  dropped at validation), for ``adata.obsm`` of an in-memory AnnData;
- :mod:`xscale.data.spatialdata_writeback` (:func:`write_to_spatialdata`,
  :func:`write_adata_to_spatialdata`, re-exported here) puts them into a SpatialData table;
- :func:`write_anndata_zarr` writes a whole AnnData (a results store such as ``cells.zarr``)
  under a temporary name, in zarr format 2 (:func:`~xscale.data.zarr_settings.zarr_format_2`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xscale.data.store import CellStore
from xscale.data.zarr_settings import unsharded, zarr_format_2
from xscale.errors import XscaleInputError
from xscale.utils.atomic import atomic_dir, replace_dir

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

_STATE = "xscale_writer.json"


def write_anndata_zarr(adata: ad.AnnData, path: str | os.PathLike) -> Path:
    """``adata.write_zarr(path)`` in zarr format 2 (:func:`~xscale.data.zarr_settings.zarr_format_2`),
    built under a temporary name beside ``path`` and renamed when complete: an existing store is
    replaced only then (a failed write leaves it as it was), and concurrent writers do not collide.
    The store's root attributes mark it as an xscale output: only such stores are ever replaced."""
    import zarr

    from xscale.utils.atomic import XSCALE_ZARR_ATTR

    with atomic_dir(path, marker=False) as tmp, zarr_format_2():
        adata.write_zarr(tmp)
        zarr.open_group(tmp, mode="r+").attrs[XSCALE_ZARR_ATTR] = 1  # replaceable by a later xscale write
    return Path(path)


class LatentWriter:
    """Resumable, block-wise writer of an (n_cells, *cell_shape) float32 zarr array.

    Parameters
    ----------
    target
        Final location of the zarr array (must not exist unless ``overwrite``).
    n_cells, cell_shape
        Array shape (n_cells, *cell_shape), e.g. (n, K, D) cell latents.
    chunk_cells
        Rows per block; blocks are the unit of writing and resuming.
    fingerprint
        Identifies the computation (model checkpoint, options). A partial array with a
        different fingerprint or shape is discarded, not resumed.
    partial
        Where the array is built; default: ``.<target name>.partial`` beside ``target``.
    attrs
        Attributes of the final array (e.g. anndata encoding).
    overwrite
        Replace an existing target on :meth:`finalize`.
    """

    def __init__(self, target: str | Path, *, n_cells: int, cell_shape: tuple[int, ...], chunk_cells: int,
                 fingerprint: str = "", partial: str | Path | None = None, attrs: dict | None = None,
                 overwrite: bool = False) -> None:
        import zarr

        self.target = Path(target)
        self.partial = Path(partial) if partial is not None else self.target.with_name(f".{self.target.name}.partial")
        if self.target.exists() and not overwrite:
            raise XscaleInputError(f"{self.target}: results already exist here. "
                                   "Pass overwrite=True (CLI: --overwrite) or another key.")
        self.n_cells, self.cell_shape, self.chunk_cells = (int(n_cells), tuple(int(s) for s in cell_shape),
                                                           int(chunk_cells))
        self.n_chunks = -(-self.n_cells // self.chunk_cells)
        self.attrs, self.overwrite = dict(attrs or {}), overwrite
        state = {"n_cells": self.n_cells, "cell_shape": list(self.cell_shape), "chunk_cells": self.chunk_cells,
                 "fingerprint": fingerprint}
        self._state_file = self.partial / _STATE
        self.done = np.zeros(self.n_chunks, dtype=bool)
        resumed = False
        if self.partial.exists():
            reason = "they were made by another computation"
            try:
                old = json.loads(self._state_file.read_text())
                if {k: old.get(k) for k in state} == state:
                    # the array first: blocks count as done only if the array holding them opens
                    self.array = zarr.open_array(self.partial, mode="r+")
                    self.done[np.asarray(old.get("done", []), dtype=np.int64)] = True
                    resumed = True
            except (OSError, json.JSONDecodeError, ValueError, KeyError) as err:
                reason = f"they are unreadable ({type(err).__name__}: {err})"
            if not resumed:
                logger.warning("discarding partial results at %s: %s", self.partial, reason)
                self.done[:] = False
                shutil.rmtree(self.partial)
        if not resumed:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self.array = zarr.create_array(self.partial, shape=(self.n_cells, *self.cell_shape),
                                           chunks=(self.chunk_cells, *self.cell_shape), dtype="float32",
                                           zarr_format=3)
        else:
            logger.info("resuming %s: %d of %d blocks already written", self.target, int(self.done.sum()),
                        self.n_chunks)
        self._state = state
        self._save_state()

    def _save_state(self) -> None:
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self._state, "done": np.flatnonzero(self.done).tolist()}))
        os.replace(tmp, self._state_file)  # atomic: a block counts as done only once its data is on disk

    def pending_chunks(self) -> list[int]:
        """Blocks still to write, in order."""
        return np.flatnonzero(~self.done).tolist()

    def chunk_range(self, i: int) -> tuple[int, int]:
        """Rows [start, stop) of block ``i``."""
        return i * self.chunk_cells, min((i + 1) * self.chunk_cells, self.n_cells)

    def write_chunk(self, i: int, values: np.ndarray) -> None:
        """Write block ``i``: values (stop - start, *cell_shape)."""
        a, b = self.chunk_range(i)
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (b - a, *self.cell_shape):
            raise ValueError(f"block {i}: expected shape {(b - a, *self.cell_shape)}, got {values.shape}")
        self.array[a:b] = values
        self.done[i] = True
        self._save_state()

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def finalize(self) -> Path:
        """Rename the complete array into place. -> target path."""
        if not self.complete:
            raise RuntimeError(f"{self.target}: {int((~self.done).sum())} block(s) not written yet")
        self.array.attrs.update(self.attrs)
        self._state_file.unlink()
        if self.overwrite:  # asked for: an old target is removed only after the swap
            replace_dir(self.partial, self.target, check=False)
        else:
            os.replace(self.partial, self.target)
        logger.info("wrote %s (%d x %s)", self.target, self.n_cells, self.cell_shape)
        return self.target


def write_store_obs(store: str | Path | CellStore, key: str, values: Any) -> None:
    """Write one ``obs`` column (n_cells values in store order) into a prepared store, in place.

    Only ``obs/<key>`` changes: the rest of the store (counts, graph, latents, its
    ``xscale_store`` metadata) is left as it is. The column is written under a temporary name
    and renamed into place, then listed in ``obs``'s column order.
    """
    import pandas as pd
    import zarr
    from anndata.io import write_elem

    store = store if isinstance(store, CellStore) else CellStore(store)
    if len(values) != store.n_cells:
        raise XscaleInputError(f"obs[{key!r}]: expected {store.n_cells} values (one per store cell), "
                               f"found {len(values)}.")
    obs = zarr.open_group(store.path / "obs", mode="r+")
    tmp_name = f"{key}__xscale_tmp_{os.getpid()}"
    with unsharded():  # one chunk per array, as the rest of the store (and no autosharding notice)
        write_elem(obs, tmp_name, values if isinstance(values, pd.Categorical) else np.asarray(values))
    replace_dir(store.path / "obs" / tmp_name, store.path / "obs" / key, check=False)
    order = [c for c in obs.attrs.get("column-order", []) if c != key]
    obs.attrs["column-order"] = [*order, key]


def store_latent_writer(store: str | Path | CellStore, key: str, cell_shape: tuple[int, ...], *,
                        fingerprint: str = "", overwrite: bool = False, attrs: dict | None = None) -> LatentWriter:
    """A writer of ``obsm[key]`` of a prepared store, one store block at a time (partial kept outside the store).
    ``attrs``: more attributes of the written array (e.g. what it was computed from)."""
    store = store if isinstance(store, CellStore) else CellStore(store)
    target = store.path / "obsm" / key
    partial = store.path.with_name(f".{store.path.name}.obsm.{key}.partial")
    # the partial beside the store outlives it: resumed only into the same store (not one prepared again)
    return LatentWriter(target, n_cells=store.n_cells, cell_shape=cell_shape, chunk_cells=store.chunk_cells,
                        fingerprint=f"{fingerprint} store:{store.identity}", partial=partial, overwrite=overwrite,
                        # the fingerprint stays on the array: what is computed from it (niches) can name it
                        attrs={"encoding-type": "array", "encoding-version": "0.2.0",
                               "xscale_fingerprint": fingerprint, **(attrs or {})})


def read_store_latents(store: str | Path | CellStore, key: str) -> Any:
    """The zarr array ``obsm[key]`` of a store (lazy; rows in store order)."""
    import zarr

    store = store if isinstance(store, CellStore) else CellStore(store)
    path = store.path / "obsm" / key
    if not path.exists():
        present = sorted(p.name for p in (store.path / "obsm").iterdir() if p.is_dir())
        raise XscaleInputError(f"{store.path}: obsm[{key!r}] not found; present: {present}. Run the embedding first.")
    return zarr.open_array(path, mode="r")


def latents_in_source_order(store: str | Path | CellStore, key: str, n_source: int | None = None,
                            *, flatten: bool = True) -> np.ndarray:
    """Store latents reordered to the input's rows: (n_source, ...) float32, NaN for dropped cells.

    ``flatten`` reshapes (n, K, D) to (n, K·D) so the result fits ``obsm`` of tools expecting 2-D.
    """
    store = store if isinstance(store, CellStore) else CellStore(store)
    lat = read_store_latents(store, key)
    src = store.source_index()
    n_source = store.n_source if n_source is None else n_source
    shape = (int(np.prod(lat.shape[1:])),) if flatten else tuple(lat.shape[1:])
    out = np.full((n_source, *shape), np.nan, dtype=np.float32)
    for i in range(store.n_chunks):
        a, b = store.chunk_range(i)
        out[src[a:b]] = np.asarray(lat[a:b]).reshape(b - a, *shape)
    return out


# the SpatialData write-back has its own module; its public names stay importable from here
from xscale.data.spatialdata_writeback import (  # noqa: E402
    NICHE_TABLE_MARK,
    write_adata_to_spatialdata,
    write_to_spatialdata,
)

__all__ = ["NICHE_TABLE_MARK", "LatentWriter", "latents_in_source_order", "read_store_latents", "store_latent_writer",
           "write_adata_to_spatialdata", "write_anndata_zarr", "write_store_obs", "write_to_spatialdata"]
