"""Python API inputs a scanpy user passes: each gives the right result or a clear error.

Found by probing the functions with real data (2026-11-25): niches silently mixed the slides
of a multi-slide AnnData by default, plot_domains(save=) switched a notebook's matplotlib
backend off, a missing slide label became a slide named "nan", repeated cell ids made the
query layer answer for another cell, NaN latents got a confident transferred label, and
several inputs ended in a raw sklearn / faiss / PIL error.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest

import xscale
from xscale.errors import XscaleInputError


@pytest.fixture(scope="module")
def starmap():
    """600 real STARmap cells, 200 per slice; uns records the slide key as the bundled loader does."""
    a = xscale.datasets.load("starmap_mpfc")
    rng = np.random.default_rng(0)
    keep = np.concatenate([rng.choice(np.flatnonzero((a.obs["slice"] == s).to_numpy()), 200, replace=False)
                           for s in sorted(a.obs["slice"].unique())])
    return a[np.sort(keep)].copy()


@pytest.fixture(scope="module")
def models(starmap):
    import torch

    from xscale.models.cell_to_tissue import CellToTissue, CellToTissueConfig
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig

    torch.manual_seed(0)
    l1 = GeneToCell(GeneToCellConfig.preset("tiny", genes=list(starmap.var_names))).eval()
    l2 = CellToTissue(CellToTissueConfig.preset("tiny", in_dim=l1.config.embedding_dim)).eval()
    return l1, l2


@pytest.fixture(scope="module")
def embedded(starmap, models):
    a = starmap.copy()
    xscale.tl.embed_cells(a, models[0], progress=False)
    return a


# ------------------------------------------------------------------ niches and slides
def test_embed_niches_keeps_slides_apart_by_default(embedded, models, caplog):
    """The bundled dataset records its slide key: niches then never mix slides, as with slide_key given."""
    a = embedded.copy()
    assert a.uns["xscale_dataset"]["slide_key"] == "slice"
    ref = xscale.tl.embed_niches(a, models[1], slide_key="slice", copy=True, progress=False).obsm["X_xscale_niche"]
    mixed = xscale.tl.embed_niches(a, models[1], slide_key=None, copy=True, progress=False)  # the default
    np.testing.assert_array_equal(mixed.obsm["X_xscale_niche"], ref)

    a.obsm["xyz"] = np.column_stack([a.obsm["spatial"][:, :2], np.full(a.n_obs, 7.0)])
    with caplog.at_level(logging.WARNING, logger="xscale.tl.niches"):
        z = xscale.tl.embed_niches(a, models[1], spatial_key="xyz", copy=True, progress=False)
    assert "obsm['xyz'] has 3 columns; niches use the first two" in caplog.text
    np.testing.assert_array_equal(z.obsm["X_xscale_niche"], ref)
    caplog.clear()
    del a.uns["xscale_dataset"]  # nothing recorded: one slide, with a warning naming the column
    with caplog.at_level(logging.WARNING, logger="xscale.tl.niches"):
        one = xscale.tl.embed_niches(a, models[1], copy=True, progress=False).obsm["X_xscale_niche"]
    assert "obs['slice'] has 3 values" in caplog.text and "pass slide_key='slice'" in caplog.text
    assert not np.allclose(one, ref)  # niches crossed the slides' overlapping coordinates


def test_missing_slide_labels_are_an_error_not_a_slide_named_nan(embedded, models, tmp_path):
    from xscale.train.finetune import finetune
    from xscale.train.level1 import fit_level1

    a = embedded.copy()
    a.obs["slide_gaps"] = a.obs["slice"].astype(object)
    a.obs.iloc[:7, a.obs.columns.get_loc("slide_gaps")] = np.nan
    msg = r"adata.obs\['slide_gaps'\]: expected a slide for every cell, found 7 missing"
    with pytest.raises(XscaleInputError, match=msg):
        xscale.tl.embed_niches(a, models[1], slide_key="slide_gaps", progress=False)
    with pytest.raises(XscaleInputError, match=msg):
        xscale.tl.domains(a, 3, use_rep="X_xscale_cell", slide_key="slide_gaps")
    with pytest.raises(XscaleInputError, match=msg):
        finetune(models[0], a, task="batch_correction", slide_key="slide_gaps", max_steps=1)
    with pytest.raises(XscaleInputError, match=msg):
        fit_level1(a, "tiny", out_dir=tmp_path / "l1", slide_key="slide_gaps", max_steps=1, logger="none",
                   enable_progress_bar=False)
    from xscale.train.staged import run_staged

    with pytest.raises(XscaleInputError, match=msg):  # before any stage, even a finished one, is used
        run_staged(a, tmp_path / "run", slide_key="slide_gaps", level1_preset="tiny", level2_preset="tiny",
                   level1_max_steps=1, level2_max_steps=1, progress=False, write_store=False)
    assert not (tmp_path / "run").exists()  # nothing made for a bad input


# ------------------------------------------------------------------ domains and plots
def test_domains_inputs(embedded):
    a = embedded.copy()
    k, d = 4, a.obsm["X_xscale_cell"].shape[1] // 4
    a.obsm["stacked"] = a.obsm["X_xscale_cell"].reshape(a.n_obs, k, d)  # (n, K, D) as some writers keep it
    xscale.tl.domains(a, 3.0, use_rep="stacked", key_added="d3")  # a whole float is a number of domains
    flat = xscale.tl.domains(a, 3, use_rep="X_xscale_cell", copy=True).obs["xscale_domain"]
    np.testing.assert_array_equal(a.obs["d3"].astype(str), flat.astype(str))
    with pytest.raises(XscaleInputError, match="n_domains: expected a whole number of domains, found 2.5"):
        xscale.tl.domains(a, 2.5, use_rep="X_xscale_cell")
    a.obsm["holes"] = a.obsm["X_xscale_cell"].copy()
    a.obsm["holes"][[3, 9]] = np.nan
    with pytest.raises(XscaleInputError, match="NaN or inf values in 2 cells"):
        xscale.tl.domains(a, 3, use_rep="holes")


def test_plot_domains_keeps_the_backend_saves_into_new_folders_and_takes_an_axes_grid(embedded, tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    a = xscale.tl.domains(embedded, 3, use_rep="X_xscale_cell", copy=True)
    before = matplotlib.get_backend()
    plt.switch_backend("pdf")  # stands in for a notebook's inline backend: not Agg
    try:
        xscale.tl.plot_domains(a, slide_key="slice", save=tmp_path / "new" / "folder" / "domains.png")
        assert matplotlib.get_backend() == "pdf"  # was switched to Agg, so later notebook plots went blank
    finally:
        plt.switch_backend(before)
    assert (tmp_path / "new" / "folder" / "domains.png").stat().st_size > 0
    fig, grid = plt.subplots(2, 2)
    with pytest.raises(XscaleInputError, match="expected 3 axes"):  # 4 axes for 3 slides
        xscale.tl.plot_domains(a, slide_key="slice", ax=grid)
    assert xscale.tl.plot_domains(a, slide_key="slice", ax=grid.ravel()[:3]) is fig
    fig2, grid2 = plt.subplots(1, 3, squeeze=False)  # a (1, 3) array: flattened, not read as one row
    assert xscale.tl.plot_domains(a, slide_key="slice", ax=grid2) is fig2
    plt.close("all")


def test_every_plot_gives_each_category_its_own_colour(embedded):
    """One palette for the report and plot_domains: n distinct colours at every size (plot_domains cycled tab20, so
    beyond 20 categories, e.g. seqFISH's 24 cell types, two types shared a colour); up to 102 they stay far apart."""
    import matplotlib
    import matplotlib.pyplot as plt

    from xscale.report.figures import palette

    for n in (3, 10, 15, 20, 24, 28, 40, 102, 150):
        colours = palette(n)
        assert len(set(colours)) == n, n
        if n <= 102:
            rgb = np.array([matplotlib.colors.to_rgb(c) for c in colours])
            gaps = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)[np.triu_indices(n, 1)]
            assert gaps.min() > 0.05, (n, gaps.min())
    a = embedded.copy()
    a.obs["many"] = [f"type{i % 25}" for i in range(a.n_obs)]
    fig = xscale.tl.plot_domains(a, key="many", slide_key="slice")
    drawn = {matplotlib.colors.to_hex(c.get_facecolor()[0]) for ax in fig.axes for c in ax.collections}
    assert len(drawn) == 25
    plt.close("all")


