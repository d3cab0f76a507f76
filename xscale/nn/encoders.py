"""Token encoders with one interface: ``forward(tokens (B, N, D), pad_mask (B, N)) -> (B, N, D)``.

- ``"full"``: pre-norm transformer, O(N²·D) per layer (SDPA never materialises N×N on CPU).
- ``"criss-cross"``: M latent ("sketch") tokens carried across layers. Per layer the
  latents read the real tokens (padding excluded), mix among themselves, pass an MLP
  of their own; then the tokens read the latents and pass their MLP. O(N·M·D).

Where ours differs from the published criss-cross variant (see
``benchmarks/results/attention.json`` for the measured effect of each):
padding never reaches the latents; the latents have their own norm and MLP; the read
and write hops are sequential (tokens read latents that already saw this layer's
tokens), not parallel.

Speed: the token side of a criss-cross layer is one LayerNorm and one fused matmul
(keys/values for the latents' read and queries for the tokens' read come from the
same normalised tokens), so per layer the tokens pay 4·N·D² + 4·N·M·D multiply-adds
for mixing instead of 4·N·D² + 2·N²·D. Memory: the normalised tokens are recomputed in
backward rather than stored, so training needs no more memory than full attention.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xscale.nn.attention import Attention, MLPBlock, SelfAttentionBlock, check_sizes

EncoderName = Literal["full", "criss-cross"]
Hops = Literal["sequential", "parallel"]


class Encoder(nn.Module):
    """Full self-attention transformer encoder. (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, depth: int, heads: int, *, mlp_mult: int = 4) -> None:
        super().__init__()
        check_sizes(dim=dim, heads=heads, depth=depth, mlp_mult=mlp_mult)
        self.attn = nn.ModuleList(SelfAttentionBlock(dim, heads=heads) for _ in range(depth))
        self.mlp = nn.ModuleList(MLPBlock(dim, mult=mlp_mult) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        x = tokens
        for attn, mlp in zip(self.attn, self.mlp, strict=True):
            x = mlp(attn(x, pad_mask))
        return self.norm(x)

    def layer_states(self, tokens: Tensor, pad_mask: Tensor | None = None) -> list[Tensor]:
        """The input and every layer's output, before the final norm: depth + 1 × (B, N, D)."""
        states = [tokens]
        for attn, mlp in zip(self.attn, self.mlp, strict=True):
            states.append(mlp(attn(states[-1], pad_mask)))
        return states


class _LayerNormLinear(torch.autograd.Function):
    """``F.linear(F.layer_norm(x), weight)`` that saves ``x`` only: the normalised tokens are
    recomputed in backward instead of being kept, which saves one (B, N, D) activation per layer."""

    @staticmethod
    def forward(ctx, x: Tensor, ln_weight: Tensor, ln_bias: Tensor, weight: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(x, ln_weight, ln_bias, weight)
        ctx.eps = eps
        return F.linear(F.layer_norm(x, x.shape[-1:], ln_weight, ln_bias, eps), weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, None]:
        x, ln_weight, ln_bias, weight = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (x, ln_weight, ln_bias)]
            xn = F.layer_norm(leaves[0], x.shape[-1:], leaves[1], leaves[2], ctx.eps)
        # under autocast the forward's matmul ran in bf16 / fp16 (so does grad_out) while x, the norm and
        # the weight stay fp32: the backward computes in the weight's dtype, each gradient in its input's
        g = grad_out.to(weight.dtype)
        grad_weight = g.reshape(-1, g.shape[-1]).T @ xn.detach().to(weight.dtype).reshape(-1, xn.shape[-1])
        grad_x, grad_lw, grad_lb = torch.autograd.grad(xn, leaves, (g @ weight).to(xn.dtype))
        return grad_x, grad_lw, grad_lb, grad_weight.to(weight.dtype), None


class CrissCrossMixing(nn.Module):
    """The token-mixing sublayer of a criss-cross layer (everything but the tokens' MLP).

    ``forward(x (B, N, D), latents (B, M, D), pad_mask (B, N)) -> (x (B, N, D), latents (B, M, D))``:
    latents read the real tokens, mix, pass their MLP; tokens read the latents. Pre-norm
    residuals throughout. With ``hops="parallel"`` the tokens read the latents as they
    were *before* this layer's read (the published variant), otherwise after it.
    """

    def __init__(
        self, dim: int, heads: int, *, mlp_mult: int = 4, latent_self_attention: bool = True,
        latent_mlp: bool = True, hops: Hops = "sequential",
    ) -> None:
        super().__init__()
        if hops not in ("sequential", "parallel"):
            raise ValueError(f"hops must be 'sequential' or 'parallel', got {hops!r}.")
        self.hops: Hops = hops
        self.norm_tokens = nn.LayerNorm(dim)  # shared by both hops: x does not change in between
        self.norm_latents_read = nn.LayerNorm(dim)
        self.latents_read = Attention(dim, heads=heads)  # q from latents, k/v from tokens
        self.latents_mix = SelfAttentionBlock(dim, heads=heads) if latent_self_attention else None
        self.latents_mlp = MLPBlock(dim, mult=mlp_mult) if latent_mlp else None
        self.norm_latents_write = nn.LayerNorm(dim)
        self.tokens_read = Attention(dim, heads=heads)  # q from tokens, k/v from latents

    def forward(self, x: Tensor, latents: Tensor, pad_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        d = x.shape[-1]
        # One matmul for every token-side projection: (B, N, D) -> (B, N, 3D) = [k_read | v_read | q_write],
        # on the shared normalised tokens (recomputed in backward, not stored).
        w = torch.cat([self.latents_read.to_kv.weight, self.tokens_read.to_q.weight], dim=0)
        norm = self.norm_tokens
        k_read, v_read, q_write = _LayerNormLinear.apply(x, norm.weight, norm.bias, w, norm.eps).split(d, dim=-1)
        old = latents
        q_read = self.latents_read.to_q(self.norm_latents_read(latents))  # (B, M, D)
        latents = latents + self.latents_read.attend(q_read, k_read, v_read, pad_mask)  # padding excluded
        if self.latents_mix is not None:
            latents = self.latents_mix(latents)
        if self.latents_mlp is not None:
            latents = self.latents_mlp(latents)
        source = latents if self.hops == "sequential" else old
        k_write, v_write = self.tokens_read.to_kv(self.norm_latents_write(source)).chunk(2, dim=-1)
        x = x + self.tokens_read.attend(q_write, k_write, v_write)  # latents hold no padding
        return x, latents


class CrissCrossLayer(nn.Module):
    """One criss-cross layer: :class:`CrissCrossMixing`, then the tokens' MLP."""

    def __init__(
        self, dim: int, heads: int, *, mlp_mult: int = 4, latent_self_attention: bool = True,
        latent_mlp: bool = True, hops: Hops = "sequential",
    ) -> None:
        super().__init__()
        self.mixing = CrissCrossMixing(
            dim, heads, mlp_mult=mlp_mult, latent_self_attention=latent_self_attention,
            latent_mlp=latent_mlp, hops=hops,
        )
        self.tokens_mlp = MLPBlock(dim, mult=mlp_mult)

    def forward(self, x: Tensor, latents: Tensor, pad_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        x, latents = self.mixing(x, latents, pad_mask)
        return self.tokens_mlp(x), latents


class CrissCrossEncoder(nn.Module):
    """Criss-cross (latent-token) attention encoder. (B, N, D) -> (B, N, D); O(N·M·D) per layer.

    Parameters
    ----------
    dim, depth, heads
        Width D, layers, heads H (D % H == 0).
    n_latents
        M latent tokens carried across the layers.
    latent_self_attention, latent_mlp
        Whether the latents mix among themselves / pass their own MLP each layer.
    hops
        ``"sequential"`` (default): tokens read the latents after the latents read this
        layer's tokens. ``"parallel"``: both hops use the latents from before the layer.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        n_latents: int = 64,
        *,
        mlp_mult: int = 4,
        latent_self_attention: bool = True,
        latent_mlp: bool = True,
        hops: Hops = "sequential",
    ) -> None:
        super().__init__()
        check_sizes(dim=dim, heads=heads, depth=depth, n_latents=n_latents, mlp_mult=mlp_mult)
        self.latents = nn.Parameter(torch.randn(n_latents, dim) * 0.02)  # (M, D)
        self.layers = nn.ModuleList(
            CrissCrossLayer(
                dim, heads, mlp_mult=mlp_mult, latent_self_attention=latent_self_attention,
                latent_mlp=latent_mlp, hops=hops,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        x = tokens
        latents = self.latents.expand(x.shape[0], -1, -1)  # (M, D) -> (B, M, D)
        for layer in self.layers:
            x, latents = layer(x, latents, pad_mask)
        return self.norm(x)

    def layer_states(self, tokens: Tensor, pad_mask: Tensor | None = None) -> list[Tensor]:
        """The input and every layer's token output, before the final norm: depth + 1 × (B, N, D)."""
        states = [tokens]
        latents = self.latents.expand(tokens.shape[0], -1, -1)  # (M, D) -> (B, M, D)
        for layer in self.layers:
            x, latents = layer(states[-1], latents, pad_mask)
            states.append(x)
        return states


ENCODERS: dict[str, type[nn.Module]] = {"full": Encoder, "criss-cross": CrissCrossEncoder}


def build_encoder(name: EncoderName, *, dim: int, depth: int, heads: int, n_latents: int = 64) -> nn.Module:
    """Encoder registered under ``name`` ("full" or "criss-cross"); ``n_latents`` is read by criss-cross only."""
    if name == "full":
        return Encoder(dim, depth, heads)
    if name == "criss-cross":
        return CrissCrossEncoder(dim, depth, heads, n_latents)
    raise ValueError(f"Unknown encoder {name!r}. Registered: {list(ENCODERS)}.")
