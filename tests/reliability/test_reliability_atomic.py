"""Outputs are written under a temporary name and renamed when complete."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xscale.utils import atomic
from xscale.utils.atomic import (
    atomic_dir,
    atomic_write_text,
    is_complete,
    remove_stale_temps,
    replace_dir,
)


def test_atomic_dir_success(tmp_path):
    target = tmp_path / "out" / "store.zarr"
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith("store.zarr.tmp-")
        (tmp / "a.txt").write_text("1")
        assert not target.exists()  # not visible until complete
    assert is_complete(target) and (target / "a.txt").read_text() == "1"
    assert sorted(p.name for p in target.parent.iterdir()) == ["store.zarr"]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    target = tmp_path / "store"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    assert not is_complete(target)


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "store"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "v").write_text("new")
            raise KeyboardInterrupt
    assert (target / "v").read_text() == "old"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("new")
    assert (target / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_replace_dir_swaps_and_keeps_the_old_directory_when_the_rename_fails(tmp_path, monkeypatch):
    target, new = tmp_path / "model", tmp_path / "model.tmp"
    target.mkdir()
    (target / "v").write_text("old")
    atomic.mark_complete(target)  # an earlier xscale output: replaceable
    new.mkdir()
    (new / "v").write_text("new")
    real_replace = os.replace

    def failing(src, dst):  # the rename of the new directory into place fails (e.g. disk error)
        if os.fspath(src) == os.fspath(new):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(OSError, match="rename failed"):
        replace_dir(new, target)
    assert (target / "v").read_text() == "old"  # moved aside, then moved back: nothing lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.tmp"]
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert replace_dir(new, target) == target
    assert (target / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the old one is gone once replaced


def test_finetune_output_is_replaced_through_replace_dir(tmp_path, monkeypatch):
    """finetune's output directory (written by _write) goes through replace_dir: a failed swap keeps the old result."""
    import torch

    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.train import finetune as ft

    model = GeneToCell(GeneToCellConfig.preset("tiny", genes=["A", "B", "C"]))
    result = ft.FinetuneResult(model, None, 0.1, 1, 10, {"final_loss": 1.0})
    out = tmp_path / "ft"
    ft._write(result, out, task="batch_correction", trainable="xpressor", slides=["s1", "s2"], ema_decay=None)
    before = (out / "finetune.json").read_text()
    real_replace, calls = os.replace, []

    def failing(src, dst):  # moving the old result aside works; moving the new one into place fails
        calls.append((os.fspath(src), os.fspath(dst)))
        if os.fspath(dst) == os.fspath(out) and "-old" not in Path(src).name:  # the new one, not the old put back
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        ft._write(result, out, task="batch_correction", trainable="xpressor", slides=["s3"], ema_decay=None)
    assert (out / "finetune.json").read_text() == before
    assert [d for _, d in calls][-2:] == [os.fspath(out), os.fspath(out)]  # the swap was tried, then undone
    left = sorted(p.name for p in tmp_path.iterdir())  # the old result and the new one's temporary
    assert len(left) == 2 and left[0] == "ft" and left[1].startswith("ft.tmp-"), left


