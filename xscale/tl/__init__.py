"""scverse-style functions on AnnData: ``f(adata, model, *, key_added=..., ...)``.

Names resolve lazily to their modules so ``import xscale.tl`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_LOCATIONS = {
    "embed_cells": "xscale.tl.cells",
    "reconstruct": "xscale.tl.cells",
    "embed_niches": "xscale.tl.niches",
    "domains": "xscale.tl.niches",
    "plot_domains": "xscale.tl.niches",
    "transfer_labels": "xscale.tl.transfer",
}

__all__ = sorted(_LOCATIONS)


def __getattr__(name: str) -> Any:
    if name in _LOCATIONS:
        return getattr(importlib.import_module(_LOCATIONS[name]), name)
    raise AttributeError(f"module 'xscale.tl' has no attribute {name!r}")
