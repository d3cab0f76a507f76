"""Embeddings of continuous inputs: scaled Fourier features of 2-D positions."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class FourierFeatures(nn.Module):
    """Random Fourier features of positions, projected to the model width.

    ``forward(xy (..., 2)) -> (..., D)``. Frequencies are drawn once from
    N(0, 1/scale²) with a fixed seed and stored as a buffer, so saved models
    reload identically; ``scale`` is in the caller's units (e.g. cell spacings).
    """

    def __init__(self, dim: int, *, n_frequencies: int = 32, scale: float = 1.0, in_dim: int = 2,
                 seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        freqs = torch.randn(in_dim, n_frequencies, generator=g) / scale  # (2, F)
        self.register_buffer("freqs", freqs)
        self.proj = nn.Linear(2 * n_frequencies, dim)

    def forward(self, xy: Tensor) -> Tensor:
        angles = 2 * math.pi * xy @ self.freqs  # (..., 2) @ (2, F) -> (..., F)
        return self.proj(torch.cat([angles.sin(), angles.cos()], dim=-1))
