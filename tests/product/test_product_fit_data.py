"""`xscale fit` data modules: niches of a user's multi-slide file stay within one slide (``slide_key``), and
joint training refuses a data vocabulary that differs from the model's saved level-1 one."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

N_GENES, PER_SLIDE = 24, 40


@pytest.fixture(scope="module")
def genes():
    import xscale

    return [str(g) for g in xscale.datasets.load("starmap_mpfc").var_names[:N_GENES]]


@pytest.fixture(scope="module")
def two_slide_h5ad(tmp_path_factory, genes):
    """Two slides whose cells sit at the same coordinates (each slide's own origin), slides interleaved in rows."""
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, size=(PER_SLIDE, 2))
    coords = np.repeat(xy, 2, axis=0) + rng.normal(0, 1e-3, size=(2 * PER_SLIDE, 2))  # slide A, B, A, B, ...
    counts = rng.poisson(3.0, size=(2 * PER_SLIDE, len(genes))).astype(np.float32) + 1
    obs = pd.DataFrame({"section": np.tile(["A", "B"], PER_SLIDE)},
                       index=[f"c{i}" for i in range(2 * PER_SLIDE)])
    adata = ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes))
    adata.obsm["spatial"] = coords
    path = tmp_path_factory.mktemp("two_slide") / "two_slide.h5ad"
    adata.write_h5ad(path)
    return path


def _save_l1(path, genes):
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.io import save_model

    save_model(GeneToCell(GeneToCellConfig.preset("tiny", genes=list(genes))), path)
    return path


@pytest.fixture(scope="module")
def level1_dir(tmp_path_factory, genes):
    return _save_l1(tmp_path_factory.mktemp("l1") / "level1", genes)


@pytest.fixture(scope="module")
def reversed_level1_dir(tmp_path_factory, genes):
    return _save_l1(tmp_path_factory.mktemp("l1rev") / "level1", genes[::-1])


def _slides_per_niche(idx, pad, slides):
    return [set(slides[row[~p]]) for row, p in zip(idx, pad, strict=True)]


def test_niche_data_slide_key_keeps_niches_within_a_slide(two_slide_h5ad, level1_dir):
    from xscale.cli.fit import NicheData

    slides = ad.read_h5ad(two_slide_h5ad).obs["section"].to_numpy()
    dm = NicheData(str(two_slide_h5ad), str(level1_dir), max_cells=6, slide_key="section")
    per = _slides_per_niche(dm.train.idx.numpy(), dm.train.pad_mask.numpy(), slides)
    assert len(per) == 2 * PER_SLIDE
    assert all(len(s) == 1 for s in per)


def test_joint_data_slide_key_keeps_niches_within_a_slide(two_slide_h5ad):
    from xscale.cli.fit import JointData

    slides = ad.read_h5ad(two_slide_h5ad).obs["section"].to_numpy()
    dm = JointData(str(two_slide_h5ad), max_cells=6, max_genes=None, slide_key="section")
    niches = dm.dataset.niches
    per = _slides_per_niche(niches.idx, niches.pad_mask, slides)
    assert len(per) == 2 * PER_SLIDE
    assert all(len(s) == 1 for s in per)
    mixed = JointData(str(two_slide_h5ad), max_cells=6, max_genes=None).dataset.niches  # one slide assumed
    assert any(len(s) == 2 for s in _slides_per_niche(mixed.idx, mixed.pad_mask, slides))  # the data overlaps


def test_fit_cli_accepts_slide_key_for_joint_data(two_slide_h5ad, tmp_path, monkeypatch):
    """``data.init_args.slide_key=`` parses for JointData (it did not before) and reaches the data."""
    from xscale.cli.fit import build_cli

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model:\n  class_path: xscale.cli.fit.Joint\n  init_args: {level1_preset: tiny, level2_preset: tiny}\n"
        f"data:\n  class_path: xscale.cli.fit.JointData\n  init_args: {{dataset: {two_slide_h5ad}, max_cells: 6}}\n"
        "trainer: {logger: false, enable_checkpointing: false, accelerator: cpu}\n"
    )
    cli = build_cli([f"--config={cfg}", "--data.init_args.slide_key=section"])
    slides = ad.read_h5ad(two_slide_h5ad).obs["section"].to_numpy()
    niches = cli.datamodule.dataset.niches
    assert all(len(s) == 1 for s in _slides_per_niche(niches.idx, niches.pad_mask, slides))


@pytest.mark.parametrize("cls", ["NicheData", "JointData"])
def test_unknown_slide_key_names_the_columns(cls, two_slide_h5ad, level1_dir):
    import xscale.cli.fit as fit
    from xscale.errors import XscaleInputError

    extra = {"level1": str(level1_dir)} if cls == "NicheData" else {}
    with pytest.raises(XscaleInputError, match=r"slide_key='slice'.*section.*data\.init_args\.slide_key"):
        getattr(fit, cls)(str(two_slide_h5ad), max_cells=6, slide_key="slice", **extra)


def test_joint_refuses_data_vocabulary_other_than_the_saved_level1(two_slide_h5ad, reversed_level1_dir, genes):
    from xscale.cli.fit import Joint, JointData
    from xscale.errors import XscaleInputError

    dm = JointData(str(two_slide_h5ad), max_cells=6, max_genes=None)  # vocabulary: the panel's own order
    with pytest.raises(XscaleInputError, match=rf"{N_GENES} genes.*data\.init_args\.level1="):
        Joint(dm.genes, dm.max_cells, level2_preset="tiny", level1=str(reversed_level1_dir))
    # the same model on both sides: the data takes the model's vocabulary and the model builds
    dm = JointData(str(two_slide_h5ad), level1=str(reversed_level1_dir), max_cells=6, max_genes=None)
    assert dm.genes == list(Joint(dm.genes, dm.max_cells, level2_preset="tiny",
                                  level1=str(reversed_level1_dir)).level1.vocab.genes)


def test_xscale_fit_joint_with_mismatched_level1_is_an_input_error(two_slide_h5ad, reversed_level1_dir, tmp_path,
                                                                    monkeypatch, capsys):
    from xscale.cli.main import main

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model:\n  class_path: xscale.cli.fit.Joint\n  init_args: {level2_preset: tiny}\n"
        f"data:\n  class_path: xscale.cli.fit.JointData\n  init_args: {{dataset: {two_slide_h5ad}, max_cells: 6}}\n"
        "trainer: {logger: false, enable_checkpointing: false, accelerator: cpu, max_steps: 1}\n"
    )
    rc = main(["fit", "--save-dir", str(tmp_path / "m"), "--config", str(cfg),
               f"model.init_args.level1={reversed_level1_dir}"])
    assert rc == 2
    assert "data.init_args.level1=" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
