"""One call to make a run reproducible: seeds every generator and picks deterministic kernels.

Identical embeddings on CPU for a fixed seed are a tested guarantee
(``tests/reliability/test_reliability_determinism.py``). On GPU, deterministic kernels
are requested too, but results may still differ across GPU models, drivers and
library versions.
"""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

log = logging.getLogger(__name__)

_MAX_SEED = 2**32 - 1


def seed_everything(seed: int, *, deterministic: bool = True, workers: bool = True) -> int:
    """Seed Python, numpy and torch (CPU and CUDA) and, optionally, force deterministic kernels.

    Parameters
    ----------
    seed
        Integer in ``[0, 2**32 - 1]``.
    deterministic
        If True: ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an op
        without a deterministic implementation warns instead of failing), cuDNN
        deterministic and not benchmarking, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` so
        cuBLAS matmuls are reproducible.
    workers
        If True, set ``PL_GLOBAL_SEED`` and ``PL_SEED_WORKERS=1`` so Lightning seeds each
        DataLoader worker (and each DDP rank) from this seed — the variables Lightning's
        own ``seed_everything`` sets; Lightning is not imported here.

    Returns
    -------
    The seed.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= _MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {_MAX_SEED}], got {seed!r}.")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    if workers:
        os.environ["PL_SEED_WORKERS"] = "1"
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    log.info("Seeded everything with %d (deterministic=%s)", seed, deterministic)
    return seed


def numpy_rng(seed: int | None) -> np.random.Generator:
    """A numpy ``Generator`` for ``seed`` (fresh entropy when ``seed`` is None)."""
    return np.random.default_rng(seed)


def torch_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A seeded ``torch.Generator`` on ``device``, for sampling without touching global state."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen
