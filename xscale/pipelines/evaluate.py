"""Evaluation shared by the pipelines and ``xscale demo``: xscale latents against baselines, held-out cells only."""
from __future__ import annotations

from typing import Any


def evaluate_adata(
    adata, *, label_key: str | None, slide_key: str | None = None, holdout: str | None = None,
    domain_key: str | None = None, drop_labels: tuple[str, ...] = (), seed: int = 0,
) -> dict[str, Any]:
    """Score xscale latents against baselines, on held-out cells only.

    Cell level (``label_key``): logistic-regression probe, fitted to convergence
    (``metrics.CONVERGED_PROBE``: the score does not hang on where the solver stopped), on the
    training slides and scored on slide ``holdout`` (a stratified 80/20 split when there is none), for
    ``obsm["X_xscale_cell"]`` and PCA of log-normalised expression (fitted on training cells).
    Tissue level (``domain_key``, on the held-out slide): k-means ARI/NMI with k = number of
    annotated domains, for ``obsm["X_xscale_niche"]``, ``obs["xscale_domain"]`` as clustered,
    PCA, and the mean of PCA over each cell and its 10 nearest spatial neighbours.
    Cells with a missing label are left out. Returns a JSON-ready dict.
    """
    import warnings

    import numpy as np
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from xscale.errors import XscaleInputError
    from xscale.eval import metrics as M

    for option, key in (("label_key", label_key), ("domain_key", domain_key), ("slide_key", slide_key)):
        if key and key not in adata.obs:  # a mistyped key scored nothing and said nothing
            raise XscaleInputError(f"{option} {key!r}: expected an obs column, found none by that name. "
                                   f"Available: {list(adata.obs.columns)}.")
    if not label_key and not domain_key:
        warnings.warn("evaluate: no label_key and no domain_key, so nothing is scored (metrics.json holds only the "
                      "cell count and the split). Pass label_key= (cell types) and / or domain_key= (annotated "
                      "spatial domains), e.g. the evaluate step's parameters.", UserWarning, stacklevel=2)
    out: dict[str, Any] = {"n_cells": int(adata.n_obs), "holdout": holdout}
    slides = adata.obs[slide_key].astype(str).to_numpy() if slide_key else None
    if holdout is not None and slides is not None and (slides == holdout).any():
        test = slides == holdout
    else:
        test = np.random.default_rng(seed).random(adata.n_obs) < 0.2
        out["holdout"] = "random 20%"
    logn = M.log_normalized(adata.X)
    pcs_train, pcs_all = M.pca(logn[~test], [logn], n_components=30, seed=seed)
    del pcs_train
    if label_key and label_key in adata.obs:
        y = adata.obs[label_key].astype(object).to_numpy()
        keep = adata.obs[label_key].notna().to_numpy() & ~np.isin(y, list(drop_labels))
        tr, te = keep & ~test, keep & test
        reps = {"pca": pcs_all}
        if "X_xscale_cell" in adata.obsm:
            reps = {"xscale_cell": np.asarray(adata.obsm["X_xscale_cell"]).reshape(adata.n_obs, -1), **reps}
        out["cell_type"] = {
            name: M.probe_scores(X[tr], y[tr].astype(str), X[te], y[te].astype(str), seed=seed, **M.CONVERGED_PROBE)
            for name, X in reps.items()
        }
    if domain_key and domain_key in adata.obs and "spatial" in adata.obsm:
        m = test & adata.obs[domain_key].notna().to_numpy()
        lab = adata.obs[domain_key].astype(str).to_numpy()[m]
        k = len(set(lab))
        xy = np.asarray(adata.obsm["spatial"])[m]
        reps = {"pca": pcs_all[m], "pca_spatial_mean": M.spatial_mean(pcs_all[m], xy, k=10)}
        if "X_xscale_cell" in adata.obsm:
            cell = np.asarray(adata.obsm["X_xscale_cell"]).reshape(adata.n_obs, -1)[m]
            reps["xscale_cell_spatial_mean"] = M.spatial_mean(cell, xy, k=10)
        if "X_xscale_niche" in adata.obsm:
            reps = {"xscale_niche": np.asarray(adata.obsm["X_xscale_niche"]).reshape(adata.n_obs, -1)[m], **reps}
        dom = {name: M.cluster_scores(X, lab, k) for name, X in reps.items()}
        if "xscale_domain" in adata.obs:
            pred = adata.obs["xscale_domain"].astype(str).to_numpy()[m]
            dom["xscale_domain"] = {"ari": float(adjusted_rand_score(lab, pred)),
                                    "nmi": float(normalized_mutual_info_score(lab, pred))}
        out["domains"] = {"n_domains": k, "n_cells": int(m.sum()), **dom}
    return out


def dataset_keys(dataset: str | None) -> dict[str, Any]:
    """Label/slide/holdout/domain keys of a bundled dataset; all None for None or for a path to the
    user's own data (a step then takes them from its own parameters: label_key=, slide_key=, ...)."""
    import xscale.datasets as ds

    keys: dict[str, Any] = {"label_key": None, "slide_key": None, "holdout": None, "domain_key": None,
                            "drop_labels": ()}
    if dataset is not None and dataset not in ds.available():
        from pathlib import Path

        from xscale.errors import XscaleInputError

        if not Path(dataset).exists():
            names = ", ".join(ds.available())
            raise XscaleInputError(f"dataset {dataset!r}: expected a bundled dataset name ({names}) or a path "
                                   "to your data, found neither.")
        return keys  # the user's own data: keys come from the step's parameters
    if dataset is not None:

        info = ds.info(dataset)
        keys.update(label_key=info.label_key, slide_key=info.slide_key, holdout=info.holdout,
                    domain_key=info.domain_key, drop_labels=tuple(info.drop_labels))
    return keys
