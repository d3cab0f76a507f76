"""Token encoders with one interface: ``forward(tokens (B, N, D), pad_mask (B, N)) -> (B, N, D)``.

- ``"full"``: pre-norm transformer, O(N²·D) per layer (SDPA never materialises N×N on CPU).
- ``"criss-cross"``: M latent ("sketch") tokens carried across layers. Per layer the
  latents read the real tokens (padding excluded), mix among themselves, pass an MLP
  of their own; then the tokens read the latents and pass their MLP. O(N·M·D).
  Unlike the published variant, padding never reaches the latents and the latents
  have their own norm + MLP; the read and write hops are sequential, so tokens read
  latents that already saw this layer's tokens.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from xscale.nn.attention import CrossAttentionBlock, MLPBlock, SelfAttentionBlock, check_sizes

EncoderName = Literal["full", "criss-cross"]


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


class CrissCrossLayer(nn.Module):
    """One criss-cross layer: latents read tokens, latents mix, tokens read latents."""

    def __init__(self, dim: int, heads: int, *, mlp_mult: int = 4, latent_self_attention: bool = True) -> None:
        super().__init__()
        self.latents_read = CrossAttentionBlock(dim, heads=heads)
        self.latents_mix = SelfAttentionBlock(dim, heads=heads) if latent_self_attention else None
        self.latents_mlp = MLPBlock(dim, mult=mlp_mult)
        self.tokens_read = CrossAttentionBlock(dim, heads=heads)
        self.tokens_mlp = MLPBlock(dim, mult=mlp_mult)

    def forward(self, x: Tensor, latents: Tensor, pad_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        latents = self.latents_read(latents, x, pad_mask)  # (B, M, D) reads (B, N, D)
        if self.latents_mix is not None:
            latents = self.latents_mix(latents)
        latents = self.latents_mlp(latents)
        x = self.tokens_read(x, latents)  # (B, N, D) reads (B, M, D); latents hold no padding
        return self.tokens_mlp(x), latents


class CrissCrossEncoder(nn.Module):
    """Criss-cross (latent-token) attention encoder. (B, N, D) -> (B, N, D); O(N·M·D) per layer."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        n_latents: int = 64,
        *,
        mlp_mult: int = 4,
        latent_self_attention: bool = True,
    ) -> None:
        super().__init__()
        check_sizes(dim=dim, heads=heads, depth=depth, n_latents=n_latents, mlp_mult=mlp_mult)
        self.latents = nn.Parameter(torch.randn(n_latents, dim) * 0.02)  # (M, D)
        self.layers = nn.ModuleList(
            CrissCrossLayer(dim, heads, mlp_mult=mlp_mult, latent_self_attention=latent_self_attention)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        x = tokens
        latents = self.latents.expand(x.shape[0], -1, -1)  # (M, D) -> (B, M, D)
        for layer in self.layers:
            x, latents = layer(x, latents, pad_mask)
        return self.norm(x)


ENCODERS: dict[str, type[nn.Module]] = {"full": Encoder, "criss-cross": CrissCrossEncoder}


def build_encoder(name: EncoderName, *, dim: int, depth: int, heads: int, n_latents: int = 64) -> nn.Module:
    """Encoder registered under ``name`` ("full" or "criss-cross")."""
    if name == "full":
        return Encoder(dim, depth, heads)
    if name == "criss-cross":
        return CrissCrossEncoder(dim, depth, heads, n_latents)
    raise ValueError(f"Unknown encoder {name!r}. Registered: {list(ENCODERS)}.")
