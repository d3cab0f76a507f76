"""Inference throughput: cells/s (level 1), niches/s (level 2), a PCA reference, and Dask 1 vs 2 workers.

Writes ``benchmarks/results/throughput.json``. Models are the demo presets ("small" for
both levels) with random weights: speed does not depend on what the weights learned.
Data: the bundled STARmap slices (166-gene panel) for the single-panel numbers, and a
mixed-panel set (STARmap 166 + PBMC 400 + MERFISH lung 479 genes, one shared vocabulary,
cells interleaved) for the padding / length-bucketing numbers.

Each inference change kept in the library is measured before/after in the same run:
grad-enabled eval forward vs ``torch.no_grad`` vs ``torch.inference_mode`` (what
``xscale.tl.embed_cells`` and ``niche_embeddings`` use); arrival-order batches vs
length-bucketed batches on mixed panels; eager vs ``torch.compile`` (optional, reported
with its compile time). Timings: CPU seconds of this process with torch on 1 thread
(the 2 cores are shared with other jobs; wall seconds are recorded beside them).

Run: ``.venv/bin/python benchmarks/throughput.py`` (a few minutes; ``--no-compile``, ``--no-dask`` to skip parts).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("benchmarks.throughput")
OUT = Path(__file__).parent / "results" / "throughput.json"


def _clock(fn) -> tuple[float, float, Any]:
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c0, time.perf_counter() - w0, out


TIMING = {"repeats": 5}  # timed passes per measurement (median reported); --repeats sets it


def _clock_median(fn) -> tuple[float, float, Any]:
    """Median CPU and wall seconds of TIMING["repeats"] calls of ``fn``; returns the last call's output."""
    runs = [_clock(fn) for _ in range(TIMING["repeats"])]
    return float(np.median([r[0] for r in runs])), float(np.median([r[1] for r in runs])), runs[-1][2]


def _rate(n: int, cpu: float, wall: float, **extra: Any) -> dict[str, Any]:
    return {"items": n, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "per_s_cpu": round(n / max(cpu, 1e-9), 1),
            "per_s_wall": round(n / max(wall, 1e-9), 1), **extra}


def _batches(ds, order: np.ndarray, batch_size: int, max_genes: int):
    from xscale.data.batch import collate_cells

    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        yield idx, collate_cells([ds[int(i)] for i in idx], max_genes=max_genes, rng=np.random.default_rng(lo))


def _embed(model, ds, order: np.ndarray, batch_size: int, mode: str) -> tuple[np.ndarray, float]:
    """Embed ``ds`` in ``order``; returns (latents in dataset order, padding fraction)."""
    out = np.empty((len(ds), model.config.embedding_dim), dtype=np.float32)
    pad = total = 0
    ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with ctx():
        for idx, b in _batches(ds, order, batch_size, model.config.inference_context):
            out[idx] = model.embed(b.gene_ids, b.values, b.pad_mask).detach().numpy()
            pad += int(b.pad_mask.sum())
            total += b.pad_mask.numel()
    return out, pad / max(total, 1)


