"""Declarative pipelines: manifests, skip on re-run, re-run when parameters or outputs change."""
from __future__ import annotations

import json
import shutil

import pytest

from xscale.errors import XscaleInputError
from xscale.pipelines import manifest_path, run_pipeline


def _write(path, text):
    path.write_text(text)
    return path


def test_pipeline_skips_complete_steps_and_reruns_changed_ones(starmap_store, tmp_path):
    store, _ = starmap_store
    pipe = _write(tmp_path / "p.yaml", f"""
name: eval-test
steps:
  - name: baseline
    uses: pca_embed
    with: {{data: starmap_mpfc, n_components: 8}}
  - name: score
    uses: evaluate
    with: {{store: {store}, dataset: starmap_mpfc}}
  - name: score_baseline_store
    uses: evaluate
    with: {{store: "${{baseline.store}}", label_key: cell_type, slide_key: slice, holdout: 20180424_BZ14_control}}
""")
    out = tmp_path / "out"
    first = run_pipeline(pipe, out)
    assert not any(m["skipped"] for m in first.values())
    man = json.loads(manifest_path(out, "score").read_text())
    metrics = json.loads((out / "score" / "metrics.json").read_text())
    assert man["outputs"]["metrics"]["bytes"] > 0 and man["results"]["metrics"] == metrics
    assert set(metrics["cell_type"]) == {"xscale_cell", "pca"}
    assert {"xscale_niche", "pca_spatial_mean", "pca"} <= set(metrics["domains"])
    assert metrics["domains"]["n_domains"] == 4
    # the spatial mean of PCA beats PCA alone on cortical layers: the evaluation sees space
    assert metrics["domains"]["pca_spatial_mean"]["ari"] > metrics["domains"]["pca"]["ari"] + 0.2

    second = run_pipeline(pipe, out)
    assert all(m["skipped"] for m in second.values())

    shutil.rmtree(out / "baseline" / "cells.zarr")  # a lost output re-runs its step only
    third = run_pipeline(pipe, out)
    assert not third["baseline"]["skipped"] and third["score"]["skipped"]

    pipe.write_text(pipe.read_text().replace("n_components: 8", "n_components: 6"))  # changed parameters
    fourth = run_pipeline(pipe, out)
    assert not fourth["baseline"]["skipped"] and fourth["score"]["skipped"]
    assert not fourth["score_baseline_store"]["skipped"]  # what it reads was made again

    # the same path holding other data: re-run (only parameters were compared, so it was skipped)
    import anndata as ad

    from xscale.data.writeback import write_anndata_zarr

    copy = tmp_path / "copy.zarr"
    data = ad.read_zarr(store)
    write_anndata_zarr(data, copy)
    pipe2 = _write(tmp_path / "p2.yaml", f"""
name: input-change
steps:
  - name: score
    uses: evaluate
    with: {{store: {copy}, dataset: starmap_mpfc}}
""")
    assert not run_pipeline(pipe2, tmp_path / "out2")["score"]["skipped"]
    assert run_pipeline(pipe2, tmp_path / "out2")["score"]["skipped"]
    write_anndata_zarr(data[: data.n_obs // 2].copy(), copy)  # half the cells, same path
    assert not run_pipeline(pipe2, tmp_path / "out2")["score"]["skipped"]


def test_pipeline_errors_are_clear(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "steps:\n  - name: a\n    uses: nope\n")
    with pytest.raises(XscaleInputError, match="unknown kind 'nope'"):
        run_pipeline(bad, tmp_path / "o")
    typo = _write(tmp_path / "typo.yaml", "steps:\n  - name: a\n    uses: pca_embed\n    with: {data: x, n_comp: 3}\n")
    with pytest.raises(XscaleInputError, match="n_comp"):
        run_pipeline(typo, tmp_path / "o")
    ref = _write(tmp_path / "ref.yaml", "steps:\n  - name: a\n    uses: evaluate\n    with: {store: '${b.store}'}\n")
    with pytest.raises(XscaleInputError, match="no earlier step is named 'b'"):
        run_pipeline(ref, tmp_path / "o")


@pytest.mark.slow
def test_pretrain_multiscale_pipeline_runs_at_tiny_settings(tmp_path):
    """The shipped multi-scale pretraining pipeline, end to end (4 panels), then a re-run that skips."""
    from pathlib import Path

    pipe = Path(__file__).resolve().parents[2] / "pipelines" / "pretrain_multiscale.yaml"
    tiny = {"preset": "tiny", "level1_steps": 2, "level2_steps": 2}
    done = run_pipeline(pipe, tmp_path, variables=tiny)
    assert list(done) == ["level1", "cells_starmap", "level2", "niches_starmap", "evaluate_starmap"]
    metrics = done["evaluate_starmap"]["results"]["metrics"]
    assert {"xscale_niche", "pca_spatial_mean"} <= set(metrics["domains"])
    assert all(m["skipped"] for m in run_pipeline(pipe, tmp_path, variables=tiny).values())


def test_cli_pipeline_runs_then_skips_and_reports_errors(tmp_path, capsys):
    """`xscale pipeline` runs a real step, skips it on re-run, and exits 2 with one line on bad input."""
    from xscale.cli.main import main

    pipe = _write(tmp_path / "p.yaml", """
name: cli-test
vars: {n: 4}
steps:
  - name: baseline
    uses: pca_embed
    with: {data: starmap_mpfc, n_components: "${vars.n}"}
""")
    out = tmp_path / "out"
    assert main(["pipeline", str(pipe), "--out", str(out)]) == 0
    assert "baseline: ran in" in capsys.readouterr().out
    assert (out / "manifests" / "baseline.json").exists()
    assert main(["pipeline", str(pipe), "--out", str(out)]) == 0
    assert "baseline: skipped (complete)" in capsys.readouterr().out
    assert main(["pipeline", str(pipe), "--out", str(out), "--var", "oops"]) == 2
    assert "--var 'oops' is not NAME=VALUE" in capsys.readouterr().err


def test_slide_correction_pipeline_runs_at_tiny_settings(tmp_path):
    """The shipped slide-correction pipeline on a tiny untrained model: corrected model, settings, embedding."""
    from pathlib import Path

    import anndata as ad
    import torch

    import xscale.datasets as ds
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.io import save_model

    adata = ds.load("starmap_mpfc")
    torch.manual_seed(0)
    save_model(GeneToCell(GeneToCellConfig.preset("tiny", genes=list(adata.var_names))), tmp_path / "pre")
    pipe = Path(__file__).resolve().parents[2] / "pipelines" / "slide_correction.yaml"
    done = run_pipeline(pipe, tmp_path / "run", variables={"model": str(tmp_path / "pre"), "max_steps": 2})
    assert list(done) == ["correct", "cells"]
    doc = json.loads((tmp_path / "run" / "correct" / "finetuned" / "finetune.json").read_text())
    assert doc["task"] == "batch_correction" and doc["correction"]["structure_weight"] == 1.0
    assert doc["reconstruction_weight"] == 1.0
    assert "latent_spread_after" in doc["metrics"]
    assert 0 < doc["metrics"]["knn_purity_after"] <= 1  # label_key: cell types scored before and after
    cells = ad.read_zarr(done["cells"]["outputs"]["store"]["path"])
    assert cells.obsm["X_xscale_cell"].shape[0] == adata.n_obs


def test_embed_pipeline_on_your_own_file(tmp_path):
    """pipelines/embed.yaml with --var data=<your .h5ad>: every step takes the path (the niche and
    evaluate steps looked it up as a bundled dataset name and stopped); a misspelt name is one error."""
    from pathlib import Path

    import numpy as np
    import torch

    import xscale
    from xscale.models.cell_to_tissue import CellToTissue, CellToTissueConfig
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.io import save_model

    torch.manual_seed(0)
    a = xscale.datasets.load("starmap_mpfc")
    a = a[np.flatnonzero((a.obs["slice"] == "20180417_BZ5_control").to_numpy())[:300]].copy()
    del a.uns["xscale_dataset"]
    a.write_h5ad(tmp_path / "mine.h5ad")
    l1 = GeneToCell(GeneToCellConfig.preset("tiny", genes=list(a.var_names)))
    save_model(l1, tmp_path / "l1")
    save_model(CellToTissue(CellToTissueConfig.preset("tiny", in_dim=l1.config.embedding_dim)), tmp_path / "l2")
    pipe = Path(__file__).resolve().parents[2] / "pipelines" / "embed.yaml"
    variables = {"level1": str(tmp_path / "l1"), "level2": str(tmp_path / "l2"), "data": str(tmp_path / "mine.h5ad"),
                 "n_domains": 3}
    done = run_pipeline(pipe, tmp_path / "out", variables=variables)
    assert list(done) == ["cells", "niches", "evaluate"] and not any(m["skipped"] for m in done.values())
    import anndata as ad

    store = ad.read_zarr(done["niches"]["outputs"]["store"]["path"])
    assert store.obsm["X_xscale_niche"].shape[0] == 300 and store.obs["xscale_domain"].nunique() == 3
    assert "cell_type" not in done["evaluate"]["results"]["metrics"]  # no label column named: nothing scored
    # the obs columns of your own file, as vars: the evaluate step scores cell types on the named held-out slide
    keyed = run_pipeline(pipe, tmp_path / "keyed", variables={**variables, "slide_key": "slice",
                                                              "label_key": "cell_type", "holdout": "none_such"})
    metrics = keyed["evaluate"]["results"]["metrics"]
    assert set(metrics["cell_type"]) == {"xscale_cell", "pca"} and metrics["holdout"] == "random 20%"
    # the same cells named by Ensembl IDs, symbols in var['feature_name'] (CELLxGENE's layout): --var gene_symbols
    a.var["feature_name"] = list(a.var_names)
    a.var_names = [f"ENSMUSG{i:011d}" for i in range(a.n_vars)]
    a.write_h5ad(tmp_path / "ens.h5ad")
    ens = run_pipeline(pipe, tmp_path / "ens", variables={**variables, "data": str(tmp_path / "ens.h5ad"),
                                                          "gene_symbols": "feature_name"})
    again = ad.read_zarr(ens["cells"]["outputs"]["store"]["path"])
    first = ad.read_zarr(done["cells"]["outputs"]["store"]["path"])
    np.testing.assert_array_equal(again.obsm["X_xscale_cell"], first.obsm["X_xscale_cell"])
    with pytest.raises(XscaleInputError, match="expected a bundled dataset name .* or a path to your data"):
        run_pipeline(pipe, tmp_path / "out2", variables={**variables, "data": "starmap_mpf"})


def test_pipeline_vars_are_type_checked_before_any_step(tmp_path, capsys):
    """--var level1_steps=abc or preset=huge stopped only inside the step that used them (a TypeError /
    ValueError traceback, after earlier steps ran); now one line before anything runs. Every shipped
    pipeline passes the check with its own vars."""
    from pathlib import Path

    from xscale.cli.main import main
    from xscale.pipelines import load_pipeline
    from xscale.pipelines.runner import _var_value, check_step

    for pipe in sorted((Path(__file__).resolve().parents[2] / "pipelines").glob("*.yaml")):
        _, steps, file_vars = load_pipeline(pipe)
        for spec in steps:
            check_step(spec.uses, {k: _var_value(v, file_vars) for k, v in spec.params.items()}, spec.name)
    pipe = str(Path(__file__).resolve().parents[2] / "pipelines" / "pretrain_multiscale.yaml")
    for var, says in (("level1_steps=abc", "parameter 'max_steps' of step 'fit_level1': expected int, found 'abc'"),
                      ("preset=huge", "expected Literal['tiny', 'small', 'base'], found 'huge'")):
        assert main(["pipeline", pipe, "--out", str(tmp_path / "o"), "--var", var]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_pipeline_only_runs_the_chosen_steps_and_what_they_read(tmp_path):
    """--only a: the steps after it that nothing chosen reads are left alone (they were required before); a chosen
    step whose input step has not run says which and why; an unknown name is an error listing the steps."""
    from xscale.errors import XscaleInputError
    from xscale.pipelines.runner import STEPS, register_step, run_pipeline

    calls = []

    @register_step("test_touch")
    def touch(ctx, *, text: str) -> dict:
        calls.append(ctx.name)
        path = ctx.workdir / "out.txt"
        path.write_text(text)
        return {"outputs": {"file": path}}

    try:
        yml = tmp_path / "p.yaml"
        yml.write_text("name: p\nsteps:\n"
                       "  - {name: a, uses: test_touch, with: {text: one}}\n"
                       "  - {name: b, uses: test_touch, with: {text: '${a.file}'}}\n"
                       "  - {name: c, uses: test_touch, with: {text: three}}\n")
        out = tmp_path / "out"
        done = run_pipeline(yml, out, only=["a"])
        assert calls == ["a"] and set(done) == {"a"}
        with pytest.raises(XscaleInputError, match=r"Step 'a' is needed by \['b'\] \(chosen with --only\)"):
            run_pipeline(yml, tmp_path / "fresh", only=["b"])
        done = run_pipeline(yml, out, only=["b"])  # a is complete: read, not run again
        assert calls == ["a", "b"] and done["a"]["skipped"] and not done["b"]["skipped"]
        with pytest.raises(XscaleInputError, match=r"--only: expected step names of this pipeline \(\['a', 'b', "
                                                   r"'c'\]\), found \['typo'\]"):
            run_pipeline(yml, out, only=["typo"])
    finally:
        STEPS.pop("test_touch", None)


def test_evaluate_refuses_a_mistyped_key_and_warns_when_nothing_is_scored():
    """A label_key not in obs scored nothing and said nothing; no key at all wrote a nearly empty metrics.json."""
    import xscale
    from xscale.errors import XscaleInputError
    from xscale.pipelines.evaluate import evaluate_adata

    a = xscale.datasets.load("starmap_mpfc")[:200].copy()
    with pytest.raises(XscaleInputError, match=r"label_key 'cell_typ': expected an obs column, found none by that "
                                               r"name. Available: \["):
        evaluate_adata(a, label_key="cell_typ")
    with pytest.warns(UserWarning, match="no label_key and no domain_key, so nothing is scored"):
        out = evaluate_adata(a, label_key=None)
    assert set(out) == {"n_cells", "holdout"}


def test_evaluate_fits_its_probe_to_convergence():
    """The cell-type probe is fitted to convergence (at scikit-learn's default tolerance the score hung on where
    lbfgs stopped, which moved with the machine): it equals probe_scores with CONVERGED_PROBE on the same split."""
    import numpy as np

    import xscale
    from xscale.eval import metrics as M
    from xscale.pipelines.evaluate import evaluate_adata

    a = xscale.datasets.load("starmap_mpfc")
    a = a[np.random.default_rng(0).choice(a.n_obs, 900, replace=False)].copy()
    lognorm, rng = np.asarray(M.log_normalized(a.X)), np.random.default_rng(10)
    # expression beside 200 noisy mixtures of it: an ill-conditioned probe (here 0.599 at the default tolerance)
    noisy = lognorm @ rng.normal(size=(a.n_vars, 200)) * 0.1 + rng.normal(size=(a.n_obs, 200))
    a.obsm["X_xscale_cell"] = np.hstack([lognorm, noisy]).astype(np.float32)
    out = evaluate_adata(a, label_key="cell_type", slide_key="slice", holdout="20180424_BZ14_control")
    test = (a.obs["slice"] == "20180424_BZ14_control").to_numpy()
    y = a.obs["cell_type"].astype(str).to_numpy()
    X = a.obsm["X_xscale_cell"]
    assert out["cell_type"]["xscale_cell"] == M.probe_scores(X[~test], y[~test], X[test], y[test],
                                                             **M.CONVERGED_PROBE)
