"""Mixed precision, padding and config edge cases found by an audit of the model code (2026-11-25).

Under bf16 autocast (the GPU trainer configs use bf16-mixed) the criss-cross encoder's backward
crashed on mixed dtypes and Fourier position features lost ~0.25 rad; the NB likelihood gave NaN
in float16 and lost nats in bfloat16; NaN config weights were accepted; a NaN at a padded slot
reached the real tokens. CPU autocast stands in for the GPU here.
"""
from __future__ import annotations

import math

import pytest
import torch

from xscale.models.cell_to_tissue import CellToTissue, CellToTissueConfig
from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
from xscale.models.heads import HeadConfig
from xscale.models.likelihoods import nb_log_prob, zinb_log_prob
from xscale.nn.embeddings import FourierFeatures
from xscale.nn.encoders import CrissCrossEncoder


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def test_criss_cross_backward_under_bf16_autocast_matches_float32():
    enc = CrissCrossEncoder(32, 1, 2, 8)
    x = torch.randn(2, 10, 32)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 6:] = True
    grads = {}
    for mixed in (False, True):
        enc.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            y = enc(xi, pad)
        y.float().pow(2).sum().backward()
        grads[mixed] = torch.cat([xi.grad.flatten()] + [p.grad.flatten() for p in enc.parameters()])
    cos = torch.nn.functional.cosine_similarity(grads[True].float(), grads[False], dim=0)
    assert cos > 0.99, cos  # bf16 rounding only


def test_level2_loss_backward_under_bf16_autocast():
    model = CellToTissue(CellToTissueConfig.preset("tiny", in_dim=16))  # criss-cross encoder by default
    lat, xy = torch.randn(3, 11, 16), torch.randn(3, 11, 2) * 3
    pad = torch.zeros(3, 11, dtype=torch.bool)
    pad[2, 5:] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.loss(lat, xy, pad)
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach()))
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_fourier_features_are_computed_in_float32_under_autocast():
    ff = FourierFeatures(16, n_frequencies=32, scale=2.0)
    xy = torch.rand(500, 2) * 8 - 4  # angles up to ~50 rad
    ref = ff(xy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ff(xy)
    assert (mixed.float() - ref).abs().max() < 0.02  # only the projection is bf16 (was 0.085 off)


def test_likelihoods_in_half_precision():
    x, mu, theta = torch.tensor([0.0, 0.0, 3.0]), torch.tensor([0.0, 1e-9, 2.0]), torch.tensor(7.0)
    ref = nb_log_prob(x, mu, theta)
    for dtype in (torch.float16, torch.bfloat16):
        got = nb_log_prob(x.to(dtype), mu.to(dtype), theta.to(dtype))
        assert torch.isfinite(got).all() and got.dtype == torch.float32, (dtype, got)
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
        z = zinb_log_prob(x.to(dtype), mu.to(dtype), theta.to(dtype), torch.zeros(3, dtype=dtype))
        assert torch.isfinite(z).all()
    big = [torch.tensor(v) for v in (1000.0, 896.0, 50.0)]  # 896: exact in bfloat16
    want = float(nb_log_prob(*big))
    assert abs(float(nb_log_prob(*(t.to(torch.bfloat16) for t in big))) - want) < 1e-3  # was -32.0 vs -6.17


def test_nan_and_inf_config_values_are_refused():
    genes = [f"G{i}" for i in range(12)]
    for field in ("w_readout", "w_autoencode", "mask_fraction"):
        for value in (math.nan, math.inf):
            with pytest.raises(ValueError, match=f"GeneToCellConfig.{field} must be a finite number"):
                GeneToCellConfig.preset("tiny", genes=genes, **{field: value})
    for field in ("position_scale", "masked_weight", "w_composition"):
        with pytest.raises(ValueError, match=f"CellToTissueConfig.{field} must be a finite number"):
            CellToTissueConfig.preset("tiny", in_dim=16, **{field: math.nan})
    for kw in ({"dim": 0, "n_latents": 4}, {"dim": 8, "n_latents": 4, "hidden": 2.5}):
        with pytest.raises(ValueError, match="HeadConfig"):
            HeadConfig(classes=("a", "b"), **kw)


def test_nan_at_padded_slots_does_not_reach_real_tokens():
    genes = [f"G{i}" for i in range(12)]
    model = GeneToCell(GeneToCellConfig.preset("tiny", genes=genes)).eval()
    ids = torch.arange(12).repeat(2, 1)
    values = torch.rand(2, 12)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 8:] = True
    clean = model.encode(ids, values.masked_fill(pad, 0.0), pad)
    dirty = model.encode(ids, values.masked_fill(pad, math.nan), pad)
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    l2 = CellToTissue(CellToTissueConfig.preset("tiny", in_dim=16)).eval()
    lat, xy = torch.randn(2, 11, 16), torch.randn(2, 11, 2)
    npad = torch.zeros(2, 11, dtype=torch.bool)
    npad[1, 6:] = True
    a = l2.encode(lat.masked_fill(npad[..., None], 0.0), xy, npad)
    b = l2.encode(lat.masked_fill(npad[..., None], math.nan), xy.masked_fill(npad[..., None], math.inf), npad)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
