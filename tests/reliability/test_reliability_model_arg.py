"""The ``model`` argument of user-facing functions: a path works, the wrong level is a clear error.

Before, ``xscale.tl.embed_niches(adata, level1_model)`` died with
``AttributeError: 'GeneToCellConfig' object has no attribute 'in_dim'`` and the other
functions took no path at all.
"""
from __future__ import annotations

import numpy as np
import pytest

from xscale.cli.main import main
from xscale.errors import XscaleInputError


@pytest.fixture(scope="module")
def cells():
    import xscale

    a = xscale.datasets.load("starmap_mpfc")
    keep = np.sort(np.random.default_rng(0).choice(a.n_obs, 120, replace=False))
    return a[keep].copy()


@pytest.fixture(scope="module")
def run_dir(cells, tmp_path_factory):
    """RUN/checkpoints/level{1,2}/model, the layout `xscale run` writes, with untrained tiny models."""
    import torch

    from xscale.models.cell_to_tissue import CellToTissue, CellToTissueConfig
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.io import save_model

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    l1 = GeneToCell(GeneToCellConfig.preset("tiny", genes=[str(g) for g in cells.var_names]))
    save_model(l1, run / "checkpoints" / "level1" / "model")
    l2 = CellToTissue(CellToTissueConfig.preset("tiny", in_dim=l1.config.embedding_dim))
    save_model(l2, run / "checkpoints" / "level2" / "model")
    return run


def _load(run_dir, level):
    from xscale.models.io import load_model

    return load_model(run_dir / "checkpoints" / f"level{level}" / "model")


@pytest.mark.parametrize("sub", ["checkpoints/level1/model", "checkpoints/level1", "checkpoints", "."])
def test_embed_cells_takes_a_path_and_equals_the_loaded_model(cells, run_dir, sub):
    import xscale

    ref = xscale.tl.embed_cells(cells, _load(run_dir, 1), copy=True, progress=False).obsm["X_xscale_cell"]
    got = xscale.tl.embed_cells(cells, str(run_dir / sub), copy=True, progress=False).obsm["X_xscale_cell"]
    np.testing.assert_array_equal(got, ref)


def test_embed_niches_takes_a_path(cells, run_dir):
    import xscale

    a = xscale.tl.embed_cells(cells, run_dir, copy=True, progress=False)
    ref = xscale.tl.embed_niches(a, _load(run_dir, 2), copy=True, progress=False).obsm["X_xscale_niche"]
    got = xscale.tl.embed_niches(a, run_dir / "checkpoints", copy=True, progress=False).obsm["X_xscale_niche"]
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("fn, level, other", [("embed_cells", 1, 2), ("reconstruct", 1, 2), ("embed_niches", 2, 1)])
def test_model_of_the_other_level_names_both(cells, run_dir, fn, level, other):
    import xscale

    a = xscale.tl.embed_cells(cells, run_dir, copy=True, progress=False)
    with pytest.raises(XscaleInputError) as err:
        getattr(xscale.tl, fn)(a, _load(run_dir, other), progress=False)
    msg = str(err.value)
    assert msg.startswith(f"{fn} needs the level-{level} model")
    assert f"that is the level-{other} model" in msg
    assert f"RUN/checkpoints/level{level}/model" in msg


def test_folder_without_a_model_lists_what_is_there(cells, tmp_path):
    import xscale

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(XscaleInputError) as err:
        xscale.tl.embed_cells(cells, tmp_path, progress=False)
    msg = str(err.value)
    assert "is not a saved level-1 model" in msg and "['notes.txt']" in msg
    with pytest.raises(XscaleInputError, match="it does not exist"):
        xscale.tl.embed_cells(cells, tmp_path / "missing", progress=False)


def test_store_and_finetune_functions_check_the_level(cells, run_dir, tmp_path):
    from xscale.tl.store_embed import embed_store_cells, embed_store_niches
    from xscale.train.finetune import finetune

    with pytest.raises(XscaleInputError, match="embed_store_cells needs the level-1 model"):
        embed_store_cells(tmp_path / "never-opened.zarr", _load(run_dir, 2))
    with pytest.raises(XscaleInputError, match="embed_store_niches needs the level-2 model"):
        embed_store_niches(tmp_path / "never-opened.zarr", _load(run_dir, 1))
    with pytest.raises(XscaleInputError, match="finetune needs the level-1 model"):
        finetune(run_dir / "checkpoints" / "level2", cells, task="cell_type", label_key="cell_type",
                 output_dir=tmp_path / "ft")
    assert not (tmp_path / "ft").exists()


def test_cli_level2_option_with_a_level1_model(cells, run_dir, tmp_path, capsys):
    src = tmp_path / "in.h5ad"
    cells.write_h5ad(src)
    rc = main(["embed", "--checkpoint", str(run_dir / "checkpoints" / "level1" / "model"),
               "--level2", str(run_dir / "checkpoints" / "level1"), "--data", str(src), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "needs the level-2 model (CellToTissue" in err and "that is the level-1 model" in err
    assert "Traceback" not in err
