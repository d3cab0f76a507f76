"""Property-based tests (hypothesis): transforms, validation, space-filling curves, niches.

Edge cases are generated (empty rows, zero libraries, single cells, stacked or collinear
coordinates, huge/tiny scales); each test checks invariants, not one example.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from xscale.data.sfc import hilbert_key, morton_key, quantize, sfc_order
from xscale.data.transforms import binomial_thin, log_normalize
from xscale.errors import XscaleInputError

FAST = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

counts_arrays = hnp.arrays(
    np.int64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
    elements=st.integers(0, 10_000),
)


# ---------------------------------------------------------------- transforms
@FAST
@given(counts=counts_arrays, target=st.floats(1.0, 1e6))
def test_log_normalize_invariants(counts, target):
    c = counts.astype(np.float32)
    lib = c.sum(1)
    out = log_normalize(c, lib, target=target)
    assert out.shape == c.shape and out.dtype == np.float32
    assert np.isfinite(out).all() and (out >= 0).all()
    assert (out[lib == 0] == 0).all()  # empty cells give zeros, not NaN
    assert ((out > 0) == (c > 0)).all()  # zero stays zero, expressed stays positive
    # numpy and torch paths agree
    t = log_normalize(torch.from_numpy(c), torch.from_numpy(lib), target=target).numpy()
    np.testing.assert_allclose(t, out, rtol=1e-5, atol=1e-5)
    # the row's order of expression is preserved (monotone per cell)
    for i in range(c.shape[0]):
        o = np.argsort(c[i], kind="stable")
        assert (np.diff(out[i][o]) >= -1e-6).all()


@FAST
@given(counts=counts_arrays, k=st.integers(1, 50))
def test_log_normalize_depth_invariant(counts, k):
    """Scaling a cell's counts and library together changes nothing (it is a library-size normaliser)."""
    c = counts.astype(np.float64)
    a = log_normalize(c, c.sum(1))
    b = log_normalize(c * k, (c * k).sum(1))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@FAST
@given(counts=counts_arrays, keep=st.floats(0.0, 1.0, exclude_min=True), seed=st.integers(0, 2**31))
def test_binomial_thin_invariants(counts, keep, seed):
    c = torch.from_numpy(counts.astype(np.float32))
    out = binomial_thin(c, keep, generator=torch.Generator().manual_seed(seed))
    assert out.shape == c.shape and out.dtype == c.dtype
    assert (out >= 0).all() and (out <= c).all()
    assert torch.equal(out, out.round())  # still counts
    assert (out[c == 0] == 0).all()
    if keep == 1.0:
        assert torch.equal(out, c)
    again = binomial_thin(c, keep, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out, again)  # seeded -> reproducible


def test_binomial_thin_mean_is_keep_times_counts():
    c = torch.full((2000, 5), 40.0)
    out = binomial_thin(c, 0.3, generator=torch.Generator().manual_seed(0))
    assert abs(out.mean().item() - 12.0) < 0.1


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, float("nan")])
def test_binomial_thin_rejects_bad_keep(keep):
    with pytest.raises(ValueError, match="keep must be in"):
        binomial_thin(torch.ones(2, 2), keep)


# ---------------------------------------------------------------- validation
def _adata(x, coords=None):
    import anndata as ad

    n, g = x.shape
    a = ad.AnnData(X=x, obsm={"spatial": coords if coords is not None else np.zeros((n, 2))})
    a.obs_names = [f"c{i}" for i in range(n)]
    a.var_names = [f"g{j}" for j in range(g)]
    return a


@FAST
@given(counts=counts_arrays, sparse=st.booleans())
def test_validate_accepts_counts_and_drops_exactly_the_empty_cells(counts, sparse):
    from xscale.data.validate import validate_adata

    x = counts.astype(np.float32)
    n_zero = int((x.sum(1) == 0).sum())
    a = _adata(sp.csr_matrix(x) if sparse else x)
    if n_zero == x.shape[0]:
        with pytest.raises(XscaleInputError, match="Empty dataset"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                validate_adata(a)
        return
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = validate_adata(a)
    msgs = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
    if n_zero:
        assert any(f"Dropped {n_zero} of {x.shape[0]} cells" in m for m in msgs), msgs
    else:
        assert not any("Dropped" in m for m in msgs)
    assert sp.isspmatrix_csr(out.X) and out.X.dtype == np.float32
    kept = x[x.sum(1) > 0]
    np.testing.assert_array_equal(out.X.toarray(), kept)
    assert list(out.obs_names) == [f"c{i}" for i in np.flatnonzero(x.sum(1) > 0)]
    # idempotent: validating validated data changes nothing and warns nothing
    with warnings.catch_warnings(record=True) as rec2:
        warnings.simplefilter("always")
        again = validate_adata(out)
    assert not any("Dropped" in str(w.message) for w in rec2)
    np.testing.assert_array_equal(again.X.toarray(), kept)


bad_values = st.sampled_from([
    (0.5, r"non-integer .*--counts-layer"),
    (2.25, r"non-integer .*--counts-layer"),
    (-1.0, r"negative"),
    (np.nan, r"NaN/inf"),
    (np.inf, r"NaN/inf"),
    (-np.inf, r"NaN/inf"),
])


@FAST
@given(counts=counts_arrays, bad=bad_values, data=st.data(), sparse=st.booleans())
def test_validate_rejects_any_bad_entry(counts, bad, data, sparse):
    from xscale.data.validate import validate_adata

    value, pattern = bad
    x = counts.astype(np.float32)
    i = data.draw(st.integers(0, x.shape[0] - 1))
    j = data.draw(st.integers(0, x.shape[1] - 1))
    x[i, j] = value
    with pytest.raises(XscaleInputError, match=pattern):
        validate_adata(_adata(sp.csr_matrix(x) if sparse else x))


@FAST
@given(counts=counts_arrays, data=st.data())
def test_validate_rejects_nonfinite_coordinates(counts, data):
    from xscale.data.validate import validate_adata

    x = counts.astype(np.float32)
    x[:, 0] += 1  # no empty cells
    coords = np.zeros((x.shape[0], 2))
    i = data.draw(st.integers(0, x.shape[0] - 1))
    coords[i, data.draw(st.integers(0, 1))] = data.draw(st.sampled_from([np.nan, np.inf]))
    with pytest.raises(XscaleInputError, match=r"finite coordinates.*1 cell"):
        validate_adata(_adata(x, coords))


# ---------------------------------------------------------------- space-filling curves
coords_arrays = st.integers(0, 40).flatmap(lambda n: hnp.arrays(
    np.float64, (n, 2), elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)))


