"""Render the README's benchmark table from ``benchmarks/results/*.json``.

``python benchmarks/summarize.py`` prints the markdown; ``--write README.md`` replaces the
block between ``<!-- bench:start -->`` and ``<!-- bench:end -->``. A test checks that the
README's block equals this output, so the table cannot drift from the results.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _f(x: float | None, nd: int = 3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def rows() -> list[tuple[str, str, str, str]]:
    """(benchmark, measure, xscale, baseline / goal) rows."""
    out: list[tuple[str, str, str, str]] = []
    cell = _load("cell_level")
    if cell:
        for ds in ("starmap_mpfc", "seqfish_embryo_wsir"):
            if ds not in cell:
                continue
            f1 = cell[ds]["macro_f1"]
            rec = cell[ds]["reconstruction"]
            seeds = cell.get("notes", {}).get(ds, {}).get("budget", {}).get("seeds")
            probe = "macro-F1, logistic probe" + (f", mean of {len(seeds)} seeds" if seeds else "")
            out.append((f"cell level, {ds} (held out {cell[ds]['holdout']})", probe,
                        f"xpressor {_f(f1['xpressor'])} (cls {_f(f1['cls'])}, mean {_f(f1['mean'])})",
                        f"lognorm {_f(f1['lognorm'])}, PCA {_f(f1['pca'])}"))
            per_pool = cell.get("notes", {}).get(ds, {}).get("reconstruction_per_pooling", {})
            pooled = ", ".join(f"{k} {_f(per_pool[k]['nb_deviance'])}" for k in ("cls", "mean") if k in per_pool)
            out.append((f"cell level, {ds}", "NB deviance per count (held out)",
                        f"xpressor {_f(rec['nb_deviance'])}" + (f" ({pooled})" if pooled else ""),
                        f"gene-mean baseline {_f(rec['baseline_nb_deviance'])}"))
    tissue = _load("tissue_level")
    if tissue:
        held = next(v for v in tissue["per_slice"].values() if v["role"] != "train")["scores"]
        summary = tissue["held_out_summary"]
        spread = (f" (level-2 seeds {len(summary['xscale_niche_staged_ari_by_level2_seed'])}: mean "
                  f"{_f(summary['xscale_niche_staged_ari_mean'])} ± {_f(summary['xscale_niche_staged_ari_sd'])})"
                  if "xscale_niche_staged_ari_mean" in summary else "")
        out.append(("tissue level, STARmap held-out slice", "domain ARI (k-means, 4 layers)",
                    f"staged {_f(held['xscale_niche_staged']['ari'])}{spread}, "
                    f"joint {_f(held['xscale_niche_joint']['ari'])}; "
                    f"cell latents + 10-NN mean {_f(held['xscale_cell_spatial_mean']['ari'])}",
                    f"PCA + 10-NN spatial mean {_f(held['pca_spatial_mean']['ari'])}; PCA {_f(held['pca']['ari'])}"))
    att = _load("attention")
    if att:
        r = next(r for r in att["rows"] if r["n_tokens"] == 8192)
        out.append(("criss-cross vs full attention, N = 8192", "encoder fwd+bwd speed-up / peak MB",
                    f"{r['full_ms'] / r['criss_cross_ms']:.1f}× / {_f(r['criss_cross_peak_mb'], 1)}",
                    f"goal ≥ 5× / full {_f(r['full_peak_mb'], 1)}"))
        q = att.get("quality") or {}
        if q.get("full_macro_f1") is not None:
            n = len(q.get("seeds", {}).get("paired", []))
            out.append((f"criss-cross vs full attention, level-1 quality ({n} seeds)", "held-out macro-F1, mean",
                        _f(q["criss_cross_macro_f1"]), f"full {_f(q['full_macro_f1'])} (goal gap ≤ 0.01)"))
    stream = _load("streaming")
    if stream:
        s, lg = stream["small"], stream["large"]
        out.append(("streaming, 100k vs 1M cells", "peak RSS MB",
                    f"{_f(lg['peak_rss_mb'], 0)} at 1M", f"{_f(s['peak_rss_mb'], 0)} at 100k (goal ≤ 1.3×)"))
        out.append(("streaming, 1M / 100k cells", "stream / raw read throughput",
                    f"{_f(lg['stream_cells_per_s'] / lg['raw_read_cells_per_s'], 2)} / "
                    f"{_f(s['stream_cells_per_s'] / s['raw_read_cells_per_s'], 2)}", "goal ≥ 0.5"))
        out.append(("streaming, 1M cells", "chunks per niche",
                    f"spatial order {_f(lg['niche_chunks_per_niche']['spatial'], 2)}",
                    f"shuffled order {_f(lg['niche_chunks_per_niche']['shuffled'], 2)}"))
    run = _load("store_run")
    if run:
        s, lg = run["small"], run["large"]
        out.append(("whole run (`xscale run`), 100k vs 1M cells", "peak RSS MB, 100k → 1M",
                    f"store (out of core) {_f(s['store']['peak_rss_mb'], 0)} → {_f(lg['store']['peak_rss_mb'], 0)} "
                    f"({run['rss_ratio_large_over_small_store']:.2f}×)",
                    f"in memory {_f(s['memory']['peak_rss_mb'], 0)} → {_f(lg['memory']['peak_rss_mb'], 0)} "
                    f"({run['rss_ratio_large_over_small_memory']:.2f}×)"))
    sdio = _load("spatialdata_io")
    if sdio:
        pr, wb, n = sdio["prepare"], sdio["write_back"], f"{sdio['n_cells'] // 1000}k cells"
        out.append((f"SpatialData input, `prepare` ({n}, table X {sdio['table_x_mb']:.0f} MB)", "peak RSS MB / s",
                    f"table read lazily {pr['current']['peak_rss_mb']:.0f} / {pr['current']['seconds']:.1f}",
                    f"read whole first {pr['baseline']['peak_rss_mb']:.0f} / {pr['baseline']['seconds']:.1f}"))
        out.append((f"SpatialData write-back of cell latents ({n})", "peak RSS MB / s",
                    f"obsm written alone {wb['current']['peak_rss_mb']:.0f} / {wb['current']['seconds']:.1f}",
                    f"whole table rewritten {wb['baseline']['peak_rss_mb']:.0f} / {wb['baseline']['seconds']:.1f}"))
        if "niche_table" in sdio:
            nt = sdio["niche_table"]
            out.append((f"SpatialData write-back, niche table ({n})", "peak RSS MB / s",
                        f"X written block by block {nt['current']['peak_rss_mb']:.0f} / {nt['current']['seconds']:.1f}",
                        f"built in memory {nt['baseline']['peak_rss_mb']:.0f} / {nt['baseline']['seconds']:.1f}"))
    peft = _load("peft")
    if peft:
        m = peft["macro_f1"]
        out.append(("fine-tuning, MERFISH spatial half", "macro-F1",
                    f"PEFT {_f(m['peft_xpressor'])} ({peft['trainable_fraction']:.1%} trainable)",
                    f"probe {_f(m['linear_probe'])}, full {_f(m['full_finetune'])}, scratch {_f(m['from_scratch'])}"))
        bc = peft.get("batch_correction", {})
        if "starmap_mpfc" in bc and "seqfish_embryo_wsir" in bc:
            st, sq = bc["starmap_mpfc"], bc["seqfish_embryo_wsir"]
            out.append(("slide correction (PEFT), STARmap / seqFISH", "slide-mixing gain",
                        f"{st['mixing_gain']:+.3f} / {sq['mixing_gain']:+.3f}",
                        f"purity drop {st['purity_drop']:+.3f} / {sq['purity_drop']:+.3f} (goal < 0.02)"))
    step = _load("finetune_step")
    if step and "peft_pretrain_shape" in step:
        a, b = step["peft_pretrain_shape"], step.get("small_preset", {})
        out.append(("slide-correction training step, encoder shared with the frozen reference",
                    "speed-up vs the reference's own pass (CPU)",
                    f"{a['speedup']:.2f}× (8 layers)" + (f", {b['speedup']:.2f}× (small preset)" if b else ""),
                    f"naive {a['naive_ms_per_step']:.0f} ms/step, shared {a['shared_ms_per_step']:.0f}"))
    thr = _load("throughput")
    if thr:
        l1 = thr["level1"]
        out.append(("throughput, level-1 embedding (1 thread)", "cells per CPU-second",
                    _f(l1["starmap_tl_embed_cells"]["per_s_cpu"], 0),
                    f"PCA transform {_f(l1['pca50_reference']['per_s_cpu'], 0)}"))
    return out


def markdown() -> str:
    lines = ["| benchmark | measure | xscale | baseline / goal |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows()]
    return "\n".join(lines) + "\n"


def write(readme: Path) -> None:
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{markdown()}{END}{tail}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", type=Path, help="README to update in place")
    args = ap.parse_args()
    if args.write:
        write(args.write)
    else:
        print(markdown(), end="")
