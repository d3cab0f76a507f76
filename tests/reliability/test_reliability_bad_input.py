"""Bad input end to end: ``xscale prepare`` (CLI, exit 2, one line, no traceback) and ``prepare()``.

Inputs are real STARmap cells (a 240-cell subset of the bundled data) damaged in one way each.
After a failure nothing is left at the output path, and no temporary looks complete.
"""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from xscale.cli.main import main
from xscale.data.zarr_settings import unsharded
from xscale.errors import XscaleInputError


@pytest.fixture(scope="module")
def cells():
    import xscale

    a = xscale.datasets.load("starmap_mpfc")
    keep = np.sort(np.random.default_rng(0).choice(a.n_obs, 240, replace=False))
    return a[keep].copy()


def _normalised(a):
    import scipy.sparse as sp

    a.layers["counts"] = a.X.copy()
    x = a.X.toarray()
    a.X = sp.csr_matrix(np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4))
    return a


def _set(a, value):
    x = a.X.toarray()
    x[3, 5] = value
    a.X = x
    return a


def _nan_coords(a):
    a.obsm["spatial"] = a.obsm["spatial"].astype(float).copy()
    a.obsm["spatial"][7, 0] = np.nan
    return a


def _dup_genes(a):
    names = list(a.var_names)
    names[1] = names[0]
    a.var_names = names
    return a


def _dup_cells(a):
    names = list(a.obs_names)
    names[2] = names[0]
    a.obs_names = names
    return a


def _move_spatial(a):
    a.obsm["xy"] = a.obsm.pop("spatial")
    return a


def _empty(a):
    return a[:0].copy()


# (case id, damage, CLI extra args, message regex)
CASES = [
    ("normalised", _normalised, [], r"non-integer values .*normalised or log-transformed.*--counts-layer NAME"),
    ("negative", lambda a: _set(a, -3.0), [], r"non-negative raw counts, found 1 negative"),
    ("nan", lambda a: _set(a, np.nan), [], r"finite raw counts, found 1 NaN/inf"),
    ("inf", lambda a: _set(a, np.inf), [], r"finite raw counts, found 1 NaN/inf"),
    ("no-spatial-key", _move_spatial, [], r"obsm\['spatial'\].*obsm keys present: \['xy'\].*--spatial-key"),
    ("nan-coords", _nan_coords, [], r"finite coordinates, found NaN/inf for 1 cell"),
    ("dup-genes", _dup_genes, [], r"unique gene names, found 1 duplicated"),
    ("dup-cells", _dup_cells, [], r"unique cell ids, found 1 duplicated"),
    ("empty", _empty, [], r"Empty dataset"),
    ("missing-layer", lambda a: a, ["--counts-layer", "raw"], r"layers\['raw'\].*no such layer"),
    ("missing-slide-key", lambda a: a, ["--slide-key", "mouse"], r"obs\['mouse'\].*obs columns present"),
]


def _cli(args: list[str], capsys) -> tuple[int, str]:
    rc = main(args)
    err = capsys.readouterr().err
    return rc, err