# ------------------------------------------------------------------ label transfer
def test_transfer_labels_inputs(embedded):
    import scipy.sparse as sp

    test = (embedded.obs["slice"] == "20180424_BZ14_control").to_numpy()
    ref, query = embedded[~test].copy(), embedded[test].copy()
    xscale.tl.transfer_labels(query, ref, key="cell_type", k=15.0)
    dense = query.obs["cell_type_transferred"].astype(str).to_numpy()
    for a in (ref, query):
        a.obsm["sparse"] = sp.csr_matrix(a.obsm["X_xscale_cell"])
    xscale.tl.transfer_labels(query, ref, key="cell_type", use_rep="sparse", key_added="from_sparse")
    np.testing.assert_array_equal(query.obs["from_sparse"].astype(str).to_numpy(), dense)
    ref.obs["type_id"] = ref.obs["cell_type"].cat.codes.astype(int)  # integer labels, e.g. cluster ids
    xscale.tl.transfer_labels(query, ref, key="type_id")
    ids = query.obs["type_id_transferred"]
    assert list(ids.cat.categories) == sorted(set(ref.obs["type_id"]))  # integers in numeric order, not '0','1','10'
    lookup = dict(zip(ref.obs["type_id"], ref.obs["cell_type"].astype(str), strict=False))
    np.testing.assert_array_equal([lookup[i] for i in ids], dense)
    with pytest.raises(XscaleInputError, match="k: expected a whole number >= 1, found 2.5"):
        xscale.tl.transfer_labels(query, ref, key="cell_type", k=2.5)
    holes = query.copy()
    holes.obsm["X_xscale_cell"][[0, 4]] = np.nan  # e.g. cells dropped at validation, NaN after a write-back
    with pytest.raises(XscaleInputError, match=r"query: obsm\['X_xscale_cell'\] has NaN or inf values in 2 cells"):
        xscale.tl.transfer_labels(holes, ref, key="cell_type")
    with pytest.raises(XscaleInputError, match="query: expected at least one cell, found none"):
        xscale.tl.transfer_labels(query[:0].copy(), ref, key="cell_type")


