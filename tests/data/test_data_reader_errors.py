"""Reading inputs that lack something (coordinates, an annotated element, X) or keep it elsewhere (.raw, gene
symbols): each reads where it can, and otherwise stops with a message that says what to pass."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from anndata.io import read_elem

from xscale.data.io import read_dataset
from xscale.data.prepare import prepare
from xscale.data.validate import validate_adata
from xscale.errors import XscaleInputError


def _write_sdata(adata: ad.AnnData, path, *, region: str | None, shapes: str | None) -> None:
    """A SpatialData store: circles named ``shapes`` (None: no shapes) and a table without coordinates that
    annotates ``region`` (None: annotates nothing)."""
    import spatialdata as sd
    from spatialdata.models import ShapesModel, TableModel

    from xscale.data.zarr_settings import unsharded

    t = adata.copy()
    del t.obsm["spatial"]
    if region is None:
        table = TableModel.parse(t)
    else:
        t.obs["region"] = pd.Categorical([region] * t.n_obs)
        t.obs["cell_id"] = np.arange(t.n_obs)
        table = TableModel.parse(t, region=region, region_key="region", instance_key="cell_id")
    elements = {}
    if shapes is not None:
        xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        elements[shapes] = ShapesModel.parse(xy, geometry=0, radius=np.ones(adata.n_obs), index=np.arange(adata.n_obs))
    with unsharded():
        sd.SpatialData(shapes=elements, tables={"table": table}).write(path)


def test_spatialdata_without_coordinates_reads_with_spatial_key_none(small_adata, tmp_path):
    path = tmp_path / "s.zarr"
    _write_sdata(small_adata, path, region=None, shapes="cells")
    a = read_dataset(path, spatial_key=None)
    assert a.n_obs == small_adata.n_obs and "spatial" not in a.obsm
    store = prepare(path, tmp_path / "p.zarr", spatial_key=None, progress=False)
    assert not read_elem(zarr.open_group(store)["uns"])["xscale"]["spatial"]
    with pytest.raises(XscaleInputError, match=r"table 'table' has no obsm\['spatial'\] and does not annotate any "
                                               r"element.*--spatial-key none"):
        read_dataset(path)


@pytest.mark.filterwarnings("ignore:The table is annotating:UserWarning")  # spatialdata's, on write and read
def test_spatialdata_table_annotating_a_missing_element(small_adata, tmp_path):
    path = tmp_path / "s.zarr"
    _write_sdata(small_adata, path, region="cells", shapes="nuclei")
    expected = (r"table 'table' annotates element\(s\) \['cells'\] \(spatialdata_attrs region\), found no element by "
                r"that name in the store; elements present: \['nuclei'\]\. Store coordinates in "
                r"table\.obsm\['spatial'\] .*--spatial-key none")
    with pytest.raises(XscaleInputError, match=expected):
        read_dataset(path)
    with pytest.raises(XscaleInputError, match=expected):
        prepare(path, tmp_path / "p.zarr", progress=False)
    # no coordinates needed: the element is not needed either
    assert "spatial" not in read_dataset(path, spatial_key=None).obsm
    prepare(path, tmp_path / "p.zarr", spatial_key=None, progress=False)


def test_h5ad_without_x_names_the_layers(small_adata, tmp_path):
    a = small_adata.copy()
    del a.uns["xscale_dataset"]
    a.layers["counts"] = a.X.copy()
    a.X = None
    a.write_h5ad(tmp_path / "noX.h5ad")
    expected = (r"adata\.X: expected raw counts, found None\. Layers present: \['counts'\]\. "
                r"Pass counts_layer=<the layer with raw counts> \(CLI: --counts-layer NAME\)\.")
    with pytest.raises(XscaleInputError, match=expected):
        prepare(tmp_path / "noX.h5ad", tmp_path / "p.zarr", progress=False)
    with pytest.raises(XscaleInputError, match=expected):
        prepare(a, tmp_path / "p.zarr", progress=False)
    with pytest.raises(XscaleInputError, match=expected):
        read_dataset(tmp_path / "noX.h5ad")
    prepare(tmp_path / "noX.h5ad", tmp_path / "p.zarr", counts_layer="counts", progress=False)


def test_counts_in_raw_are_pointed_at(small_adata, tmp_path):
    """scanpy / CELLxGENE layout: raw counts in .raw, X normalised."""
    a = small_adata.copy()
    del a.uns["xscale_dataset"]
    a.raw = a
    x = sp.csr_matrix(a.X, dtype=np.float32)
    a.X = sp.csr_matrix(sp.diags(1e4 / np.maximum(x.sum(axis=1).A1, 1)) @ x).log1p()
    a.write_h5ad(tmp_path / "raw.h5ad")
    expected = (r"adata\.X: expected raw integer counts, found non-integer values.*Layers present: \[\]\. "
                rf"adata\.raw holds a matrix of the same cells \({a.n_obs} x {a.n_vars}\); if it has the raw counts, "
                r"use it: adata = adata\.raw\.to_adata\(\) in Python, or store it as a layer "
                r"\(adata\.layers\['counts'\] = adata\.raw\[:, adata\.var_names\]\.X\) and pass "
                r"counts_layer='counts' \(CLI: --counts-layer counts\)\.")
    with pytest.raises(XscaleInputError, match=expected):
        prepare(tmp_path / "raw.h5ad", tmp_path / "p.zarr", progress=False)  # read lazily
    with pytest.raises(XscaleInputError, match=expected):
        read_dataset(tmp_path / "raw.h5ad")
    with pytest.raises(XscaleInputError, match=expected):
        validate_adata(a)
    assert validate_adata(a.raw.to_adata()).n_obs == a.n_obs  # what the message says to do


def test_nan_coordinates_message_names_the_key(small_adata):
    a = small_adata.copy()
    xy = np.asarray(a.obsm.pop("spatial"), dtype=np.float64)
    xy[3] = np.nan
    a.obsm["xy"] = xy
    with pytest.raises(XscaleInputError, match=r"adata\.obsm\['xy'\]: expected finite coordinates, found NaN/inf for "
                                               r"1 cell\(s\).*adata = adata\[np\.isfinite\(adata\.obsm\['xy'\]\)"
                                               r"\.all\(1\)\]\.copy\(\)\."):
        validate_adata(a, spatial_key="xy")


def test_prepare_with_gene_symbols_keeps_var_columns(small_adata, tmp_path):
    a = small_adata.copy()
    del a.uns["xscale_dataset"]
    symbols = list(a.var_names)
    a.var["feature_name"] = symbols
    a.var["biotype"] = "protein_coding"
    a.var_names = [f"ENSMUSG{i:011d}" for i in range(a.n_vars)]
    a.write_h5ad(tmp_path / "ens.h5ad")
    for source in (tmp_path / "ens.h5ad", a):
        store = prepare(source, tmp_path / "p.zarr", gene_symbols="feature_name", overwrite=True, progress=False)
        var = read_elem(zarr.open_group(store)["var"])
        assert list(var.index) == symbols
        assert list(var["xscale_var_id"][:2]) == ["ENSMUSG00000000000", "ENSMUSG00000000001"]
        assert list(var["feature_name"]) == symbols and set(var["biotype"]) == {"protein_coding"}
    assert "xscale_var_id" not in a.var  # the caller's AnnData is left as it was
