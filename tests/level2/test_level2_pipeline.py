"""Staged pipeline, stage skipping, joint training and `xscale run` on real STARmap cells (tiny settings)."""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import torch

import xscale.datasets as datasets

HOLDOUT = "20180424_BZ14_control"


@pytest.fixture(scope="module")
def starmap_small() -> ad.AnnData:
    """~300 real STARmap cells: a spatial window of each of two slices (one held out)."""
    a = datasets.load("starmap_mpfc")
    slides = a.obs["slice"].astype(str).to_numpy()
    keep = np.zeros(a.n_obs, dtype=bool)
    for s in ("20180417_BZ5_control", HOLDOUT):
        rows = np.flatnonzero(slides == s)
        xy = a.obsm["spatial"][rows]
        order = np.argsort(xy[:, 0])  # a band of the slice across the layers
        keep[rows[order[:150]]] = True
    return a[keep].copy()


def test_level2_staged_end_to_end_and_rerun_skips(starmap_small, tmp_path):
    from xscale.train.staged import STAGES, run_staged

    out = tmp_path / "run"
    kwargs = dict(
        level1_preset="tiny", level2_preset="tiny", train_slides=["20180417_BZ5_control"], slide_key="slice",
        n_domains=3, level1_max_steps=4, level2_max_steps=4, batch_size=32, progress=False,
    )
    res = run_staged(starmap_small.copy(), out, **kwargs)
    n = starmap_small.n_obs
    assert res.skipped == []
    k, d = res.level1.config.latents_per_cell, res.level1.config.dim
    assert res.adata.obsm["X_xscale_cell"].shape == (n, k * d)
    t, dl2 = res.level2.config.n_tissue_latents, res.level2.config.dim
    assert res.adata.obsm["X_xscale_niche"].shape == (n, t * dl2)
    assert np.isfinite(res.adata.obsm["X_xscale_niche"]).all()
    assert set(res.adata.obs["xscale_domain"].astype(str)) <= {"0", "1", "2"}
    store = ad.read_zarr(out / "cells.zarr")
    assert list(store.obs_names) == list(starmap_small.obs_names)
    np.testing.assert_allclose(store.obsm["X_xscale_niche"], res.adata.obsm["X_xscale_niche"])
    for stage in STAGES:
        assert (out / "checkpoints" / stage).is_dir()

    again = run_staged(starmap_small.copy(), out, **kwargs)
    assert again.skipped == list(STAGES)
    assert again.seconds == {}
    np.testing.assert_array_equal(again.adata.obsm["X_xscale_niche"], res.adata.obsm["X_xscale_niche"])

    # An interrupted niche stage (no completion marker) is redone, the finished ones are not.
    import shutil

    shutil.rmtree(out / "checkpoints" / "niches")
    third = run_staged(starmap_small.copy(), out, **kwargs)
    assert third.skipped == ["level1", "cells", "level2"]
    np.testing.assert_allclose(third.adata.obsm["X_xscale_niche"], res.adata.obsm["X_xscale_niche"], atol=1e-5)

    # Other settings in the same out dir: a clear error, not silently reused stale stages.
    from xscale.errors import XscaleInputError

    with pytest.raises(XscaleInputError, match=r"Stage 'level1'.*level1_max_steps: finished with 4, now 8"):
        run_staged(starmap_small.copy(), out, **{**kwargs, "level1_max_steps": 8})
    with pytest.raises(XscaleInputError, match=r"Stage 'level2'.*level2_overrides"):
        run_staged(starmap_small.copy(), out, **kwargs, level2_overrides={"mask_ratio": 0.5})
    from xscale.models.cell_to_tissue import CellToTissueConfig

    # a preset changed by a newer xscale

    changed = {**CellToTissueConfig.PRESETS["tiny"], "w_composition": 0.5}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(CellToTissueConfig.PRESETS, "tiny", changed)
        with pytest.raises(XscaleInputError, match=r"Stage 'level2'.*level2_preset_values"):
            run_staged(starmap_small.copy(), out, **kwargs)
    np.testing.assert_array_equal(np.load(out / "checkpoints" / "niches" / "latents.npy"),
                                  third.adata.obsm["X_xscale_niche"])  # nothing written was touched
    # the same number of cells in another order (or another file): not reused, it would attach the
    # finished latents to other cells
    other = starmap_small.copy()
    order = np.argsort(other.obs["cell_type"].astype(str).to_numpy(), kind="stable")
    other.X, other.obsm["spatial"] = other.X[order], other.obsm["spatial"][order]  # same ids, slides, mask
    other.obs_names = starmap_small.obs_names[order]
    other.obs["slice"] = starmap_small.obs["slice"].to_numpy()
    with pytest.raises(XscaleInputError, match=r"Stage 'level1'.*\(data_digest: finished with \S+, now \S+\)"):
        run_staged(other, out, **kwargs)