def _assert_one_clean_line(err: str, command: str) -> str:
    # progress bars (leave=False) redraw with \r on stderr; split on it too
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith(f"xscale {command}: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if out.name in p.name]
    assert leftovers == [], leftovers


@pytest.mark.parametrize("case,damage,extra,pattern", CASES, ids=[c[0] for c in CASES])
def test_prepare_cli_bad_input(case, damage, extra, pattern, cells, tmp_path, capsys):
    src = tmp_path / "in.h5ad"
    damage(cells.copy()).write_h5ad(src)
    out = tmp_path / "out.zarr"
    rc, err = _cli(["prepare", str(src), str(out), *extra], capsys)
    assert rc == 2
    import re

    assert re.search(pattern, _assert_one_clean_line(err, "prepare")), err
    _assert_nothing_left(out)


@pytest.mark.parametrize("case,damage,extra,pattern", CASES, ids=[c[0] for c in CASES])
def test_run_cli_bad_input(case, damage, extra, pattern, cells, tmp_path, capsys):
    """``xscale run`` stops at the boundary, before any training, with the same one-line messages."""
    src = tmp_path / "in.h5ad"
    damage(cells.copy()).write_h5ad(src)
    out = tmp_path / "run"
    rc, err = _cli(["run", "--data", str(src), "--out", str(out), "--preset", "tiny", "--no-progress", *extra],
                   capsys)
    assert rc == 2
    import re

    assert re.search(pattern, _assert_one_clean_line(err, "run")), err
    assert not (out / "cells.zarr").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize("case,damage,extra,pattern", CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_prepare_api_bad_input(case, damage, extra, pattern, cells, tmp_path):
    from xscale.data.prepare import prepare

    with pytest.raises(XscaleInputError, match=pattern):
        prepare(damage(cells.copy()), tmp_path / "out.zarr")
    _assert_nothing_left(tmp_path / "out.zarr")


def test_normalised_message_lists_layers_in_file(cells, tmp_path, capsys):
    src = tmp_path / "in.h5ad"
    _normalised(cells.copy()).write_h5ad(src)
    rc, err = _cli(["prepare", str(src), str(tmp_path / "out.zarr")], capsys)
    assert rc == 2 and "Layers present: ['counts']" in err


def test_counts_layer_fixes_normalised_input(cells, tmp_path, capsys):
    src = tmp_path / "in.h5ad"
    _normalised(cells.copy()).write_h5ad(src)
    rc, err = _cli(["prepare", str(src), str(tmp_path / "out.zarr"), "--counts-layer", "counts"], capsys)
    assert rc == 0, err


def test_zero_count_cells_dropped_with_count(cells, tmp_path, capsys):
    from xscale.data.prepare import prepare
    from xscale.data.store import CellStore

    a = cells.copy()
    x = a.X.toarray()
    x[[4, 9, 11]] = 0
    a.X = x
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = prepare(a, tmp_path / "out.zarr")
    assert any("Dropped 3 of 240 cells with zero total counts" in str(w.message) for w in rec)
    assert CellStore(out).n_cells == 237


def test_debug_shows_traceback(cells, tmp_path):
    src = tmp_path / "in.h5ad"
    _dup_genes(cells.copy()).write_h5ad(src)
    with pytest.raises(XscaleInputError, match="unique gene names"):
        main(["--debug", "prepare", str(src), str(tmp_path / "out.zarr")])


def test_not_anndata_file(tmp_path, capsys):
    src = tmp_path / "cells.csv"
    src.write_text("cell,gene,count\nc1,Actb,3\n")
    rc, err = _cli(["prepare", str(src), str(tmp_path / "out.zarr")], capsys)
    assert rc == 2
    assert "expected AnnData (.h5ad, HDF5) or SpatialData/AnnData zarr, found a file that is neither" in \
        _assert_one_clean_line(err, "prepare")


def test_directory_that_is_not_zarr(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("hi")
    rc, err = _cli(["prepare", str(tmp_path / "folder"), str(tmp_path / "out.zarr")], capsys)
    assert rc == 2 and "without zarr metadata" in _assert_one_clean_line(err, "prepare")


def test_pickle_as_input_is_not_unpickled(tmp_path, plant, marker, capsys):
    src = plant(tmp_path / "data.h5ad", "pickle")
    rc, err = _cli(["prepare", str(src), str(tmp_path / "out.zarr")], capsys)
    assert rc == 2 and "found a file that is neither" in err
    assert not marker.exists()


def test_spatialdata_without_table(cells, tmp_path, capsys):
    import spatialdata as sd
    from spatialdata.models import ShapesModel

    xy = np.asarray(cells.obsm["spatial"], dtype=np.float64)
    circles = ShapesModel.parse(xy, geometry=0, radius=np.ones(cells.n_obs), index=np.arange(cells.n_obs))
    with unsharded():
        sd.SpatialData(shapes={"cells": circles}).write(tmp_path / "s.zarr")
    rc, err = _cli(["prepare", str(tmp_path / "s.zarr"), str(tmp_path / "out.zarr")], capsys)
    assert rc == 2
    line = _assert_one_clean_line(err, "prepare")
    assert "found no table" in line and "'cells'" in line and "TableModel" in line


@pytest.mark.parametrize("damage", ["root-metadata", "chunk"])
def test_corrupted_zarr(cells, tmp_path, capsys, damage):
    import anndata

    store = tmp_path / "in.zarr"
    with anndata.settings.override(zarr_write_format=3), unsharded():
        cells.write_zarr(store)
    if damage == "root-metadata":
        (store / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    else:
        chunks = sorted((store / "X" / "data").rglob("c/*")) or sorted((store / "X" / "data").rglob("*"))
        target = [p for p in chunks if p.is_file()][0]
        target.write_bytes(b"\x00garbage" * 3)
    out = tmp_path / "out.zarr"
    rc, err = _cli(["prepare", str(store), str(out)], capsys)
    assert rc == 2, err
    assert "corrupted" in _assert_one_clean_line(err, "prepare")
    _assert_nothing_left(out)


def test_real_subprocess_exit_status_and_no_traceback(cells, tmp_path):
    src = tmp_path / "in.h5ad"
    _dup_cells(cells.copy()).write_h5ad(src)
    proc = subprocess.run([sys.executable, "-m", "xscale.cli.main", "prepare", str(src), str(tmp_path / "o.zarr")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "xscale prepare: error: adata.obs_names: expected unique cell ids" in proc.stderr


# ---------------------------------------------------------------- xscale embed: panel vs model
@pytest.fixture(scope="module")
def tiny_model_dir(cells, tmp_path_factory):
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.io import save_model

    genes = [str(g) for g in cells.var_names]
    return save_model(GeneToCell(GeneToCellConfig.preset("tiny", genes=genes)),
                      tmp_path_factory.mktemp("m") / "model")


@pytest.mark.parametrize("n_shared", [0, 4])
def test_embed_panel_sharing_too_few_genes(cells, tiny_model_dir, tmp_path, capsys, n_shared):
    a = cells.copy()
    a.var_names = [g if i < n_shared else f"ENSMUSG{i:011d}" for i, g in enumerate(a.var_names)]
    a.write_h5ad(tmp_path / "ens.h5ad")
    out = tmp_path / "emb"
    rc, err = _cli(["embed", "--checkpoint", str(tiny_model_dir), "--data", str(tmp_path / "ens.h5ad"),
                    "--out", str(out)], capsys)
    assert rc == 2
    line = _assert_one_clean_line(err, "embed")
    assert f"shares {n_shared} of its 166 genes" in line and "at least 10" in line
    assert "Ensembl IDs" in line and "ENSMUSG" in line  # says what was found and what to check
    assert not (out / "cells.zarr").exists()


def test_embed_panel_with_enough_shared_genes_works(cells, tiny_model_dir, tmp_path, capsys):
    import anndata

    a = cells.copy()
    a.var_names = [g if i < 40 else f"ENSMUSG{i:011d}" for i, g in enumerate(a.var_names)]
    a.write_h5ad(tmp_path / "part.h5ad")
    rc, err = _cli(["embed", "--checkpoint", str(tiny_model_dir), "--data", str(tmp_path / "part.h5ad"),
                    "--out", str(tmp_path / "emb")], capsys)
    assert rc == 0, err
    z = anndata.read_zarr(tmp_path / "emb" / "cells.zarr")
    assert z.obsm["X_xscale_cell"].shape[0] == cells.n_obs
