"""The command line never replaces what it did not write, and bad options are one-line errors (exit 2).

finetune --out / --write-h5ad, run --out, query --output, domains --key-added; argparse validators of numeric
options; fit's config errors; run_staged's n_domains checked before any training; a bundled dataset's slide key as
finetune's default --slide-key.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from xscale.cli.main import main
from xscale.errors import XscaleInputError


class _Reached(Exception):
    """Raised by a stand-in for the training step: the command got past its checks."""


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(dir, saved tiny level-1 model, .h5ad of 120 STARmap cells)."""
    import xscale
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.io import save_model

    root = tmp_path_factory.mktemp("guards")
    adata = xscale.datasets.load("starmap_mpfc")
    rng = np.random.default_rng(0)
    adata = adata[np.sort(rng.choice(adata.n_obs, 120, replace=False))].copy()
    adata.write_h5ad(root / "d.h5ad")
    save_model(GeneToCell(GeneToCellConfig.preset("tiny", genes=list(adata.var_names))), root / "pre")
    return root, root / "pre", root / "d.h5ad"


@pytest.fixture
def no_training(monkeypatch):
    """finetune's training replaced by one that records its arguments and stops."""
    import xscale.train.finetune as ft

    seen: dict = {}

    def stand_in(*args, **kwargs):
        seen.update(kwargs)
        raise _Reached

    monkeypatch.setattr(ft, "finetune", stand_in)
    return seen


def _finetune_args(model, data, out, *extra):
    return ["finetune", str(model), str(data), "--label-key", "cell_type", "--epochs", "1", "--no-progress",
            "--out", str(out), *extra]


def _fake_finetune_output(path):
    path.mkdir()
    (path / ".xscale-complete").write_text("complete\n")
    (path / "finetune.json").write_text("{}")
    (path / "model").mkdir()
    (path / "head").mkdir()
    return path


def test_finetune_out_holding_a_runs_files_is_refused(small, tmp_path, capsys, no_training):
    _, model, data = small
    out = _fake_finetune_output(tmp_path / "ft1")
    (out / "cells.zarr").mkdir()  # what `xscale run --out ft1` added
    (out / "checkpoints").mkdir()
    (out / "stages.json").write_text("{}")
    assert main(_finetune_args(model, data, out)) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cells.zarr" in err and "pass a new path" in err and "\n" not in err.strip()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".xscale-complete", "finetune.json", "model", "head", "cells.zarr", "checkpoints", "stages.json"])
    # a saved model (marker, config.json, model.safetensors) is not finetune's either
    assert main(_finetune_args(model, data, model)) == 2
    assert "without finetune.json" in capsys.readouterr().err
    assert (model / "model.safetensors").is_file()
    # an earlier finetune output holding only what finetune writes may be replaced
    with pytest.raises(_Reached):
        main(_finetune_args(model, data, _fake_finetune_output(tmp_path / "ft2")))


