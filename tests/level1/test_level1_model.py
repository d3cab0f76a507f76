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
    [("xpressor", "full", "nb"), ("cls", "full", "zinb"), ("mean", "criss-cross", "nb"),
     ("xpressor", "criss-cross", "zinb")],
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
    assert float(out.total.detach()) < 0.6 * first_loss
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


def test_level1_gene_stats_match_naive_numpy(starmap_small):
    vocab = vocab_from_adatas([starmap_small])
    ids, share, v_mean, v_std = AnnDataCellDataset(starmap_small, vocab).gene_stats()
    X = np.asarray(starmap_small.X.toarray(), dtype=np.float64)
    X = X[X.sum(1) > 0]
    frac = X / X.sum(1, keepdims=True)  # (n, G) each cell's composition
    order = vocab.index(list(map(str, starmap_small.var_names)))
    assert sorted(ids.tolist()) == sorted(order.tolist())
    pos = {int(g): j for j, g in enumerate(order)}
    cols = [pos[int(g)] for g in ids]
    np.testing.assert_allclose(share, frac.mean(0)[cols], rtol=1e-6)
    logv = np.log1p(frac * 1e4)
    np.testing.assert_allclose(v_mean, logv.mean(0)[cols], rtol=1e-6)
    np.testing.assert_allclose(v_std, logv.std(0)[cols], rtol=1e-5, atol=1e-7)


def test_level1_gene_offset_and_standardised_inputs_round_trip(starmap_small, tmp_path):
    vocab, batch = _batch(starmap_small, n=16)
    config = GeneToCellConfig.preset("tiny", genes=vocab.genes, decoder_gene_bias=True, standardize_values=True)
    torch.manual_seed(0)
    model = GeneToCell(config).eval()
    ids, share, v_mean, v_std = (torch.from_numpy(a) for a in AnnDataCellDataset(starmap_small, vocab).gene_stats())
    before = model.encode(batch.gene_ids, batch.values, batch.pad_mask)
    model.init_value_scaling(ids, v_mean, v_std)
    model.init_gene_bias(ids, share)
    # the statistics change what the encoder sees, and the offset is log share, centred
    assert not torch.allclose(before, model.encode(batch.gene_ids, batch.values, batch.pad_mask))
    log_share = share.clamp_min(1e-8).log()
    torch.testing.assert_close(model.gene_bias[ids], (log_share - log_share.mean()).float())
    # with zero decoder output the mean share follows the offset: softmax(gene_bias) over the panel
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        lib = torch.full((len(batch),), 100.0)
        mean = model.decode(model.encode(batch.gene_ids, batch.values, batch.pad_mask), batch.gene_ids, lib).mean
    expected = torch.softmax(model.gene_bias[batch.gene_ids[0]].detach(), -1) * 100
    torch.testing.assert_close(mean[0], expected)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")  # buffers and offset travel with the weights
    torch.testing.assert_close(loaded.value_std, model.value_std)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(batch.gene_ids, batch.values, batch.pad_mask),
                                   loaded.encode(batch.gene_ids, batch.values, batch.pad_mask), rtol=0, atol=0)


def test_level1_linear_readout_is_linear_in_latents_and_trains(starmap_small, tmp_path):
    """The read-out head is an exact linear map of the flattened latents, scored on the clean input values."""
    vocab, batch = _batch(starmap_small, n=16)
    # auto-encode only, so the loss's encoder pass sees the clean input and can be recomputed here
    config = GeneToCellConfig.preset("tiny", genes=vocab.genes, standardize_values=True, w_readout=1.0,
                                     w_autoencode=1.0, w_masked=0.0, w_denoise=0.0)
    torch.manual_seed(0)
    model = GeneToCell(config)
    ids, _, v_mean, v_std = (torch.from_numpy(a) for a in AnnDataCellDataset(starmap_small, vocab).gene_stats())
    model.init_value_scaling(ids, v_mean, v_std)
    z1, z2 = torch.randn(2, 16, config.n_latents, config.dim)
    with torch.no_grad():
        bias = model.readout_values(torch.zeros_like(z1), batch.gene_ids)
        lin = model.readout_values(2.0 * z1 - 3.0 * z2, batch.gene_ids) - bias
        ref = (2.0 * (model.readout_values(z1, batch.gene_ids) - bias)
               - 3.0 * (model.readout_values(z2, batch.gene_ids) - bias))
    torch.testing.assert_close(lin, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the factored fast path equals the naive one that builds every gene direction
        torch.testing.assert_close(model.readout_values(z1, batch.gene_ids),
                                   model.readout_values_naive(z1, batch.gene_ids), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias, model.readout_bias[batch.gene_ids].detach().expand_as(bias))
    # the loss part equals a naive MSE against the standardised clean values
    out = model.loss(batch, generator=torch.Generator().manual_seed(0))
    target = (batch.values - model.value_mean[batch.gene_ids]) / model.value_std[batch.gene_ids]
    real = ~batch.pad_mask
    with torch.no_grad():
        lat = model.encode(batch.gene_ids, batch.values, batch.pad_mask)
        naive = ((model.readout_values(lat, batch.gene_ids) - target) ** 2)[real].mean()
    torch.testing.assert_close(out.readout.detach(), naive)
    torch.testing.assert_close(out.total.detach(), out.autoencode.detach() + naive)
    # gradients reach the head; without the term there is no head and the part is 0
    out.total.backward()
    assert model.readout.weight.grad is not None and model.readout_bias.grad.abs().sum() > 0
    plain = GeneToCell(GeneToCellConfig.preset("tiny", genes=vocab.genes))
    assert plain.readout is None and plain.loss(batch).readout.item() == 0.0
    with pytest.raises(ValueError, match="w_readout"):
        plain.readout_values(lat, batch.gene_ids)
    with pytest.raises(ValueError, match="w_readout"):
        GeneToCellConfig(genes=["A"], w_readout=-1.0)
    # training on the read-out alone drives its error far down on one real batch
    model.zero_grad()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def readout_mse() -> float:
        with torch.no_grad():
            pred = model.readout_values(model.encode(batch.gene_ids, batch.values, batch.pad_mask), batch.gene_ids)
            return float(((pred - target) ** 2)[real].mean())

    first = readout_mse()
    # the head starts small (weights scaled by 1/sqrt(K·D)): its first error is near the targets' own
    # mean square, not the ~100x that the default nn.Linear init gave
    assert first < 2.0 * float((target ** 2)[real].mean()), first
    for _ in range(200):
        loss = ((model.readout_values(model.encode(batch.gene_ids, batch.values, batch.pad_mask), batch.gene_ids)
                 - target) ** 2)[real].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert readout_mse() < 0.1 * first  # from about the targets' mean square to a small part of it
    # the head travels with the checkpoint
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded.readout_values(lat, batch.gene_ids),
                                   model.readout_values(lat, batch.gene_ids), rtol=0, atol=0)


def test_level1_loss_runs_the_gene_embedder_once(starmap_small):
    """encode, decode and the read-out share one gene-embedder pass per loss (a protein LM is costly)."""
    vocab, batch = _batch(starmap_small, n=8)
    model = GeneToCell(GeneToCellConfig.preset("tiny", genes=vocab.genes, w_readout=1.0))
    calls = []
    model.gene_embedder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    model.loss(batch, generator=torch.Generator().manual_seed(0))
    assert calls == [batch.gene_ids.shape]
