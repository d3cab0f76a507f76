"""The HTML report: self-contained, every section drawn, images are real PNGs."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from xscale.errors import XscaleInputError
from xscale.report import SECTION_IDS, build_report, comparison_groups
from xscale.report.logs import discover_histories, load_histories
from xscale.report.metrics import headline, run_info

HOLDOUT = "20180424_BZ14_control"


class _Tags(HTMLParser):
    """Collects tags and attributes; counts sections and figures."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _parse(html: str) -> list[tuple[str, dict[str, str | None]]]:
    p = _Tags()
    p.feed(html)
    return p.tags


def _assert_self_contained(html: str) -> list[bytes]:
    """No resource fetched from anywhere; returns the decoded PNG bytes of every <img>."""
    tags = _parse(html)
    pngs = []
    for tag, attrs in tags:
        if tag in ("script", "iframe", "object", "embed"):
            raise AssertionError(f"report contains a <{tag}> element")
        if tag == "link":
            raise AssertionError(f"report links an external resource: {attrs}")
        for attr in ("src", "href"):
            v = attrs.get(attr)
            if v is None:
                continue
            assert not re.match(r"^\s*(https?:)?//", v), (
                f"<{tag} {attr}={v[:60]}> fetches from the network"
            )
            if tag == "img":
                assert v.startswith("data:image/png;base64,"), v[:40]
                pngs.append(base64.b64decode(v.split(",", 1)[1], validate=True))
            if tag == "a":
                assert v.startswith("#"), v
    assert "@import" not in html and "url(" not in html.split("<body", 1)[0]
    return pngs


def _png_sizes(pngs: list[bytes]) -> list[tuple[int, int]]:
    from PIL import Image

    sizes = []
    for data in pngs:
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            sizes.append(im.size)
            # a figure, not a blank canvas: more than one colour in it
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or [0, 0]) > 1
    return sizes


def test_report_from_store_has_every_section(report_inputs: dict, out_dir: Path) -> None:
    out = out_dir / "sub" / "report.html"
    path = build_report(
        report_inputs["store"],
        report_inputs["metrics"],
        out,
        history=report_inputs["logs"],
        embedding="pca",
    )
    assert path == out and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["report.html"], "temporary file left behind"
    html = out.read_text()
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in html, sid
        assert f'href="#{sid}"' in html, sid
    assert 'class="note"' not in html, "a section says its input is missing"
    pngs = _assert_self_contained(html)
    sizes = _png_sizes(pngs)
    # domains, cell UMAP, niche UMAP, bars, training, reconstruction, gene histogram
    assert len(pngs) == 7, len(pngs)
    assert all(w > 300 and h > 150 for w, h in sizes), sizes
    # held-out slide named as such; metrics written with their values
    assert f"{HOLDOUT}</td><td>1,088</td><td>held out (never trained on)" in html
    ari = report_inputs["metrics"]["domains"]["xscale_niche"]["ari"]
    assert f"{ari:.3f}" in html
    assert "macro F1" in html and "ARI" in html
    assert "level1" in html or "Training curves" in html


def test_report_missing_inputs_leave_notes(report_inputs: dict, out_dir: Path) -> None:
    import anndata as ad

    a = report_inputs["adata"]
    bare = ad.AnnData(
        a.X.copy(), obs=a.obs[["slice", "cell_type"]].copy(), obsm={"spatial": a.obsm["spatial"]}
    )
    out = build_report(bare, None, out_dir / "bare.html", slide_key="slice", holdout=HOLDOUT)
    html = out.read_text()
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in html
    # every section except the summary explains what is missing and how to get it
    assert html.count('class="note"') == len(SECTION_IDS) - 1
    assert "xscale.tl.domains" in html and "xscale.tl.reconstruct" in html
    assert _assert_self_contained(html) == []


def test_report_takes_integer_slides_and_the_run_folder(report_inputs: dict, out_dir: Path, tmp_path: Path) -> None:
    """An integer holdout was a TypeError (and a numeric one in metrics marked nothing held out); the run
    folder instead of RUN/cells.zarr was a raw zarr GroupNotFoundError."""
    from xscale.data.writeback import write_anndata_zarr

    a = report_inputs["adata"].copy()
    for key in ("xscale", "xscale_dataset"):  # the held-out slide comes from the argument / metrics only
        if key in a.uns:
            a.uns[key] = {k: v for k, v in a.uns[key].items() if k != "holdout"}
    a.obs["slide_no"] = a.obs["slice"].cat.codes.astype(int)
    held_no = int(a.obs.loc[a.obs["slice"] == HOLDOUT, "slide_no"].iloc[0])
    html = build_report(a, None, out_dir / "int.html", slide_key="slide_no", holdout=held_no).read_text()
    assert f"{held_no} (held out)" in html or "held out (never trained on)" in html
    html = build_report(a, {"holdout": held_no}, out_dir / "int2.html", slide_key="slide_no").read_text()
    assert "held out (never trained on)" in html
    run = tmp_path / "run"
    write_anndata_zarr(a, run / "cells.zarr")
    assert build_report(run, None, out_dir / "run.html", slide_key="slice").is_file()
    with pytest.raises(XscaleInputError, match="expected an AnnData zarr store .* Pass the cells.zarr of a run"):
        build_report(tmp_path, None, out_dir / "none.html")


