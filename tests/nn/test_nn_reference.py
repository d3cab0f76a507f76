"""Every fast attention path equals its naive explicit-softmax twin (float32 and float64, ragged padding)."""
from __future__ import annotations

import copy

import pytest
import torch

from xscale.nn import (
    Attention,
    CrissCrossEncoder,
    CrossAttentionBlock,
    Decompressor,
    Encoder,
    SelfAttentionBlock,
    Xpressor,
    build_encoder,
    naive_attention,
    sdpa_attention,
    set_attention_backend,
)

DTYPES = [torch.float32, torch.float64]
D, H = 32, 4


def ragged_mask(lengths: list[int], n: int) -> torch.Tensor:
    """(B, N) bool, True = padding; row b keeps its first lengths[b] positions."""
    return torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 2e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-9}


def naive_twin(module: torch.nn.Module) -> torch.nn.Module:
    twin = set_attention_backend(copy.deepcopy(module), "naive")
    backends = {m.backend for m in twin.modules() if isinstance(m, Attention)}
    assert backends == {"naive"}
    return twin


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_function_matches_naive_with_ragged_padding(dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, H, 7, 8, generator=g, dtype=dtype)
    k = torch.randn(4, H, 11, 8, generator=g, dtype=dtype)
    v = torch.randn(4, H, 11, 8, generator=g, dtype=dtype)
    mask = ragged_mask([11, 5, 1, 0], 11)  # last row fully padded
    fast, ref = sdpa_attention(q, k, v, mask), naive_attention(q, k, v, mask)
    torch.testing.assert_close(fast, ref, **tol(dtype))
    torch.testing.assert_close(sdpa_attention(q, k, v), naive_attention(q, k, v), **tol(dtype))
    # Fully padded row: zeros, not NaN.
    assert torch.isfinite(fast).all() and torch.isfinite(ref).all()
    assert fast[3].abs().max() == 0 and ref[3].abs().max() == 0
    # Padded keys really are ignored: the masked answer equals attention over the real keys only.
    torch.testing.assert_close(fast[1:2], naive_attention(q[1:2], k[1:2, :, :5], v[1:2, :, :5]), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_self_and_cross_match_naive(dtype):
    torch.manual_seed(1)
    attn = Attention(D, heads=H).to(dtype)
    x = torch.randn(3, 9, D, dtype=dtype)
    ctx = torch.randn(3, 13, D, dtype=dtype)
    self_mask, ctx_mask = ragged_mask([9, 4, 1], 9), ragged_mask([13, 6, 2], 13)
    twin = naive_twin(attn)
    torch.testing.assert_close(attn(x, None, self_mask), twin(x, None, self_mask), **tol(dtype))
    torch.testing.assert_close(attn(x, ctx, ctx_mask), twin(x, ctx, ctx_mask), **tol(dtype))
    cross, self_ = CrossAttentionBlock(D, heads=H).to(dtype), SelfAttentionBlock(D, heads=H).to(dtype)
    torch.testing.assert_close(cross(x, ctx, ctx_mask), naive_twin(cross)(x, ctx, ctx_mask), **tol(dtype))
    torch.testing.assert_close(self_(x, self_mask), naive_twin(self_)(x, self_mask), **tol(dtype))


def _modules(dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    torch.manual_seed(2)
    mods = {
        "full": Encoder(D, 2, H),
        "criss-cross": CrissCrossEncoder(D, 2, H, n_latents=6),
        "criss-cross-no-latent-mix": CrissCrossEncoder(D, 2, H, n_latents=6, latent_self_attention=False),
        "criss-cross-parallel": CrissCrossEncoder(D, 2, H, n_latents=6, hops="parallel", latent_mlp=False),
        "xpressor": Xpressor(D, 5, 2, H),
    }
    return {k: m.to(dtype).eval() for k, m in mods.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "name", ["full", "criss-cross", "criss-cross-no-latent-mix", "criss-cross-parallel", "xpressor"]
)
def test_token_modules_match_naive(name, dtype):
    module = _modules(dtype)[name]
    x = torch.randn(4, 17, D, dtype=dtype)
    mask = ragged_mask([17, 9, 3, 1], 17)
    fast, ref = module(x, mask), naive_twin(module)(x, mask)
    torch.testing.assert_close(fast, ref, **tol(dtype))
    # Also without any mask.
    torch.testing.assert_close(module(x), naive_twin(module)(x), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("self_attend", [False, True])
def test_decompressor_matches_naive(self_attend, dtype):
    torch.manual_seed(3)
    dec = Decompressor(D, 2, H, self_attend=self_attend).to(dtype)
    queries = torch.randn(3, 12, D, dtype=dtype)
    latents = torch.randn(3, 5, D, dtype=dtype)
    mask = ragged_mask([12, 7, 2], 12)
    torch.testing.assert_close(dec(queries, latents, mask), naive_twin(dec)(queries, latents, mask), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_xpressor_stack_matches_naive(dtype):
    """Encoder -> Xpressor -> Decompressor, as a level uses them, end to end."""
    torch.manual_seed(4)
    stack = torch.nn.ModuleDict(
        {"enc": build_encoder("criss-cross", dim=D, depth=2, heads=H, n_latents=4), "xp": Xpressor(D, 3, 1, H),
         "dec": Decompressor(D, 1, H, self_attend=True)}
    ).to(dtype)

    def run(m: torch.nn.ModuleDict, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return m["dec"](x, m["xp"](m["enc"](x, mask), mask), mask)

    x = torch.randn(3, 10, D, dtype=dtype)
    mask = ragged_mask([10, 6, 2], 10)
    torch.testing.assert_close(run(stack, x, mask), run(naive_twin(stack), x, mask), **tol(dtype))


def test_fused_norm_projection_equals_plain_layers_in_value_and_gradient():
    """The criss-cross token side (LayerNorm recomputed in backward, one fused matmul) vs plain modules."""
    from xscale.nn.encoders import _LayerNormLinear

    torch.manual_seed(5)
    d = 8  # small: gradcheck costs one backward per input element
    norm = torch.nn.LayerNorm(d).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    w = torch.randn(3 * d, d, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, d, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda *a: _LayerNormLinear.apply(*a, norm.eps), (x, norm.weight, norm.bias, w), fast_mode=True
    )
    out = _LayerNormLinear.apply(x, norm.weight, norm.bias, w, norm.eps)
    ref = torch.nn.functional.linear(norm(x), w)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, norm.weight, norm.bias, w), g)
    ref_grads = torch.autograd.grad(ref, (x, norm.weight, norm.bias, w), g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_criss_cross_hops_differ_and_sequential_reads_this_layer():
    """Sequential hops: token outputs depend on this layer's latent read; parallel: the first layer's do not."""
    torch.manual_seed(6)
    seq = CrissCrossEncoder(D, 1, H, n_latents=4).double()
    par = CrissCrossEncoder(D, 1, H, n_latents=4, hops="parallel").double()
    par.load_state_dict(seq.state_dict())
    x = torch.randn(2, 9, D, dtype=torch.float64)
    assert not torch.allclose(seq(x), par(x))
    # In one parallel layer token i's output cannot depend on token j (latents are the learned init).
    x2 = x.clone()
    x2[:, 5] = torch.randn(2, D, dtype=torch.float64)  # not a constant shift: LayerNorm would remove that
    torch.testing.assert_close(par(x)[:, :5], par(x2)[:, :5])
    assert (seq(x)[:, :5] - seq(x2)[:, :5]).abs().max() > 1e-6
