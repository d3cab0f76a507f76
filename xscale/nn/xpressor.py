"""The Xpressor (compressor) and its Decompressor (decoder).

Xpressor: K learned queries that, per layer, cross-attend into the tokens (padding
excluded), self-attend among themselves and pass an MLP (pre-norm residuals).
(B, N, D) -> (B, K, D). The result does not depend on token order or padded values.

Decompressor: per-position queries that carry identity only (gene identity at level
1, relative position at level 2) cross-attend into the K latents, optionally attend
among themselves, and pass an MLP. (B, N, D) + (B, K, D) -> (B, N, D). It never sees
the input values, so whatever it rebuilds had to pass through the latents.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from xscale.nn.attention import CrossAttentionBlock, MLPBlock, SelfAttentionBlock, check_sizes


class Xpressor(nn.Module):
    """Compress a token set into ``n_latents`` latent tokens. (B, N, D) -> (B, K, D)."""

    def __init__(self, dim: int, n_latents: int, depth: int, heads: int, *, mlp_mult: int = 4) -> None:
        super().__init__()
        check_sizes(dim=dim, heads=heads, depth=depth, n_latents=n_latents, mlp_mult=mlp_mult)
        self.queries = nn.Parameter(torch.randn(n_latents, dim) * 0.02)  # (K, D)
        self.read = nn.ModuleList(CrossAttentionBlock(dim, heads=heads) for _ in range(depth))
        self.mix = nn.ModuleList(SelfAttentionBlock(dim, heads=heads) for _ in range(depth))
        self.mlp = nn.ModuleList(MLPBlock(dim, mult=mlp_mult) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    @property
    def n_latents(self) -> int:
        return self.queries.shape[0]

    def forward(self, tokens: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        latents = self.queries.expand(tokens.shape[0], -1, -1)  # (K, D) -> (B, K, D)
        for read, mix, mlp in zip(self.read, self.mix, self.mlp, strict=True):
            latents = mlp(mix(read(latents, tokens, pad_mask)))
        return self.norm(latents)  # (B, K, D)


class Decompressor(nn.Module):
    """Rebuild per-position outputs from latents. queries (B, N, D), latents (B, K, D) -> (B, N, D)."""

    def __init__(
        self, dim: int, depth: int, heads: int, *, self_attend: bool = False, mlp_mult: int = 4
    ) -> None:
        super().__init__()
        check_sizes(dim=dim, heads=heads, depth=depth, mlp_mult=mlp_mult)
        self.read = nn.ModuleList(CrossAttentionBlock(dim, heads=heads) for _ in range(depth))
        self.mix = (
            nn.ModuleList(SelfAttentionBlock(dim, heads=heads) for _ in range(depth)) if self_attend else None
        )
        self.mlp = nn.ModuleList(MLPBlock(dim, mult=mlp_mult) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries: Tensor, latents: Tensor, query_pad_mask: Tensor | None = None) -> Tensor:
        x = queries
        for i, (read, mlp) in enumerate(zip(self.read, self.mlp, strict=True)):
            x = read(x, latents)  # (B, N, D) reads (B, K, D)
            if self.mix is not None:
                x = self.mix[i](x, query_pad_mask)
            x = mlp(x)
        return self.norm(x)
