"""`xscale demo` for real at tiny settings: every output, then a re-run that skips finished stages."""
from __future__ import annotations

import json
import math
import re

import anndata as ad

from xscale.cli.main import main


def test_demo_tiny_writes_every_output_and_resumes(tmp_path, capsys, monkeypatch):
    import numpy as np

    import xscale.datasets as ds
    import xscale.train.level1 as level1
    import xscale.train.level2 as level2

    trained_on = {}  # the slices each level trains on, seen where they train

    def spy_level1(train, *args, **kwargs):
        trained_on["level1"] = set(train.obs["slice"].astype(str))
        return fit1(train, *args, **kwargs)

    def spy_level2(cells, coords, *args, train_cells, slides, **kwargs):
        trained_on["level2"] = set(np.asarray(slides)[train_cells])
        return fit2(cells, coords, *args, train_cells=train_cells, slides=slides, **kwargs)

    fit1, fit2 = level1.fit_level1, level2.fit_level2
    monkeypatch.setattr(level1, "fit_level1", spy_level1)
    monkeypatch.setattr(level2, "fit_level2", spy_level2)
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--preset", "tiny", "--max-steps", "2", "--no-progress"]
    assert main([*args, "--no-report"]) == 0
    assert trained_on == {"level1": {"20180417_BZ5_control", "20180419_BZ9_control"},
                          "level2": {"20180417_BZ5_control", "20180419_BZ9_control"}}  # never BZ14, the held-out
    store = ad.read_zarr(out / "cells.zarr")
    assert list(store.obs_names) == list(ds.load("starmap_mpfc").obs_names)  # every slice embedded, named as given
    assert {"spatial", "X_xscale_cell", "X_xscale_niche"} <= set(store.obsm)
    assert store.obs["xscale_domain"].nunique() == 4
    assert {"cell_type", "domain_name", "slice"} <= set(store.obs.columns)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["holdout"] == "20180424_BZ14_control"
    assert {"xscale_niche", "xscale_domain", "pca", "pca_spatial_mean"} <= set(metrics["domains"])
    assert {"xscale_cell", "pca"} <= set(metrics["cell_type"])
    scores = [v for group in ("domains", "cell_type") for m in metrics[group].values() if isinstance(m, dict)
              for v in m.values()]
    assert scores and all(math.isfinite(v) for v in scores)
    assert (out / "checkpoints" / "level1" / "model" / "config.json").is_file()
    assert (out / "checkpoints" / "level2" / "model" / "model.safetensors").is_file()
    assert (out / "logs").is_dir()
    capsys.readouterr()

    # same command again: finished stages are skipped; this time with the report
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "skipped: level1, cells, level2, niches" in text
    html = (out / "report.html").read_text()
    assert "<img" in html and not re.search(r"<script[^>]+src=|<link[^>]+href=\"http", html)
