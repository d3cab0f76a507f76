"""Query layer, label transfer and `xscale query` on a store built from real STARmap cells."""
from __future__ import annotations

import json

import numpy as np
import pytest

from xscale.cli.main import main
from xscale.errors import XscaleInputError
from xscale.query import LatentIndex, LatentStore, open_store

HOLDOUT = "20180424_BZ14_control"


def test_open_store_reads_latents_coords_and_slide(starmap_store, tmp_path):
    path, adata = starmap_store
    store = open_store(path, level="niche")
    assert store.latents.shape == (adata.n_obs, 32)
    assert store.latent_shape == (2, 16)
    assert store.slide_key == "slice"
    np.testing.assert_allclose(store.coords, adata.obsm["spatial"][:, :2])
    with pytest.raises(XscaleInputError, match="does not exist"):
        open_store(path.parent / "missing.zarr")
    cells_only = adata[:50].copy()
    del cells_only.obsm["X_xscale_niche"]
    cells_only.write_zarr(tmp_path / "c.zarr")
    with pytest.raises(XscaleInputError, match="X_xscale_niche"):
        open_store(tmp_path / "c.zarr", level="niche")
    (tmp_path / "broken.zarr").mkdir()
    with pytest.raises(XscaleInputError, match="Could not read"):
        open_store(tmp_path / "broken.zarr")


def test_flat_index_matches_brute_force_and_respects_filters(starmap_store):
    _, adata = starmap_store
    index = LatentIndex(LatentStore.from_adata(adata), kind="auto")
    assert index.kind == "flat"
    cid = adata.obs_names[10]
    hits = index.query_cell(cid, k=5)
    X = adata.obsm["X_xscale_cell"].reshape(adata.n_obs, -1)
    d = np.linalg.norm(X - X[10], axis=1)
    d[10] = np.inf  # the query cell is left out
    assert [h.row for h in hits] == list(np.argsort(d)[:5])
    np.testing.assert_allclose([h.distance for h in hits], np.sort(d)[:5], rtol=1e-4)
    own = adata.obs["slice"].iloc[10]
    cross = index.query_cell(cid, k=20, cross_slide=True)
    assert len(cross) == 20 and all(h.slide != own for h in cross)
    only = index.query_cell(cid, k=20, slide=HOLDOUT)
    assert all(h.slide == HOLDOUT for h in only)
    with pytest.raises(XscaleInputError, match="not found"):
        index.query_cell("no-such-cell")


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_recall_and_narrow_filters(starmap_store, kind):
    _, adata = starmap_store
    store = LatentStore.from_adata(adata, level="niche")
    exact, approx = LatentIndex(store, kind="flat"), LatentIndex(store, kind=kind)
    assert LatentIndex(store, kind="auto", exact_max=100).kind == "ivf"  # chosen by size
    recall = []
    for i in range(0, adata.n_obs, 160):
        a = {h.row for h in exact.query_cell(adata.obs_names[i], k=10)}
        b = {h.row for h in approx.query_cell(adata.obs_names[i], k=10)}
        recall.append(len(a & b) / 10)
    assert np.mean(recall) >= 0.8
    # A filter narrower than the probed lists still returns k hits (exact fallback).
    box = approx.region_rows((0, 0, 2000, 2000), region_slide=HOLDOUT)
    hits = approx.query_region((0, 0, 2000, 2000), k=7, region_slide=HOLDOUT, slide=HOLDOUT)
    assert len(hits) == 7 and not set(box) & {h.row for h in hits}


