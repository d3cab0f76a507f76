"""Streaming benchmark: memory stays flat as the store grows; streaming keeps up with raw reads;
spatial order keeps niches in few blocks.

For a small (~100k cells) and a large (>= 1M cells) tissue built by ``tile_tissue`` from
the real STARmap cells, prepared into stores (Hilbert order, and a shuffled-order store as
the baseline), measure:

- ``peak_rss_mb``: peak RSS of the process tree (main + 2 DataLoader workers) during one
  full pass of ``CellStream`` through a DataLoader, in a fresh process (batched mode:
  ``CellStream(batch_size=1024)`` yields the ``CellBatch`` es that ``collate_cells`` would
  build, from whole blocks at once);
- ``stream_cells_per_s``: cells per second of that pass;
- ``raw_read_cells_per_s``: sequential read + decode (CSR -> dense) of every block of the
  same store, same run (the baseline);
- ``niche_chunks_per_niche``: mean number of store blocks holding a niche's cells, for
  ``NicheStream`` items on the Hilbert-ordered store and on the shuffled-order store.

Run: ``.venv/bin/python benchmarks/streaming.py`` (about 10 minutes on 2 cores; stores go
to a temporary directory and are deleted). Writes ``benchmarks/results/streaming.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "streaming.json"
CHUNK_CELLS = 8192
N_NICHES = 20_000
MAX_CELLS = 16
TILES_PER_SLIDE = 100  # ~105k cells per synthetic slide, like a large Xenium / MERSCOPE section
logger = logging.getLogger("benchmarks.streaming")


def stream_pass(store: str, batch_size: int, workers: int) -> dict:
    """One full CellStream pass through a DataLoader; peak RSS of this process and its workers."""
    import psutil
    import torch
    from torch.utils.data import DataLoader

    from xscale.data.stream import CellStream

    torch.set_num_threads(1)
    me = psutil.Process()
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], rss)
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    # batched mode: the stream builds each CellBatch from a block with array operations
    ds = CellStream(store, seed=0, buffer_size=4096, batch_size=batch_size)
    dl = DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=4)
    t0 = time.perf_counter()
    n = 0
    for batch in dl:
        n += len(batch)
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    return {"cells": n, "seconds": seconds, "peak_rss_mb": peak[0] / 2**20}


def raw_read(store_path: Path) -> float:
    """Cells per second of a sequential read + decode of every block of the store."""
    from xscale.data.store import CellStore, iter_store_blocks

    store = CellStore(store_path)
    t0 = time.perf_counter()
    n = 0
    for _, block in iter_store_blocks(store):
        n += block.toarray().shape[0]
    return n / (time.perf_counter() - t0)


def inprocess_stream(store_path: Path) -> float:
    """Cells per second of the same batched CellStream iterated in this process (diagnostic: no IPC)."""
    import torch

    from xscale.data.stream import CellStream

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    n = sum(len(b) for b in CellStream(store_path, seed=0, buffer_size=4096, batch_size=1024))
    return n / (time.perf_counter() - t0)


def niche_chunks(store_path: Path, n_niches: int) -> float:
    """Mean blocks per niche over the first ``n_niches`` NicheStream items."""
    from xscale.data.niche_stream import NicheStream, chunks_per_niche

    ds = NicheStream(store_path, max_cells=MAX_CELLS, seed=0, buffer_size=256)
    idx = []
    for item in ds:
        idx.append(item.idx)
        if len(idx) >= n_niches:
            break
    return chunks_per_niche(np.stack(idx), ds.store.chunk_cells)


def measure(n_cells: int, root: Path, seed: int) -> dict:
    import xscale
    from xscale.data.store import prepare
    from xscale.data.synthetic import tile_tissue

    t0 = time.perf_counter()
    src = tile_tissue(xscale.datasets.load("starmap_mpfc"), n_cells, out=root / "source.zarr", seed=seed,
                      slide_key="slice", chunk_cells=CHUNK_CELLS, tiles_per_slide=TILES_PER_SLIDE)
    logger.info("%d cells generated in %.0f s", n_cells, time.perf_counter() - t0)
    t0 = time.perf_counter()
    store = prepare(src, root / "store.zarr", slide_key="slide", chunk_cells=CHUNK_CELLS)
    logger.info("prepared in %.0f s", time.perf_counter() - t0)
    shuffled = prepare(src, root / "shuffled.zarr", slide_key="slide", chunk_cells=CHUNK_CELLS, curve="random")
    shutil.rmtree(src)
    out = subprocess.run([sys.executable, __file__, "--pass", str(store)], check=True, capture_output=True, text=True)
    run = json.loads(out.stdout.strip().splitlines()[-1])
    assert run["cells"] == n_cells, run
    raw = raw_read(store)
    inproc = inprocess_stream(store)
    logger.info("stream without DataLoader workers (no IPC): %.0f cells/s = %.2f of raw", inproc, inproc / raw)
    result = {
        "n_cells": n_cells,
        "peak_rss_mb": round(run["peak_rss_mb"], 1),
        "stream_cells_per_s": round(run["cells"] / run["seconds"]),
        "raw_read_cells_per_s": round(raw),
        "niche_chunks_per_niche": {
            "spatial": round(niche_chunks(store, N_NICHES), 3),
            "shuffled": round(niche_chunks(shuffled, N_NICHES), 3),
        },
    }
    logger.info("%s", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--pass", dest="pass_store", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.pass_store:  # child process: one measured pass
        print(json.dumps(stream_pass(args.pass_store, batch_size=1024, workers=2)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    results = {}
    for name, n in (("small", args.small), ("large", args.large)):
        root = Path(tempfile.mkdtemp(prefix=f"xscale_stream_{name}_", dir="/tmp"))
        try:
            results[name] = measure(n, root, seed=0)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    s, l = results["small"], results["large"]
    logger.info("RSS large/small = %.2f (goal <= 1.3); stream/raw small = %.2f, large = %.2f (goal >= 0.5); "
                "chunks per niche spatial/shuffled large = %.3f / %.3f",
                l["peak_rss_mb"] / s["peak_rss_mb"], s["stream_cells_per_s"] / s["raw_read_cells_per_s"],
                l["stream_cells_per_s"] / l["raw_read_cells_per_s"],
                l["niche_chunks_per_niche"]["spatial"], l["niche_chunks_per_niche"]["shuffled"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
