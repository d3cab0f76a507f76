"""``xscale run``: the whole staged pipeline on a user's dataset."""
from __future__ import annotations

import argparse

from xscale.cli.options import add_gene_symbols, options_given, refuse_gene_symbols_for_store, seed_int

HELP = "train level 1 then level 2 on a dataset and write cell latents, niche latents and domains"
DESCRIPTION = (
    "Read an .h5ad, AnnData zarr or SpatialData zarr dataset, validate it, fit level 1 (genes -> "
    "cells) and level 2 (cells -> tissue niches) self-supervised, and write DIR/cells.zarr with "
    "obsm['X_xscale_cell'], obsm['X_xscale_niche'] and obs['xscale_domain']. Stages checkpoint "
    "into DIR/checkpoints and a re-run skips finished stages. Label keys (--domain-key, "
    "--cell-type-key) are never used for training; they only turn on evaluation written to "
    "DIR/metrics.json (against PCA and neighbourhood-mean-of-PCA baselines). DIR/report.html shows "
    "the domains on each slide, the latents (UMAP), the scores, the training curves and the "
    "expression decoded from the latents on one slide."
)
DEFAULT_N_DOMAINS = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="input .h5ad file, AnnData .zarr or SpatialData .zarr store, "
                        "or a bundled dataset name (e.g. starmap_mpfc; its slide key is the default --slide-key)")
    parser.add_argument("--out", required=True, help="output directory (created; re-running resumes)")
    parser.add_argument("--spatial-key", default="spatial", help="obsm key of the coordinates (default: spatial)")
    parser.add_argument("--slide-key", default=None, help="obs column naming each cell's slide (niches never cross)")
    parser.add_argument("--counts-layer", default=None, help="layer holding raw counts when X is normalised")
    add_gene_symbols(parser)
    parser.add_argument("--table-key", default=None, help="SpatialData table to use (if several)")
    parser.add_argument("--n-domains", type=int, default=None,
                        help="number of spatial domains (default: categories of --domain-key, "
                             f"else {DEFAULT_N_DOMAINS})")
    parser.add_argument("--no-slide-center", action="store_true",
                        help="cluster domains on the niche latents as they are; by default, with "
                             "--slide-key, each slide's latents are centred first so a slide-wide "
                             "shift is not a domain (leave that on for sections of one organ; turn "
                             "it off for slides of different regions)")
    parser.add_argument("--domain-key", default=None, help="obs column of annotated regions: evaluation only")
    parser.add_argument("--cell-type-key", default=None, help="obs column of cell types: evaluation only")
    parser.add_argument("--preset", choices=("tiny", "small", "base"), default="small",
                        help="model size of both levels (default: small)")
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="epochs of each level (default: 20 for level 1, 30 for level 2)")
    parser.add_argument("--max-steps", type=int, default=-1, help="optimiser steps per level (budget cap; -1 = none)")
    parser.add_argument("--radius", type=float, default=None,
                        help="niche radius in median nearest-neighbour distances (default: nearest cells only)")
    parser.add_argument("--seed", type=seed_int, default=0, help="random seed (default: 0)")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator (cpu, gpu, auto)")
    parser.add_argument("--no-report", action="store_true", help="skip DIR/report.html")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--write-back", action="store_true",
                        help="SpatialData --data, or a store prepared from one: also put the latents and domains "
                        "into its table (obsm, obs) and a niche table")


def _label_column(adata, key: str | None, option: str):
    import logging

    import numpy as np

    from xscale.errors import XscaleInputError

    if key is None:
        return None
    if key not in adata.obs:
        raise XscaleInputError(
            f"{option} {key!r} not found in obs of the data. Available: {list(adata.obs.columns)}."
        )
    col = adata.obs[key]
    labels = col.astype(object).to_numpy()
    missing = col.isna().to_numpy() | np.isin(col.astype(str).str.strip().to_numpy(), ["", "nan", "NaN", "None"])
    if missing.all():
        raise XscaleInputError(f"{option} {key!r}: every value is missing; expected labels for at least some cells.")
    if missing.any():
        logging.getLogger(__name__).warning(
            "%s %r: %d of %d cells have no label; evaluation uses the %d labelled cells only.",
            option, key, int(missing.sum()), len(labels), int((~missing).sum()),
        )
    labels = labels.astype(str)
    labels[missing] = ""  # "" = unlabelled; never counted as a class
    return labels


