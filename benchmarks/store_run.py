"""Whole-run memory: ``xscale run`` on a prepared store (out of core) against the same run in memory.

For a small (100k cells) and a large (1M cells) tissue built by ``tile_tissue`` from the real
STARmap cells, each in a fresh process, with the same budget (tiny presets, ``--max-steps``
optimiser steps per level, 8 domains):

- ``store``: ``xscale.train.store_run.run_store`` on the store from ``xscale prepare``
  (``xscale run --data STORE``): both levels train streaming the store, latents are written into it;
- ``memory``: the AnnData read whole (``read_dataset``) and ``run_staged`` on it
  (``xscale run --data SOURCE.zarr``), the baseline.

Per run: ``peak_rss_mb`` (the process tree, sampled every 20 ms), ``seconds``, and the seconds of
each stage. The figure of merit is ``rss_ratio_large_over_small`` per mode: how much peak memory
grows when the tissue grows tenfold. Also the cells' latents of the two modes are not compared
(training differs in batch order); quality is measured elsewhere (benchmarks/tissue_level.py).

Run: ``.venv/bin/python benchmarks/store_run.py`` (~15-25 minutes on 2 cores). Writes
``benchmarks/results/store_run.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from streaming import CHUNK_CELLS, TILES_PER_SLIDE, tree_rss_bytes  # noqa: E402  (the same tissues, RSS reader)

RESULTS = Path(__file__).parent / "results" / "store_run.json"
MAX_STEPS = 30
N_DOMAINS = 8
logger = logging.getLogger("benchmarks.store_run")


def child(mode: str, data: str, out: str) -> dict:
    """One run in this (fresh) process; returns its seconds and stage seconds."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    budget = dict(level1_max_steps=MAX_STEPS, level2_max_steps=MAX_STEPS, n_domains=N_DOMAINS, progress=False)
    if mode == "store":
        from xscale.train.store_run import run_store

        result = run_store(data, out, level1_preset="tiny", level2_preset="tiny", **budget)
    else:
        from xscale.data.io import read_dataset
        from xscale.train.staged import run_staged

        adata = read_dataset(data, slide_key="slide")
        result = run_staged(adata, out, level1_preset="tiny", level2_preset="tiny", slide_key="slide", **budget)
    return {"seconds": time.perf_counter() - t0, "stage_seconds": {k: round(v, 1) for k, v in result.seconds.items()}}


def measure(mode: str, data: Path, out: Path) -> dict:
    """:func:`child` in a fresh process; the peak RSS of that process and its children (DataLoader
    workers, if any), sampled from here every 20 ms (this process, which built the tissues, is not counted)."""
    cmd = [sys.executable, __file__, "--child", mode, str(data), str(out)]
    peak = 0
    with tempfile.TemporaryFile("w+") as log_out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_out, text=True)
        while proc.poll() is None:
            peak = max(peak, tree_rss_bytes(proc.pid))
            time.sleep(0.02)
        stdout = proc.stdout.read()
        if proc.returncode:
            log_out.seek(0)
            raise RuntimeError(f"{mode} run failed ({proc.returncode}):\n{log_out.read()[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"peak_rss_mb": round(peak / 2**20, 1), "seconds": round(result["seconds"], 1),
            "stage_seconds": result["stage_seconds"]}


def tissue(n_cells: int, root: Path) -> tuple[Path, Path]:
    """(source AnnData zarr, prepared store) of an ``n_cells`` tissue tiled from STARmap."""
    import xscale
    from xscale.data.prepare import prepare
    from xscale.data.synthetic import tile_tissue

    src = tile_tissue(xscale.datasets.load("starmap_mpfc"), n_cells, out=root / "source.zarr", seed=0,
                      slide_key="slice", chunk_cells=CHUNK_CELLS, tiles_per_slide=TILES_PER_SLIDE)
    store = prepare(src, root / "store.zarr", slide_key="slide", chunk_cells=CHUNK_CELLS, progress=False)
    return Path(src), Path(store)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=100_000)
    p.add_argument("--large", type=int, default=1_000_000)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", nargs=3, metavar=("MODE", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        logging.disable(logging.WARNING)
        print(json.dumps(child(*args.child)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results: dict = {"settings": {"presets": "tiny", "max_steps_per_level": MAX_STEPS, "n_domains": N_DOMAINS,
                                  "chunk_cells": CHUNK_CELLS, "torch_threads": 1}}
    for size, n in (("small", args.small), ("large", args.large)):
        with tempfile.TemporaryDirectory(prefix=f"xscale_store_run_{size}_") as tmp:
            root = Path(tmp)
            src, store = tissue(n, root)
            entry = {"n_cells": n}
            for mode in ("store", "memory"):
                data = store if mode == "store" else src
                entry[mode] = measure(mode, data, root / f"run_{mode}")
                logger.info("%s %s: %s", size, mode, entry[mode])
                shutil.rmtree(root / f"run_{mode}", ignore_errors=True)
            results[size] = entry
    for mode in ("store", "memory"):
        results[f"rss_ratio_large_over_small_{mode}"] = round(
            results["large"][mode]["peak_rss_mb"] / results["small"][mode]["peak_rss_mb"], 3)
    results["load_average_1min"] = round(os.getloadavg()[0], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