def test_region_modes(starmap_store):
    _, adata = starmap_store
    index = LatentIndex(LatentStore.from_adata(adata))
    box = (0, 0, 3000, 3000)
    rows = index.region_rows(box, region_slide=HOLDOUT)
    xy = adata.obsm["spatial"][rows]
    assert (xy[:, 0] <= 3000).all() and (adata.obs["slice"].iloc[rows] == HOLDOUT).all()
    inside = index.query_region(box, k=5, region_slide=HOLDOUT, mode="cells")
    assert {h.row for h in inside} <= set(rows)
    cross = index.query_region(box, k=5, region_slide=HOLDOUT, cross_slide=True)
    assert all(h.slide != HOLDOUT for h in cross)
    with pytest.raises(XscaleInputError, match="slides.*--region-slide S / region_slide=S"):
        index.region_rows(box)  # three slides: the region's slide must be named
    with pytest.raises(XscaleInputError, match="No cells"):
        index.region_rows((-10, -10, -5, -5), region_slide=HOLDOUT)
    for filters in ({"cross_slide": True}, {"slide": HOLDOUT}):  # nothing to filter: an error, not ignored
        with pytest.raises(XscaleInputError, match="mode 'cells' lists the region's own cells"):
            index.query_region(box, k=5, region_slide=HOLDOUT, mode="cells", **filters)


def test_cli_cross_slide_with_a_vector_is_an_error(starmap_store, tmp_path, capsys):
    path, adata = starmap_store
    vec = tmp_path / "v.npy"
    np.save(vec, adata.obsm["X_xscale_cell"][7])
    assert main(["query", "--store", str(path), "--vector", str(vec), "--cross-slide"]) == 2
    assert "--cross-slide: a --vector has no slide of its own" in capsys.readouterr().err


def test_transfer_labels_on_held_out_slice(starmap_store):
    from sklearn.metrics import accuracy_score

    import xscale.tl

    _, adata = starmap_store
    test = (adata.obs["slice"] == HOLDOUT).to_numpy()
    ref, query = adata[~test].copy(), adata[test].copy()
    xscale.tl.transfer_labels(query, ref, key="cell_type", k=15)
    pred = query.obs["cell_type_transferred"].astype(str)
    acc = accuracy_score(query.obs["cell_type"].astype(str), pred)
    majority = query.obs["cell_type"].value_counts(normalize=True).iloc[0]
    assert acc > majority + 0.2, (acc, majority)
    conf = query.obs["cell_type_transferred_confidence"].to_numpy()
    assert conf.min() > 0 and conf.max() <= 1
    # confident calls are more often right
    right = (pred == query.obs["cell_type"].astype(str)).to_numpy()
    assert right[conf >= 0.8].mean() > right[conf < 0.5].mean()
    ratio = query.uns["cell_type_transferred_params"]["nn_distance_ratio"]
    assert 0.7 < ratio < 1.5, ratio  # slices of one dataset share one latent space
    with pytest.raises(XscaleInputError, match="not found in reference.obs"):
        xscale.tl.transfer_labels(query, ref, key="nope")