def check_budget(max_epochs: int | None, max_steps: int, *, epochs_option: str = "--max-epochs") -> None:
    """A training budget that trains: epochs >= 1, steps -1 (no cap) or >= 1 (0 wrote untrained models)."""
    from xscale.errors import XscaleInputError

    if max_epochs is not None and max_epochs < 1:
        raise XscaleInputError(f"{epochs_option}: expected >= 1 epochs, found {max_epochs}.")
    if max_steps == 0 or max_steps < -1:
        raise XscaleInputError(f"--max-steps: expected -1 (no cap) or >= 1 optimiser steps, found {max_steps}.")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import xscale.datasets as ds
    from xscale.data.io import read_dataset
    from xscale.errors import XscaleInputError
    from xscale.train.staged import run_staged
    from xscale.utils.device import check_accelerator

    check_accelerator(args.accelerator)  # before reading or training: a missing GPU fails first
    check_budget(args.max_epochs, args.max_steps)
    if args.radius is not None and not args.radius > 0:
        raise XscaleInputError(f"--radius: expected a radius > 0 (in median nearest-neighbour distances), "
                               f"found {args.radius}.")
    out = Path(args.out)
    from xscale.data.store import is_prepared_store
    from xscale.train.staged import check_run_dir

    check_run_dir(out, "--out")  # before any work: a finetune output / saved model is replaced whole later

    if is_prepared_store(args.data):
        refuse_gene_symbols_for_store(args)
        return _run_store(args)
    ds.check_source(args.data)
    source, slide_key = ds.resolve(args.data, args.slide_key)
    if args.write_back:  # before any work
        from xscale.cli.embed import check_write_back_source

        check_write_back_source(args.data)
    adata = read_dataset(
        source, table_key=args.table_key, spatial_key=args.spatial_key, counts_layer=args.counts_layer,
        slide_key=slide_key, gene_symbols=args.gene_symbols,
    )
    domains = _label_column(adata, args.domain_key, "--domain-key")
    cell_types = _label_column(adata, args.cell_type_key, "--cell-type-key")
    n_domains = args.n_domains
    if n_domains is None:
        n_domains = len(set(domains) - {""}) if domains is not None else DEFAULT_N_DOMAINS
    if n_domains < 1 or n_domains > adata.n_obs:
        raise XscaleInputError(f"--n-domains: expected 1..{adata.n_obs} (the number of cells), found {n_domains}.")
    epochs = {} if args.max_epochs is None else {"level1_epochs": args.max_epochs, "level2_epochs": args.max_epochs}
    result = run_staged(
        adata, out, level1_preset=args.preset, level2_preset=args.preset, slide_key=slide_key,
        spatial_key=args.spatial_key, n_domains=n_domains, radius=args.radius, seed=args.seed,
        level1_max_steps=args.max_steps, level2_max_steps=args.max_steps, accelerator=args.accelerator,
        progress=not args.no_progress, domain_slide_center=not args.no_slide_center, **epochs,
    )
    print(f"{result.store}: {adata.n_obs} cells; obsm['X_xscale_cell'] {result.adata.obsm['X_xscale_cell'].shape}, "
          f"obsm['X_xscale_niche'] {result.adata.obsm['X_xscale_niche'].shape}, obs['xscale_domain'] ({n_domains})")
    if result.skipped:
        print(f"skipped finished stages: {', '.join(result.skipped)}")
    if args.write_back:
        from xscale.data.writeback import write_adata_to_spatialdata

        write_adata_to_spatialdata(source, result.adata, table_key=args.table_key, niche_key="X_xscale_niche",
                                   obs_keys=("xscale_domain",))
        print(f"wrote obsm['X_xscale_cell'] and obs['xscale_domain'] into the table of {source}, "
              "and the niche latents into its niche table")
    metrics = None
    _drop_stale(out, metrics=domains is None and cell_types is None, report=args.no_report)
    if domains is not None or cell_types is not None:
        metrics = _evaluate(result.adata, domains, cell_types, slide_key=slide_key,
                            spatial_key=args.spatial_key, seed=args.seed)
        from xscale.utils.atomic import atomic_write_text

        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        summary = {k: round(v, 3) for k, v in metrics.get("summary", {}).items()}  # full precision in the file
        print(f"{out / 'metrics.json'}: " + json.dumps(summary))
    if not args.no_report:
        from xscale.report.run_report import write_run_report

        report = write_run_report(out, result.adata, result.level1, metrics, slide_key=slide_key,
                                  domain_key=args.domain_key, cell_type_key=args.cell_type_key,
                                  title=f"xscale run: {Path(str(args.data)).name}", seed=args.seed,
                                  progress=not args.no_progress)
        print(f"{report}: open it in a browser (self-contained, offline)")
    return 0


