"""SpatialData at scale: what reading the table lazily and writing back only what changes save.

A SpatialData store of ``--cells`` cells (circles + one table annotating them; coordinates from the
circles' centroids, as a segmentation export gives them) is built by ``tile_tissue`` from the
bundled CosMx lung cells (960 genes). Each measure runs in a fresh process (peak RSS = that
process's VmHWM), the current code and its baseline in the same run, alternating, ``--repeats``
times each (medians):

- ``prepare``: ``prepare(store)`` reads the table lazily (dask blocks of X, spatialdata reads only the
  elements) vs the baseline, the table read whole by spatialdata (``read_dataset(store)``: what
  ``prepare`` did before, whatever ``backed`` said) and then prepared from memory;
- ``write_back``: ``write_to_spatialdata(store, prepared)`` of cell latents (K·D = 512 floats per cell)
  writes ``obsm/X_xscale_cell`` of the table only, the latents reordered to the table's rows out of core,
  vs the baseline, the previous implementation: the whole table read by spatialdata, the latents reordered
  in memory and put in its obsm, and the whole table (counts included) written again under a temporary
  name, then renamed;
- ``niche_table``: ``write_to_spatialdata(store, prepared, cell_key=None, niche_key=...)`` of niche latents
  (the same 512 floats per cell) writes the second table with its X reordered and written block by block,
  vs the baseline, the previous implementation: the latents reordered in memory and the table's X built
  whole before it is written.

``--kinds`` runs some of them and keeps the others' entries of an existing results file.

Writes ``benchmarks/results/spatialdata_io.json``::

    {"n_cells", "n_genes", "table_x_mb", "latent_dims", "repeats",
     "prepare": {"current": {"peak_rss_mb", "seconds", "each": [...]}, "baseline": {...},
                 "rss_ratio", "time_ratio"},
     "write_back": {... same ...}, "niche_table": {... same ...}, "notes": [...]}

``rss_ratio`` / ``time_ratio`` are current / baseline (below 1 = the current code uses less).
Run: ``.venv/bin/python benchmarks/spatialdata_io.py [--cells 600000]`` (about 10 minutes on 2 cores;
the stores live in a temporary directory and are deleted).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from proc_memory import vm_hwm_bytes

RESULTS = Path(__file__).parent / "results" / "spatialdata_io.json"
LATENT_SHAPE = (16, 32)  # K x D of the small preset: 512 floats per cell
NICHE_KEY = "X_xscale_niche"  # niche latents of the same shape, for the niche-table measure
KINDS = ("prepare", "write_back", "niche_table")


def build(path: Path, n_cells: int) -> dict:
    """The SpatialData store of ``n_cells`` tiled CosMx cells; its sizes."""
    import anndata as ad
    import spatialdata as sd
    from spatialdata.models import ShapesModel, TableModel

    import xscale
    from xscale.data.synthetic import tile_tissue
    from xscale.data.zarr_settings import unsharded

    src = xscale.datasets.load("cosmx_nsclc_profast")
    tiled = tile_tissue(src, n_cells, out=path.with_suffix(".tiles.zarr"), seed=0, progress=False)
    t = ad.read_zarr(tiled)
    xy = np.asarray(t.obsm.pop("spatial"), dtype=np.float64)
    circles = ShapesModel.parse(xy, geometry=0, radius=np.ones(t.n_obs), index=np.arange(t.n_obs))
    t.obs["region"] = "cells"
    t.obs["region"] = t.obs["region"].astype("category")
    t.obs["cell_id"] = np.arange(t.n_obs)
    table = TableModel.parse(t, region="cells", region_key="region", instance_key="cell_id")
    with unsharded():
        sd.SpatialData(shapes={"cells": circles}, tables={"table": table}).write(path)
    shutil.rmtree(tiled)
    x = t.X
    return {"n_cells": int(t.n_obs), "n_genes": int(t.n_vars),
            "table_x_mb": round((x.data.nbytes + x.indices.nbytes + x.indptr.nbytes) / 2**20, 1)}


def measure(kind: str, variant: str, store: Path, work: Path) -> dict:
    """One measure in this (fresh) process: seconds and peak RSS."""
    from xscale.data.prepare import prepare

    out = work / f"{kind}-{variant}.zarr"
    t = time.perf_counter()
    if kind == "prepare":
        if variant == "current":
            prepare(store, out, progress=False)
        else:
            from xscale.data.io import read_dataset

            prepare(read_dataset(store), out, progress=False)  # the table read whole, then prepared
    elif kind == "niche_table":
        from xscale.data.spatialdata_writeback import _put_latents, write_to_spatialdata
        from xscale.data.store import CellStore
        from xscale.data.writeback import latents_in_source_order

        prepared = work / "prepared.zarr"
        if variant == "current":
            write_to_spatialdata(store, prepared, cell_key=None, niche_key=NICHE_KEY)
        else:  # the previous implementation: the niche latents reordered in memory, the table built whole
            cells = CellStore(prepared)
            _put_latents(store, None, lambda key, table: latents_in_source_order(cells, key, table.n_obs),
                         None, NICHE_KEY, None)
    else:
        from xscale.data.writeback import latents_in_source_order, write_to_spatialdata

        prepared = work / "prepared.zarr"
        if variant == "current":
            write_to_spatialdata(store, prepared)
        else:
            import spatialdata as sd

            from xscale.data.spatialdata_writeback import _write_table
            from xscale.data.store import CellStore

            sdata = sd.read_zarr(store)  # the previous implementation, as it was
            table = sdata.tables["table"]
            table.obsm["X_xscale_cell"] = latents_in_source_order(CellStore(prepared), "X_xscale_cell", table.n_obs)
            _write_table(sdata, "table")
    seconds = time.perf_counter() - t
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent into a child started by subprocess,
    # so every measure would read at least the builder's RSS
    return {"seconds": seconds, "peak_rss_mb": vm_hwm_bytes() / 2**20}


def _fresh(kind: str, variant: str, store: Path, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, variant, str(store), str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _latents(work: Path, store: Path) -> None:
    """A prepared store with cell latents (values from the source index: the write-back does not care)."""
    from xscale.data.prepare import prepare
    from xscale.data.store import CellStore
    from xscale.data.writeback import store_latent_writer

    cells = CellStore(prepare(store, work / "prepared.zarr", progress=False))
    src = cells.source_index()
    for key in ("X_xscale_cell", NICHE_KEY):
        w = store_latent_writer(cells, key, LATENT_SHAPE)
        for c in w.pending_chunks():
            a, b = w.chunk_range(c)
            w.write_chunk(c, np.broadcast_to(src[a:b, None, None], (b - a, *LATENT_SHAPE)).astype(np.float32))
        w.finalize()


def notes(result: dict) -> list[str]:
    """The JSON's numbers in words."""
    pr, wb = result["prepare"], result["write_back"]
    out = [
        f"{result['n_cells']:,} cells x {result['n_genes']} genes, the table's X {result['table_x_mb']} MB as CSR. "
        f"prepare of the SpatialData store: peak RSS {pr['current']['peak_rss_mb']:.0f} MB (table read lazily) "
        f"vs {pr['baseline']['peak_rss_mb']:.0f} MB (read whole first), ratio {pr['rss_ratio']:.2f}; time ratio "
        f"{pr['time_ratio']:.2f}.",
        f"write-back of {result['latent_dims']} latent floats per cell: {wb['current']['seconds']:.1f} s and "
        f"{wb['current']['peak_rss_mb']:.0f} MB (only obsm written, the latents reordered to the table's rows out "
        f"of core) vs {wb['baseline']['seconds']:.1f} s and {wb['baseline']['peak_rss_mb']:.0f} MB (the whole table "
        f"read and rewritten, the latents reordered in memory), time ratio {wb['time_ratio']:.2f}, RSS ratio "
        f"{wb['rss_ratio']:.2f}.",
    ]
    if "niche_table" in result:
        nt = result["niche_table"]
        out.append(
            f"niche table of {result['latent_dims']} latent floats per cell: {nt['current']['seconds']:.1f} s and "
            f"{nt['current']['peak_rss_mb']:.0f} MB (its X reordered and written block by block) vs "
            f"{nt['baseline']['seconds']:.1f} s and {nt['baseline']['peak_rss_mb']:.0f} MB (reordered in memory, "
            f"the table built whole), time ratio {nt['time_ratio']:.2f}, RSS ratio {nt['rss_ratio']:.2f}.")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=600_000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--measure", nargs=4, metavar=("KIND", "VARIANT", "STORE", "WORK"), help=argparse.SUPPRESS)
    p.add_argument("--renote", action="store_true", help="rewrite only the notes of the results JSON")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                   help="measures to run; the others' entries of an existing results file are kept")
    args = p.parse_args(argv)
    if args.renote:
        result = json.loads(RESULTS.read_text())
        result["notes"] = notes(result)
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        return 0
    if args.measure:
        kind, variant, store, work = args.measure
        print(json.dumps(measure(kind, variant, Path(store), Path(work))))
        return 0
    kept: dict = {}  # the entries of the measures not re-run
    if set(args.kinds) != set(KINDS) and RESULTS.exists():
        kept = json.loads(RESULTS.read_text())
        if kept.get("n_cells") != args.cells:
            p.error(f"{RESULTS} holds measures of {kept.get('n_cells')} cells, not --cells {args.cells}: pass "
                    "the same --cells, or run every kind (leave out --kinds).")
        kept = {k: v for k, v in kept.items() if k not in args.kinds}
    tmp = Path(tempfile.mkdtemp(prefix="xscale-sdata-bench-"))
    try:
        store = tmp / "tissue.sdata.zarr"
        t = time.perf_counter()
        result: dict = {**build(store, args.cells), "latent_dims": int(np.prod(LATENT_SHAPE)),
                        "repeats": args.repeats}
        result = {**kept, **result}
        print(f"built {store.name}: {result} in {time.perf_counter() - t:.0f} s", flush=True)
        _latents(tmp, store)
        for kind in args.kinds:
            runs: dict[str, list[dict]] = {"current": [], "baseline": []}
            for _ in range(args.repeats):
                for variant in ("baseline", "current"):
                    runs[variant].append(_fresh(kind, variant, store, tmp))
                    shutil.rmtree(tmp / f"{kind}-{variant}.zarr", ignore_errors=True)
                    print(kind, variant, runs[variant][-1], flush=True)
            summary = {v: {"peak_rss_mb": float(np.median([r["peak_rss_mb"] for r in rs])),
                           "seconds": float(np.median([r["seconds"] for r in rs])), "each": rs}
                       for v, rs in runs.items()}
            summary["rss_ratio"] = summary["current"]["peak_rss_mb"] / summary["baseline"]["peak_rss_mb"]
            summary["time_ratio"] = summary["current"]["seconds"] / summary["baseline"]["seconds"]
            result[kind] = summary
        result["notes"] = notes(result)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        print("\n".join(result["notes"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