def test_staged_interrupted_stage_does_not_resume_with_other_settings(starmap_small, tmp_path, monkeypatch):
    """A level-1 stage killed after its last checkpoint (model not saved yet) and re-run with other
    training cells stops with a clear error: it would resume the interrupted run's weights (trained on
    the other cells) and record the new settings. Re-run with the same settings, it resumes and finishes."""
    import shutil
    from pathlib import Path

    import xscale.train.level1 as level1
    import xscale.train.staged as staged
    from xscale.errors import XscaleInputError

    out = tmp_path / "run"
    kwargs = dict(level1_preset="tiny", level2_preset="tiny", slide_key="slice", level1_max_steps=4,
                  level2_max_steps=2, batch_size=32, progress=False, write_store=False)
    real_fit = level1.fit_level1  # run_staged imports it from xscale.train.level1 when it runs

    def killed_before_saving(*args, **kw):
        real_fit(*args, **kw)
        shutil.rmtree(Path(kw["out_dir"]) / "model")  # the checkpoint is on disk, the finished model is not
        raise KeyboardInterrupt

    monkeypatch.setattr(level1, "fit_level1", killed_before_saving)
    with pytest.raises(KeyboardInterrupt):
        staged.run_staged(starmap_small.copy(), out, train_slides=["20180417_BZ5_control"], **kwargs)
    monkeypatch.setattr(level1, "fit_level1", real_fit)
    assert (out / "checkpoints" / "level1.started.json").is_file()
    with pytest.raises(XscaleInputError, match=r"Stage 'level1'.*interrupted earlier with other settings "
                                               r"\(train_cells: started with"):
        staged.run_staged(starmap_small.copy(), out, train_slides=[HOLDOUT], **kwargs)
    res = staged.run_staged(starmap_small.copy(), out, train_slides=["20180417_BZ5_control"], **kwargs)
    assert res.skipped == [] and not (out / "checkpoints" / "level1.started.json").exists()
    assert (out / "checkpoints" / "level1.settings.json").is_file()


def test_level2_joint_loss_falls(starmap_small):
    from xscale.data.anndata_dataset import AnnDataCellDataset
    from xscale.models.cell_to_tissue import CellToTissue, CellToTissueConfig
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.train.joint import HierarchyModule, JointNicheDataset
    from xscale.train.level2 import make_niches

    torch.manual_seed(0)
    a = starmap_small
    l1 = GeneToCell(GeneToCellConfig.preset("tiny", genes=list(a.var_names), max_genes=48))
    width = l1.config.latents_per_cell * l1.config.dim
    l2 = CellToTissue(CellToTissueConfig.preset("tiny", in_dim=width, max_cells=6))
    niches = make_niches(a.obsm["spatial"], np.arange(8), max_cells=6, slides=a.obs["slice"].astype(str).to_numpy())
    data = JointNicheDataset(AnnDataCellDataset(a, l1.vocab), niches, max_genes=48)
    module = HierarchyModule(l1, l2)
    batch = data.collate(list(range(8)))
    assert batch.cells.gene_ids.shape[0] == int((~batch.pad_mask).sum())
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        out = module.compute_loss(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.8 * losses[0]
    assert out.counts.item() > 0 and out.level2.item() >= 0
    # gradients of the summed loss reach both levels
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in l1.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in l2.parameters())


def test_level2_cli_run_writes_store_and_metrics(starmap_small, tmp_path, capsys):
    from xscale.cli.main import main

    data = tmp_path / "small.h5ad"
    starmap_small.write_h5ad(data)
    out = tmp_path / "out"
    code = main([
        "run", "--data", str(data), "--out", str(out), "--slide-key", "slice", "--domain-key", "domain_name",
        "--cell-type-key", "cell_type", "--preset", "tiny", "--max-steps", "3", "--no-progress",
    ])
    assert code == 0
    store = ad.read_zarr(out / "cells.zarr")
    assert list(store.obs_names) == list(starmap_small.obs_names)
    assert {"X_xscale_cell", "X_xscale_niche"} <= set(store.obsm)
    assert store.obs["xscale_domain"].nunique() <= starmap_small.obs["domain_name"].nunique()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["domains"]["per_slide"]) == set(starmap_small.obs["slice"].astype(str))
    assert -1.0 <= metrics["domains"]["xscale_domain"]["ari"] <= 1.0
    assert 0.0 <= metrics["cell_types"]["knn_purity_xscale_cell"] <= 1.0
    # the printed summary puts each score beside its baseline
    summary = metrics["summary"]
    assert {"knn_purity_xscale_cell", "knn_purity_pca", "domain_ari_xscale_niche", "domain_ari_pca_spatial_mean",
            "domain_ari_xscale_domain"} <= set(summary)
    assert summary["domain_ari_xscale_domain"] == metrics["domains"]["xscale_domain"]["ari"]
    assert '"knn_purity_pca"' in capsys.readouterr().out
    # a missing key is a user error (exit 2), not a traceback
    assert main(["run", "--data", str(data), "--out", str(out), "--slide-key", "nope", "--preset", "tiny"]) == 2