def _drop_stale(out, *, metrics: bool, report: bool) -> None:
    """Remove an earlier run's ``metrics.json`` (``metrics``: this run scores nothing) and ``report.html``
    (``report``: this run writes none) from the run folder: they describe latents and domains this run has
    just rewritten."""
    for name, stale in (("metrics.json", metrics), ("report.html", report)):
        path = out / name
        if stale and path.is_file():
            path.unlink()
            print(f"removed {path} of an earlier run: it described the results this run replaced"
                  + (" (pass --domain-key / --cell-type-key to score them)" if name == "metrics.json"
                     else " (leave out --no-report to write a new one)"))


#: Options that a prepared store answers itself (xscale prepare fixed them), with their defaults.
STORE_FIXED = {"slide_key": None, "spatial_key": "spatial", "counts_layer": None, "table_key": None, "radius": None}


def _run_store(args: argparse.Namespace) -> int:
    """``xscale run --data STORE``: both levels trained out of core; results written into the store."""
    from xscale.data.store import CellStore
    from xscale.errors import XscaleInputError
    from xscale.train.store_run import run_store

    given = options_given(args, STORE_FIXED)
    if given:
        raise XscaleInputError(
            f"--data {args.data} is a prepared store: expected none of {', '.join(given)}, found them. The store "
            "has its counts, slides, coordinates and neighbour graph from xscale prepare (prepare again to change "
            "them).")
    cells = CellStore(args.data)
    target = None
    if args.write_back:  # before any work: the SpatialData store it was prepared from
        from xscale.cli.embed import check_write_back_source

        target = check_write_back_source(args.data)
    columns = list(cells.root["obs"].attrs.get("column-order", []))
    for option, key in (("--domain-key", args.domain_key), ("--cell-type-key", args.cell_type_key)):
        if key is not None and key not in columns:  # before any training
            raise XscaleInputError(f"{option} {key!r} not found in obs of the store. Available: {columns}.")
    n_domains = args.n_domains if args.n_domains is not None else DEFAULT_N_DOMAINS
    if n_domains < 1:
        raise XscaleInputError(f"--n-domains: expected >= 1, found {n_domains}.")
    epochs = {} if args.max_epochs is None else {"level1_epochs": args.max_epochs, "level2_epochs": args.max_epochs}
    result = run_store(cells, args.out, level1_preset=args.preset, level2_preset=args.preset,
                       n_domains=n_domains, domain_slide_center=not args.no_slide_center, seed=args.seed,
                       level1_max_steps=args.max_steps, level2_max_steps=args.max_steps,
                       accelerator=args.accelerator, progress=not args.no_progress, **epochs)
    print(f"{result.store}: obsm['X_xscale_cell'], obsm['X_xscale_niche'] and obs['xscale_domain'] ({n_domains}) "
          f"written into the prepared store (out of core); {args.out} holds the checkpoints")
    if result.skipped:
        print(f"skipped finished stages: {', '.join(result.skipped)}")
    if target is not None:
        from xscale.data.writeback import write_to_spatialdata

        write_to_spatialdata(target, cells, niche_key="X_xscale_niche", obs_keys=("xscale_domain",))
        print(f"wrote the cell latents, the domains and a niche table into {target}")
    labelled = args.domain_key is not None or args.cell_type_key is not None
    from pathlib import Path

    _drop_stale(Path(args.out), metrics=not labelled, report=args.no_report)
    if args.no_report and not labelled:
        return 0
    from xscale.train.store_run import REPORT_CELLS, store_sample

    # the report and the scores: up to REPORT_CELLS random cells of the store, read block by block
    sample = store_sample(cells, seed=args.seed)
    n_cells = cells.n_cells
    metrics = None
    if labelled:
        import json

        from xscale.utils.atomic import atomic_write_text

        metrics = _evaluate(sample, _label_column(sample, args.domain_key, "--domain-key"),
                            _label_column(sample, args.cell_type_key, "--cell-type-key"), slide_key="slide",
                            spatial_key="spatial", seed=args.seed)
        metrics["scored_cells"] = {"n": sample.n_obs, "of": n_cells, "note": (
            "every cell of the store" if sample.n_obs == n_cells else "a random sample of the store's cells: "
            "the neighbourhood means (baselines) average each sampled cell's nearest sampled neighbours")}
        atomic_write_text(Path(args.out) / "metrics.json", json.dumps(metrics, indent=2))
        summary = {k: round(v, 3) for k, v in metrics.get("summary", {}).items()}
        print(f"{Path(args.out) / 'metrics.json'} ({sample.n_obs} of {n_cells} cells): " + json.dumps(summary))
    if not args.no_report:
        from xscale.report.run_report import write_run_report

        drawn = "" if sample.n_obs == n_cells else f", {sample.n_obs} random cells drawn"
        report = write_run_report(args.out, sample, result.level1, metrics, slide_key="slide",
                                  domain_key=args.domain_key, cell_type_key=args.cell_type_key,
                                  title=f"xscale run: {Path(result.store).name}{drawn}", seed=args.seed,
                                  progress=not args.no_progress)
        print(f"{report}: open it in a browser (self-contained, offline; at most {REPORT_CELLS} cells drawn)")
    return 0


