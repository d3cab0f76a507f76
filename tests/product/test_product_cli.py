"""`xscale --help` is fast; `xscale embed` and `query` run for real on a tiny model; decode a hit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from xscale.cli.main import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "JSONARGPARSE_DEPRECATION_WARNINGS": "off"}


def test_help_answers_fast_and_lists_commands():
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "xscale.cli.main", "--help"], capture_output=True, text=True, env=ENV)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0
    for cmd in ("demo", "fit", "embed", "query", "domains"):
        assert cmd in res.stdout
    assert elapsed < 3.0, f"xscale --help took {elapsed:.2f}s"
    # sub-command help must not import the heavy stack either
    res = subprocess.run([sys.executable, "-c", "import sys; from xscale.cli.main import build_parser; build_parser(); "
                          "print(sorted(m for m in ('torch', 'lightning', 'anndata', 'faiss') if m in sys.modules))"],
                         capture_output=True, text=True, env=ENV)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr


def test_help_examples_keep_their_lines(capsys):
    """Sub-commands whose description ends with an "Examples:" block print it line by line
    (argparse's default formatter re-wrapped finetune's two examples into one paragraph)."""
    from xscale.cli.main import COMMANDS, _load, main

    with_examples = [c for c in COMMANDS if "\nExamples:\n" in (getattr(_load(c), "DESCRIPTION", "") or "")]
    assert "finetune" in with_examples
    for cmd in with_examples:
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        block = _load(cmd).DESCRIPTION.split("\nExamples:\n", 1)[1].strip("\n")
        for line in block.splitlines():
            assert line in out, (cmd, line)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Tiny level-1 and level-2 models (random weights) saved in the layout of a demo run."""
    import torch

    import xscale
    from xscale.models.cell_to_tissue import CellToTissue, CellToTissueConfig
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.io import save_model

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("run") / "checkpoints"
    genes = list(xscale.datasets.load("starmap_mpfc").var_names)
    model = GeneToCell(GeneToCellConfig.preset("tiny", genes=genes))
    save_model(model, root / "level1" / "model")
    in_dim = model.config.latents_per_cell * model.config.dim
    save_model(CellToTissue(CellToTissueConfig.preset("tiny", in_dim=in_dim)), root / "level2" / "model")
    return root


