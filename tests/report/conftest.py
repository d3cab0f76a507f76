"""A small real latent store for report tests: bundled STARmap with PCA latents.

Stand-ins computed from the real data, no synthetic values: cell latents = PCA of
log-normalised expression (reshaped to (K, D) tokens), niche latents = mean of the PCA over
each cell and its 10 nearest spatial neighbours, domains = k-means on those, decoded
expression = the PCA reconstruction mapped back to counts, metrics = the scores of
:mod:`xscale.eval.metrics` on the held-out slice, histories = Lightning CSV logs of a short
real training run (a linear auto-encoder of the same expression).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

HOLDOUT = "20180424_BZ14_control"


@pytest.fixture(scope="session")
def report_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import torch
    from lightning.fabric.loggers import CSVLogger
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    import xscale
    from xscale.eval import metrics as M

    root = tmp_path_factory.mktemp("report")
    a = xscale.datasets.load("starmap_mpfc")
    ln = M.log_normalized(a.X)  # (n, G)
    slides = a.obs["slice"].astype(str).to_numpy()
    held = slides == HOLDOUT
    pca = PCA(n_components=20, random_state=0).fit(ln[~held])
    P = pca.transform(ln).astype(np.float32)  # (n, 20)
    a.obsm["X_xscale_cell"] = P.reshape(-1, 4, 5)  # (n, K=4, D=5)
    N = np.zeros_like(P)
    for s in np.unique(slides):
        m = slides == s
        N[m] = M.spatial_mean(P[m], a.obsm["spatial"][m], k=10)
    a.obsm["X_xscale_niche"] = N
    a.obs["xscale_domain"] = KMeans(4, n_init=4, random_state=0).fit_predict(N).astype(str)
    lib = np.asarray(a.X.sum(axis=1))
    a.layers["xscale_expected"] = (
        np.expm1(np.clip(pca.inverse_transform(P), 0, None)) * lib / 1e4
    ).astype(np.float32)
    a.uns["xscale"] = {
        "slide_key": "slice",
        "holdout": HOLDOUT,
        "domain_key": "domain_name",
        "label_key": "cell_type",
    }

    lab = a.obs["domain_name"].astype(str).to_numpy()
    ct = a.obs["cell_type"].astype(str).to_numpy()
    metrics = {
        "dataset": "starmap_mpfc",
        "holdout": HOLDOUT,
        "domains": {
            "n_domains": 4,
            "xscale_niche": M.cluster_scores(N[held], lab[held], 4, seeds=(0,)),
            "pca": M.cluster_scores(P[held], lab[held], 4, seeds=(0,)),
        },
        "cell_type": {
            "xscale_cell": M.probe_scores(P[~held], ct[~held], P[held], ct[held], max_iter=300),
            "pca": M.probe_scores(P[~held, :5], ct[~held], P[held, :5], ct[held], max_iter=300),
        },
    }

    logs = root / "logs"
    X = torch.from_numpy(ln[~held])
    for level, width in (("level1", 8), ("level2", 4)):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(X.shape[1], width), torch.nn.Linear(width, X.shape[1])
        )
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        logger = CSVLogger(str(logs), name=level)
        for step in range(60):
            batch = X[torch.randint(0, len(X), (64,))]
            loss = ((net(batch) - batch) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            logger.log_metrics({"train/loss_step": loss.item(), "epoch": step // 20}, step=step)
            if step % 20 == 19:
                with torch.no_grad():
                    val = float(((net(X[:256]) - X[:256]) ** 2).mean())
                logger.log_metrics({"val/loss": val, "epoch": step // 20}, step=step)
        logger.finalize("success")

    from xscale.data.writeback import write_anndata_zarr

    store = write_anndata_zarr(a, root / "cells.zarr")
    return {"adata": a, "store": store, "metrics": metrics, "logs": logs, "root": root}


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path
