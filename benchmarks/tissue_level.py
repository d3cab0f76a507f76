"""Tissue level on STARmap mPFC: spatial domains from niche latents against neighbourhood averaging.

Level 1 and level 2 train on the two training slices only (self-supervised; no labels).
Then, on the held-out slice and on each training slice separately, k-means with k = 4
(the annotated cortical layers, ``obs["domain_name"]``) clusters:

- ``xscale_niche_staged``: niche latents of the staged pipeline (``run_staged``);
- ``xscale_niche_joint``: niche latents after joint training (``fit_joint``) started
  from the staged checkpoints;
- ``xscale_cell_spatial_mean``: staged cell latents averaged over each cell + 10 nearest
  spatial neighbours;
- ``pca``: PCA of log-normalised expression fitted on the slice (10 components);
- ``pca_spatial_mean``: that PCA averaged over each cell + 10 nearest neighbours (the
  CellCharter-like recipe; 0.715 ARI on the held-out slice in the issue's figures);
- ``pca30_train_spatial_mean``: the same with 30 components fitted on the training slices.

Scores are ARI / NMI against the layers, mean over k-means seeds 0, 1, 2
(:func:`xscale.eval.metrics.cluster_scores`). Training time and peak resident memory
(VmHWM of a child process per pipeline; imports included) are recorded for the
staged and the joint runs. Model settings were chosen on the training slices only.

Run: ``.venv/bin/python benchmarks/tissue_level.py --level1-preset small --level1-epochs 200
--level2-epochs 80 --level2-seeds 0 1 2`` (about 15 CPU minutes; the committed JSON). ``--level2-seeds``
retrains level 2 from the same staged cell latents with the other seeds and reports the spread of
the staged score (``held_out_summary``): one level-2 run cannot resolve a margin of a few hundredths.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from proc_memory import vm_hwm_bytes

DATASET = "starmap_mpfc"
LAYER_KEY = "domain_name"
N_LAYERS = 4


def _peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: Linux carries the spawning parent's peak over into a child's ru_maxrss
    return vm_hwm_bytes() / 2**20


def _staged_child(work: str, settings: dict, threads: int, queue: mp.Queue) -> None:
    import torch

    torch.set_num_threads(threads)
    import xscale.datasets as datasets
    from xscale.train.staged import run_staged

    adata = datasets.load(DATASET)
    info = datasets.info(DATASET)
    train = sorted(s for s in adata.obs[info.slide_key].astype(str).unique() if s != info.holdout)
    t0 = time.perf_counter()
    l2 = settings["level2"]
    res = run_staged(
        adata, Path(work) / "staged", level1_preset=settings["level1_preset"], level2_config=None,
        level2_preset=l2["preset"], train_slides=train, slide_key=info.slide_key, n_domains=N_LAYERS,
        level1_epochs=settings["level1_epochs"], level2_epochs=settings["level2_epochs"],
        batch_size=settings["batch_size"], seed=settings["seed"], progress=False,
        level2_overrides=l2["overrides"],
    )
    seconds = time.perf_counter() - t0
    np.save(Path(work) / "staged_cell.npy", res.adata.obsm["X_xscale_cell"])
    np.save(Path(work) / "staged_niche.npy", res.adata.obsm["X_xscale_niche"])
    queue.put({"seconds": seconds, "stage_seconds": res.seconds, "peak_rss_mb": _peak_rss_mb(),
               "level2_config": {k: v for k, v in vars(res.level2.config).items()},
               "level1_dim": int(res.adata.obsm["X_xscale_cell"].shape[1]), "train_slides": train})


def _joint_child(work: str, settings: dict, threads: int, queue: mp.Queue) -> None:
    import torch

    torch.set_num_threads(threads)
    import xscale.datasets as datasets
    from xscale.models.io import load_model
    from xscale.tl.cells import embed_cells
    from xscale.tl.niches import niche_embeddings
    from xscale.train.joint import fit_joint

    adata = datasets.load(DATASET)
    info = datasets.info(DATASET)
    slides = adata.obs[info.slide_key].astype(str).to_numpy()
    ckpt = Path(work) / "staged" / "checkpoints"
    level1, level2 = load_model(ckpt / "level1" / "model"), load_model(ckpt / "level2" / "model")
    t0 = time.perf_counter()
    level1, level2 = fit_joint(
        adata, level1, level2, train_cells=np.flatnonzero(slides != info.holdout), slide_key=info.slide_key,
        max_epochs=settings["joint_epochs"], max_steps=settings["joint_max_steps"],
        batch_size=settings["joint_batch_size"], seed=settings["seed"],
        progress=False,
    )
    train_seconds = time.perf_counter() - t0
    embed_cells(adata, level1, key_added="X_xscale_cell")
    cells = np.asarray(adata.obsm["X_xscale_cell"])
    niches = niche_embeddings(level2, cells, np.asarray(adata.obsm["spatial"]), slides=slides)
    np.save(Path(work) / "joint_niche.npy", niches)
    queue.put({"seconds": train_seconds, "peak_rss_mb": _peak_rss_mb()})


def _level2_seeds_child(work: str, settings: dict, seeds: list[int], threads: int, queue: mp.Queue) -> None:
    """Level 2 retrained from the staged cell latents with other seeds (same config, epochs and batch)."""
    import torch

    torch.set_num_threads(threads)
    import xscale.datasets as datasets
    from xscale.models.cell_to_tissue import CellToTissueConfig
    from xscale.tl.niches import niche_embeddings
    from xscale.train.level2 import fit_level2
    from xscale.train.staged import LEVEL2_MAX_BATCH

    adata = datasets.load(DATASET)
    info = datasets.info(DATASET)
    slides = adata.obs[info.slide_key].astype(str).to_numpy()
    coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    cells = np.load(Path(work) / "staged_cell.npy")
    l2 = settings["level2"]
    config = CellToTissueConfig.preset(l2["preset"], in_dim=cells.shape[1], **l2["overrides"])
    seconds = {}
    for seed in seeds:
        t0 = time.perf_counter()
        model = fit_level2(cells, coords, config=config, train_cells=np.flatnonzero(slides != info.holdout),
                           slides=slides, max_epochs=settings["level2_epochs"],
                           batch_size=min(settings["batch_size"], LEVEL2_MAX_BATCH), seed=seed, progress=False)
        seconds[seed] = time.perf_counter() - t0
        np.save(Path(work) / f"staged_niche_level2_seed{seed}.npy",
                niche_embeddings(model, cells, coords, slides=slides))
    queue.put({"seconds": seconds})


def _in_child(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{target.__name__} failed with exit code {proc.exitcode}")
    return result


def evaluate(work: Path, with_joint: bool, level2_seeds: list[int] = ()) -> dict:
    import xscale.datasets as datasets
    from xscale.eval.metrics import cluster_scores, log_normalized, pca, spatial_mean

    adata = datasets.load(DATASET)
    info = datasets.info(DATASET)
    slides = adata.obs[info.slide_key].astype(str).to_numpy()
    y = adata.obs[LAYER_KEY].astype(str).to_numpy()
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    X = log_normalized(adata.X)
    train = slides != info.holdout
    pcs30_train = pca(X[train], [X], n_components=30)[1]
    reps = {"xscale_niche_staged": np.load(work / "staged_niche.npy")}
    if with_joint:
        reps["xscale_niche_joint"] = np.load(work / "joint_niche.npy")
    for seed in level2_seeds:
        reps[f"xscale_niche_staged_level2_seed{seed}"] = np.load(work / f"staged_niche_level2_seed{seed}.npy")
    cells = np.load(work / "staged_cell.npy")
    out: dict = {}
    for s in sorted(set(slides)):
        m = slides == s
        pcs = pca(X[m], n_components=10)[0]
        scores = {name: cluster_scores(r[m], y[m], N_LAYERS) for name, r in reps.items()}
        scores["xscale_cell_spatial_mean"] = cluster_scores(spatial_mean(cells[m], xy[m], k=10), y[m], N_LAYERS)
        scores["pca"] = cluster_scores(pcs, y[m], N_LAYERS)
        scores["pca_spatial_mean"] = cluster_scores(spatial_mean(pcs, xy[m], k=10), y[m], N_LAYERS)
        scores["pca30_train_spatial_mean"] = cluster_scores(
            spatial_mean(pcs30_train[m], xy[m], k=10), y[m], N_LAYERS
        )
        out[s] = {"role": "held_out" if s == info.holdout else "train", "n_cells": int(m.sum()), "scores": scores}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/tissue_level.json")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--level1-preset", choices=("tiny", "small", "base"), default="tiny")
    parser.add_argument("--level1-epochs", type=int, default=30)
    parser.add_argument("--level2-epochs", type=int, default=10)
    parser.add_argument("--joint-epochs", type=int, default=1)
    parser.add_argument("--joint-max-steps", type=int, default=30)
    parser.add_argument("--no-joint", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--level2-seeds", type=int, nargs="*", default=[],
                        help="also retrain level 2 from the staged cell latents with these seeds (spread of the score)")
    args = parser.parse_args()

    settings = {
        "level1_preset": args.level1_preset, "level1_epochs": args.level1_epochs, "level2_epochs": args.level2_epochs,
        "batch_size": 128, "seed": args.seed, "joint_epochs": args.joint_epochs,
        "joint_max_steps": args.joint_max_steps, "joint_batch_size": 4,
        "level2": {"preset": "small", "overrides": LEVEL2_OVERRIDES},
    }
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="xscale-tissue-"))
    t0 = time.perf_counter()
    staged = _in_child(_staged_child, str(work), settings, args.threads)
    joint = None if args.no_joint else _in_child(_joint_child, str(work), settings, args.threads)
    extra = [s for s in args.level2_seeds if s != args.seed]
    seeds_run = _in_child(_level2_seeds_child, str(work), settings, extra, args.threads) if extra else None
    per_slide = evaluate(work, joint is not None, extra)
    hold = next(v for v in per_slide.values() if v["role"] == "held_out")["scores"]
    baselines = ("xscale_cell_spatial_mean", "pca", "pca_spatial_mean", "pca30_train_spatial_mean")
    best_name = max(baselines, key=lambda k: hold[k]["ari"])
    margin = hold["xscale_niche_staged"]["ari"] - hold[best_name]["ari"]
    result = {
        "dataset": DATASET,
        "task": f"k-means (k={N_LAYERS}) per slice against obs['{LAYER_KEY}']; ARI/NMI mean over seeds 0,1,2",
        "settings": settings,
        "per_slice": per_slide,
        "held_out_summary": {
            "xscale_niche_staged_ari": hold["xscale_niche_staged"]["ari"],
            "xscale_niche_joint_ari": hold["xscale_niche_joint"]["ari"] if joint else None,
            "best_baseline": best_name,
            "best_baseline_ari": hold[best_name]["ari"],
            "margin_staged_minus_best_baseline": margin,
            **_seed_spread(hold, args.seed, extra),
            "goal": "margin >= 0.03 and staged ARI >= 0.745",
            "goal_met": bool(margin >= 0.03 and hold["xscale_niche_staged"]["ari"] >= 0.745),
        },
        "cost": {
            "staged": {"train_seconds": staged["seconds"], "stage_seconds": staged["stage_seconds"],
                       "peak_rss_mb": staged["peak_rss_mb"]},
            "joint": None if joint is None else {
                "train_seconds": joint["seconds"], "peak_rss_mb": joint["peak_rss_mb"],
                "note": "fine-tunes both levels from the staged checkpoints; seconds exclude the staged run"},
            "level2_seed_seconds": None if seeds_run is None else seeds_run["seconds"],
            "note": "peak_rss_mb = VmHWM of the child process running that pipeline (imports included)",
        },
        "level2_config": staged["level2_config"],
        "model_selection": MODEL_SELECTION,
        "total_seconds": time.perf_counter() - t0,
        "machine": {"python": platform.python_version(), "cpu_threads_per_child": args.threads},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result["held_out_summary"], indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def _seed_spread(hold: dict, seed: int, extra: list[int]) -> dict:
    """Held-out staged ARI per level-2 seed (same cell latents), with mean and sd; {} without extra seeds."""
    if not extra:
        return {}
    aris = {seed: hold["xscale_niche_staged"]["ari"]}
    aris.update({s: hold[f"xscale_niche_staged_level2_seed{s}"]["ari"] for s in extra})
    vals = np.array(list(aris.values()))
    return {"xscale_niche_staged_ari_by_level2_seed": aris, "xscale_niche_staged_ari_mean": float(vals.mean()),
            "xscale_niche_staged_ari_sd": float(vals.std(ddof=1))}


#: Level-2 settings chosen on the training slices (see MODEL_SELECTION).
# the "small" preset as it is (C=16, T=8, reads "both", w_composition=10): chosen below
LEVEL2_OVERRIDES: dict = {}
#: What was tried, scored on the training slices only.
MODEL_SELECTION: list[dict] = [
    {"what": "level-2 small preset, C=16 niches, 10 epochs, inputs = 30 PCA components (stand-in cell latents)",
     "train_slice_ari": {"20180417_BZ5_control": 0.742, "20180419_BZ9_control": 0.414}},
    {"what": "same with C=32 niches (chosen: higher on both training slices)",
     "train_slice_ari": {"20180417_BZ5_control": 0.801, "20180419_BZ9_control": 0.544}},
    {"what": "first full run: level-1 tiny 4 epochs (cell latents vary little: per-feature variance 0.0016, "
             "level-2 MSE fell to 0.002 by predicting the mean) -> standardised latents added to CellToTissue",
     "train_slice_ari": "n/a (fixed before scoring)"},
    {"what": "level-1 tiny 4 epochs, level-2 C=32, standardised latents, Xpressor reads encoder outputs",
     "train_slice_ari": {"20180417_BZ5_control": 0.332, "20180419_BZ9_control": 0.207}},
    {"what": "same, mask_ratio 0.5",
     "train_slice_ari": {"20180417_BZ5_control": 0.309, "20180419_BZ9_control": 0.218}},
    {"what": "same, Xpressor reads the cell tokens (chosen: best mean over training slices)",
     "train_slice_ari": {"20180417_BZ5_control": 0.455, "20180419_BZ9_control": 0.205}},
    {"what": "level-1 epochs 4 -> 30 for the final run (cell latents were the bottleneck: neighbourhood mean of "
             "xscale cell latents scored 0.17 / 0.13 on the training slices vs 0.71 / 0.38 for PCA)"},
    {"what": "level-1 'small' preset for the benchmark: dropped, ~6 CPU-min per epoch on the shared 2-core "
             "machine; the benchmark uses level-1 'tiny' to stay within ~15 CPU minutes"},
    {"what": "2026-11-24: new level-1 small preset (K=16, whole panel, standardised inputs; 200 epochs), level-2 "
             "small C=32/T=4/tokens, 80 epochs (this benchmark, run to the end): niche ARI fell while the "
             "neighbourhood mean of the new cell latents rose (held-out 0.704); level-2 variants then scored on "
             "the training slices only, with those cached level-1 latents, 80 epochs, seed 0 "
             "(/work/exp/l2.py in the session)",
     "train_slice_ari": {"C32 T4 tokens": {"BZ5": 0.567, "BZ9": 0.362}, "C11 T4 tokens": {"BZ5": 0.613, "BZ9": 0.384},
                         "C11 T8 tokens": {"BZ5": 0.696, "BZ9": 0.421}, "C16 T8 tokens": {"BZ5": 0.775, "BZ9": 0.499},
                         "C16 T16 tokens": {"BZ5": 0.701, "BZ9": 0.534}, "C24 T8 tokens": {"BZ5": 0.760, "BZ9": 0.437},
                         "C16 T8 both (chosen)": {"BZ5": 0.784, "BZ9": 0.527},
                         "reference: cell latents + 10-NN mean": {"BZ5": 0.817, "BZ9": 0.435},
                         "reference: per-slice PCA(10) + 10-NN mean": {"BZ5": 0.713, "BZ9": 0.381}}},
    {"what": "level-1 epochs 200 -> 120 (the demo's default, which the new preset made ~1.7x slower per step)"},
    {"what": "2026-11-24 (later): out-of-sample check without the held-out slice. Level 2 (small preset) trained "
             "on BZ5 niches only, scored on BZ9, which level 2 never saw (cached 120-epoch level-1 latents of the "
             "two training slices; k-means ARI, mean of 3 k-means seeds); 3 level-2 seeds per budget. The same "
             "setting's score moves by up to 0.3 ARI between level-2 seeds, so one level-2 run (as in this "
             "benchmark's held-out figure) cannot resolve a 0.03 margin; no setting was changed from this.",
     "unseen_slice_BZ9_ari_by_level2_epochs_seeds_0_1_2": {
         "10": [0.436], "20": [0.729, 0.502, 0.480], "30": [0.724, 0.406, 0.635], "40": [0.536, 0.701, 0.600],
         "60": [0.555, 0.334, 0.528], "80": [0.658]},
     "BZ9_references": {"cell latents + 10-NN mean": 0.435, "per-slice PCA(10) + 10-NN mean": 0.381},
     "training_slice_BZ5_ari_same_runs": {"20": [0.838, 0.759, 0.807], "40": [0.648, 0.801, 0.663],
                                          "60": [0.499, 0.723, 0.514]}},
    {"what": "2026-11-24 (third session): level-1 small preset with the linear read-out term (w_readout=1, chosen "
             "on the level-1 tuning split for cell types, not for domains). The same out-of-sample check (level 2 "
             "on BZ5 only, 40 epochs, scored on the unseen BZ9) on the new 200-epoch cell latents: niche ARI "
             "0.551 / 0.490 / 0.642 (level-2 seeds 0/1/2; mean 0.561, vs 0.612 with the previous latents); cell "
             "latents + 10-NN mean 0.391 on BZ9 and 0.497 on BZ5 (was 0.435 / 0.817). No level-2 setting changed.",
     "unseen_slice_BZ9_ari_40_epochs_seeds_0_1_2": [0.551, 0.490, 0.642],
     "training_slice_BZ5_ari_same_runs": [0.656, 0.641, 0.590]},
    {"what": "2026-11-24 (fourth session): the level-1 read-out head starts small (GeneToCell; chosen for decoding "
             "at short budgets on a split without the held-out slice, see cell_level.py NOTES). No level-2 setting "
             "changed. Re-run of this benchmark with the same arguments: held-out staged ARI by level-2 seed "
             "0.491 / 0.650 / 0.818 (mean 0.653, sd 0.163; before 0.606 / 0.675 / 0.577), joint 0.547 (before "
             "0.655), cell latents + 10-NN mean 0.637 (before 0.639). The level-2 seed decides more than the "
             "level-1 change."},
    {"what": "2026-11-24 (fourth session, later): level-1 read-out weight 3 (was 1) with the small start, chosen on "
             "level-1 splits without the held-out slide (cell_level.py NOTES). No level-2 setting changed. Re-run "
             "with the same arguments: held-out staged ARI by level-2 seed 0.618 / 0.587 / 0.699 (mean 0.634, sd "
             "0.058), joint 0.656, cell latents + 10-NN mean 0.633."},
    {"what": "2026-11-24 (fifth session): level-2 composition term (CellToTissueConfig."
             "w_composition: a linear head on the flattened tissue latents must give the mean "
             "standardised latents of the niche's cells). Same out-of-sample check on this "
             "benchmark's cached 200-epoch small level-1 latents: level 2 trained on BZ5 niches "
             "only, scored on BZ5 and on BZ9, which level 2 never saw; level-2 seeds 0/1/2. "
             "Chosen: w_composition=10, the highest mean ARI over both slices: at 40 epochs 0.760 "
             "vs 0.752 / 0.692 / 0.689 / 0.545 for 30 / 3 / 1 / 0, at 80 epochs 0.760 vs 0.704 "
             "for 1; now in the tiny/small/base presets. Level-2 reconstruction MSE on BZ9 niches "
             "(standardised units, seed 0, 40 epochs) also fell: 0.920 / 0.874 / 0.833 / 0.83 for "
             "0 / 1 / 10 / 30.",
     "unseen_slice_BZ9_ari_seeds_0_1_2": {
         "w0, 40 epochs": [0.656, 0.495, 0.629], "w1, 40 epochs": [0.671, 0.675, 0.718],
         "w3, 40 epochs": [0.594, 0.633, 0.759], "w10, 40 epochs": [0.586, 0.700, 0.767],
         "w30, 40 epochs": [0.577, 0.714, 0.690], "w1, 80 epochs": [0.524, 0.727, 0.733],
         "w10, 80 epochs (chosen)": [0.624, 0.681, 0.723]},
     "training_slice_BZ5_ari_same_runs": {
         "w0, 40 epochs": [0.433, 0.557, 0.500], "w1, 40 epochs": [0.706, 0.689, 0.671],
         "w3, 40 epochs": [0.732, 0.716, 0.716], "w10, 40 epochs": [0.836, 0.821, 0.851],
         "w30, 40 epochs": [0.856, 0.814, 0.861], "w1, 80 epochs": [0.604, 0.814, 0.822],
         "w10, 80 epochs (chosen)": [0.844, 0.835, 0.857]},
     "references_same_latents": {"cell latents + 10-NN mean": {"BZ5": 0.762, "BZ9": 0.489}}},
    {"what": "2026-11-24 (fifth session), after the choice and not used for it: the same benchmark with "
             "level-1 seeds 1 and 2 (--seed 1 --level2-seeds 1 2; --seed 2 --level2-seeds 0 1). "
             "Held-out staged ARI, level-1 seed 1: 0.811 / 0.747 (level-2 seeds 1 / 2), joint "
             "0.786; level-1 seed 2: 0.800 / 0.772 / 0.832 (level-2 seeds 2 / 0 / 1), joint 0.796. "
             "With the committed run's "
             "0.807 / 0.795 / 0.787: 8 runs, mean 0.794, lowest 0.747; every run clears 0.745 and "
             "PCA + 10-NN (0.717) + 0.03.",
     "held_out_ari_level1_seed1": {"staged_level2_seed1": 0.811, "staged_level2_seed2": 0.747,
                                   "joint": 0.786, "cell_latents_10nn_mean": 0.699},
     "held_out_ari_level1_seed2": {"staged_level2_seed2": 0.800, "staged_level2_seed0": 0.772,
                                   "staged_level2_seed1": 0.832, "joint": 0.796,
                                   "cell_latents_10nn_mean": 0.706}},
]

if __name__ == "__main__":
    main()
