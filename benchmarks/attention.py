"""Criss-cross vs full attention: speed, peak memory and cell-level quality, one run.

Writes ``benchmarks/results/attention.json``:

- ``rows``: for n_tokens in {512, 2048, 8192, 32768}, D=128, H=4, M=64, batch 1,
  forward + backward: the whole 2-layer encoder (``full_ms`` / ``criss_cross_ms``),
  the token-mixing sublayer alone (``full_attn_ms`` / ``criss_cross_attn_ms``: full =
  pre-norm self-attention block; criss-cross = latents read tokens, latents mix + MLP,
  tokens read latents), and the encoder's peak extra memory (``*_peak_mb``).
- ``quality``: level-1 ``GeneToCell`` (preset "small") trained on the STARmap training
  slices with the encoder switched, same steps / seed / batch; logistic probe on the
  cell embeddings, trained on the training slices, scored on the held-out slice.
- ``ablations``: the criss-cross variants that explain why the published one lost
  accuracy (no latent MLP, few latents, parallel hops, padding leaking into latents).

Run: ``.venv/bin/python benchmarks/attention.py``. On an idle 2-core machine the speed half takes
about 10 min (full attention at N=32768 is ~1 CPU-minute per pass) and each quality run (train
1600 steps + embed + probe) 2-3 minutes on one core. ``--skip-quality`` / ``--skip-speed`` run one half
and keep the other half of an existing JSON; ``--quality-runs VARIANT:SEED ...`` appends single
runs to ``--quality-jsonl`` (to spread them over processes) and ``--collect-quality`` summarises.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from proc_memory import vm_hwm_bytes

from xscale.nn import CrissCrossEncoder, Encoder, SelfAttentionBlock
from xscale.nn.encoders import CrissCrossMixing

log = logging.getLogger("benchmarks.attention")
OUT = Path(__file__).parent / "results" / "attention.json"
D, HEADS, M, DEPTH = 128, 4, 64, 2
SIZES = (512, 2048, 8192, 32768)


NOTES = [
    "FLOP ceilings at N=8192, D=128, M=64, multiply-adds per token per layer: full token mixing = 4·D² "
    "(projections) + 2·N·D (attention) = (512 + 16,384)·D; criss-cross = 4·D² + 4·M·D = (512 + 256)·D. Ratio 22x "
    "with projections counted (64x counting the attention products only); whole encoder ~10x because the token "
    "MLP (8·D² = 1,024·D) costs the same in both.",
    "Speed work kept in xscale.nn.encoders: one LayerNorm shared by both hops (tokens do not change between them) "
    "and one fused (D -> 3D) matmul for the read keys/values and the write queries. A probe at N=8192 (1 thread) "
    "measured the unfused sublayer at ~88 ms CPU vs ~71 ms fused.",
    "Memory work kept: the shared LayerNorm output is recomputed in backward (custom autograd function, gradcheck-"
    "tested) instead of stored. Allocator peak at N=8192 went from 134.4 MB (above full's 132.6 MB) to 126.3 MB; "
    "checkpointing LayerNorm+matmul instead gave the same 126.3 MB but recomputes the matmul.",
    "Padding: in our encoder the latents' read uses pad_mask, so a cell's embedding is independent of how much "
    "padding its batch adds (tests/nn: padding invariance). The 'padding_leak' ablation re-uses the trained "
    "criss-cross weights, drops that mask, and embeds held-out cells with 166 extra padding tokens: see its F1. "
    "Single-panel STARmap batches have no padding at all, so the leak cannot show in the main comparison; it bites "
    "in multi-panel training and whenever inference batches are padded differently from training.",
    "Quality pair since 2026-11-24 (second run of the day): the level-1 model of benchmarks/cell_level.py unchanged "
    "(preset 'small': D=32, depth 1, K=16, context 192 = the whole 166-gene panel, standardised inputs; 1600 steps, "
    "batch 64, lr 3e-3), only the encoder switched; 5 seeds each. The full-attention seed 0 run reproduces "
    "cell_level.json's STARmap xpressor score exactly (0.5823). Held-out macro-F1: full 0.582 / 0.576 / 0.615 / "
    "0.566 / 0.590 (mean 0.586); criss-cross 0.603 / 0.608 / 0.585 / 0.602 / 0.613 (mean 0.602): criss-cross is "
    "not worse (gap full - criss-cross = -0.016) and varies less across seeds (range 0.028 vs 0.049).",
    "Earlier pinned-model runs (the morning of 2026-11-24, kept in attention_quality_runs_pinned_2026_11_24.jsonl): "
    "D=64, depth 2, K=8, context 512, unstandardised inputs, 400 steps. Full 0.476 / 0.552 / 0.527 / 0.522 / 0.566 "
    "(mean 0.529), criss-cross 0.557 / 0.424 / 0.500 / 0.279 / 0.514 (mean 0.455): at that short budget criss-cross "
    "was lower and unstable (seed 3 reached the same loss as full, 4.37 vs 4.38, yet probed at 0.279). The next "
    "note has that seed trained to the benchmark's 1600 steps.",
    "Does the gap depend on the model? quality_diagnostics (attention_quality_diagnostics.jsonl; same 1600-step "
    "budget, lr 3e-3): 'small_depth2' (the small preset with 2 encoder layers), seeds 0-4: full 0.541 / 0.599 / "
    "0.556 / 0.570 / 0.611 (mean 0.575), criss-cross 0.513 / 0.589 / 0.537 / 0.559 / 0.571 (mean 0.554): gap 0.022, "
    "criss-cross lower on every seed (by 0.010-0.040); 'pinned' (D=64, depth 2, K=8) seed 3 full 0.538, criss-cross "
    "0.416 (0.279 at 400 steps), and 0.373 with standardised inputs ('pinned_standardised'). So the gap is within "
    "the goal for the benchmark's one-layer model but not for two stacked criss-cross layers, where it is a "
    "consistent ~0.02 (and larger for the wider K=8 model on some seeds), for reasons not yet found (not padding: "
    "STARmap batches have none; not the input scaling; not only the budget).",
    "Padding leak (the published behaviour: latents also read padded tokens), measured on each criss-cross seed of "
    "the 'small' runs with the same weights and 166 extra padding tokens per held-out cell: 0.603 -> 0.427, "
    "0.608 -> 0.587, 0.585 -> 0.377, 0.602 -> 0.098, 0.613 -> 0.249. With our pad mask the scores are unchanged "
    "by construction. This is the largest single cause we measured of criss-cross losing accuracy.",
    "Ablations with the 'small' model, seed 0 (criss-cross 0.603, full 0.582 on that seed): parallel read/write "
    "hops 0.618, no MLP on the latents 0.588, 4 encoder latents instead of 32 0.547, 'published_like' (4 latents, "
    "no latent MLP, no latent self-attention, parallel hops) 0.592. One seed each: seed-to-seed spread of the "
    "criss-cross run is 0.028, so only '4 latents' (-0.056) is clearly below. The 2026-11-23 one-seed ablations "
    "(earlier preset) are kept under ablations_2026_11_23.",
    "2026-11-24 (third session): the small preset gained the linear read-out term (w_readout=1) and the cell-level "
    "budget grew to 3200 steps. The committed pair above stays pinned to w_readout=0 / 1600 steps; the pair on the "
    "current preset ('--quality-model small_readout --quality-steps 3200', 5 seeds each, raw runs in "
    "attention_quality_readout_runs_default_init.jsonl): full 0.686 / 0.675 / 0.678 / 0.677 / 0.667 (mean 0.677; "
    "seed 0 "
    "reproduces cell_level.json's 0.686), criss-cross 0.666 / 0.670 / 0.669 / 0.667 / 0.676 (mean 0.670): gap "
    "0.007, within the 0.01 goal, criss-cross lower on 4 of 5 seeds. Padding leak on those criss-cross weights: "
    "0.154 / 0.558 / 0.648 / 0.416 / 0.503 with 166 padding tokens (masked: unchanged). Those runs used the "
    "read-out head's default start.",
    "2026-11-24 (fourth session): the read-out head now starts small (GeneToCell). The pair re-run on the small "
    "preset with read-out weight 1 (the preset's weight then; 3 since later that session, not re-run) with "
    "the same command (raw runs in attention_quality_readout_runs.jsonl): full 0.664 / 0.649 / 0.690 / "
    "0.659 / 0.678 (mean 0.668; seed 0 reproduced cell_level.json's 0.664 of that run), criss-cross 0.684 / "
    "0.663 / 0.684 / 0.674 / 0.661 (mean 0.673): criss-cross 0.005 higher, higher on 3 of 5 seeds. Padding leak: "
    "0.627 / 0.588 / "
    "0.651 / 0.598 / 0.555.",
]


# ---------------------------------------------------------------------------- speed
def _encoder(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return Encoder(D, DEPTH, HEADS) if kind == "full" else CrissCrossEncoder(D, DEPTH, HEADS, M)


def _step_fn(kind: str, part: str, n: int):
    """A closure running one forward + backward on (1, n, D) random tokens."""
    torch.manual_seed(0)
    x = torch.randn(1, n, D, requires_grad=True)
    if part == "encoder":
        module = _encoder(kind)
        return lambda: module(x).sum().backward()
    if kind == "full":
        block = SelfAttentionBlock(D, heads=HEADS)
        return lambda: block(x).sum().backward()
    mixing = CrissCrossMixing(D, HEADS)
    latents = torch.nn.Parameter(torch.randn(1, M, D) * 0.02)
    return lambda: mixing(x, latents, None)[0].sum().backward()


def _timed(fn, repeats: int, warmup: bool = True) -> tuple[float, float]:
    """Median CPU ms and median wall ms over ``repeats`` calls (after one warm-up call if ``warmup``)."""
    if warmup:
        fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append((time.process_time() - c0) * 1e3)
        wall.append((time.perf_counter() - w0) * 1e3)
    return statistics.median(cpu), statistics.median(wall)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _allocator_peak(fn) -> float:
    """Peak bytes held by torch's CPU allocator during ``fn()``, from the profiler's memory accounting."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:  # allocations and frees in time order
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return float(peak)