@FAST
@given(coords=coords_arrays, curve=st.sampled_from(["hilbert", "morton"]),
       n_slides=st.integers(1, 3), data=st.data())
def test_sfc_order_is_a_permutation_grouped_by_sorted_slide(coords, curve, n_slides, data):
    n = coords.shape[0]
    slides = np.array(data.draw(st.lists(st.sampled_from(["b", "a", "c"][:n_slides]), min_size=n, max_size=n)),
                      dtype=object)
    order = sfc_order(coords, slides=slides if n else None, curve=curve)
    assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(n))
    if n:
        s = slides[order]
        assert list(s) == sorted(s)  # slides contiguous, in sorted order


@FAST
@given(coords=coords_arrays, curve=st.sampled_from(["hilbert", "morton"]),
       shift=st.integers(-1000, 1000), log2_scale=st.integers(-4, 4))
def test_sfc_order_ignores_units_and_origin(coords, curve, shift, log2_scale):
    """Shifting by an integer and scaling by a power of two (exact in floating point) keeps the order."""
    coords = np.round(coords / 1000)  # integers: exact arithmetic under the transform
    moved = (coords + shift) * 2.0**log2_scale
    np.testing.assert_array_equal(sfc_order(coords, curve=curve), sfc_order(moved, curve=curve))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_hilbert_is_a_bijection_with_adjacent_steps(bits):
    side = 1 << bits
    ix, iy = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    ix, iy = ix.ravel(), iy.ravel()
    key = hilbert_key(ix, iy, bits)
    assert sorted(key.tolist()) == list(range(side * side))
    o = np.argsort(key)
    steps = np.abs(np.diff(ix[o])) + np.abs(np.diff(iy[o]))
    assert (steps == 1).all()  # consecutive cells on the curve are grid neighbours
    m = morton_key(ix, iy)
    assert sorted(m.astype(np.int64).tolist()) == list(range(side * side))


@FAST
@given(coords=coords_arrays, bits=st.integers(1, 16))
def test_quantize_stays_on_grid(coords, bits):
    q = quantize(coords, bits)
    assert q.shape == coords.shape and q.dtype == np.int64
    if coords.shape[0]:
        assert q.min() >= 0 and q.max() <= (1 << bits) - 1


# ---------------------------------------------------------------- niches
@st.composite
def tissues(draw):
    n = draw(st.integers(1, 30))
    pts = draw(hnp.arrays(np.float64, (n, 2), elements=st.integers(0, 20).map(float)))
    n_slides = draw(st.integers(1, 3))
    slides = np.array(draw(st.lists(st.integers(0, n_slides - 1), min_size=n, max_size=n)))
    return pts, slides


@SLOW
@given(tissue=tissues(), k=st.integers(1, 6), max_cells=st.integers(1, 8), scale_exp=st.integers(-3, 3))
def test_niche_invariants(tissue, k, max_cells, scale_exp):
    from xscale.data.niches import build_niches, spatial_graph

    coords, slides = tissue
    n = coords.shape[0]
    graph = spatial_graph(coords, slides=slides, n_neighbors=k)
    assert graph.shape == (n, n) and graph.diagonal().sum() == 0
    r, c = graph.nonzero()
    assert (slides[r] == slides[c]).all()  # no edge joins two slides
    centres = np.arange(n)
    niches = build_niches(graph, coords, centres, max_cells=max_cells, slides=slides)
    idx, rel, pad = niches.idx, niches.rel_xy, niches.pad_mask
    assert idx.shape == (n, max_cells) and rel.shape == (n, max_cells, 2)
    assert (idx[:, 0] == centres).all() and not pad[:, 0].any()
    assert (pad == (idx < 0)).all()
    assert (np.diff(pad.astype(int), axis=1) >= 0).all()  # padding only at the end
    assert np.isfinite(rel).all() and (rel[pad] == 0).all() and (rel[:, 0] == 0).all()
    for b in range(n):
        members = idx[b][~pad[b]]
        assert len(set(members.tolist())) == members.size  # no cell twice
        assert set(members[1:].tolist()) <= set(graph[b].indices.tolist())  # only graph neighbours
        assert (slides[members] == slides[b]).all()
        d = np.linalg.norm(rel[b][~pad[b]], axis=1)
        assert (np.diff(d) >= -1e-5).all()  # nearest first
        if graph[b].nnz >= max_cells - 1:
            assert members.size == max_cells
    # niches do not depend on the coordinate units (powers of two: exact, so distance ties stay ties)
    scaled = build_niches(graph, coords * 2.0**scale_exp, centres, max_cells=max_cells, slides=slides)
    np.testing.assert_array_equal(scaled.idx, idx)
    np.testing.assert_allclose(scaled.rel_xy, rel, rtol=1e-4, atol=1e-4)