# ------------------------------------------------------------------ query layer
def test_query_layer_inputs(embedded, models):
    import anndata as ad

    from xscale.query import LatentIndex, LatentStore, decode_hit
    from xscale.query.decode import decode_latent

    parts = [embedded[(embedded.obs["slice"] == s).to_numpy()].copy() for s in sorted(embedded.obs["slice"].unique())]
    for p in parts:
        p.obs_names = [f"cell{i}" for i in range(p.n_obs)]  # numbered per slide, as many exports do
    with pytest.warns(UserWarning, match="not unique"):
        joined = ad.concat(parts)
    with pytest.raises(XscaleInputError, match=r"found 200 repeated, e.g. \['cell0'.*index_unique='-'"):
        LatentStore.from_adata(joined)
    fine = ad.concat(parts, index_unique="-")
    fine.obs["slide_no"] = fine.obs["slice"].cat.codes.astype(int)  # an integer slide column
    index = LatentIndex(LatentStore.from_adata(fine, slide_key="slide_no"))
    hits = index.query_cell(fine.obs_names[0], k=3, slide=1)  # the int the column holds, not "1"
    assert len(hits) == 3 and all(h.slide == "1" for h in hits)
    with pytest.raises(XscaleInputError, match="k: expected a whole number of hits >= 1, found -1"):
        index.query_cell(fine.obs_names[0], k=-1)
    expected = decode_hit(index, hits[0], models[0], library=100.0)
    np.testing.assert_allclose(expected, decode_latent(models[0], fine.obsm["X_xscale_cell"][hits[0].row],
                                                       library=100.0))


