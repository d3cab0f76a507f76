from __future__ import annotations

import numpy as np
import pytest
import torch

from xscale.data.anndata_dataset import AnnDataCellDataset, vocab_from_adatas
from xscale.data.batch import collate_cells
from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig, GeneToCellLoss
from xscale.models.io import load_model, save_model
from xscale.models.likelihoods import nb_deviance


def _batch(adata, n=32, max_genes=None, seed=0):
    vocab = vocab_from_adatas([adata])
    ds = AnnDataCellDataset(adata, vocab)
    return vocab, collate_cells([ds[i] for i in range(n)], max_genes=max_genes, rng=np.random.default_rng(seed))


def test_level1_config_checks_and_presets():
    cfg = GeneToCellConfig.preset("small", genes=["gad1", " Sst"])
    assert cfg.genes == ["GAD1", "SST"] and cfg.embedding_dim == cfg.n_latents * cfg.dim
    assert GeneToCellConfig.preset("tiny", genes=["A"], pooling="mean").embedding_dim == 32
    with pytest.raises(ValueError, match="preset"):
        GeneToCellConfig.preset("huge", genes=["A"])
    with pytest.raises(ValueError, match="Unknown GeneToCellConfig fields"):
        GeneToCellConfig.preset("tiny", genes=["A"], n_latent=3)
    with pytest.raises(ValueError, match="pooling"):
        GeneToCellConfig(genes=["A"], pooling="max")
    with pytest.raises(ValueError, match="divisible"):
        GeneToCellConfig(genes=["A"], dim=30, heads=4)
    with pytest.raises(ValueError, match="duplicates"):
        GeneToCellConfig(genes=["A", "a"])
    with pytest.raises(ValueError, match="weights"):
        GeneToCellConfig(genes=["A"], w_autoencode=0, w_masked=0, w_denoise=0)


@pytest.mark.parametrize(
    "pooling,encoder,likelihood",
    [("xpressor", "full", "nb"), ("cls", "full", "zinb"), ("mean", "criss-cross", "nb"), ("xpressor", "criss-cross", "zinb")],
)
def test_level1_pooling_variants_shapes_and_loss(starmap_small, pooling, encoder, likelihood):
    vocab, batch = _batch(starmap_small, n=8)
    cfg = GeneToCellConfig.preset("tiny", genes=vocab.genes, pooling=pooling, encoder=encoder,
                                  likelihood=likelihood, encoder_latents=8)
    torch.manual_seed(0)
    model = GeneToCell(cfg)
    lat = model.encode(batch.gene_ids, batch.values, batch.pad_mask)
    k = cfg.n_latents if pooling == "xpressor" else 1
    assert lat.shape == (8, k, cfg.dim)
    assert model.embed(batch.gene_ids, batch.values, batch.pad_mask).shape == (8, cfg.embedding_dim)
    params = model.decode(lat, batch.gene_ids, batch.library, batch.pad_mask)
    torch.testing.assert_close(params.mean.sum(-1), batch.library)  # softmax × library, pads excluded
    assert (params.zi_logits is not None) == (likelihood == "zinb")
    out = model.loss(batch, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, GeneToCellLoss) and torch.isfinite(out.total)
    out.total.backward()
    assert model.gene_embedder.table.weight.grad is not None


def test_level1_padding_does_not_change_latents(starmap_small):
    vocab, batch = _batch(starmap_small, n=4)
    torch.manual_seed(0)
    model = GeneToCell(GeneToCellConfig.preset("tiny", genes=vocab.genes)).eval()
    extra = 7  # append padding with garbage values
    ids = torch.cat([batch.gene_ids, torch.zeros(4, extra, dtype=torch.long)], 1)
    vals = torch.cat([batch.values, torch.full((4, extra), 5.0)], 1)
    pad = torch.cat([batch.pad_mask, torch.ones(4, extra, dtype=torch.bool)], 1)
    with torch.no_grad():
        a = model.encode(batch.gene_ids, batch.values, batch.pad_mask)
        b = model.encode(ids, vals, pad)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_level1_overfit_one_real_batch(starmap_small):
    """A tiny Xpressor + Decompressor auto-encoder overfits one real STARmap batch."""
    vocab, batch = _batch(starmap_small, n=16)
    torch.manual_seed(0)
    cfg = GeneToCellConfig.preset("tiny", genes=vocab.genes, w_autoencode=1.0, w_masked=0.0, w_denoise=0.0)
    model = GeneToCell(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def deviance() -> float:
        with torch.no_grad():
            lat = model.encode(batch.gene_ids, batch.values, batch.pad_mask)
            p = model.decode(lat, batch.gene_ids, batch.counts.sum(-1), batch.pad_mask)
            return float(nb_deviance(batch.counts, p.mean, p.theta)[~batch.pad_mask].mean())

    first_loss, first_dev = None, deviance()
    for _ in range(120):
        out = model.loss(batch)
        first_loss = float(out.total.detach()) if first_loss is None else first_loss
        opt.zero_grad()
        out.total.backward()
        opt.step()
    assert float(out.total) < 0.6 * first_loss
    assert deviance() < first_dev / 2  # excess over the saturated model falls by a large factor


def test_level1_save_load_identical_latents(starmap_small, tmp_path):
    vocab, batch = _batch(starmap_small, n=16)
    torch.manual_seed(0)
    model = GeneToCell(GeneToCellConfig.preset("tiny", genes=vocab.genes, likelihood="zinb")).eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, GeneToCell) and loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode(batch.gene_ids, batch.values, batch.pad_mask),
            loaded.encode(batch.gene_ids, batch.values, batch.pad_mask), rtol=0, atol=0,
        )
