"""Level-1 training objectives (masked genes, denoising, loss weighting), gene-context sampling, base preset."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import xscale.models.gene_to_cell as g2c
from xscale.data.anndata_dataset import AnnDataCellDataset, vocab_from_adatas
from xscale.data.batch import collate_cells, sample_context
from xscale.data.transforms import log_normalize
from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig


@pytest.fixture(scope="module")
def real(starmap_small):
    """(vocab, CellBatch) of 64 real cells, whole 166-gene panel (library == context sum)."""
    vocab = vocab_from_adatas([starmap_small])
    ds = AnnDataCellDataset(starmap_small, vocab)
    return vocab, collate_cells([ds[i] for i in range(64)], rng=np.random.default_rng(0))


def _model(vocab, **overrides) -> GeneToCell:
    torch.manual_seed(0)
    return GeneToCell(GeneToCellConfig.preset("tiny", genes=vocab.genes, **overrides))


def _head(batch, n: int):
    """The first n cells of a CellBatch."""
    return type(batch)(**{f.name: getattr(batch, f.name)[:n] for f in dataclasses.fields(batch)})


def _spy_encode(model, monkeypatch) -> list[dict]:
    """Record every encode call's inputs and output latents."""
    calls, real_encode = [], model.encode

    def spy(gene_ids, values, pad_mask=None, **kw):
        out = real_encode(gene_ids, values, pad_mask, **kw)
        calls.append(dict(values=values, value_mask=kw.get("value_mask"), latents=out))
        return out

    monkeypatch.setattr(model, "encode", spy)
    return calls


def _nll(model, latents, batch, scored):
    """Hand computation: mean NB NLL of the clean counts over the ``scored`` (B, G) positions."""
    lp = model.decode(latents, batch.gene_ids, batch.counts.sum(-1), batch.pad_mask).log_prob(batch.counts)
    return -lp[scored].mean()


def test_masked_values_are_invisible_to_the_encoder(real):
    """Guards: encode(value_mask=...) really hides the masked genes' values (mask token replaces them)."""
    vocab, batch = real
    model = _model(vocab).eval()
    hide = (torch.rand(batch.pad_mask.shape, generator=torch.Generator().manual_seed(1)) < 0.3) & ~batch.pad_mask
    scrambled = torch.where(hide, batch.values + 3.0, batch.values)  # (B, G) change only hidden values
    with torch.no_grad():
        a = model.encode(batch.gene_ids, batch.values, batch.pad_mask, value_mask=hide)  # (B, K, D)
        b = model.encode(batch.gene_ids, scrambled, batch.pad_mask, value_mask=hide)
        clean = model.encode(batch.gene_ids, batch.values, batch.pad_mask)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (a - clean).abs().amax() > 1e-3  # masking changes what the encoder sees


def test_masked_objective_hides_mask_fraction_and_scores_only_hidden(real, monkeypatch):
    """Guards: w_masked cells hide ~mask_fraction of real genes; ``masked`` is the NB NLL over those only."""
    vocab, batch = real
    model = _model(vocab, w_autoencode=0.0, w_masked=1.0, w_denoise=0.0, mask_fraction=0.4)
    calls = _spy_encode(model, monkeypatch)
    out = model.loss(batch, generator=torch.Generator().manual_seed(0))
    (call,) = calls
    hide, real_genes = call["value_mask"], ~batch.pad_mask
    assert hide is not None and not (hide & batch.pad_mask).any()  # padding is never "hidden"
    assert abs(hide.sum().item() / real_genes.sum().item() - 0.4) < 0.03  # ~10k real positions
    torch.testing.assert_close(call["values"], batch.values)  # masked cells are not thinned
    with torch.no_grad():
        expected = _nll(model, call["latents"], batch, hide)
        everywhere = _nll(model, call["latents"], batch, real_genes)
    torch.testing.assert_close(out.masked.detach(), expected)
    assert abs(everywhere - expected) > 1e-3  # the hand computation does tell hidden from all genes
    assert out.autoencode == 0 and out.denoise == 0
    torch.testing.assert_close(out.total, out.masked)


def test_denoise_objective_thins_input_and_scores_clean_counts(real, monkeypatch):
    """Guards: denoise cells encode Binomial(counts, denoise_keep) (log-normalised again); target = clean counts."""
    vocab, batch = real
    model = _model(vocab, w_autoencode=0.0, w_masked=0.0, w_denoise=1.0, denoise_keep=0.5)
    calls, thins, real_thin = _spy_encode(model, monkeypatch), [], g2c.binomial_thin

    def thin_spy(c, k, **kw):
        thins.append((c, k, real_thin(c, k, **kw)))
        return thins[-1][2]

    monkeypatch.setattr(g2c, "binomial_thin", thin_spy)
    out = model.loss(batch, generator=torch.Generator().manual_seed(0))
    (call,), real_genes = calls, ~batch.pad_mask
    assert call["value_mask"] is None
    assert len(thins) == 1 and thins[0][1] == 0.5
    counts, _, thinned = thins[0]
    assert (thinned <= counts).all() and 0.45 < thinned.sum() / counts.sum() < 0.55  # ~half the molecules
    expected_values = log_normalize(thinned, thinned.sum(-1)).masked_fill(batch.pad_mask, 0.0)
    torch.testing.assert_close(call["values"], expected_values)
    # spy-independent: the encoder input lost expressed genes compared with the clean input
    assert ((call["values"] > 0) & real_genes).sum() < 0.9 * ((batch.values > 0) & real_genes).sum()
    with torch.no_grad():
        torch.testing.assert_close(out.denoise.detach(), _nll(model, call["latents"], batch, real_genes))
    assert out.denoise > 0 and out.autoencode == 0 and out.masked == 0