def test_fit_level1_out_dir_that_is_a_file(starmap, tmp_path):
    from xscale.train.level1 import fit_level1

    (tmp_path / "run").write_text("my notes")
    with pytest.raises(XscaleInputError, match="expected an output directory, found a file"):
        fit_level1(starmap, "tiny", out_dir=tmp_path / "run", max_steps=1, logger="none", enable_progress_bar=False)
    assert (tmp_path / "run").read_text() == "my notes"


# ------------------------------------------------------------------ level 2 and fine-tuning arguments
def test_level2_train_cells_mask_and_nan_latents(embedded, tmp_path):
    """A boolean train_cells mask was read as row numbers 0 / 1 (niches centred on cells 0 and 1 only);
    NaN latents trained a model whose weights were all NaN."""
    from xscale.train.level2 import fit_level2, niche_centres

    n = embedded.n_obs
    mask = (embedded.obs["slice"] != "20180424_BZ14_control").to_numpy()
    np.testing.assert_array_equal(niche_centres(mask, n), np.flatnonzero(mask))
    np.testing.assert_array_equal(niche_centres(np.flatnonzero(mask), n), np.flatnonzero(mask))
    with pytest.raises(XscaleInputError, match="a boolean mask needs one value per cell"):
        niche_centres(mask[:10], n)
    with pytest.raises(XscaleInputError, match="expected a boolean mask or row numbers"):
        niche_centres(np.array([0, n]), n)
    latents = np.asarray(embedded.obsm["X_xscale_cell"], dtype=np.float32).copy()
    latents[[4, 9]] = np.nan
    with pytest.raises(XscaleInputError, match=r"NaN/inf in 2 cells \(rows e.g. \[4, 9\]\)"):
        fit_level2(latents, embedded.obsm["spatial"], preset="tiny", max_steps=1, progress=False)


def test_finetune_all_keeps_frozen_parts_and_head_with_layer_mix_is_refused(starmap, tmp_path):
    """trainable='all' unfroze a frozen gene table (it changed, then was marked frozen again, and counted
    as trainable); trainable='head' with layer_mix left the mix at its uniform start."""
    import torch

    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.plm import save_gene_table
    from xscale.train.finetune import finetune

    genes = [str(g) for g in starmap.var_names]
    table = save_gene_table(tmp_path / "t.npz", genes, np.random.default_rng(0).normal(size=(len(genes), 8)))
    torch.manual_seed(0)
    net = GeneToCell(GeneToCellConfig.preset("tiny", genes=genes, gene_embedder="table",
                                             gene_embedder_options={"path": str(table), "freeze": True}))
    before = net.gene_embedder.table.detach().clone()
    n_table = net.gene_embedder.table.numel()
    res = finetune(net, starmap, task="cell_type", label_key="cell_type", trainable="all", max_steps=3,
                   batch_size=32, progress=False)
    torch.testing.assert_close(res.model.gene_embedder.table.detach(), before, rtol=0, atol=0)
    assert res.n_trainable == res.n_parameters - n_table
    from xscale.train.finetune import encode_cells, predict_labels

    empty = starmap[:0].copy()  # no cells: empty results, not "need at least one array to concatenate"
    assert encode_cells(res.model, empty).shape == (0, res.model.config.latents_per_cell, res.model.config.dim)
    assert predict_labels(res.model, res.head, empty, key_added="pred").shape == (0,) and "pred" in empty.obs
    with pytest.raises(XscaleInputError, match="trainable='head' trains nothing in the model"):
        finetune(net, starmap, task="cell_type", label_key="cell_type", trainable="head", layer_mix=True,
                 max_steps=1, progress=False)