def test_run_refuses_an_out_that_is_a_finetune_output(small, tmp_path, capsys, monkeypatch):
    import xscale.train.staged as staged

    _, _, data = small
    out = _fake_finetune_output(tmp_path / "ft")

    def stand_in(*a, **k):
        raise _Reached

    monkeypatch.setattr(staged, "run_staged", stand_in)
    assert main(["run", "--data", str(data), "--out", str(out), "--preset", "tiny", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "xscale finetune` output" in err and "pass a new path" in err
    assert sorted(p.name for p in out.iterdir()) == [".xscale-complete", "finetune.json", "head", "model"]
    with pytest.raises(XscaleInputError, match="saved model"):  # the library refuses too
        staged.check_run_dir(small[1])


def test_finetune_write_h5ad_never_replaces_a_users_file(small, tmp_path, capsys, no_training):
    import anndata as ad

    root, model, data = small
    user = tmp_path / "other.h5ad"
    shutil.copy(data, user)
    before = user.read_bytes()
    assert main(_finetune_args(model, data, tmp_path / "a", "--write-h5ad", str(user))) == 2
    err = capsys.readouterr().err
    assert "--write-h5ad" in err and "did not write" in err and "another path" in err
    assert main(_finetune_args(model, data, tmp_path / "b", "--write-h5ad", str(data))) == 2
    assert "the input data file itself" in capsys.readouterr().err
    assert user.read_bytes() == before and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # a file an earlier finetune wrote (marked in uns) may be replaced; even then never the input file
    marked = ad.read_h5ad(data)
    marked.uns["xscale_finetune"] = {"model": str(model)}
    marked.write_h5ad(tmp_path / "mine.h5ad")
    with pytest.raises(_Reached):
        main(_finetune_args(model, data, tmp_path / "c", "--write-h5ad", str(tmp_path / "mine.h5ad")))
    assert main(_finetune_args(model, tmp_path / "mine.h5ad", tmp_path / "c",
                               "--write-h5ad", str(tmp_path / "mine.h5ad"))) == 2
    assert "the input data file itself" in capsys.readouterr().err


def test_finetune_writes_marked_h5ad_and_reruns_into_its_own_out(small, tmp_path, capsys):
    """End to end: finetune's own --out and --write-h5ad are replaced by a re-run; run then refuses that --out."""
    import h5py

    _, model, data = small
    args = _finetune_args(model, data, tmp_path / "ft", "--write-h5ad", str(tmp_path / "p.h5ad"),
                          "--batch-size", "32")
    assert main(args) == 0
    with h5py.File(tmp_path / "p.h5ad", "r") as f:
        assert "xscale_finetune" in f["uns"]
    assert main(args) == 0
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["task"] == "cell_type"
    capsys.readouterr()
    assert main(["run", "--data", str(data), "--out", str(tmp_path / "ft"), "--preset", "tiny",
                 "--max-steps", "1", "--no-report"]) == 2
    assert "xscale finetune` output" in capsys.readouterr().err
    assert not (tmp_path / "ft" / "checkpoints").exists()


@pytest.mark.parametrize(("option", "value", "says"), [
    ("--batch-size", "0", "expected an integer >= 1, found 0"),
    ("--lr", "-1", "expected a finite number > 0, found '-1'"),
    ("--seed", "-1", "expected an integer seed 0.."),
])
def test_finetune_numeric_options_are_one_line_errors(small, tmp_path, capsys, option, value, says):
    _, model, data = small
    with pytest.raises(SystemExit) as exit_:
        main(_finetune_args(model, data, tmp_path / "x", option, value))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {option}: {says}" in err
    assert not (tmp_path / "x").exists()


def test_run_seed_out_of_bounds_creates_nothing(small, tmp_path, capsys):
    _, _, data = small
    for seed in ("-1", str(2**32)):
        with pytest.raises(SystemExit) as exit_:
            main(["run", "--data", str(data), "--out", str(tmp_path / "rz"), "--preset", "tiny", "--seed", seed])
        assert exit_.value.code == 2
        assert "argument --seed: expected an integer seed 0..4294967295" in capsys.readouterr().err
    assert not (tmp_path / "rz").exists()


def test_finetune_uses_a_bundled_datasets_slide_key(small, tmp_path, no_training):
    _, model, _ = small
    with pytest.raises(_Reached):
        main(["finetune", str(model), "starmap_mpfc", "--task", "batch_correction", "--out", str(tmp_path / "bc")])
    assert no_training["slide_key"] == "slice"
    with pytest.raises(_Reached):  # an explicit --slide-key still wins
        main(["finetune", str(model), "starmap_mpfc", "--task", "batch_correction", "--slide-key", "cell_type",
              "--out", str(tmp_path / "bc")])
    assert no_training["slide_key"] == "cell_type"


def test_run_staged_checks_n_domains_before_training(small, tmp_path):
    import anndata as ad

    from xscale.train.staged import run_staged

    adata = ad.read_h5ad(small[2])[:30].copy()
    out = tmp_path / "staged"
    with pytest.raises(XscaleInputError, match=r"n_domains: expected a whole number 1\.\.30 .*found 50"):
        run_staged(adata, out, n_domains=50, level1_preset="tiny", level2_preset="tiny", level1_epochs=1,
                   level2_epochs=1, level1_max_steps=1, level2_max_steps=1, progress=False)
    assert not out.exists()


def test_query_output_never_replaces_a_file_silently(starmap_store, tmp_path, capsys):
    path, adata = starmap_store
    target = tmp_path / "afile.txt"
    target.write_text("my notes\n")
    query = ["query", "--store", str(path), "--cell", str(adata.obs_names[0]), "--k", "2"]
    assert main([*query, "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "existing" in err and "--overwrite" in err
    assert target.read_text() == "my notes\n"
    assert main([*query, "-o", str(target), "--overwrite"]) == 0
    assert len(json.loads(target.read_text())) == 2
    (tmp_path / "mydir").mkdir()
    assert main([*query, "-o", str(tmp_path / "mydir")]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "found a directory" in err and len(err.strip().splitlines()) == 1
    assert main([*query, "-o", str(tmp_path / "new.json")]) == 0


def test_domains_never_replaces_a_users_obs_column(starmap_store, tmp_path, capsys):
    import anndata as ad

    source, adata = starmap_store
    store = tmp_path / "cells.zarr"
    shutil.copytree(source, store)
    before = ad.read_zarr(store).obs["cell_type"].astype(str).to_numpy()
    assert main(["domains", "--store", str(store), "-n", "4", "--key-added", "cell_type"]) == 2
    err = capsys.readouterr().err
    assert "--key-added 'cell_type'" in err and "did not write" in err and "another --key-added" in err
    np.testing.assert_array_equal(ad.read_zarr(store).obs["cell_type"].astype(str).to_numpy(), before)
    assert main(["domains", "--store", str(store), "-n", "4", "--key-added", "cell_type",
                 "--out", str(tmp_path / "o.zarr")]) == 2  # nor into a copy
    capsys.readouterr()
    # a column domains wrote (recorded in the store) may be replaced, as may xscale_* columns
    for key in ("my_domains", "my_domains", "xscale_domain"):
        assert main(["domains", "--store", str(store), "-n", "3", "--key-added", key]) == 0
    back = ad.read_zarr(store)
    assert back.obs["my_domains"].nunique() == 3
    np.testing.assert_array_equal(back.obs["cell_type"].astype(str).to_numpy(), before)


def test_domains_on_a_prepared_store_refuses_a_users_column(tmp_path, capsys):
    import xscale
    from xscale.data.prepare import prepare

    store = prepare(xscale.datasets.path("starmap_mpfc"), tmp_path / "s.zarr", slide_key="slice", progress=False)
    assert main(["domains", "--store", str(store), "-n", "4", "--key-added", "domain"]) == 2
    err = capsys.readouterr().err
    assert "--key-added 'domain'" in err and "another --key-added" in err


@pytest.mark.parametrize(("override", "says"), [
    ("model.init_args.preset=tinyy", "Unknown GeneToCellConfig preset 'tinyy'"),
    ("model.init_args.overrides={w_readot: 0.0}", "Unknown GeneToCellConfig fields ['w_readot']"),
])
def test_fit_config_errors_are_one_line(tmp_path, monkeypatch, capsys, override, says):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", str(root / "model/level1/tiny.yaml"), "--config",
                 str(root / "data/starmap_mpfc.yaml"), "trainer.logger=false", override])
    assert code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("xscale fit: error:")]
    assert len(lines) == 1 and says in lines[0] and "--print-config" in lines[0]
    assert "Does not validate against any of the Union subtypes" not in err and "Given value" not in err


def test_run_removes_an_earlier_runs_metrics_and_report_it_does_not_rewrite(small, tmp_path, capsys):
    """A re-run that scores nothing (no --domain-key / --cell-type-key) or writes no report (--no-report) removes the
    earlier metrics.json / report.html: they described the latents and domains this run replaced."""
    _, _, data = small
    out = tmp_path / "r"
    argv = ["run", "--data", str(data), "--out", str(out), "--preset", "tiny", "--max-steps", "1", "--no-report",
            "--no-progress", "--n-domains", "2"]
    assert main(argv) == 0
    (out / "metrics.json").write_text("{}")  # as an earlier labelled run with a report left them
    (out / "report.html").write_text("<html></html>")
    capsys.readouterr()
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert not (out / "metrics.json").exists() and not (out / "report.html").exists()
    assert "removed" in said and "metrics.json of an earlier run" in said and "report.html of an earlier run" in said


def test_finetune_from_python_never_deletes_files_it_did_not_write(small, tmp_path, monkeypatch):
    """xscale.train.finetune.finetune(output_dir=) refuses, before training, a folder holding more than a finetune
    output (as the CLI's --out does)."""
    import anndata as ad

    import xscale.train.finetune as ft

    _, model, data = small
    out = tmp_path / "ft"
    from xscale.utils.atomic import COMPLETE_MARKER

    (out / "cells.zarr").mkdir(parents=True)  # a run written into an earlier finetune output
    (out / "finetune.json").write_text("{}")
    (out / COMPLETE_MARKER).write_text("")

    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(ft, "_load", reached)
    with pytest.raises(XscaleInputError, match=r"output_dir '.*ft': expected an earlier `xscale finetune` output .* "
                                               r"found also cells.zarr"):
        ft.finetune(model, ad.read_h5ad(data), task="cell_type", label_key="cell_type", output_dir=out)
    assert (out / "cells.zarr").is_dir()
    with pytest.raises(_Reached):  # a new folder gets past the check
        ft.finetune(model, ad.read_h5ad(data), task="cell_type", label_key="cell_type", output_dir=tmp_path / "new")
