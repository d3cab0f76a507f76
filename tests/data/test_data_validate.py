"""One test per bad-input case of validate_adata; each checks the message, not only the type."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from xscale.data.validate import check_counts, validate_adata
from xscale.errors import XscaleInputError


def test_valid_real_data_gives_csr_float32(starmap):
    out = validate_adata(starmap, slide_key="slice")
    assert sp.issparse(out.X) and out.X.format == "csr" and out.X.dtype == np.float32
    assert out.n_obs == starmap.n_obs and out.obsm["spatial"].shape == (starmap.n_obs, 2)
    assert out is not starmap


def test_normalised_counts_point_to_counts_layer(small_adata):
    a = small_adata
    a.layers["counts"] = a.X.copy()
    a.X = sp.csr_matrix(np.log1p(a.X.toarray()))
    with pytest.raises(XscaleInputError, match=r"non-integer.*counts_layer.*--counts-layer.*'counts'"):
        validate_adata(a)
    out = validate_adata(a, counts_layer="counts")
    kept = np.asarray(a.layers["counts"].sum(1)).ravel() > 0
    assert np.array_equal(out.X.toarray(), a.layers["counts"].toarray()[kept])
    assert "counts" not in out.layers


def test_missing_counts_layer_lists_layers(small_adata):
    with pytest.raises(XscaleInputError, match=r"layers\['raw'\].*no such layer.*Layers present: \[\]"):
        validate_adata(small_adata, counts_layer="raw")


def test_negative_counts(small_adata):
    x = small_adata.X.toarray()
    x[3, 2] = -2
    small_adata.X = x
    with pytest.raises(XscaleInputError, match=r"non-negative.*1 negative value.*minimum -2"):
        validate_adata(small_adata)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_counts(small_adata, bad):
    x = small_adata.X.toarray()
    x[5, 0] = bad
    small_adata.X = sp.csr_matrix(x)
    with pytest.raises(XscaleInputError, match=r"adata.X: expected finite raw counts, found 1 NaN/inf"):
        validate_adata(small_adata)


def test_missing_spatial_key_lists_obsm_keys(small_adata):
    small_adata.obsm["X_umap"] = np.zeros((small_adata.n_obs, 2))
    with pytest.raises(XscaleInputError,
                       match=r"obsm\['coords'\].*obsm keys present: \['spatial', 'X_umap'\].*spatial_key="):
        validate_adata(small_adata, spatial_key="coords")
    assert validate_adata(small_adata, spatial_key=None).n_obs == small_adata.n_obs
    # coordinates as obs columns (how Xenium / MERSCOPE exports often arrive): the message shows the fix
    small_adata.obs["x_centroid"], small_adata.obs["y_centroid"] = small_adata.obsm["spatial"].T
    del small_adata.obsm["spatial"]
    with pytest.raises(XscaleInputError, match=r"obs has coordinate columns \['x_centroid', 'y_centroid'\]: store "
                                               r"them as adata.obsm\['spatial'\] = adata.obs\[\['x_centroid'"):
        validate_adata(small_adata)


def test_nan_coordinates(small_adata):
    small_adata.obsm["spatial"][[1, 7]] = np.nan
    with pytest.raises(XscaleInputError, match=r"expected finite coordinates, found NaN/inf for 2 cell"):
        validate_adata(small_adata)


def test_duplicate_gene_names(small_adata):
    names = list(small_adata.var_names)
    names[1] = names[0]
    small_adata.var_names = names
    with pytest.raises(XscaleInputError,
                       match=rf"unique gene names, found 1 duplicated.*{names[0]}.*var_names_make_unique"):
        validate_adata(small_adata)


def test_gene_names_equal_after_normalisation(small_adata):
    """Gad1 and GAD1 map to one vocabulary token: a cell would hold that token twice with two counts
    (map_panel gave ids [0, 0, ...]), so validation, map_panel and prepare refuse them."""
    from xscale.data.anndata_dataset import map_panel
    from xscale.data.vocab import GeneVocab

    names = list(small_adata.var_names)
    names[1] = names[0].upper() if names[0] != names[0].upper() else names[0].lower()
    small_adata.var_names = names
    msg = rf"distinct after normalisation .* found 1 that collide, e.g. '{names[0]}' / '{names[1]}'"
    with pytest.raises(XscaleInputError, match=msg):
        validate_adata(small_adata)
    with pytest.raises(XscaleInputError, match=msg):
        map_panel(names, GeneVocab(names))


def test_duplicate_cell_ids(small_adata):
    names = list(small_adata.obs_names)
    names[2] = names[0]
    small_adata.obs_names = names
    with pytest.raises(XscaleInputError, match=r"unique cell ids, found 1 duplicated.*obs_names_make_unique"):
        validate_adata(small_adata)


def test_zero_count_cells_dropped_with_count(small_adata):
    x = small_adata.X.toarray()
    x[[0, 10, 20]] = 0
    small_adata.X = sp.csr_matrix(x)
    with pytest.warns(UserWarning, match=r"Dropped 3 of 300 cells with zero total counts"):
        out = validate_adata(small_adata)
    assert out.n_obs == 297 and small_adata.n_obs == 300
    assert out.obsm["spatial"].shape == (297, 2)


@pytest.mark.parametrize("lazy", [False, True])
def test_cells_with_counts_on_control_probes_only_are_zero_count(small_adata, lazy):
    """Counts of control probes (NegPrb*, BLANK_*) are background: a cell with no other count is dropped."""
    import anndata as ad
    import dask.array as da
    import pandas as pd

    x = small_adata.X.toarray()
    x[[0, 10, 20]] = 0
    probes = np.zeros((300, 2), dtype=np.float32)
    probes[[0, 10, 30], 0] = 2  # cells 0 and 10: only probe counts; cell 30 has genes too
    x = np.hstack([x, probes])
    data = ad.AnnData(X=da.from_array(x, chunks=(64, x.shape[1])) if lazy else sp.csr_matrix(x),
                      obs=small_adata.obs.copy(), obsm=dict(small_adata.obsm),
                      var=pd.DataFrame(index=[*small_adata.var_names, "NegPrb1", "BLANK_0002"]))
    with pytest.warns(UserWarning, match=r"Dropped 3 of 300 cells with zero total counts in adata.X \(counts of "
                                         r"the 2 control probes aside\)"):
        out = validate_adata(data)
    assert out.n_obs == 297 and out.n_vars == 168  # the probes stay columns: vocabularies leave them out
    assert not np.isin(small_adata.obs_names[[0, 10, 20]], out.obs_names).any()


def test_zero_count_in_place(small_adata):
    small_adata.X = sp.csr_matrix(small_adata.X.multiply(np.arange(300)[:, None] > 0))
    with pytest.warns(UserWarning, match="Dropped 1 of 300"):
        out = validate_adata(small_adata, copy=False)
    assert out is small_adata and small_adata.n_obs == 299


def test_empty_dataset(small_adata):
    with pytest.raises(XscaleInputError, match=r"Empty dataset: expected at least 1 cell.*found 0 cells x 166 genes"):
        validate_adata(small_adata[:0].copy())
    small_adata.X = sp.csr_matrix(small_adata.shape, dtype=np.float32)
    with pytest.warns(UserWarning), pytest.raises(XscaleInputError,
                                                  match=r"found 0 cells.*after dropping 300 zero-count"):
        validate_adata(small_adata)


def test_missing_slide_key(small_adata):
    with pytest.raises(XscaleInputError, match=r"obs\['sample'\].*obs columns present: \['slice'"):
        validate_adata(small_adata, slide_key="sample")


def test_chunked_check_matches_and_dask_stays_lazy(small_adata):
    import dask.array as da

    x = small_adata.X.toarray()
    whole = check_counts(x, where="X")
    chunked = check_counts(x, where="X", chunk_rows=7)
    assert np.array_equal(whole.totals, chunked.totals) and whole.nnz == chunked.nnz
    lazy = small_adata.copy()
    lazy.X = da.from_array(x, chunks=(64, x.shape[1]))
    out = validate_adata(lazy)
    assert type(out.X).__module__.startswith("dask")  # not materialised by validation
    assert np.array_equal(out.X.compute().toarray(), x)


def test_lazy_zero_count_cells_dropped(small_adata):
    import dask.array as da

    x = small_adata.X.toarray()
    x[[2, 200]] = 0
    small_adata.X = da.from_array(x, chunks=(64, x.shape[1]))
    with pytest.warns(UserWarning, match="Dropped 2 of 300"):
        out = validate_adata(small_adata)
    assert out.n_obs == 298
    np.testing.assert_array_equal(out.X.compute().toarray(), np.delete(x, [2, 200], axis=0))
