"""Attention on ``torch.nn.functional.scaled_dot_product_attention`` with a naive twin.

Masks follow one convention: ``pad_mask`` is a bool tensor, True = padding, over
the *keys* being read. A query row whose keys are all padding reads nothing and
returns zeros (never NaN).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Backend = Literal["sdpa", "naive"]


def _key_mask(pad_mask: Tensor | None, n_keys: int) -> tuple[Tensor | None, Tensor | None]:
    """Turn ``pad_mask`` (B, Nk) into an SDPA keep-mask (B, 1, 1, Nk) and an empty-row flag (B,)."""
    if pad_mask is None:
        return None, None
    if pad_mask.dtype != torch.bool or pad_mask.dim() != 2 or pad_mask.shape[-1] != n_keys:
        raise ValueError(
            f"pad_mask must be a bool tensor (B, Nk={n_keys}) with True = padding; "
            f"found dtype={pad_mask.dtype}, shape={tuple(pad_mask.shape)}. "
            "Build it as `lengths[:, None] <= arange(Nk)`."
        )
    empty = pad_mask.all(dim=-1)  # (B,)
    # Rows with no real key would give NaN from softmax; let them read everything and zero them after.
    keep = ~pad_mask | empty[:, None]  # (B, Nk)
    return keep[:, None, None, :], empty


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, pad_mask: Tensor | None = None) -> Tensor:
    """Fast path. q (B, H, Nq, dh), k/v (B, H, Nk, dh), pad_mask (B, Nk) -> (B, H, Nq, dh)."""
    keep, empty = _key_mask(pad_mask, k.shape[-2])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    if empty is not None:
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out


def naive_attention(q: Tensor, k: Tensor, v: Tensor, pad_mask: Tensor | None = None) -> Tensor:
    """Reference: explicit softmax(q kᵀ / √dh) v. Same shapes and masking as :func:`sdpa_attention`."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (B, H, Nq, Nk)
    keep, empty = _key_mask(pad_mask, k.shape[-2])
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    out = scores.softmax(dim=-1) @ v  # (B, H, Nq, dh)
    if empty is not None:
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out


ATTENTION_BACKENDS = {"sdpa": sdpa_attention, "naive": naive_attention}


def check_sizes(*, dim: int, heads: int, **counts: int) -> None:
    """Raise ``ValueError`` naming the argument when a size is not a positive integer or dim % heads != 0."""
    for name, value in {"dim": dim, "heads": heads, **counts}.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {name}={value!r}.")
    if dim % heads != 0:
        raise ValueError(f"dim={dim} must be divisible by heads={heads}; pick heads in the divisors of dim.")


class Attention(nn.Module):
    """Multi-head attention serving both self-attention and cross-attention.

    ``forward(x (B, Nq, D), context (B, Nk, D) | None, pad_mask (B, Nk) | None) -> (B, Nq, D)``.
    With ``context=None`` the queries attend to themselves. A query whose keys are all
    padding reads nothing: its output is exactly zero (so a residual block leaves it as is).
    """

    def __init__(self, dim: int, *, heads: int, backend: Backend = "sdpa") -> None:
        super().__init__()
        check_sizes(dim=dim, heads=heads)
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"backend must be one of {list(ATTENTION_BACKENDS)}, got {backend!r}.")
        self.heads = heads
        self.backend: Backend = backend
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def _split(self, t: Tensor) -> Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, N, D) -> (B, H, N, dh)

    def forward(self, x: Tensor, context: Tensor | None = None, pad_mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        k, v = self.to_kv(context).chunk(2, dim=-1)  # (B, Nk, D) x2
        return self.attend(self.to_q(x), k, v, pad_mask)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        """Attention on already-projected q (B, Nq, D), k/v (B, Nk, D), then ``to_out``. -> (B, Nq, D).

        Lets callers compute projections themselves (e.g. fused into one matmul) and
        still use this module's heads, backend, output projection and empty-row rule.
        """
        out = ATTENTION_BACKENDS[self.backend](self._split(q), self._split(k), self._split(v), pad_mask)
        b, h, n, dh = out.shape  # (B, H, Nq, dh)
        out = self.to_out(out.transpose(1, 2).reshape(b, n, h * dh))  # (B, Nq, D)
        if pad_mask is not None:
            out = out.masked_fill(pad_mask.all(dim=-1)[:, None, None], 0.0)  # no key to read -> no update
        return out


class FeedForward(nn.Module):
    """Position-wise MLP: Linear -> GELU -> Linear. (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, *, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CrossAttentionBlock(nn.Module):
    """Pre-norm residual cross-attention: ``x + Attn(norm(x), norm(context), pad_mask)``."""

    def __init__(self, dim: int, *, heads: int, backend: Backend = "sdpa") -> None:
        super().__init__()
        self.norm_x = nn.LayerNorm(dim)
        self.norm_ctx = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=heads, backend=backend)

    def forward(self, x: Tensor, context: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        return x + self.attn(self.norm_x(x), self.norm_ctx(context), pad_mask)


class SelfAttentionBlock(nn.Module):
    """Pre-norm residual self-attention: ``x + Attn(norm(x), pad_mask)``."""

    def __init__(self, dim: int, *, heads: int, backend: Backend = "sdpa") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=heads, backend=backend)

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        return x + self.attn(self.norm(x), None, pad_mask)


class MLPBlock(nn.Module):
    """Pre-norm residual MLP: ``x + FF(norm(x))``."""

    def __init__(self, dim: int, *, mult: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=mult)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ff(self.norm(x))


def set_attention_backend(module: nn.Module, backend: Backend) -> nn.Module:
    """Switch every :class:`Attention` inside ``module`` to ``backend`` ("sdpa" or "naive")."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {list(ATTENTION_BACKENDS)}, got {backend!r}")
    for m in module.modules():
        if isinstance(m, Attention):
            m.backend = backend
    return module