def test_denoise_keep_one_leaves_input_clean(real, monkeypatch):
    """Guards: denoise_keep=1.0 thins nothing: the encoder sees exactly the clean values."""
    vocab, batch = real
    model = _model(vocab, w_autoencode=0.0, w_masked=0.0, w_denoise=1.0, denoise_keep=1.0)
    calls = _spy_encode(model, monkeypatch)
    model.loss(batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(calls[0]["values"], batch.values)


def test_total_is_weighted_sum_of_parts(real):
    """Guards: total = Σ w·part when every part is present, rescaled by Σw / Σw_present otherwise."""
    vocab, batch = real
    w = dict(w_autoencode=0.5, w_masked=2.0, w_denoise=3.0)
    model = _model(vocab, **w)
    out = model.loss(batch, generator=torch.Generator().manual_seed(0))
    parts = (out.autoencode, out.masked, out.denoise)
    assert all(p > 0 for p in parts) and out.readout == 0  # 64 cells: every objective drawn
    torch.testing.assert_close(out.total, sum(wi * p for wi, p in zip(w.values(), parts, strict=True)))
    out1 = model.loss(_head(batch, 1), generator=torch.Generator().manual_seed(0))  # one cell: one objective present
    (present,) = [(wi, p) for wi, p in zip(w.values(), (out1.autoencode, out1.masked, out1.denoise),
                                            strict=True) if p > 0]
    torch.testing.assert_close(out1.total, present[1] * sum(w.values()))  # = Σw · that part


def test_sample_context_keeps_expressed_then_samples_zeros():
    """Guards: long panels keep every expressed gene, fill with distinct zeros; seeded; sorted."""
    counts = np.zeros(100, dtype=np.float32)
    expressed = np.array([3, 17, 18, 40, 41, 77, 99])
    counts[expressed] = [1, 5, 2, 9, 1, 3, 4]
    keep = sample_context(counts, 30, np.random.default_rng(0))  # (30,) positions
    assert keep.shape == (30,) and len(np.unique(keep)) == 30 and (np.diff(keep) > 0).all()
    assert set(expressed) <= set(keep.tolist())
    assert (counts[np.setdiff1d(keep, expressed)] == 0).all()
    np.testing.assert_array_equal(keep, sample_context(counts, 30, np.random.default_rng(0)))
    assert not np.array_equal(keep, sample_context(counts, 30, np.random.default_rng(1)))  # zeros are sampled
    np.testing.assert_array_equal(sample_context(counts, 100, np.random.default_rng(0)), np.arange(100))


def test_sample_context_subsamples_expressed_when_too_many():
    """Guards: more expressed genes than the context -> a distinct subset of the expressed genes only."""
    rng = np.random.default_rng(5)
    counts = np.where(rng.random(200) < 0.5, rng.integers(1, 9, 200), 0).astype(np.float32)  # ~100 expressed
    keep = sample_context(counts, 40, np.random.default_rng(0))
    assert keep.shape == (40,) and len(np.unique(keep)) == 40 and (counts[keep] > 0).all()
    np.testing.assert_array_equal(keep, sample_context(counts, 40, np.random.default_rng(0)))


def test_collate_context_library_is_whole_panel(real, starmap_small):
    """Guards: collate_cells(max_genes) trims G to the context but keeps the whole panel's library."""
    vocab, full = real
    ds = AnnDataCellDataset(starmap_small, vocab)
    batch = collate_cells([ds[i] for i in range(64)], max_genes=32, rng=np.random.default_rng(0))
    assert batch.gene_ids.shape == (64, 32)
    torch.testing.assert_close(batch.library, full.library)
    expressed = (full.counts > 0).sum(-1)  # (B,) expressed genes per cell, all kept when they fit
    kept = (batch.counts > 0).sum(-1)
    torch.testing.assert_close(kept, expressed.clamp_max(32))


def test_base_preset_forward_and_loss(real):
    """Guards: the GPU-sized "base" preset builds and runs encode + loss + backward on CPU."""
    vocab, batch = real
    two = _head(batch, 2)
    cfg = GeneToCellConfig.preset("base", genes=vocab.genes)
    assert (cfg.dim, cfg.depth, cfg.n_latents, cfg.max_genes) == (256, 6, 16, 2048)
    torch.manual_seed(0)
    model = GeneToCell(cfg)
    assert model.encode(two.gene_ids, two.values, two.pad_mask).shape == (2, 16, 256)  # (B, K, D)
    out = model.loss(two, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.total) and out.total > 0
    out.total.backward()
    assert model.log_theta.grad is not None and torch.isfinite(model.log_theta.grad).all()