def test_transfer_labels_warns_when_panels_put_cells_in_different_spaces(tmp_path, caplog):
    """CosMx -> MERFISH (real cells) embedded from each panel's own genes lie apart in latent space;
    from the genes the panels share they do not. The warning says which case and what to do."""
    import logging

    import xscale
    from xscale.train.level1 import fit_level1

    rng = np.random.default_rng(0)
    ref, query = (a[np.sort(rng.choice(a.n_obs, 400, replace=False))].copy() for a in
                  (xscale.datasets.load("cosmx_nsclc_profast"), xscale.datasets.load("merfish_lung_tessera")))
    model = fit_level1([ref, query], "tiny", out_dir=tmp_path / "l1", max_steps=60, batch_size=64, logger="none",
                       enable_progress_bar=False)
    for a in (ref, query):
        xscale.tl.embed_cells(a, model, progress=False)
    with caplog.at_level(logging.WARNING, logger="xscale.tl.transfer"):
        xscale.tl.transfer_labels(query, ref, key="cell_type")
    far = query.uns["cell_type_transferred_params"]["nn_distance_ratio"]
    assert far > 2, far
    msg = caplog.text
    assert "not in one latent space" in msg and "cell_type_transferred_params" in msg
    assert "Their panels differ (283 genes shared of the query's 479 and the reference's 960)" in msg

    shared = [g for g in ref.var_names if g in set(query.var_names)]
    ref2, query2 = ref[:, shared].copy(), query[:, shared].copy()
    for a in (ref2, query2):
        xscale.tl.embed_cells(a, model, progress=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xscale.tl.transfer"):
        xscale.tl.transfer_labels(query2, ref2, key="cell_type")
    near = query2.uns["cell_type_transferred_params"]["nn_distance_ratio"]
    assert near < 2 and near < far / 2, (near, far)
    assert "not in one latent space" not in caplog.text


def test_cli_query_json_and_tsv(starmap_store, capsys, tmp_path):
    path, adata = starmap_store
    cid = adata.obs_names[5]
    assert main(["query", "--store", str(path), "--level", "niche", "--cell", cid, "--k", "4", "--cross-slide"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 4
    for h in hits:
        assert {"id", "distance", "slide", "x", "y", "cell_type", "domain_name"} <= set(h)
        assert h["slide"] != adata.obs["slice"].iloc[5] and h["distance"] >= 0
    vec = tmp_path / "v.npy"
    np.save(vec, adata.obsm["X_xscale_cell"][7])
    assert main(["query", "--store", str(path), "--vector", str(vec), "--k", "3", "--format", "tsv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split("\t")[:5] == ["id", "distance", "slide", "x", "y"] and len(lines) == 4
    assert lines[1].split("\t")[0] == adata.obs_names[7]  # the vector's own cell, distance 0
    assert main(["query", "--store", str(path), "--region", "0,0,3000,3000", "--slide", HOLDOUT,
                 "--region-slide", HOLDOUT, "--k", "2"]) == 0
    assert all(h["slide"] == HOLDOUT for h in json.loads(capsys.readouterr().out))
    # a user error: exit status 2 and one line naming what to do
    assert main(["query", "--store", str(path), "--cell", "nope"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_domains_reclusters_niche_latents(starmap_store, tmp_path, capsys):
    import anndata as ad

    path, adata = starmap_store
    out = tmp_path / "re.zarr"
    code = main(["domains", "--store", str(path), "--n-domains", "5", "--key-added", "dom5",
                 "--label-key", "domain_name", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "ARI" in text
    result = ad.read_zarr(out)
    assert result.obs["dom5"].nunique() == 5 and result.n_obs == adata.n_obs
    assert "dom5" not in ad.read_zarr(path).obs  # --out leaves the source store alone
    assert main(["domains", "--store", str(out), "--n-domains", "1"]) == 2
    args = ["domains", "--store", str(path), "--n-domains", "4", "--slide-key", "slice"]
    assert main([*args, "--out", str(out)]) == 0
    assert ad.read_zarr(out).obs["xscale_domain"].nunique() == 4
    explicit = ad.read_zarr(out).obs["xscale_domain"].astype(str).to_numpy()
    assert "centred per slide of obs['slice'] (3 slides)" in capsys.readouterr().out
    # by default the slide key the store records (uns["xscale"]["slide_key"], as xscale run writes it)
    assert main(["domains", "--store", str(path), "--n-domains", "4", "--out", str(out)]) == 0
    assert "centred per slide of obs['slice']" in capsys.readouterr().out
    np.testing.assert_array_equal(ad.read_zarr(out).obs["xscale_domain"].astype(str).to_numpy(), explicit)
    assert main(["domains", "--store", str(path), "--n-domains", "4", "--no-slide-center", "--out", str(out)]) == 0
    assert "centred" not in capsys.readouterr().out
    import xscale.tl

    plain = adata.copy()
    plain.obsm["X_xscale_niche"] = plain.obsm["X_xscale_niche"].reshape(plain.n_obs, -1)
    xscale.tl.domains(plain, 4)
    np.testing.assert_array_equal(ad.read_zarr(out).obs["xscale_domain"].astype(str).to_numpy(),
                                  plain.obs["xscale_domain"].astype(str).to_numpy())
    assert main(["domains", "--store", str(path), "--n-domains", "4", "--slide-key", "nope"]) == 2
    assert "--slide-key 'nope' not in the store's obs" in capsys.readouterr().err
    assert main(["domains", "--store", str(path), "--n-domains", "4", "--label-key", "typo", "--out",
                 str(tmp_path / "never.zarr")]) == 2
    captured = capsys.readouterr()
    assert "--label-key 'typo'" in captured.err and "domains in obs" not in captured.out  # before clustering
    assert not (tmp_path / "never.zarr").exists()


def test_approximate_index_under_a_slide_filter_matches_brute_force():
    """IVF probed the lists nearest the query without the filter and returned farther allowed cells
    (recall@10 0.40 at worst for a 2,000-cell slide of 150,000); a filter that leaves at most exact_max
    cells is now searched exactly, a wider one probes proportionally more lists."""
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 12_000
    lat = rng.normal(size=(n, 16)).astype(np.float32)
    obs = pd.DataFrame({"slide": np.where(np.arange(n) < 600, "B", "A")}, index=[f"c{i}" for i in range(n)])
    store = LatentStore(lat, (16,), obs, None, "slide", "cell")
    for kind in ("ivf", "hnsw"):
        index = LatentIndex(store, kind=kind, exact_max=1000)
        for q in range(600, 640):  # cells of slide A, hits on slide B only (600 cells <= exact_max)
            hits = index.query_cell(f"c{q}", k=10, cross_slide=True)
            d = ((lat[:600] - lat[q]) ** 2).sum(1)
            assert [h.row for h in hits] == list(np.argsort(d, kind="stable")[:10]), (kind, q)
    # a filter wider than exact_max (2,000 allowed, exact_max 100): IVF probes 6x the lists, and recall under
    # the filter is no worse than the index's own unfiltered recall on the same data
    obs2 = pd.DataFrame({"slide": np.where(np.arange(n) < 2000, "B", "A")}, index=obs.index)
    ivf = LatentIndex(LatentStore(lat, (16,), obs2, None, "slide", "cell"), kind="ivf", exact_max=100)

    def recall(q: int, cross: bool) -> float:
        rows = np.arange(2000) if cross else np.delete(np.arange(n), q)
        truth = set(rows[np.argsort(((lat[rows] - lat[q]) ** 2).sum(1))[:10]].tolist())
        return len({h.row for h in ivf.query_cell(f"c{q}", k=10, cross_slide=cross)} & truth) / 10

    queries = range(2000, 2040)
    filtered, unfiltered = (np.mean([recall(q, c) for q in queries]) for c in (True, False))
    assert filtered >= unfiltered - 0.02, (filtered, unfiltered)


def test_region_query_argument_checks():
    """mode='cells' took k=-1 (all but one cell) or 2.5 (a TypeError); cross_slide on a store without
    slides was ignored by region queries (cell queries refuse it)."""
    import pandas as pd

    rng = np.random.default_rng(0)
    lat = rng.normal(size=(50, 4)).astype(np.float32)
    obs = pd.DataFrame(index=[f"c{i}" for i in range(50)])
    store = LatentStore(lat, (4,), obs, rng.uniform(0, 10, size=(50, 2)), None, "cell")
    index = LatentIndex(store)
    for k in (0, -1, 2.5, True):
        for mode in ("cells", "mean"):
            with pytest.raises(XscaleInputError, match="k: expected a whole number of hits"):
                index.query_region((0, 0, 10, 10), k=k, mode=mode)
    with pytest.raises(XscaleInputError, match="Cross-slide retrieval needs a slide column"):
        index.query_region((0, 0, 10, 10), k=3, cross_slide=True)
    with pytest.raises(XscaleInputError, match="Query vector: expected numbers"):
        index.query_vector(np.array(["a"] * 4), k=3)