def test_report_rejects_unknown_key(report_inputs: dict, out_dir: Path) -> None:
    with pytest.raises(XscaleInputError, match="cell_type_key='celltype'.*Available"):
        build_report(report_inputs["adata"], {}, out_dir / "r.html", cell_type_key="celltype")
    with pytest.raises(XscaleInputError, match="metrics file"):
        build_report(report_inputs["adata"], out_dir / "missing.json", out_dir / "r.html")
    assert not (out_dir / "r.html").exists()


def test_metrics_schema_groups_and_headline() -> None:
    flat = {
        "holdout": HOLDOUT,
        "n_cells": 3190,
        "domains": {
            "n_domains": 4,
            "n_cells": 1088,
            "xscale_niche": {"ari": 0.76, "nmi": 0.7},
            "pca_spatial_mean": {"ari": 0.715, "nmi": 0.72},
        },
        "cell_type": {"xscale_cell": {"macro_f1": 0.5}, "pca": {"macro_f1": 0.6}},
        "seconds": {"level1": 41.25, "level2": 30.0},
    }
    groups = comparison_groups(flat)
    assert run_info(flat)["seconds"] == "level1: 41.250, level2: 30"
    assert [g.path for g in groups] == [("domains",), ("cell_type",)]
    assert groups[0].context == {"n_domains": 4.0, "n_cells": 1088.0}
    assert groups[0].best("ari") == "xscale_niche" and groups[0].best("nmi") == "pca_spatial_mean"
    lines = headline(groups)
    assert "+0.045, better" in lines[0] and "not better" in lines[1]

    nested = {
        "domains": {
            "heldout": {"xscale_niche": {"ari": 0.7}, "pca": {"ari": 0.2}},
            "BZ5": {"xscale_niche": {"ari": 0.6}},
        },
        "timing": {"staged": {"seconds": 10.0}, "joint": {"seconds": 12.0}},
        "notes": ["x"],
    }
    paths = [g.path for g in comparison_groups(nested)]
    assert paths == [("domains", "heldout"), ("domains", "BZ5"), ("timing",)]
    assert comparison_groups(nested)[2].best("seconds") == "staged"  # lower is better


def test_histories_pick_newest_version(report_inputs: dict, tmp_path: Path) -> None:
    import pandas as pd

    found = discover_histories(report_inputs["logs"])
    assert found == {
        "level1": report_inputs["logs"] / "level1",
        "level2": report_inputs["logs"] / "level2",
    }
    csv = report_inputs["logs"] / "level1" / "version_0" / "metrics.csv"
    one = pd.read_csv(csv)
    # a fit restarted from scratch (version_1 starts at step 0) replaces version_0 ...
    run = tmp_path / "logs" / "level1"
    for v in ("version_0", "version_1"):
        (run / v).mkdir(parents=True)
        shutil.copy(csv, run / v / "metrics.csv")
    assert discover_histories(tmp_path / "logs") == {"level1": run}
    assert len(load_histories(tmp_path / "logs")["level1"]) == len(one)
    # ... a resumed fit (version_2 goes on from a later step) continues it
    later = one.assign(step=one["step"] + 1000)
    (run / "version_2").mkdir()
    later.to_csv(run / "version_2" / "metrics.csv", index=False)
    stitched = load_histories({"l1": run})["l1"]
    assert len(stitched) == 2 * len(one) and stitched["step"].is_monotonic_increasing
    # the staged pipeline's layout: checkpoints/<stage>/... named by the stage folder
    for rel in ("level1/logs/level1/version_0", "level2/lightning/logs/version_0"):
        (tmp_path / "checkpoints" / rel).mkdir(parents=True)
        shutil.copy(csv, tmp_path / "checkpoints" / rel / "metrics.csv")
    assert sorted(discover_histories(tmp_path / "checkpoints")) == ["level1", "level2"]
    hist = load_histories({"Level 1": report_inputs["logs"] / "level1"})
    df = hist["Level 1"]
    assert {"step", "train/loss_step", "val/loss"} <= set(df.columns)
    loss = df["train/loss_step"].dropna().to_numpy()
    assert loss[-10:].mean() < loss[:10].mean()  # the logged run did train
    # a run that logged nothing does not stop the report; it is named in the section
    assert load_histories({"x": tmp_path / "nothing"})["x"].empty
    html = build_report(
        report_inputs["adata"],
        {},
        tmp_path / "r.html",
        embedding="pca",
        history={"Level 1": report_inputs["logs"] / "level1", "level 2": tmp_path / "nothing"},
    ).read_text()
    assert "No metrics were logged for level 2" in html and html.count("data:image/png") >= 1


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_report_renders_headless(report_inputs: dict, out_dir: Path) -> None:
    """Opens offline in a headless browser (network disabled) and paints figures."""
    from PIL import Image

    out = build_report(
        report_inputs["adata"], report_inputs["metrics"], out_dir / "report.html", embedding="pca"
    )
    shot = out_dir / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--proxy-server=127.0.0.1:9",
            "--window-size=1200,2400",
            f"--screenshot={shot}",
            out.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with Image.open(shot) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape[0] >= 2000
    # the dark header and coloured figure pixels were painted
    assert (arr[:60].mean(axis=(0, 1)) < 80).all()
    assert len(np.unique(arr.reshape(-1, 3)[::50], axis=0)) > 50


@pytest.mark.slow
def test_report_umap_embedding() -> None:
    import xscale
    from xscale.eval.metrics import log_normalized
    from xscale.report import embed_2d

    a = xscale.datasets.load("starmap_mpfc")
    xy, axis = embed_2d(log_normalized(a.X[:800]), method="umap")
    assert axis == "UMAP" and xy.shape == (800, 2) and np.isfinite(xy).all()