def test_cli_embed_then_query_then_decode(tiny_models, starmap_subset_h5ad, tmp_path, capsys):
    from xscale.query import LatentIndex, decode_hit

    out = tmp_path / "emb"
    assert main(["embed", "--checkpoint", str(tiny_models), "--data", str(starmap_subset_h5ad), "--out", str(out),
                 "--slide-key", "slice", "--n-domains", "4"]) == 0
    store = out / "cells.zarr"
    assert store.exists() and not (out / "cells.zarr.tmp").exists()
    capsys.readouterr()
    import anndata as ad

    import xscale.tl

    written = ad.read_zarr(store)  # domains of slide-centred niche latents, as xscale run clusters them
    centred = xscale.tl.domains(written, 4, slide_key="slice", copy=True).obs["xscale_domain"]
    np.testing.assert_array_equal(written.obs["xscale_domain"].astype(str), centred.astype(str))
    index = LatentIndex.open(store, level="cell")
    assert index.store.slide_key == "slice"
    cid = str(index.store.ids[0])
    assert main(["query", "--store", str(store), "--level", "niche", "--cell", cid, "--k", "3", "--cross-slide"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and all({"id", "distance", "slide", "x", "y", "xscale_domain"} <= set(h) for h in hits)
    expected = decode_hit(index, hits[0]["id"], tiny_models / "level1" / "model", library=1000.0)
    assert len(expected) == 166 and np.isclose(expected.sum(), 1000.0, rtol=1e-3) and (expected >= 0).all()
    assert main(["query", "--store", str(store), "--cell", cid, "--k", "2",
                 "--decode", str(tiny_models / "level1" / "model"),
                 "--genes", "Gad1,Slc17a7", "--library", "100"]) == 0
    decoded = json.loads(capsys.readouterr().out)
    assert set(decoded[0]["expected"]) == {"Gad1", "Slc17a7"} and 0 < sum(decoded[0]["expected"].values()) < 100
    # level 1 only: a model directory without level2/
    assert main(["embed", "--checkpoint", str(tiny_models / "level1" / "model"), "--data", str(starmap_subset_h5ad),
                 "--out", str(tmp_path / "l1only")]) == 0
    only = ad.read_zarr(tmp_path / "l1only" / "cells.zarr")
    assert "X_xscale_cell" in only.obsm and "X_xscale_niche" not in only.obsm


def test_cli_embed_bad_checkpoint_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["embed", "--checkpoint", str(tmp_path / "empty"), "--data", "starmap_mpfc",
                 "--out", str(tmp_path / "o")]) == 2
    assert "level1/" in capsys.readouterr().err
    assert not (tmp_path / "o" / "cells.zarr").exists()


def test_cli_embed_checks_the_slide_key_before_embedding(tiny_models, tmp_path, capsys):
    assert main(["embed", "--checkpoint", str(tiny_models), "--data", "starmap_mpfc", "--slide-key", "typo",
                 "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert "--slide-key 'typo'" in captured.err and "'slice'" in captured.err
    assert "cell latents" not in captured.out and not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [["run", "--data", "starmap_mpf", "--out", "OUT"],
                                     ["prepare", "starmap_mpf", "OUT"],
                                     ["finetune", "MODEL", "starmap_mpf", "--out", "OUT"]])
def test_a_mistyped_dataset_name_lists_the_bundled_names(command, tmp_path, capsys):
    """A name that is neither bundled nor a path: one line naming the bundled datasets (was "expected an .h5ad
    file or a .zarr store" only, as if a file were missing), exit 2, nothing written."""
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.io import save_model

    save_model(GeneToCell(GeneToCellConfig.preset("tiny", genes=["A", "B"])), tmp_path / "model")
    args = [str(tmp_path / a) if a in ("OUT", "MODEL") else a for a in command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "starmap_mpf: expected a bundled dataset name (starmap_mpfc, " in err and "found nothing at this path" in err
    assert not (tmp_path / "OUT").exists()


def test_cli_embed_names_missing_data_before_anything_else(tmp_path, capsys):
    (tmp_path / "empty").mkdir()  # not a model either: the data is checked first, without loading anything
    assert main(["embed", "--checkpoint", str(tmp_path / "empty"), "--data", str(tmp_path / "typo.zarr")]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "typo.zarr" in err and "found nothing at this path" in err and "starmap_mpfc" in err
    assert "--out" not in err


def test_cli_prepare_takes_a_bundled_dataset_name(tmp_path, capsys):
    from xscale.data.store import CellStore

    assert main(["prepare", "starmap_mpfc", str(tmp_path / "st.zarr"), "--chunk-cells", "1024"]) == 0
    store = CellStore(tmp_path / "st.zarr")
    assert store.n_cells == 3190 and store.n_genes == 166
    assert list(store.slide_names) == ["20180417_BZ5_control", "20180419_BZ9_control", "20180424_BZ14_control"]
    assert "3 slide(s)" in capsys.readouterr().out


def test_cli_no_progress_hides_every_bar(tiny_models, starmap_subset_h5ad, tmp_path, capsys):
    """``--no-progress`` on embed and prepare hides the bars they show otherwise (on stderr)."""
    embed = ["embed", "--checkpoint", str(tiny_models), "--data", str(starmap_subset_h5ad),
             "--slide-key", "slice", "--batch-size", "16"]  # 600 cells: 38 batches, enough for a bar
    assert main([*embed, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "cells:" in err and "niches:" in err
    assert main([*embed, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "cells:" not in err and "niches:" not in err
    assert main(["prepare", str(starmap_subset_h5ad), str(tmp_path / "p.zarr"), "--slide-key", "slice"]) == 0
    assert "prepare: write" in capsys.readouterr().err
    assert main(["prepare", str(starmap_subset_h5ad), str(tmp_path / "q.zarr"), "--slide-key", "slice",
                 "--no-progress"]) == 0
    assert "prepare:" not in capsys.readouterr().err


def test_cli_prepare_defaults_are_the_function_defaults():
    import argparse
    import inspect

    from xscale.cli import prepare as cli
    from xscale.data.prepare import prepare

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["in.h5ad", "out.zarr"])
    defaults = {k: v.default for k, v in inspect.signature(prepare).parameters.items()}
    for name in ("chunk_cells", "curve", "n_neighbors", "radius", "table_key", "counts_layer", "slide_key"):
        assert getattr(args, name) == defaults[name], name


def test_cli_quiets_the_faiss_loader_unless_verbose(tmp_path, capsys):
    import logging

    missing = str(tmp_path / "missing.zarr")
    assert main(["domains", "--store", missing, "--n-domains", "2"]) == 2
    assert logging.getLogger("faiss.loader").level == logging.WARNING
    logging.getLogger("faiss.loader").setLevel(logging.NOTSET)
    assert main(["--verbose", "domains", "--store", missing, "--n-domains", "2"]) == 2
    assert logging.getLogger("faiss.loader").level == logging.NOTSET
    capsys.readouterr()


def test_ctrl_c_during_lightning_training_exits_130_with_a_message(monkeypatch, capsys):
    """Lightning answers Ctrl-C by tearing down and calling sys.exit(1): the CLI reported nothing
    and exited 1; it now says it was interrupted and exits 130, as for Ctrl-C elsewhere."""
    import sys

    import xscale.cli.run as run_cli
    from xscale.cli.main import main

    def lightning_like(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)  # what lightning.pytorch.trainer.call._call_and_handle_interrupt does

    monkeypatch.setattr(run_cli, "run", lightning_like)
    assert main(["run", "--data", "starmap_mpfc", "--out", "never"]) == 130
    assert "xscale run: interrupted (checkpoints saved so far are kept; re-run to resume)" in capsys.readouterr().err

    def plain_exit(args):
        sys.exit(3)

    monkeypatch.setattr(run_cli, "run", plain_exit)
    with pytest.raises(SystemExit):
        main(["run", "--data", "starmap_mpfc", "--out", "never"])


def test_accelerator_is_checked_before_any_work(tmp_path, capsys):
    """--accelerator gpu on a machine without one: Lightning failed only when training started, after
    the output folder was made; now one line before anything happens."""
    import torch

    from xscale.cli.main import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for argv in (["run", "--data", "starmap_mpfc", "--out", str(tmp_path / "r"), "--accelerator", "gpu"],
                 ["finetune", str(tmp_path / "m"), "starmap_mpfc", "--out", str(tmp_path / "f"),
                  "--accelerator", "gpu"],
                 ["run", "--data", "starmap_mpfc", "--out", str(tmp_path / "r"), "--accelerator", "tpu"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--accelerator" in err and ("found none on this machine" in err or "expected one of" in err), err
    assert list(tmp_path.iterdir()) == []


def test_options_that_would_waste_or_fake_a_run_are_refused_first(tiny_models, starmap_subset_h5ad, tmp_path,
                                                                   capsys):
    """A zero budget wrote untrained models (exit 0); --radius -1 and --n-domains beyond the cells failed
    only after training / embedding. All are one line before any work; RUN works as --checkpoint;
    --decode in TSV gives one column per gene (it printed a Python dict)."""
    data = str(starmap_subset_h5ad)
    for argv, says in (
        (["run", "--data", data, "--out", str(tmp_path / "r"), "--max-steps", "0"], "--max-steps: expected -1"),
        (["run", "--data", data, "--out", str(tmp_path / "r"), "--max-epochs", "0"], "--max-epochs: expected >= 1"),
        (["run", "--data", data, "--out", str(tmp_path / "r"), "--radius", "-1"], "--radius: expected a radius > 0"),
        (["finetune", str(tiny_models), data, "--out", str(tmp_path / "f"), "--epochs", "0"], "--epochs: expected"),
        (["embed", "--checkpoint", str(tiny_models), "--data", data, "--out", str(tmp_path / "e"), "--n-domains",
          "5000"], "--n-domains: expected 2..600"),
        (["embed", "--checkpoint", str(tiny_models / "level1" / "model"), "--data", data, "--out",
          str(tmp_path / "e"), "--n-domains", "3"], "--n-domains clusters niche latents: expected a level-2 model"),
    ):
        assert main(argv) == 2, argv
        assert says in capsys.readouterr().err, argv
    assert list(tmp_path.iterdir()) == []
    run = tiny_models.parent  # RUN: the folder holding checkpoints/
    assert main(["embed", "--checkpoint", str(run), "--data", data, "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "niche latents" in out  # level2/ found through RUN/checkpoints
    store = tmp_path / "e" / "cells.zarr"
    import anndata as ad

    cid = str(ad.read_zarr(store).obs_names[0])
    assert main(["query", "--store", str(store), "--cell", cid, "--k", "2", "--decode", str(run),
                 "--genes", "Gad1,Slc17a7", "--format", "tsv"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split("\t")
    assert header[-2:] == ["expected.Gad1", "expected.Slc17a7"]
