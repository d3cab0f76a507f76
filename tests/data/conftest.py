from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def starmap():
    """The bundled STARmap mPFC slice set (3,190 cells x 166 genes, 3 slides), read once."""
    import xscale

    return xscale.datasets.load("starmap_mpfc")


@pytest.fixture
def small_adata(starmap):
    """A fresh 300-cell copy of real cells for tests that mutate it."""
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(starmap.n_obs, 300, replace=False))
    return starmap[keep].copy()