def _evaluate(adata, domains, cell_types, *, slide_key: str | None, spatial_key: str, seed: int) -> dict:
    """Scores of the run's latents against labels, beside baselines computed on the same cells.

    Domains (per slide, k = number of annotated regions of that slide, k-means over 3 seeds):
    niche latents, the mean of cell latents over each cell + 10 nearest neighbours, PCA of
    log-normalised expression, and the neighbourhood mean of that PCA; plus the ARI/NMI of
    the written ``obs["xscale_domain"]``. Cell types: kNN purity (k = 15) of cell latents and PCA.
    """
    import numpy as np
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from xscale.eval.metrics import cluster_scores, knn_purity, log_normalized, pca, spatial_mean

    pcs = pca(log_normalized(adata.X), n_components=30, seed=seed)[0]
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
    slides = adata.obs[slide_key].astype(str).to_numpy() if slide_key else np.full(adata.n_obs, "all")
    cell = np.asarray(adata.obsm["X_xscale_cell"])
    niche = np.asarray(adata.obsm["X_xscale_niche"])
    out: dict = {"n_cells": int(adata.n_obs)}
    if domains is not None:
        per_slide = {}
        labelled = domains != ""  # evaluation uses labelled cells only
        for s in sorted(set(slides)):
            m = (slides == s) & labelled
            k = len(set(domains[m]))
            if k < 2 or m.sum() <= k:
                continue
            y = domains[m]
            per_slide[s] = {
                "n_domains": k,
                "xscale_niche": cluster_scores(niche[m], y, k),
                "xscale_cell_spatial_mean": cluster_scores(spatial_mean(cell[m], coords[m], k=10), y, k),
                "pca": cluster_scores(pcs[m], y, k),
                "pca_spatial_mean": cluster_scores(spatial_mean(pcs[m], coords[m], k=10), y, k),
            }
        written = adata.obs["xscale_domain"].astype(str).to_numpy()
        out["domains"] = {
            "per_slide": per_slide,
            "xscale_domain": {"ari": float(adjusted_rand_score(domains[labelled], written[labelled])),
                              "nmi": float(normalized_mutual_info_score(domains[labelled], written[labelled]))},
            "n_labelled": int(labelled.sum()),
        }
        methods = ("xscale_niche", "xscale_cell_spatial_mean", "pca", "pca_spatial_mean")
        out["summary"] = {f"domain_ari_{m}": float(np.mean([v[m]["ari"] for v in per_slide.values()]))
                          for m in methods} if per_slide else {}
        out["summary"]["domain_ari_xscale_domain"] = out["domains"]["xscale_domain"]["ari"]
    if cell_types is not None:
        typed = cell_types != ""
        out["cell_types"] = {"knn_purity_xscale_cell": knn_purity(cell[typed], cell_types[typed]),
                             "knn_purity_pca": knn_purity(pcs[typed], cell_types[typed]),
                             "n_labelled": int(typed.sum())}
        summary = out.setdefault("summary", {})  # each score beside its baseline
        summary["knn_purity_xscale_cell"] = out["cell_types"]["knn_purity_xscale_cell"]
        summary["knn_purity_pca"] = out["cell_types"]["knn_purity_pca"]
    return out
