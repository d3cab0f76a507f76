"""CellToTissue: shapes, padding invariance, overfitting one batch, save -> load."""
from __future__ import annotations

import pytest
import torch

from xscale.models.cell_to_tissue import CellToTissue, CellToTissueConfig
from xscale.models.io import load_model, save_model


def _batch(b: int = 8, c: int = 11, w: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, w, generator=g)
    xy = torch.randn(b, c, 2, generator=g) * 2
    xy[:, 0] = 0.0
    pad = torch.zeros(b, c, dtype=torch.bool)
    pad[: b // 2, c - 3 :] = True
    return x, xy, pad


def test_level2_config_checks_itself():
    with pytest.raises(ValueError, match="divisible"):
        CellToTissueConfig(in_dim=8, dim=30, heads=4)
    with pytest.raises(ValueError, match="mask_ratio"):
        CellToTissueConfig(in_dim=8, mask_ratio=1.5)
    with pytest.raises(ValueError, match="preset"):
        CellToTissueConfig.preset("huge", in_dim=8)
    with pytest.raises(TypeError):
        CellToTissueConfig.preset("tiny", in_dim=8, no_such_option=1)
    assert CellToTissueConfig.preset("small", in_dim=8).encoder == "criss-cross"


@pytest.mark.parametrize("encoder", ["criss-cross", "full"])
def test_level2_shapes_and_padding_ignored(encoder):
    torch.manual_seed(0)
    model = CellToTissue(CellToTissueConfig.preset("tiny", in_dim=24, encoder=encoder)).eval()
    x, xy, pad = _batch()
    z = model.encode(x, xy, pad)
    assert z.shape == (8, model.config.n_tissue_latents, model.config.dim)
    assert model.embed(x, xy, pad).shape == (8, model.config.n_tissue_latents * model.config.dim)
    x2, xy2 = x.clone(), xy.clone()
    x2[pad] = 100.0
    xy2[pad] = -50.0
    torch.testing.assert_close(model.encode(x2, xy2, pad), z)
    with pytest.raises(ValueError, match="in_dim"):
        model.encode(x[..., :10], xy, pad)


def test_level2_overfits_a_batch():
    torch.manual_seed(0)
    model = CellToTissue(CellToTissueConfig.preset("tiny", in_dim=24))
    x, xy, pad = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        out = model.loss(x, xy, pad, mask=False)
        first = first if first is not None else out.loss.item()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.loss.item() < 0.02 * first
    assert out.n_cells == int((~pad).sum())


def test_level2_masked_cells_scored_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = CellToTissue(CellToTissueConfig.preset("tiny", in_dim=24, mask_ratio=0.5))
    x, xy, pad = _batch()
    out = model.train().loss(x, xy, pad)
    assert out.masked.item() > 0
    cell_mask = model.sample_cell_mask(pad)
    assert not (cell_mask & pad).any()
    model.eval()
    save_model(model, tmp_path / "l2")
    again = load_model(tmp_path / "l2")
    torch.testing.assert_close(again.embed(x, xy, pad), model.embed(x, xy, pad))


def test_level2_composition_term_matches_a_naive_reference():
    torch.manual_seed(0)
    model = CellToTissue(CellToTissueConfig.preset("tiny", in_dim=24, w_composition=2.5)).eval()
    x, xy, pad = _batch()
    out = model.loss(x, xy, pad, mask=False)
    latents = model.encode(x, xy, pad)
    errors = []
    for i in range(x.shape[0]):  # one niche at a time: the mean of its real cells only
        real = [model.standardize(x[i, j]) for j in range(x.shape[1]) if not pad[i, j]]
        mean = torch.stack(real).mean(0)
        errors.append((model.composition(latents[i].flatten()) - mean).pow(2))
    torch.testing.assert_close(out.composition, torch.cat(errors).mean())
    torch.testing.assert_close(out.loss, out.reconstruction + out.masked + 2.5 * out.composition)


def test_level2_composition_off_builds_no_head_and_trains_when_on():
    off = CellToTissue(CellToTissueConfig.preset("tiny", in_dim=24, w_composition=0.0))
    assert off.composition is None
    x, xy, pad = _batch()
    assert off.loss(x, xy, pad, mask=False).composition.item() == 0.0
    # configs saved before the term (no w_composition key) load unchanged
    assert CellToTissueConfig(in_dim=24).w_composition == 0.0
    with pytest.raises(ValueError, match="w_composition"):
        CellToTissueConfig(in_dim=8, w_composition=-1.0)
    torch.manual_seed(0)
    model = CellToTissue(CellToTissueConfig.preset("tiny", in_dim=24))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model.loss(x, xy, pad, mask=False).composition.item()
    for _ in range(100):
        out = model.loss(x, xy, pad, mask=False)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.composition.item() < 0.05 * first


def test_domains_centred_per_slide_ignore_a_slide_wide_shift():
    import anndata as ad
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    from xscale.errors import XscaleInputError
    from xscale.tl.niches import center_groups, domains

    rng = np.random.default_rng(0)
    truth = np.tile(np.repeat([0, 1], 50), 2)  # two domains on each of two slides
    slide = np.repeat(["a", "b"], 100)
    x = rng.normal(size=(200, 6)) * 0.3
    x[:, 0] += 2.0 * truth  # the domains differ along feature 0
    x[slide == "b"] += 8.0  # slide b shifted as a whole (a batch effect), more than domains differ
    adata = ad.AnnData(np.zeros((200, 1), dtype=np.float32), obsm={"X_xscale_niche": x})
    adata.obs["slide"] = slide
    domains(adata, 2)
    # without centring the clusters follow the slides
    assert adjusted_rand_score(truth, adata.obs["xscale_domain"]) < 0.1
    domains(adata, 2, slide_key="slide")
    assert adjusted_rand_score(truth, adata.obs["xscale_domain"]) == 1.0
    centred = center_groups(x, slide)
    for s in ("a", "b"):  # reference: each slide minus its own mean
        np.testing.assert_allclose(centred[slide == s], x[slide == s] - x[slide == s].mean(0))
    with pytest.raises(XscaleInputError, match="slide_key 'nope' not found"):
        domains(adata, 2, slide_key="nope")