def _user_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_outputs_never_replace_what_xscale_did_not_write(tmp_path):
    """A file, or a folder of other things, is refused before any work and left as it was; empty
    folders, earlier xscale outputs, saved models and zarr stores are replaceable."""
    from xscale.errors import XscaleInputError
    from xscale.utils.atomic import check_replaceable

    mine = tmp_path / "project"
    (mine / "notes").mkdir(parents=True)
    (mine / "analysis.ipynb").write_text("my work")
    (mine / "notes" / "a.txt").write_text("more")
    a_file = tmp_path / "results.csv"
    a_file.write_text("x,y")
    before = _user_files(tmp_path)
    for target, found in ((mine, "analysis.ipynb, notes"), (a_file, "found a file")):
        with pytest.raises(XscaleInputError, match=found):
            with atomic_dir(target) as tmp:
                (tmp / "x").write_text("new")
        with pytest.raises(XscaleInputError):
            replace_dir(tmp_path / "new", target)
    assert _user_files(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project", "results.csv"]  # no temporaries left
    xscale_v3 = '{"zarr_format": 3, "node_type": "group", "attributes": {"xscale_output": 1}}'
    for name, files in (("empty", {}), ("earlier", {".xscale-complete": "", "v": ""}),
                        ("copied_model", {"config.json": "", "model.safetensors": ""}),
                        ("v3.zarr", {"zarr.json": xscale_v3}),
                        ("v2.zarr", {".zgroup": "{}", ".zattrs": '{"xscale_output": 1}'}),
                        ("prepared.zarr", {"zarr.json": xscale_v3.replace("xscale_output", "xscale_store")}),
                        ("old_output.zarr", {".zgroup": "{}", "uns/xscale/.zgroup": "{}"})):
        d = tmp_path / name
        for f, text in files.items():
            (d / f).parent.mkdir(parents=True, exist_ok=True)
            (d / f).write_text(text)
        d.mkdir(exist_ok=True)
        check_replaceable(d)
    check_replaceable(tmp_path / "missing")
    # a zarr store xscale did not write (the user's AnnData or SpatialData) is refused like a folder
    for name, files in (("user_v2.zarr", {".zgroup": "{}", ".zattrs": '{"encoding-type": "anndata"}'}),
                        ("user.sdata.zarr", {"zarr.json": '{"zarr_format": 3, "node_type": "group"}'})):
        d = tmp_path / name
        d.mkdir()
        for f, text in files.items():
            (d / f).write_text(text)
        with pytest.raises(XscaleInputError, match="found a zarr store it did not write"):
            check_replaceable(d)


def test_cli_outputs_refuse_a_file_or_a_foreign_folder(tmp_path, capsys):
    """finetune --out, prepare --overwrite, run / embed / demo --out: one clear line (exit 2), nothing lost."""
    import xscale
    from xscale.cli.main import main
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.io import save_model

    model = tmp_path / "m"
    save_model(GeneToCell(GeneToCellConfig.preset("tiny", genes=list(xscale.datasets.load("starmap_mpfc").var_names))),
               model)
    user = tmp_path / "user"
    mine = user / "project"
    mine.mkdir(parents=True)
    (mine / "analysis.ipynb").write_text("my work")
    a_file = user / "results.csv"
    a_file.write_text("x,y")
    before = _user_files(user)
    for argv in (
        ["finetune", str(model), "starmap_mpfc", "--task", "cell_type", "--label-key", "cell_type", "--out", str(mine)],
        ["finetune", str(model), "starmap_mpfc", "--task", "cell_type", "--label-key", "cell_type",
         "--out", str(a_file)],
        ["prepare", "starmap_mpfc", str(mine), "--overwrite"],
        ["prepare", "starmap_mpfc", str(a_file), "--overwrite"],
        ["run", "--data", "starmap_mpfc", "--out", str(a_file), "--preset", "tiny", "--max-steps", "1"],
        ["embed", "--checkpoint", str(model), "--data", "starmap_mpfc", "--out", str(a_file)],
        ["demo", "--out", str(a_file)],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert str(a_file if str(a_file) in argv else mine) in err and "Traceback" not in err, (argv, err)
    assert _user_files(user) == before
    assert sorted(p.name for p in user.iterdir()) == ["project", "results.csv"]  # no temporaries left
    assert main(["prepare", "starmap_mpfc", str(a_file)]) == 2  # without --overwrite: says what is there
    assert "found a file already there" in capsys.readouterr().err
    # the user's own AnnData zarr is never replaced: not by its prepared store, a fine-tuned model, re-clustered
    # domains, or the cells.zarr of run / embed --out its folder (all replaced any zarr store before)
    from xscale.data.zarr_settings import zarr_format_2

    proj = tmp_path / "proj"
    source = proj / "cells.zarr"
    with zarr_format_2():
        xscale.datasets.load("starmap_mpfc")[:50].copy().write_zarr(source)
    listing = sorted(str(p.relative_to(source)) for p in source.rglob("*"))
    emb = tmp_path / "emb"
    assert main(["embed", "--checkpoint", str(model), "--data", "starmap_mpfc", "--out", str(emb)]) == 0
    capsys.readouterr()
    for argv in (
        ["prepare", str(source), str(source), "--overwrite", "--spatial-key", "none"],
        ["finetune", str(model), "starmap_mpfc", "--task", "cell_type", "--label-key", "cell_type", "--epochs", "1",
         "--out", str(source)],
        ["domains", "--store", str(emb / "cells.zarr"), "--n-domains", "3", "--use-rep", "X_xscale_cell",
         "--out", str(source)],
        ["embed", "--checkpoint", str(model), "--data", str(source), "--out", str(proj)],
        ["run", "--data", str(source), "--out", str(proj), "--preset", "tiny", "--max-steps", "1",
         "--spatial-key", "spatial"],
    ):
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert "found a zarr store it did not write" in err and "Traceback" not in err, (argv, err)
        assert "domains in obs" not in out  # refused before any work (domains clustered first)
    assert sorted(str(p.relative_to(source)) for p in source.rglob("*")) == listing
    assert sorted(p.name for p in proj.iterdir()) == ["cells.zarr"]


def test_atomic_dir_no_overwrite(tmp_path):
    (tmp_path / "store").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_dir(tmp_path / "store", overwrite=False):
            pass


def test_is_complete_rejects_plain_dir(tmp_path):
    (tmp_path / "d").mkdir()
    assert not is_complete(tmp_path / "d")
    assert not is_complete(tmp_path / "missing")


def test_sigkilled_writer_leaves_incomplete_temp_that_is_cleaned(tmp_path):
    target = tmp_path / "store"
    code = (
        "import os, signal, sys\n"
        "from xscale.utils.atomic import atomic_dir\n"
        f"with atomic_dir({str(target)!r}) as tmp:\n"
        "    (tmp / 'half').write_text('x')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    leftovers = [p for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].name.startswith("store.tmp-")
    assert not target.exists() and not is_complete(leftovers[0])
    assert remove_stale_temps(target) == leftovers
    assert list(tmp_path.iterdir()) == []


def test_live_writer_temp_is_kept(tmp_path):
    live = tmp_path / f"store.tmp-{os.getpid()}-abcd"
    live.mkdir()
    assert remove_stale_temps(tmp_path / "store") == []
    assert live.exists()


def test_atomic_write_text(tmp_path):
    p = atomic_write_text(tmp_path / "sub" / "f.json", "{}")
    assert p.read_text() == "{}"
    assert [x.name for x in p.parent.iterdir()] == ["f.json"]


def test_prepare_killed_mid_write_leaves_nothing_that_looks_complete(tmp_path):
    """``xscale prepare`` SIGKILLed while its temporary store exists: no output; a re-run completes."""
    import signal
    import time

    import xscale

    src = tmp_path / "in.h5ad"
    xscale.datasets.load("starmap_mpfc").write_h5ad(src)
    out = tmp_path / "out.zarr"
    cmd = [sys.executable, "-m", "xscale.cli.main", "prepare", str(src), str(out), "--chunk-cells", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name != "in.h5ad" and "out.zarr" in p.name and "tmp" in p.name for p in tmp_path.iterdir()):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    assert not out.exists()  # nothing at the final path while incomplete

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    from xscale.data.store import CellStore

    assert CellStore(out).n_cells == 3190


def test_atomic_dir_without_marker(tmp_path):
    with atomic_dir(tmp_path / "s.zarr", marker=False) as tmp:
        (tmp / "zarr.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "s.zarr").iterdir()) == ["zarr.json"]
    assert list(tmp_path.iterdir()) == [tmp_path / "s.zarr"]


def test_zarr_writers_keep_the_old_store_when_a_write_fails(tmp_path):
    """The store writer of the pipeline steps, ``xscale domains``, ``xscale embed`` and staged runs
    (``write_anndata_zarr``): a failed write leaves the earlier store whole."""
    import anndata as ad

    from xscale.data.writeback import write_anndata_zarr as write

    path = tmp_path / "cells.zarr"
    old = ad.AnnData(np.ones((4, 2), dtype=np.float32))
    write(old, path)

    class Broken(ad.AnnData):
        def write_zarr(self, store, **kwargs):
            (Path(store) / "half").write_text("x")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write(Broken(np.zeros((4, 2), dtype=np.float32)), path)
    np.testing.assert_array_equal(ad.read_zarr(path).X, old.X)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.zarr"]  # no temporary left
    write(ad.AnnData(np.full((3, 2), 2.0, dtype=np.float32)), path)  # a later write replaces it
    assert ad.read_zarr(path).shape == (3, 2)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_gene_table_write_is_atomic(tmp_path, monkeypatch, suffix):
    from xscale.models.plm import read_gene_table, save_gene_table

    path = save_gene_table(tmp_path / f"t{suffix}", ["A", "B"], np.ones((2, 3)))
    assert read_gene_table(path)[0] == ["A", "B"]
    if suffix == ".npz":
        monkeypatch.setattr(np, "savez", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    else:
        import safetensors.numpy

        monkeypatch.setattr(safetensors.numpy, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_gene_table(path, ["C", "D", "E"], np.zeros((3, 3)))
    genes, vectors = read_gene_table(path)  # the previous table, whole
    assert genes == ["A", "B"] and np.array_equal(vectors, np.ones((2, 3), np.float32))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left
