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
        # angles in float32 even under autocast: in bf16 an angle of ~50 rad is off by ~0.25 rad
        with torch.autocast(device_type=xy.device.type, enabled=False):
            angles = 2 * math.pi * xy.float() @ self.freqs.float()  # (..., 2) @ (2, F) -> (..., F)
            features = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (..., 2F)
        return self.proj(features.to(xy.dtype) if xy.dtype in (torch.float16, torch.bfloat16) else features)
