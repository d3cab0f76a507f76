"""Pure transforms on counts, tested on tiny arrays. Work on numpy arrays and torch tensors."""
from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

TARGET_LIBRARY = 1e4


def log_normalize(counts: ArrayT, library: ArrayT, *, target: float = TARGET_LIBRARY) -> ArrayT:
    """log1p(counts / library × target). counts (B, G), library (B,) -> (B, G).

    Cells with a zero library give zeros (not NaN).
    """
    if isinstance(counts, torch.Tensor):
        lib = library.clamp_min(1e-8)[..., None]
        return torch.log1p(counts / lib * target)
    lib = np.maximum(np.asarray(library, dtype=np.float64), 1e-8)[..., None]
    return np.log1p(counts / lib * target).astype(np.float32)


def binomial_thin(counts: torch.Tensor, keep: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each molecule with probability ``keep``: Binomial(counts, keep). Same shape, ≤ counts."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if keep == 1.0:
        return counts.clone()
    probs = torch.full_like(counts, keep)
    return torch.binomial(counts.float(), probs, generator=generator).to(counts.dtype)
