"""Padding invariance, set semantics, gradients, empty rows, argument errors, and a tiny real overfit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import xscale
from xscale.nn import (
    Attention,
    CrissCrossEncoder,
    Decompressor,
    Encoder,
    FourierFeatures,
    Xpressor,
    build_encoder,
    set_attention_backend,
)

D, H = 32, 4


def ragged_mask(lengths: list[int], n: int) -> torch.Tensor:
    return torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]


def encoders() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "full": Encoder(D, 2, H).double().eval(),
        "criss-cross": CrissCrossEncoder(D, 2, H, n_latents=6).double().eval(),
    }


def xpressor() -> Xpressor:
    torch.manual_seed(0)
    return Xpressor(D, 4, 2, H).double().eval()


@pytest.mark.parametrize("name", ["full", "criss-cross"])
def test_encoder_outputs_ignore_padded_values(name):
    enc = encoders()[name]
    x = torch.randn(3, 15, D, dtype=torch.float64)
    mask = ragged_mask([15, 8, 2], 15)
    noisy = torch.where(mask[..., None], torch.randn_like(x) * 100, x)
    assert not torch.equal(noisy, x)
    a, b = enc(x, mask), enc(noisy, mask)
    torch.testing.assert_close(a[~mask], b[~mask])


def test_xpressor_latents_ignore_padded_values_and_length():
    xp = xpressor()
    x = torch.randn(3, 15, D, dtype=torch.float64)
    mask = ragged_mask([15, 8, 2], 15)
    noisy = torch.where(mask[..., None], torch.randn_like(x) * 100, x)
    torch.testing.assert_close(xp(x, mask), xp(noisy, mask))
    # A padded row equals the same cell alone without padding.
    torch.testing.assert_close(xp(x, mask)[1], xp(x[1:2, :8])[0])


@pytest.mark.parametrize("name", ["full", "criss-cross"])
def test_encoders_are_permutation_equivariant(name):
    enc = encoders()[name]
    x = torch.randn(2, 12, D, dtype=torch.float64)
    mask = ragged_mask([12, 7], 12)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    out, out_p = enc(x, mask), enc(x[:, perm], mask[:, perm])
    torch.testing.assert_close(out_p[~mask[:, perm]], out[:, perm][~mask[:, perm]])


def test_xpressor_is_permutation_invariant():
    xp = xpressor()
    x = torch.randn(2, 12, D, dtype=torch.float64)
    mask = ragged_mask([12, 7], 12)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(xp(x, mask), xp(x[:, perm], mask[:, perm]))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Encoder(D, 2, H),
        lambda: CrissCrossEncoder(D, 2, H, n_latents=4),
        lambda: Xpressor(D, 3, 2, H),
    ],
    ids=["full", "criss-cross", "xpressor"],
)
def test_gradients_reach_every_parameter(make):
    torch.manual_seed(0)
    module = make()
    x = torch.randn(2, 9, D, requires_grad=True)
    out = module(x, ragged_mask([9, 5], 9))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert x.grad.abs().sum() > 0


def test_decompressor_gradients_reach_every_parameter_and_latents():
    torch.manual_seed(0)
    dec = Decompressor(D, 2, H, self_attend=True)
    q, lat = torch.randn(2, 9, D), torch.randn(2, 3, D, requires_grad=True)
    out = dec(q, lat, ragged_mask([9, 5], 9))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert lat.grad.abs().sum() > 0


def test_fully_padded_rows_give_zeros_not_nan():
    torch.manual_seed(0)
    attn = Attention(D, heads=H)
    x, ctx = torch.randn(2, 4, D), torch.randn(2, 6, D)
    mask = ragged_mask([6, 0], 6)
    for backend in ("sdpa", "naive"):
        out = set_attention_backend(attn, backend)(x, ctx, mask)
        assert torch.isfinite(out).all()
        assert out[1].abs().max() == 0, "a query with no real key must read nothing"
        assert out[0].abs().max() > 0
    x = torch.randn(2, 6, D)
    for module in (*encoders().values(), xpressor()):
        module = module.float()
        out = module(x, mask)
        assert torch.isfinite(out).all()
    # An empty cell's latents are its queries passed through the latent layers only (nothing read).
    xp = xpressor().float()
    torch.testing.assert_close(xp(x, mask)[1], xp(torch.zeros(1, 6, D), ragged_mask([0], 6))[0])


def test_bad_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible by heads"):
        Attention(30, heads=4)
    with pytest.raises(ValueError, match="heads must be a positive integer"):
        Attention(32, heads=0)
    with pytest.raises(ValueError, match="divisible by heads"):
        Xpressor(30, 4, 1, 4)
    with pytest.raises(ValueError, match="n_latents"):
        CrissCrossEncoder(32, 2, 4, n_latents=0)
    with pytest.raises(ValueError, match="depth"):
        Encoder(32, 0, 4)
    with pytest.raises(ValueError, match="Registered"):
        build_encoder("linformer", dim=32, depth=1, heads=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        set_attention_backend(Encoder(32, 1, 4), "flash")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pad_mask"):
        Attention(32, heads=4)(torch.randn(2, 5, 32), None, torch.zeros(2, 5))  # float mask


def test_build_encoder_returns_registered_classes():
    assert isinstance(build_encoder("full", dim=D, depth=1, heads=H), Encoder)
    cc = build_encoder("criss-cross", dim=D, depth=1, heads=H, n_latents=7)
    assert isinstance(cc, CrissCrossEncoder) and cc.latents.shape == (7, D)


def test_fourier_features_deterministic_and_distance_sensitive():
    a, b = FourierFeatures(D, scale=10.0), FourierFeatures(D, scale=10.0)
    torch.testing.assert_close(a.freqs, b.freqs)
    xy = torch.tensor([[0.0, 0.0], [0.1, 0.0], [50.0, 50.0]])
    out = a(xy)
    assert out.shape == (3, D)
    # Raw features (before the projection) of near points are closer than of far points.
    feats = torch.cat([(xy @ a.freqs).sin(), (xy @ a.freqs).cos()], dim=-1)
    assert (feats[0] - feats[1]).norm() < (feats[0] - feats[2]).norm()


def test_tiny_xpressor_autoencoder_overfits_one_real_batch():
    """Gene tokens (identity + value) -> Xpressor (K latents) -> gene-identity queries decode values.

    The decoder sees gene identity only, so beating the per-gene mean needs information through the latents.
    """
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    adata = xscale.datasets.load("starmap_mpfc")
    X = adata.X[:16].toarray()
    values = torch.tensor(np.log1p(X / X.sum(1, keepdims=True) * 1e4), dtype=torch.float32)  # (B, G)
    b, g = values.shape
    gene_mean_mse = ((values - values.mean(0)) ** 2).mean().item()
    gene_emb = torch.nn.Embedding(g, D)
    value_proj = torch.nn.Linear(1, D)
    xp, dec, head = Xpressor(D, 4, 1, H), Decompressor(D, 1, H), torch.nn.Linear(D, 1)
    params = [p for m in (gene_emb, value_proj, xp, dec, head) for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    ids = torch.arange(g).expand(b, g)

    def loss_fn() -> torch.Tensor:
        tokens = gene_emb(ids) + value_proj(values[..., None])  # (B, G, D)
        latents = xp(tokens)  # (B, K, D)
        pred = head(dec(gene_emb(ids), latents)).squeeze(-1)  # (B, G)
        return ((pred - values) ** 2).mean()

    try:
        first = loss_fn().item()
        for _ in range(250):
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < first / 10, (first, loss.item())
    assert loss.item() < gene_mean_mse / 4, (gene_mean_mse, loss.item())
