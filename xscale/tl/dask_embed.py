"""Level-1 embedding of a whole store with Dask distributed: one model load per worker, chunked zarr writes.

The input is an AnnData zarr store: a store written by ``xscale prepare``
(:mod:`xscale.data.store`) or any AnnData written with ``write_zarr`` (``X`` CSR or
dense, raw counts). Rows are split into ranges of ``chunk_rows`` cells; each range is one
dask task. A worker process loads the model once (:func:`xscale.models.io.load_model`,
safetensors) and keeps it for all its tasks; each task reads only its rows and writes
its latents straight into the output zarr array (ranges are chunk-aligned, so no two
tasks touch one chunk). Nothing passes through the client but row ranges and timings.

The output is an AnnData zarr (``anndata.read_zarr`` and
:func:`xscale.query.store.open_store` read it) with ``obs`` and ``obsm['spatial']`` of
the input, ``obsm['X_xscale_cell']`` (n, K·D) float32 in input row order and
``uns['xscale']`` (model, latent shape, how it was made); the root attribute ``xscale_dask``
records chunks, worker processes and model loads per worker. It is written under a
temporary name and renamed when complete.

The embedding of a cell does not depend on which worker embeds it or on the number of
workers, range or batch: panels longer than the model's ``config.inference_context`` are
cut per cell by :func:`xscale.data.batch.inference_context` (a rule of the cell's counts
alone), and every task runs torch with one thread.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from xscale.errors import XscaleInputError
from xscale.utils.atomic import atomic_dir

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

LATENT_KEY = "X_xscale_cell"
_MODELS: dict[tuple[str, float], Any] = {}  # per worker process: (model_dir, mtime) -> model
_LOADS = {"count": 0}


class ZarrRows:
    """Row reader over an AnnData zarr store (CSR or dense ``X``). Picklable; opens lazily in each process."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise XscaleInputError(f"store_path={str(self.path)!r} does not exist. Pass a store written by "
                                   "`xscale prepare` or an AnnData .zarr.")
        root = self._open()
        if "X" not in root or "var" not in root:
            raise XscaleInputError(f"{self.path}: expected an AnnData zarr store with X and var, found members "
                                   f"{sorted(root.keys())}. Run `xscale prepare` first.")
        x = root["X"]
        enc = x.attrs.get("encoding-type", "array")
        if enc not in ("csr_matrix", "array"):
            raise XscaleInputError(f"{self.path}: X is stored as {enc!r}; expected 'csr_matrix' or a dense array. "
                                   "Run `xscale prepare` to convert it.")
        self.sparse = enc == "csr_matrix"
        shape = x.attrs["shape"] if self.sparse else x.shape
        self.n_cells, self.n_genes = int(shape[0]), int(shape[1])

    def _open(self):
        import zarr

        try:
            return zarr.open_group(self.path, mode="r")
        except Exception as err:  # zarr raises several error types for non-stores
            raise XscaleInputError(f"{self.path}: cannot open as a zarr store ({err}). Pass a store written by "
                                   "`xscale prepare` or an AnnData .zarr.") from err

    def genes(self) -> list[str]:
        from anndata.io import read_elem

        return [str(g) for g in read_elem(self._open()["var"]).index]

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Counts of rows [start, stop) as CSR float32, reading only those rows' chunks."""
        x = self._open()["X"]
        if not self.sparse:
            return sp.csr_matrix(np.asarray(x[start:stop], dtype=np.float32))
        ptr = np.asarray(x["indptr"][start : stop + 1], dtype=np.int64)
        p0, p1 = int(ptr[0]), int(ptr[-1])
        data = np.asarray(x["data"][p0:p1], dtype=np.float32)
        return sp.csr_matrix((data, x["indices"][p0:p1], ptr - p0), shape=(stop - start, self.n_genes))


def _worker_model(model_dir: str):
    """The model of ``model_dir``, loaded once per process (reloaded if the files change)."""
    from xscale.models.io import load_model

    key = (model_dir, (Path(model_dir) / "model.safetensors").stat().st_mtime)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_model(model_dir).eval()
        _LOADS["count"] += 1
    return _MODELS[key]


def embed_rows(model, counts: sp.csr_matrix, columns: np.ndarray, gene_ids: np.ndarray, *, start: int,
               batch_size: int, seed: int = 0) -> np.ndarray:
    """Embed cells with a level-1 model. counts (n, G_panel) CSR raw counts -> (n, K·D) float32.

    ``columns`` are the panel columns known to the model and ``gene_ids`` their vocabulary
    ids. Batches of ``batch_size`` rows in order. Panels longer than the model's context are
    cut per cell by :func:`xscale.data.batch.inference_context`, so a cell's latents do not
    depend on ``start``, ``batch_size`` or ``seed`` (kept for compatibility; unused).
    """
    import torch

    from xscale.data.batch import CellItem, collate_cells

    counts = counts[:, columns].tocsr()
    out = np.empty((counts.shape[0], model.config.embedding_dim), dtype=np.float32)
    with torch.inference_mode():
        for lo in range(0, counts.shape[0], batch_size):
            block = counts[lo : lo + batch_size].toarray()
            items = [CellItem(gene_ids=gene_ids, counts=row, index=start + lo + i) for i, row in enumerate(block)]
            batch = collate_cells(items, max_genes=model.config.inference_context, deterministic=True)
            out[lo : lo + len(items)] = model.embed(batch.gene_ids, batch.values, batch.pad_mask).numpy()
    return out


