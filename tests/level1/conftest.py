from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def starmap():
    import xscale.datasets as datasets

    return datasets.load("starmap_mpfc")


@pytest.fixture(scope="session")
def starmap_small(starmap):
    """300 cells from the two training slices (never the held-out one)."""
    keep = np.flatnonzero(starmap.obs["slice"].astype(str).values != "20180424_BZ14_control")
    rng = np.random.default_rng(0)
    return starmap[np.sort(rng.choice(keep, 300, replace=False))].copy()
