"""xscale: cross-scale representation learning for spatial transcriptomics.

Stacked Xpressor levels compress gene tokens into cell latents (level 1) and cell
latents with their positions into tissue-niche latents (level 2). Heavy submodules
are imported lazily so that ``import xscale`` and ``xscale --help`` stay fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("nn", "models", "data", "train", "query", "tl", "eval", "datasets", "cli")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"xscale.{name}")
    raise AttributeError(f"module 'xscale' has no attribute {name!r}")