def peak_one(kind: str, n: int) -> dict[str, Any]:
    """Run in a fresh process: extra memory (MB) of one encoder forward + backward at n tokens.

    ``peak_mb``: torch allocator (profiler memory accounting, deterministic); ``peak_rss_mb``:
    resident-set growth (VmHWM after resetting it), which also sees malloc/arena effects.
    """
    torch.set_num_threads(1)
    _step_fn(kind, "encoder", 64)()  # warm every kernel path on a tiny input first
    fn = _step_fn(kind, "encoder", n)
    import gc

    gc.collect()
    before = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:  # Linux >= 4.0: 5 resets the peak-RSS counter (VmHWM)
        f.write("5")
    fn()
    rss_peak = vm_hwm_bytes() - before
    return {"peak_mb": round(_allocator_peak(fn) / 2**20, 1), "peak_rss_mb": round(max(rss_peak, 0) / 2**20, 1)}


def speed(sizes: tuple[int, ...], full_max_n: int, repeats: int) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    rows = []
    for n in sizes:
        row: dict[str, Any] = {"n_tokens": n}
        run_full = n <= full_max_n
        reps = repeats if n <= 8192 else max(1, repeats // 3)
        for part, key in (("encoder", "{}_ms"), ("sublayer", "{}_attn_ms")):
            for kind, name in (("criss-cross", "criss_cross"), ("full", "full")):
                if kind == "full" and not run_full:
                    row[key.format(name)] = None
                    continue
                cpu, wall = _timed(_step_fn(kind, part, n), reps, warmup=n <= 8192)
                row[key.format(name)] = round(cpu, 2)
                row[key.format(name).replace("_ms", "_wall_ms")] = round(wall, 2)
                log.info("N=%d %s %s: %.1f ms CPU (%.1f ms wall)", n, part, kind, cpu, wall)
        for kind, name in (("full", "full"), ("criss-cross", "criss_cross")):
            if kind == "full" and not run_full:
                row[f"{name}_peak_mb"] = None
                continue
            row[f"{name}_peak_mb"] = round(_allocator_peak(_step_fn(kind, "encoder", n)) / 2**20, 1)
        row["repeats"] = reps
        row["warmup"] = n <= 8192
        if row["full_ms"] is not None:
            row["encoder_speedup"] = round(row["full_ms"] / row["criss_cross_ms"], 2)
            row["attn_speedup"] = round(row["full_attn_ms"] / row["criss_cross_attn_ms"], 2)
        rows.append(row)
        log.info("row %s", row)
    return rows


# ---------------------------------------------------------------------------- quality
class _LeakyCrissCross(CrissCrossEncoder):
    """The published variant's padding bug: latents read padded tokens too."""

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(tokens, None)


def _embed(model, adata, vocab, *, batch_size: int = 256, extra_pad: int = 0) -> np.ndarray:
    """(n_cells, K·D) embeddings; ``extra_pad`` appends that many padding tokens to every cell."""
    from xscale.data.anndata_dataset import AnnDataCellDataset
    from xscale.data.batch import collate_cells

    ds = AnnDataCellDataset(adata, vocab)
    out = []
    with torch.inference_mode():
        for lo in range(0, len(ds), batch_size):
            b = collate_cells([ds[i] for i in range(lo, min(lo + batch_size, len(ds)))], max_genes=None)
            ids, values, pad = b.gene_ids, b.values, b.pad_mask
            if extra_pad:
                z = torch.zeros(len(b), extra_pad, dtype=ids.dtype)
                ids = torch.cat([ids, z], 1)
                values = torch.cat([values, torch.rand(len(b), extra_pad) * values.max()], 1)
                pad = torch.cat([pad, torch.ones(len(b), extra_pad, dtype=torch.bool)], 1)
            out.append(model.embed(ids, values, pad).numpy())
    return np.concatenate(out)


def _fit(train, config, *, steps: int, seed: int, out_dir: Path, lr: float, encoder_factory=None):
    """fit_level1 with an optional replacement encoder (benchmark-only ablations)."""
    import xscale.models.gene_to_cell as g2c
    from xscale.train.level1 import fit_level1

    original = g2c.build_encoder
    if encoder_factory is not None:
        g2c.build_encoder = lambda name, **kw: encoder_factory(**kw)
    try:
        return fit_level1(train, config, out_dir=out_dir, max_steps=steps, batch_size=64, seed=seed, lr=lr,
                          logger="none", enable_progress_bar=False, accelerator="cpu", val_fraction=0.0)
    finally:
        g2c.build_encoder = original


# The quality pair is the level-1 model of benchmarks/cell_level.py as it was when measured: preset "small",
# its budget then (1600 steps, batch 64, lr 3e-3); only the encoder is switched. (Until 2026-11-24 the
# pair used a pinned D=64 / depth-2 / K=8 / context-512 model at 400 steps: see NOTES.)
# "pinned": the model of the first 2026-11-24 re-run, kept to check whether its instability was a budget effect.
# The committed pair was measured before the small preset gained the linear read-out term (w_readout=1) and the
# cell-level budget grew to 3200 steps; w_readout=0 and QUALITY_STEPS keep it reproducible. "small_readout" is
# the current preset (see NOTES for its pair).
QUALITY_MODELS: dict[str, dict[str, Any]] = {
    "small": dict(w_readout=0.0),
    "pinned": dict(dim=64, heads=4, depth=2, n_latents=8, max_genes=512, standardize_values=False, w_readout=0.0),
    "small_depth2": dict(depth=2, w_readout=0.0),
    # the small preset with the read-out term at weight 1 (the preset's weight when this pair was measured; it is 3
    # since 2026-11-24, fourth session) and the read-out head's small start; run with --quality-steps 3200
    "small_readout": dict(w_readout=1.0),
    "pinned_standardised": dict(dim=64, heads=4, depth=2, n_latents=8, max_genes=512, standardize_values=True,
                                w_readout=0.0),
}
QUALITY_STEPS, QUALITY_LR = 1600, 3e-3


def _variants() -> dict[str, tuple[str, Any]]:
    """name -> (GeneToCellConfig.encoder, optional replacement-encoder factory)."""

    def cc(m: int, **opts):
        return lambda *, dim, depth, heads, n_latents: CrissCrossEncoder(dim, depth, heads, m, **opts)

    return {
        "full": ("full", None),
        "criss_cross": ("criss-cross", None),
        "criss_cross_no_latent_mlp": ("criss-cross", cc(32, latent_mlp=False)),
        "criss_cross_parallel_hops": ("criss-cross", cc(32, hops="parallel")),
        "criss_cross_4_latents": ("criss-cross", cc(4)),
        "published_like": ("criss-cross", cc(4, latent_mlp=False, latent_self_attention=False, hops="parallel")),
    }


def quality_runs(steps: int, runs: list[tuple[str, int]], jsonl: Path, model_name: str = "small") -> None:
    """Train and score each (variant, seed); append one JSON line per run to ``jsonl`` as it finishes."""
    import xscale
    from xscale.eval.metrics import probe_scores
    from xscale.models.gene_to_cell import GeneToCellConfig

    torch.set_num_threads(1)
    adata = xscale.datasets.load("starmap_mpfc")
    meta = xscale.datasets.info("starmap_mpfc")
    is_test = (adata.obs[meta.slide_key] == meta.holdout).to_numpy()
    train, test = adata[~is_test].copy(), adata[is_test].copy()
    y_train, y_test = train.obs[meta.label_key].astype(str).to_numpy(), test.obs[meta.label_key].astype(str).to_numpy()
    genes = [str(g) for g in adata.var_names]
    variants = _variants()
    with tempfile.TemporaryDirectory() as tmp:
        for name, seed in runs:
            encoder, factory = variants[name]
            config = GeneToCellConfig.preset("small", genes=genes, encoder=encoder, encoder_latents=32,
                                             **QUALITY_MODELS[model_name])
            t0 = time.perf_counter()
            model = _fit(train, config, steps=steps, seed=seed, out_dir=Path(tmp) / f"{name}-{seed}",
                         encoder_factory=factory, lr=QUALITY_LR)
            x_tr = _embed(model, train, model.vocab)
            keys = ("dim", "heads", "depth", "n_latents", "max_genes", "encoder_latents", "standardize_values",
                    "w_readout")
            cfg = {k: getattr(config, k) for k in keys}
            rec: dict[str, Any] = {"variant": name, "seed": seed, "steps": steps, "model": model_name, "config": cfg,
                                   **probe_scores(x_tr, y_train, _embed(model, test, model.vocab), y_test)}
            if name == "criss_cross":
                # Same trained weights; only the mask on the latents' read is dropped, and each held-out
                # cell is embedded with 166 padding tokens (as in a batch mixed with a 332-gene panel).
                rec["padded_test_macro_f1"] = probe_scores(
                    x_tr, y_train, _embed(model, test, model.vocab, extra_pad=166), y_test)["macro_f1"]
                leaky = _LeakyCrissCross(config.dim, config.depth, config.heads, 32)
                leaky.load_state_dict(model.encoder.state_dict())
                model.encoder = leaky.eval()
                rec["leaky_padded_test_macro_f1"] = probe_scores(
                    x_tr, y_train, _embed(model, test, model.vocab, extra_pad=166), y_test)["macro_f1"]
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            log.info("quality %s", rec)
            with jsonl.open("a") as f:
                f.write(json.dumps(rec) + "\n")


def collect_quality(jsonl: Path, steps: int, lr: float = QUALITY_LR) -> tuple[dict[str, Any], dict[str, Any]]:
    """Summaries of the runs in ``jsonl``: ``quality`` (full vs criss-cross) and ``ablations``."""
    import xscale

    meta = xscale.datasets.info("starmap_mpfc")
    recs = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    c = argparse.Namespace(**recs[0]["config"])
    by: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        by.setdefault(r["variant"], []).append(r)

    def mean(name: str, key: str = "macro_f1") -> float | None:
        vals = [r[key] for r in by.get(name, []) if key in r]
        return round(float(np.mean(vals)), 4) if vals else None

    full, cc = mean("full"), mean("criss_cross")
    paired = sorted({r["seed"] for r in by.get("full", [])} & {r["seed"] for r in by.get("criss_cross", [])})
    q = {
        "full_macro_f1": full,
        "criss_cross_macro_f1": cc,
        "full_accuracy": mean("full", "accuracy"),
        "criss_cross_accuracy": mean("criss_cross", "accuracy"),
        "gap": None if full is None or cc is None else round(full - cc, 4),
        "seeds": {"full": [r["seed"] for r in by.get("full", [])],
                  "criss_cross": [r["seed"] for r in by.get("criss_cross", [])], "paired": paired},
        "per_run": [r for r in recs if r["variant"] in ("full", "criss_cross")],
        "setup": (f"GeneToCell preset 'small' (D={c.dim}, H={c.heads}, depth {c.depth}, K={c.n_latents} cell latents, "
                  f"context {c.max_genes} genes; criss-cross M={c.encoder_latents}), {steps} "
                  f"AdamW steps (lr {lr:g}, warm-up + cosine), batch 64, trained on the two STARmap training slices "
                  "only; embedding = the K latents flattened; probe = xscale.eval.metrics.probe_scores (logistic "
                  f"regression, standardised) fit on training-slice cells, scored on held-out slice "
                  f"{meta.holdout!r} (labels {meta.label_key!r})."),
    }
    ablations: dict[str, Any] = {
        k: {"macro_f1": mean(k), "accuracy": mean(k, "accuracy"), "seeds": [r["seed"] for r in v]}
        for k, v in by.items() if k not in ("full", "criss_cross")
    }
    if mean("criss_cross", "leaky_padded_test_macro_f1") is not None:
        ablations["padding_leak"] = {
            "ours_unpadded_test_macro_f1": cc,
            "ours_padded_test_macro_f1": mean("criss_cross", "padded_test_macro_f1"),
            "leaky_padded_test_macro_f1": mean("criss_cross", "leaky_padded_test_macro_f1"),
            "how": "criss_cross weights; held-out cells embedded with 166 extra padding tokens; 'leaky' drops the "
                   "pad_mask from the latents' read (the published behaviour); training-slice cells embedded "
                   "unpadded for the probe.",
        }
    return q, ablations


def collect_diagnostics(jsonl: Path) -> dict[str, Any]:
    """Runs of other QUALITY_MODELS (``--quality-model``): macro-F1 per model, variant and seed."""
    out: dict[str, Any] = {}
    for line in jsonl.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            m = out.setdefault(r["model"], {"config": r["config"], "steps": r["steps"]})
            m.setdefault(r["variant"], {})[str(r["seed"])] = round(r["macro_f1"], 4)
    for m in out.values():
        paired = sorted(set(m.get("full", {})) & set(m.get("criss_cross", {})))
        if paired:
            m["paired_seeds"] = paired
            m["gap_mean_full_minus_criss_cross"] = round(
                float(np.mean([m["full"][s] - m["criss_cross"][s] for s in paired])), 4)
    return out


# ---------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peak-one", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--full-max-n", type=int, default=32768, help="largest N at which full attention is run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quality-steps", type=int, default=QUALITY_STEPS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds of the full / criss-cross pair")
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--quality-runs", nargs="+", default=None,
                   help="only these VARIANT:SEED runs, appended to --quality-jsonl (no JSON written)")
    p.add_argument("--quality-model", choices=sorted(QUALITY_MODELS), default="small",
                   help="level-1 model of the quality runs (default: the cell-level benchmark's 'small' preset)")
    p.add_argument("--quality-jsonl", type=Path, default=OUT.with_name("attention_quality_runs.jsonl"))
    p.add_argument("--collect-quality", action="store_true", help="summarise --quality-jsonl, train nothing")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if args.peak_one:
        print(json.dumps(peak_one(args.peak_one[0], int(args.peak_one[1]))))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.quality_runs:
        runs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.quality_runs]
        quality_runs(args.quality_steps, runs, args.quality_jsonl, args.quality_model)
        return
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    result: dict[str, Any] = {
        "config": {"dim": D, "heads": HEADS, "n_latents": M, "depth": DEPTH, "batch": 1, "dtype": "float32",
                   "pass": "forward + backward (sum of outputs)", "threads": 1},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "method": {
            "timing": "median over repeats (after one warm-up) of process CPU time with torch.set_num_threads(1); "
                      "the machine's 2 cores are shared with other jobs, so CPU time of one thread is the stable "
                      "measure; wall-clock medians are recorded beside it (*_wall_ms).",
            "full": "xscale.nn.Encoder / SelfAttentionBlock on torch SDPA (CPU flash kernel, no N×N matrix).",
            "criss_cross_attn": "xscale.nn.encoders.CrissCrossMixing: latents read tokens, latent self-attention "
                                "+ MLP, tokens read latents (everything but the tokens' MLP).",
            "peak_memory": "*_peak_mb: peak bytes held by torch's CPU allocator during one encoder forward+backward "
                           "beyond the model and input (torch.profiler profile_memory: every allocation and free "
                           "summed in time order; deterministic, independent of other processes). The process-RSS "
                           "alternative (`--peak-one KIND N` runs one config in a fresh process and also reports "
                           "VmHWM growth) agrees within a few MB but varies run to run with glibc arenas.",
            "large_n": "at N > 8192 each config is timed once without a warm-up call (kernels already warm from "
                       "smaller N); full attention at N=32768 costs about a minute of CPU per pass.",
        },
    }
    if args.skip_speed:
        for k in ("rows", "goals"):
            if k in old:
                result[k] = old[k]
    else:
        result["rows"] = speed(tuple(args.sizes), args.full_max_n, args.repeats)
    rows = {r["n_tokens"]: r for r in result.get("rows", [])}
    if 8192 in rows and rows[8192]["full_ms"] is not None:
        r = rows[8192]
        result["goals"] = {
            "n_tokens": 8192,
            "encoder_speedup": r["encoder_speedup"], "encoder_goal": 5.0,
            "attn_speedup": r["attn_speedup"], "attn_goal": 20.0,
            "peak_ok": r["criss_cross_peak_mb"] is not None and r["full_peak_mb"] is not None
            and r["criss_cross_peak_mb"] <= r["full_peak_mb"],
        }
    if args.skip_quality:
        for k in ("quality", "ablations"):
            if k in old:
                result[k] = old[k]
    else:
        if not args.collect_quality:
            args.quality_jsonl.unlink(missing_ok=True)
            runs = [(v, s) for s in args.seeds for v in ("full", "criss_cross")]
            runs += [(v, s) for s in args.ablation_seeds for v in _variants() if v not in ("full", "criss_cross")]
            quality_runs(args.quality_steps, runs, args.quality_jsonl)
        result["quality"], result["ablations"] = collect_quality(args.quality_jsonl, args.quality_steps)
        diag = OUT.with_name("attention_quality_diagnostics.jsonl")
        if diag.exists():  # other level-1 models at the same budget: does the gap depend on the model?
            result["quality_diagnostics"] = collect_diagnostics(diag)
        pinned = OUT.with_name("attention_quality_runs_pinned_2026_11_24.jsonl")
        if pinned.exists():  # the earlier pinned-model pair (400 steps, lr 2e-3): see NOTES
            result["quality_pinned_2026_11_24"], _ = collect_quality(pinned, 400, lr=2e-3)
        result.setdefault("goals", {})["quality_gap"] = result["quality"]["gap"]
        result["goals"]["quality_goal"] = 0.01
    for k in old:  # hand-kept records of earlier ablation rounds
        if k.startswith("ablations_20"):
            result[k] = old[k]
    result["gpu"] = None
    result["gpu_note"] = "no GPU machine was lent to this task; bf16 GPU rows not measured"
    result["notes"] = NOTES
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