def test_level2_cli_run_takes_a_bundled_dataset_name(tmp_path, monkeypatch):
    """``xscale run --data starmap_mpfc`` reads the bundled file with its slide key (training stubbed)."""
    import xscale.train.staged
    from xscale.cli.main import main

    class Stop(Exception):
        pass

    seen = {}

    def stop(adata, out, **kw):
        seen.update(n_obs=adata.n_obs, slide_key=kw["slide_key"], slides=adata.obs[kw["slide_key"]].nunique())
        raise Stop  # before training

    monkeypatch.setattr(xscale.train.staged, "run_staged", stop)
    with pytest.raises(Stop):
        main(["run", "--data", "starmap_mpfc", "--out", str(tmp_path / "o"), "--preset", "tiny"])
    assert seen == {"n_obs": 3190, "slide_key": "slice", "slides": 3}


def test_level2_niche_embeddings_unit_invariant_and_padded(starmap_small):
    from xscale.models.cell_to_tissue import CellToTissue, CellToTissueConfig
    from xscale.tl.niches import niche_embeddings
    from xscale.train.level2 import make_niches

    torch.manual_seed(0)
    a = starmap_small
    slides = a.obs["slice"].astype(str).to_numpy()
    xy = np.asarray(a.obsm["spatial"], dtype=np.float64)
    lat = np.random.default_rng(0).normal(size=(a.n_obs, 8)).astype(np.float32)
    model = CellToTissue(CellToTissueConfig.preset("tiny", in_dim=8, max_cells=7))
    e1 = niche_embeddings(model, lat, xy, slides=slides)
    e2 = niche_embeddings(model, lat, xy * 1000.0, slides=slides)
    np.testing.assert_allclose(e1, e2, rtol=1e-4, atol=1e-5)
    # a slide with fewer cells than the niche size gets padded niches, centre first
    tiny = make_niches(xy[:4], np.arange(4), max_cells=7)
    assert tiny.pad_mask[:, 4:].all() and not tiny.pad_mask[:, :4].any()
    assert (tiny.idx[:, 0] == np.arange(4)).all() and np.allclose(tiny.rel_xy[:, 0], 0.0)


def _spots(a: ad.AnnData, bin_size: float) -> ad.AnnData:
    """Spot-based data from real cells: counts summed over a square grid, one spot per occupied bin
    (at the bin centre), per slide: a regular lattice like Visium's, several cells per spot."""
    import scipy.sparse as sp

    names, slide = np.unique(a.obs["slice"].astype(str).to_numpy(), return_inverse=True)
    bins = np.floor(a.obsm["spatial"] / bin_size).astype(np.int64)  # (n, 2) grid cell of each cell
    # (S, 3) slide and grid cell of each spot; inverse: the spot of each cell
    spot_keys, inverse = np.unique(np.column_stack([slide, bins]), axis=0, return_inverse=True)
    n_spots = len(spot_keys)
    rows_cols = (inverse.ravel(), np.arange(a.n_obs))
    member = sp.csr_matrix((np.ones(a.n_obs), rows_cols), shape=(n_spots, a.n_obs))  # (S, n)
    counts = sp.csr_matrix(member @ sp.csr_matrix(a.X)).astype(np.float32)  # (S, genes) summed
    spots = ad.AnnData(counts, var=a.var[[]].copy())
    spots.obs_names = [f"spot{i}" for i in range(n_spots)]
    spots.obs["slice"] = names[spot_keys[:, 0]]
    spots.obsm["spatial"] = (spot_keys[:, 1:] + 0.5) * bin_size  # bin centres: a regular lattice
    return spots


@pytest.mark.parametrize("kind", ["small_panel", "spots"])
def test_level2_cli_run_on_a_small_panel_and_on_spots(starmap_small, tmp_path, kind):
    """`xscale run` completes on a panel of tens of genes and on spot-based data (a regular grid)."""
    from xscale.cli.main import main

    a = starmap_small
    if kind == "small_panel":  # the 24 most detected genes of the panel
        detected = np.asarray((a.X > 0).sum(axis=0)).ravel()
        a = a[:, np.sort(np.argsort(-detected)[:24])].copy()
    else:
        extent = np.ptp(a.obsm["spatial"], axis=0).max()
        a = _spots(a, bin_size=extent / 12)
        assert a.n_obs < starmap_small.n_obs and a.X.sum() == starmap_small.X.sum()
    data = tmp_path / f"{kind}.h5ad"
    a.write_h5ad(data)
    out = tmp_path / "out"
    code = main(["run", "--data", str(data), "--out", str(out), "--slide-key", "slice", "--n-domains", "3",
                 "--preset", "tiny", "--max-steps", "3", "--no-progress", "--no-report"])
    assert code == 0
    store = ad.read_zarr(out / "cells.zarr")
    assert list(store.obs_names) == list(a.obs_names)
    for key in ("X_xscale_cell", "X_xscale_niche"):
        assert store.obsm[key].shape[0] == a.n_obs and np.isfinite(store.obsm[key]).all()
    assert store.obs["xscale_domain"].nunique() == 3