def _embed_range(rows: ZarrRows, model_dir: str, out_array: str, start: int, stop: int, batch_size: int,
                 seed: int) -> dict[str, Any]:
    """One dask task: embed rows [start, stop) and write them into the output array."""
    import torch
    import zarr

    from xscale.data.anndata_dataset import map_panel

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = _worker_model(model_dir)
    mapping = map_panel(rows.genes(), model.vocab, what=str(rows.path))
    latents = embed_rows(model, rows.read_rows(start, stop), mapping.columns, mapping.gene_ids,
                         start=start, batch_size=batch_size, seed=seed)
    zarr.open_array(out_array, mode="r+")[start:stop] = latents
    return {"start": start, "stop": stop, "pid": os.getpid(), "loads": _LOADS["count"],
            "seconds": time.perf_counter() - t0}


def _client(client_or_address: Any, n_workers: int) -> tuple[Client, Any]:
    """(client, cluster to close or None) for "local", an address, or an existing Client."""
    from distributed import Client, LocalCluster

    if isinstance(client_or_address, Client):
        return client_or_address, None
    if client_or_address == "local":
        if n_workers < 1:
            raise XscaleInputError(f"n_workers must be >= 1 for a local cluster; got {n_workers}.")
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        return Client(cluster), cluster
    if isinstance(client_or_address, str) and client_or_address:
        try:
            return Client(client_or_address, timeout="20s"), None
        except OSError as err:
            raise XscaleInputError(f"Cannot reach a Dask scheduler at {client_or_address!r} ({err}). Start one "
                                   "(`dask scheduler` + `dask worker ADDRESS`) or pass 'local'.") from err
    raise XscaleInputError(f"client_or_address must be 'local', a scheduler address (tcp://host:8786) or a "
                           f"distributed.Client; got {client_or_address!r}.")


def _close_quietly(client: Client, cluster: Any) -> None:
    """Close a local cluster we started; a slow shutdown (busy machine) must not fail a finished job."""
    for closer in (client, cluster):
        try:
            closer.close(timeout=60)
        except (TimeoutError, OSError, RuntimeError) as err:
            log.warning("closing the local Dask %s timed out or failed (%s); results are complete.",
                        type(closer).__name__, err)


def _write_skeleton(src: Path, tmp: Path, n: int, width: int, chunk_rows: int, meta: dict[str, Any]) -> str:
    """Write obs / obsm['spatial'] / uns of the input to ``tmp`` and an empty latent array; return its path."""
    import anndata as ad
    import zarr
    from anndata.io import read_elem

    from xscale.data.zarr_settings import zarr_format_2

    root = zarr.open_group(src, mode="r")
    obs = read_elem(root["obs"])
    obsm = {}
    if "obsm" in root and "spatial" in root["obsm"]:
        obsm["spatial"] = np.asarray(read_elem(root["obsm"]["spatial"]))
    slide_key = meta.get("slide_key")
    adata = ad.AnnData(obs=obs, obsm=obsm, uns={"xscale": meta})
    with zarr_format_2():  # an AnnData result: format 2, whatever anndata's default (zarr_settings)
        adata.write_zarr(tmp)
    group = zarr.open_group(tmp, mode="r+")
    arr = group["obsm"].create_array(LATENT_KEY, shape=(n, width), chunks=(chunk_rows, width), dtype="float32",
                                     fill_value=np.nan)
    arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    log.debug("skeleton written to %s (slide key %s)", tmp, slide_key)
    return str(tmp / "obsm" / LATENT_KEY)