def level1(batch_size: int, compile_: bool) -> dict[str, Any]:
    import xscale
    from xscale.data.anndata_dataset import AnnDataCellDataset, vocab_from_adatas
    from xscale.eval.metrics import log_normalized, pca
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig

    res: dict[str, Any] = {}
    star = xscale.datasets.load("starmap_mpfc")
    mixed = [star, xscale.datasets.load("pbmc3k_subset_profast"), xscale.datasets.load("merfish_lung_tessera")]
    vocab = vocab_from_adatas(mixed)
    torch.manual_seed(0)
    model = GeneToCell(GeneToCellConfig.preset("small", genes=vocab.genes)).eval()
    res["model"] = {"preset": "small", "dim": model.config.dim, "depth": model.config.depth,
                    "encoder": model.config.encoder, "n_latents": model.config.n_latents,
                    "max_genes": model.config.max_genes, "vocabulary": len(vocab.genes)}
    ds = AnnDataCellDataset(star, vocab)
    order = np.arange(len(ds))
    base = None
    for mode in ("grad", "no_grad", "inference_mode"):
        cpu, wall, (z, padf) = _clock_median(lambda m=mode: _embed(model, ds, order, batch_size, m))
        base = z if base is None else base
        assert np.allclose(z, base, atol=1e-5), "inference modes must give the same latents"
        res[f"starmap_{mode}"] = _rate(len(ds), cpu, wall, batch_size=batch_size, padding_fraction=round(padf, 4))
        log.info("level 1 %s: %s", mode, res[f"starmap_{mode}"])
    # Library path: xscale.tl.embed_cells (inference_mode, in cell order).
    from xscale.tl.cells import embed_cells

    a = star.copy()
    cpu, wall, _ = _clock_median(lambda: embed_cells(a, model, batch_size=batch_size))
    res["starmap_tl_embed_cells"] = _rate(a.n_obs, cpu, wall, batch_size=batch_size)
    # PCA reference on the same cells: log-normalise + transform (fit timed separately).
    cpu_fit, wall_fit, (proj,) = _clock(lambda: pca(log_normalized(star.X), n_components=50)[:1])
    from sklearn.decomposition import PCA

    model_pca = PCA(n_components=50, random_state=0).fit(log_normalized(star.X))
    # One pass over 3,190 cells takes ~1 ms: repeat it until >= 0.5 s of CPU so the rate is not timer noise.
    reps = 1
    while True:
        cpu, wall, _ = _clock(lambda r=reps: [model_pca.transform(log_normalized(star.X)) for _ in range(r)])
        if cpu >= 0.5 or reps >= 2**16:
            break
        reps *= 4
    res["pca50_reference"] = _rate(star.n_obs * reps, cpu, wall, fit_plus_transform_cpu_s=round(cpu_fit, 3),
                                   passes=reps, note="log-normalise + PCA(50).transform of the same cells "
                                   "(sklearn, BLAS), repeated `passes` times; items = cells x passes")
    # Mixed panels: arrival order (interleaved) vs length-bucketed batches. The preset samples a context of
    # max_genes genes per cell (no padding when every panel is longer); with whole panels (max_genes=512 covers
    # 166, 400 and 479 genes) short panels are padded to the longest in their batch.
    torch.manual_seed(0)
    model = GeneToCell(GeneToCellConfig.preset("small", genes=vocab.genes, max_genes=512)).eval()
    res["mixed_model_max_genes"] = 512
    mds = AnnDataCellDataset(mixed, vocab)
    lengths = np.array([len(mds[i].gene_ids) for i in range(len(mds))])
    rng = np.random.default_rng(0)
    interleaved = rng.permutation(len(mds))
    bucketed = interleaved[np.argsort(lengths[interleaved], kind="stable")]
    ref = None
    for name, order_ in (("mixed_arrival_order", interleaved), ("mixed_length_bucketed", bucketed)):
        cpu, wall, (z, padf) = _clock_median(lambda o=order_: _embed(model, mds, o, batch_size, "inference_mode"))
        ref = z if ref is None else ref
        res[name] = _rate(len(mds), cpu, wall, batch_size=batch_size, padding_fraction=round(padf, 4),
                          max_abs_diff_vs_arrival=float(np.abs(z - ref).max()))
        log.info("level 1 %s: %s", name, res[name])
    if compile_:
        try:
            compiled = torch.compile(model.encode, dynamic=True)
            t0 = time.perf_counter()
            with torch.inference_mode():
                b = next(_batches(ds, order, batch_size, model.config.inference_context))[1]
                compiled(b.gene_ids, b.values, b.pad_mask)
            compile_s = time.perf_counter() - t0

            def run() -> None:
                with torch.inference_mode():
                    for _, bb in _batches(ds, order, batch_size, model.config.inference_context):
                        compiled(bb.gene_ids, bb.values, bb.pad_mask)

            cpu, wall, _ = _clock_median(run)
            res["starmap_inference_mode_compiled"] = _rate(len(ds), cpu, wall, batch_size=batch_size,
                                                           compile_wall_s=round(compile_s, 1))
        except Exception as err:  # compile needs a C compiler; record why it did not run
            res["starmap_inference_mode_compiled"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        log.info("level 1 compiled: %s", res["starmap_inference_mode_compiled"])
    res["_latents"] = base
    return res


def level2(latents: np.ndarray, batch_size: int) -> dict[str, Any]:
    import xscale
    from xscale.models.cell_to_tissue import CellToTissue, CellToTissueConfig
    from xscale.tl.niches import niche_embeddings
    from xscale.train.level2 import NicheDataset, make_niches

    star = xscale.datasets.load("starmap_mpfc")
    meta = xscale.datasets.info("starmap_mpfc")
    coords, slides = np.asarray(star.obsm["spatial"]), star.obs[meta.slide_key].astype(str).to_numpy()
    torch.manual_seed(0)
    model = CellToTissue(CellToTissueConfig.preset("small", in_dim=latents.shape[1])).eval()
    res: dict[str, Any] = {"model": {"preset": "small", "max_cells": model.config.max_cells,
                                     "encoder": model.config.encoder, "dim": model.config.dim}}
    cpu, wall, _ = _clock(lambda: niche_embeddings(model, latents, coords, slides=slides, batch_size=batch_size))
    res["tl_niche_embeddings"] = _rate(len(star), cpu, wall, batch_size=batch_size,
                                       note="includes the spatial graph and niche construction")
    niches = make_niches(coords, np.arange(len(star)), max_cells=model.config.max_cells, slides=slides)
    data = NicheDataset(latents, niches)
    for mode in ("grad", "inference_mode"):
        ctx = torch.enable_grad if mode == "grad" else torch.inference_mode

        def run(ctx=ctx) -> None:
            with ctx():
                for b in data.loader(batch_size, shuffle=False):
                    model.embed(b.cell_latents, b.rel_xy, b.pad_mask)

        cpu, wall, _ = _clock_median(run)
        res[f"model_only_{mode}"] = _rate(len(data), cpu, wall, batch_size=batch_size,
                                          padding_fraction=round(float(niches.pad_mask.mean()), 4))
        log.info("level 2 %s: %s", mode, res[f"model_only_{mode}"])
    return res


def dask_workers(batch_size: int) -> dict[str, Any]:
    import xscale
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.io import save_model
    from xscale.tl.dask_embed import embed_store, embed_store_dask

    star = xscale.datasets.load("starmap_mpfc")
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        star.write_zarr(tmp / "cells.zarr")
        torch.manual_seed(0)
        save_model(GeneToCell(GeneToCellConfig.preset("small", genes=[str(g) for g in star.var_names])), tmp / "m")
        cpu, wall, ref = _clock(lambda: embed_store(tmp / "cells.zarr", tmp / "m", batch_size=batch_size,
                                                   chunk_rows=512))
        res["single_process"] = _rate(len(star), cpu, wall, threads=1)
        import zarr

        for n in (1, 2):
            _, wall, out = _clock(lambda n=n: embed_store_dask(tmp / "cells.zarr", tmp / "m", tmp / f"o{n}.zarr",
                                                                n_workers=n, chunk_rows=512, batch_size=batch_size))
            info = dict(zarr.open_group(out, mode="r").attrs["xscale_dask"])
            import anndata as ad

            same = bool(np.array_equal(np.asarray(ad.read_zarr(out).obsm["X_xscale_cell"]), ref))
            res[f"dask_{n}_workers"] = {**_rate(len(star), info["task_seconds"], wall), "identical_to_single": same,
                                        "chunks": info["chunks"], "note": "wall includes cluster start-up; cpu_s = "
                                        "sum of task seconds inside the workers"}
            log.info("dask %d workers: %s", n, res[f"dask_{n}_workers"])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-dask", action="store_true")
    p.add_argument("--repeats", type=int, default=TIMING["repeats"],
                   help="timed passes per measurement (median reported)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    TIMING["repeats"] = args.repeats
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "machine": {"cpu": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "method": "per_s_cpu = items / CPU seconds of the measured loop (torch on 1 thread; the 2 cores are shared "
                  "with other jobs, so wall-clock rates are noisier); per_s_wall beside it. Random-weight models of "
                  "the demo presets. Median of `repeats` passes per measurement (one pass for the niche pipeline "
                  "with its "
                  "graph, the PCA reference (timed over `passes` passes) and the Dask runs), batch size as listed.",
        "repeats": TIMING["repeats"],
    }
    l1 = level1(args.batch_size, not args.no_compile)
    latents = l1.pop("_latents")
    result["level1"] = l1
    result["level2"] = level2(latents, args.batch_size)
    g, i = l1["starmap_grad"]["per_s_cpu"], l1["starmap_inference_mode"]["per_s_cpu"]
    a, b = l1["mixed_arrival_order"]["per_s_cpu"], l1["mixed_length_bucketed"]["per_s_cpu"]
    result["speedups"] = {
        "inference_mode_vs_grad_level1": round(i / g, 2),
        "length_bucketing_vs_arrival_mixed_panels": round(b / a, 2),
        "inference_mode_vs_grad_level2": round(result["level2"]["model_only_inference_mode"]["per_s_cpu"]
                                               / result["level2"]["model_only_grad"]["per_s_cpu"], 2),
        "level1_vs_pca_reference": round(i / l1["pca50_reference"]["per_s_cpu"], 4),
    }
    compiled = l1.get("starmap_inference_mode_compiled", {})
    if "per_s_cpu" in compiled:
        result["speedups"]["compiled_vs_eager_level1"] = round(compiled["per_s_cpu"] / i, 2)
    result["gpu"] = None
    result["gpu_note"] = "no GPU machine was lent to this task; bf16 autocast on GPU not measured"
    _write(result, args.out)
    if not args.no_dask:
        try:
            result["dask"] = dask_workers(args.batch_size)
        except Exception as err:  # record, keep the rest of the results
            result["dask"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        _write(result, args.out)


def _write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
