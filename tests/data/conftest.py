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


@pytest.fixture
def interrupt_after_two_blocks():
    """The function below, for the store-embedding and store-run resume tests."""
    return _interrupt_after_two_blocks


def _interrupt_after_two_blocks(monkeypatch):
    """Make LatentWriter raise KeyboardInterrupt at its third block; returns the real write_chunk."""
    from xscale.data.writeback import LatentWriter

    real_write, calls = LatentWriter.write_chunk, []

    def interrupted(self, i, values):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(i)
        real_write(self, i, values)

    monkeypatch.setattr(LatentWriter, "write_chunk", interrupted)
    return real_write


@pytest.fixture
def write_spatialdata():
    """The function below, for tests (tests/data has no __init__ to import from)."""
    return _write_spatialdata


def _write_spatialdata(adata, path, *, with_table: bool = True, coords_in_table: bool = False):
    """Write ``adata`` as a SpatialData store: circles 'cells' + a table annotating them."""
    import spatialdata as sd
    from spatialdata.models import ShapesModel, TableModel

    from xscale.data.zarr_settings import unsharded

    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    circles = ShapesModel.parse(xy, geometry=0, radius=np.ones(adata.n_obs), index=np.arange(adata.n_obs))
    tables = {}
    if with_table:
        t = adata.copy()
        if not coords_in_table:
            del t.obsm["spatial"]
        t.obs["region"] = "cells"
        t.obs["region"] = t.obs["region"].astype("category")
        t.obs["cell_id"] = np.arange(adata.n_obs)
        tables["table"] = TableModel.parse(t, region="cells", region_key="region", instance_key="cell_id")
    with unsharded():  # anndata's setting made explicit, as xscale's own writes do (no notice)
        sd.SpatialData(shapes={"cells": circles}, tables=tables).write(path)
    return path