def embed_store_dask(
    store_path: str | os.PathLike,
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    client_or_address: Any = "local",
    n_workers: int = 2,
    chunk_rows: int = 4096,
    batch_size: int = 256,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Embed every cell of a store with a level-1 model on a Dask cluster.

    Parameters
    ----------
    store_path
        Store written by ``xscale prepare``, or any AnnData ``.zarr`` with raw counts in ``X``.
    model_dir
        Directory of a saved level-1 model (``model.safetensors`` + ``config.json``).
    out_path
        AnnData zarr to create; receives ``obsm['X_xscale_cell']`` (n, K·D) in the input's
        row order, plus the input's ``obs``, ``obsm['spatial']`` and ``uns['xscale']``.
    client_or_address
        ``"local"`` (start a ``LocalCluster`` of ``n_workers`` single-threaded processes,
        closed afterwards), a scheduler address such as ``"tcp://10.0.0.5:8786"``, or a
        ``distributed.Client`` (left open).
    n_workers
        Worker processes of the local cluster (ignored for an address or Client: the
        cluster's own workers are used).
    chunk_rows
        Cells per task and per output chunk.
    batch_size, seed
        Cells per forward pass; ``seed`` is kept for compatibility and no longer changes the
        result (panels longer than the model's ``config.inference_context`` get a fixed context
        per cell, :func:`xscale.data.batch.inference_context`).
    overwrite
        Replace an existing ``out_path``.

    Returns
    -------
    ``out_path`` once complete.
    """
    from distributed import as_completed
    from tqdm.auto import tqdm

    from xscale.data.anndata_dataset import map_panel
    from xscale.models.io import load_model

    store_path, out_path, model_dir = Path(store_path), Path(out_path), Path(model_dir)
    if chunk_rows < 1 or batch_size < 1:
        raise XscaleInputError(f"chunk_rows and batch_size must be >= 1; got {chunk_rows}, {batch_size}.")
    if out_path.exists() and not overwrite:
        raise XscaleInputError(f"out_path={str(out_path)!r} exists. Pass overwrite=True or choose another path.")
    if not (client_or_address == "local" or isinstance(client_or_address, str) or hasattr(client_or_address, "submit")):
        raise XscaleInputError(f"client_or_address must be 'local', a scheduler address (tcp://host:8786) or a "
                               f"distributed.Client; got {client_or_address!r}.")
    rows = ZarrRows(store_path)
    model = load_model(model_dir)  # fail here, not in every worker, if the model is unusable
    mapping = map_panel(rows.genes(), model.vocab, what=str(store_path))
    width = int(model.config.embedding_dim)
    k = int(model.config.latents_per_cell)
    meta = {"level": "cell", "model_dir": str(model_dir.resolve()), "latent_shape": [k, width // k],
            "source": str(store_path.resolve()), "genes_used": int(mapping.n_used), "embedded_with": "dask"}
    import zarr

    src_root = zarr.open_group(store_path, mode="r")
    if "uns" in src_root and "xscale" in src_root["uns"]:
        from anndata.io import read_elem

        slide_key = read_elem(src_root["uns"]["xscale"]).get("slide_key")
        if slide_key:
            meta["slide_key"] = str(slide_key)
    # an earlier output stays whole until this one is in place; a failed run removes its temporary
    with atomic_dir(out_path, marker=False) as tmp:
        array_path = _write_skeleton(store_path, tmp, rows.n_cells, width, chunk_rows, meta)
        ranges = [(a, min(a + chunk_rows, rows.n_cells)) for a in range(0, rows.n_cells, chunk_rows)]
        client, cluster = _client(client_or_address, n_workers)
        reports = []
        try:
            futures = [client.submit(_embed_range, rows, str(model_dir.resolve()), array_path, a, b, batch_size, seed,
                                     pure=False) for a, b in ranges]
            for fut in tqdm(as_completed(futures), total=len(futures), desc="embed (dask)", unit="chunk"):
                reports.append(fut.result())
        finally:
            if cluster is not None:
                _close_quietly(client, cluster)
        pids = sorted({r["pid"] for r in reports})
        log.info("embedded %d cells in %d chunks on %d worker process(es)", rows.n_cells, len(ranges), len(pids))
        loads = {str(p): max(r["loads"] for r in reports if r["pid"] == p) for p in pids}
        zarr.open_group(tmp, mode="r+").attrs["xscale_dask"] = {
            "chunks": len(ranges), "chunk_rows": chunk_rows, "worker_pids": [int(p) for p in pids],
            "model_loads_per_worker": loads, "task_seconds": round(sum(r["seconds"] for r in reports), 3),
        }
        zarr.consolidate_metadata(str(tmp))
    return out_path


def embed_store(store_path: str | os.PathLike, model_dir: str | os.PathLike, *, batch_size: int = 256,
                seed: int = 0, chunk_rows: int = 4096) -> np.ndarray:
    """Single-process reference: the same embedding as :func:`embed_store_dask`, returned in memory. (n, K·D)."""
    import torch

    from xscale.data.anndata_dataset import map_panel
    from xscale.models.io import load_model

    rows = ZarrRows(store_path)
    model = load_model(model_dir)
    mapping = map_panel(rows.genes(), model.vocab, what=str(store_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        parts = [embed_rows(model, rows.read_rows(a, min(a + chunk_rows, rows.n_cells)), mapping.columns,
                            mapping.gene_ids, start=a, batch_size=batch_size, seed=seed)
                 for a in range(0, rows.n_cells, chunk_rows)]
    finally:
        torch.set_num_threads(threads)
    return np.concatenate(parts) if parts else np.zeros((0, model.config.embedding_dim), np.float32)


__all__ = ["ZarrRows", "embed_rows", "embed_store", "embed_store_dask"]
