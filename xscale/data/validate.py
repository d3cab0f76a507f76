"""Validation at the boundary: every AnnData entering xscale passes through :func:`validate_adata`.

Checks (each failure raises :class:`~xscale.errors.XscaleInputError` naming the key, the
expected, the found and what to do):

- an empty dataset (no cells or no genes, or fewer than ``min_cells`` after dropping);
- the counts source (``X`` or ``layers[counts_layer]``) exists;
- counts are finite, non-negative integers (normalised data points to ``counts_layer=`` /
  ``--counts-layer``);
- duplicate gene names (``var_names``) and duplicate cell ids (``obs_names``); gene symbols kept in a
  var column (var_names holding Ensembl IDs) are taken from it by :func:`use_gene_symbols`;
- the spatial key exists in ``obsm`` (the keys present are listed) and holds finite (n, ≥2)
  coordinates;
- the slide key exists in ``obs`` and has no missing values;
- zero-count cells are dropped with a warning that gives their number (counts of control probes,
  :func:`~xscale.data.vocab.is_control_probe`, are not expression and do not count).

Counts are checked block by block of rows (:func:`iter_row_blocks`), so a backed or
dask-backed ``X`` is never densified or loaded whole.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from xscale.data.vocab import is_control_probe
from xscale.errors import XscaleInputError

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

#: rows per block when scanning counts (a block of 160 genes × 16k cells is ~10 MB dense)
CHECK_CHUNK_ROWS = 16384


def _is_dask(x: Any) -> bool:
    return type(x).__module__.startswith("dask")


def iter_row_blocks(x: Any, chunk_rows: int = CHECK_CHUNK_ROWS) -> Iterator[tuple[int, Any]]:
    """Yield ``(start, block)`` over blocks of rows of any matrix AnnData can hold.

    ``x`` may be a numpy array, a scipy sparse matrix, an h5py/zarr dataset, an anndata
    backed sparse dataset or a dask array. Blocks are numpy arrays or scipy sparse
    matrices of at most ``chunk_rows`` rows; only one block is in memory at a time.
    """
    n = x.shape[0]
    if sp.issparse(x) and x.format != "csr":
        x = x.tocsr()
    if _is_dask(x):
        # follow the dask chunking so every chunk is read once
        start = 0
        for i in range(x.numblocks[0]):
            block = x.blocks[i].compute()
            yield start, block
            start += block.shape[0]
        return
    for start in range(0, n, chunk_rows):
        yield start, x[start : min(start + chunk_rows, n)]


def _values(block: Any) -> np.ndarray:
    if sp.issparse(block):
        return np.asarray(block.data)
    return np.asarray(block).ravel()


@dataclass
class CountsSummary:
    """Result of :func:`check_counts`: per-cell totals (n,) float64 and the number of entries."""

    totals: np.ndarray
    nnz: int


def raw_counts_hint(raw_shape: tuple[int, int] | None) -> str:
    """The part of a counts message that points at ``adata.raw`` ("" when there is none)."""
    if raw_shape is None:
        return ""
    return (f" adata.raw holds a matrix of the same cells ({raw_shape[0]} x {raw_shape[1]}); if it has the raw "
            "counts, use it: adata = adata.raw.to_adata() in Python, or store it as a layer "
            "(adata.layers['counts'] = adata.raw[:, adata.var_names].X) and pass counts_layer='counts' "
            "(CLI: --counts-layer counts).")


def raw_shape_of(adata: ad.AnnData) -> tuple[int, int] | None:
    """Shape of ``adata.raw``, or None when it has none."""
    return None if adata.raw is None else (int(adata.raw.shape[0]), int(adata.raw.shape[1]))


def counts_matrix(adata: ad.AnnData, counts_layer: str | None) -> tuple[Any, str]:
    """``(matrix, where)``: the counts source (``X`` or ``layers[counts_layer]``) and its name for messages.
    Raises :class:`XscaleInputError` for a missing layer or an absent ``X`` (listing the layers)."""
    layers = list(adata.layers.keys())
    if counts_layer is not None:
        if counts_layer not in adata.layers:
            raise XscaleInputError(
                f"adata.layers[{counts_layer!r}]: expected the raw counts, found no such layer. "
                f"Layers present: {layers}. Pass counts_layer=<one of these>, or None to use X."
            )
        return adata.layers[counts_layer], f"adata.layers[{counts_layer!r}]"
    if adata.X is None:
        raise XscaleInputError(
            f"adata.X: expected raw counts, found None. Layers present: {layers}. "
            "Pass counts_layer=<the layer with raw counts> (CLI: --counts-layer NAME)."
            f"{raw_counts_hint(raw_shape_of(adata))}"
        )
    return adata.X, "adata.X"


def check_counts(
    x: Any, *, where: str, chunk_rows: int = CHECK_CHUNK_ROWS, layers: list[str] | None = None, row_offset: int = 0,
    total_columns: np.ndarray | None = None, raw_shape: tuple[int, int] | None = None,
) -> CountsSummary:
    """Check that ``x`` holds finite, non-negative integer counts, block by block.

    Parameters
    ----------
    x
        (n, G) counts matrix (any type :func:`iter_row_blocks` accepts).
    where
        Name of the slot for messages, e.g. ``"adata.X"`` or ``"adata.layers['counts']"``.
    layers
        Layer names present, listed in the message for normalised data.
    row_offset
        Row of ``x[0]`` in the whole dataset (when ``x`` is one block), for messages.
    total_columns
        Columns the totals sum over (e.g. the genes without the control probes); None = all.
    raw_shape
        Shape of ``adata.raw`` when it holds a matrix (scanpy / CELLxGENE keep raw counts there), for messages.

    Returns
    -------
    CountsSummary with ``totals`` (n,) float64, the total counts of each cell.
    """
    n = x.shape[0]
    totals = np.zeros(n, dtype=np.float64)
    nnz = 0
    for start, block in iter_row_blocks(x, chunk_rows):
        v = _values(block)
        first, last = row_offset + start, row_offset + start + block.shape[0] - 1
        if v.dtype.kind not in "biuf":
            raise XscaleInputError(
                f"{where}: expected numeric raw counts, found dtype {v.dtype}. "
                "Store integer counts in X or pass counts_layer= (CLI: --counts-layer)."
            )
        if v.dtype.kind == "f":
            bad = ~np.isfinite(v)
            if bad.any():
                raise XscaleInputError(
                    f"{where}: expected finite raw counts, found {int(bad.sum())} NaN/inf value(s) "
                    f"in cells {first}..{last}. Remove or fix those cells "
                    "(e.g. replace missing measurements by 0) before using xscale."
                )
        neg = v < 0
        if neg.any():
            raise XscaleInputError(
                f"{where}: expected non-negative raw counts, found {int(neg.sum())} negative "
                f"value(s) (minimum {v[neg].min():g}) in cells {first}..{last}. "
                "This looks like scaled/centred data; pass the raw counts instead, e.g. "
                f"counts_layer='counts' (CLI: --counts-layer counts).{raw_counts_hint(raw_shape)}"
            )
        if v.dtype.kind == "f":
            frac = v != np.floor(v)
            if frac.any():
                i = int(np.flatnonzero(frac)[0])
                present = f" Layers present: {layers}." if layers is not None else ""
                raise XscaleInputError(
                    f"{where}: expected raw integer counts, found non-integer values (e.g. {v[i]:g}); "
                    "the data look normalised or log-transformed. Pass the layer holding raw counts "
                    f"with counts_layer=... (CLI: --counts-layer NAME).{present}{raw_counts_hint(raw_shape)}"
                )
        counted = block if total_columns is None else block[:, total_columns]
        totals[start : start + block.shape[0]] = np.asarray(counted.sum(axis=1)).ravel()
        nnz += int(np.count_nonzero(v))
    return CountsSummary(totals=totals, nnz=nnz)


def _examples(values: pd.Index | np.ndarray, k: int = 5) -> list[str]:
    return [str(v) for v in list(values)[:k]]


def check_gene_names(var_names: Sequence[str]) -> None:
    """Duplicate gene names, also after normalisation (``Gad1`` / ``GAD1``) ->
    :class:`XscaleInputError` (a gene would enter each cell twice)."""
    var = pd.Index(var_names)
    if var.has_duplicates:
        dup = var[var.duplicated()].unique()
        raise XscaleInputError(
            f"adata.var_names: expected unique gene names, found {len(dup)} duplicated "
            f"(e.g. {_examples(dup)}). Sum or drop the duplicated genes, or call "
            "adata.var_names_make_unique() if they are distinct features."
        )
    from xscale.data.vocab import normalize_symbol

    norm = pd.Series(var.astype(str), index=[normalize_symbol(v) for v in var])
    clash = norm.groupby(level=0).agg(list)
    clash = clash[clash.map(len) > 1]
    if len(clash):
        pairs = [" / ".join(map(repr, names)) for names in clash.iloc[:3]]
        raise XscaleInputError(
            f"adata.var_names: expected gene names that stay distinct after normalisation (stripped, upper-case: "
            f"the vocabulary matches symbols that way, so mouse Gad1 and human GAD1 share a token), found "
            f"{len(clash)} that collide, e.g. {', '.join(pairs)}: they would enter each cell as one gene twice. "
            "Rename, sum or drop one of each."
        )


def use_gene_symbols(adata: ad.AnnData, key: str | None) -> ad.AnnData:
    """Make ``adata.var[key]`` the gene names (in place; returns ``adata``): for files whose var_names
    are IDs (CELLxGENE: Ensembl IDs, symbols in ``var['feature_name']``). The former names are kept
    in ``var['xscale_var_id']``; ``key=None`` leaves ``adata`` as it is. Raises :class:`XscaleInputError`
    for a missing column (the columns present are listed) or missing / empty symbols; duplicated
    symbols are caught by :func:`check_gene_names` later, as for any panel."""
    if key is None:
        return adata
    if key not in adata.var.columns:
        raise XscaleInputError(
            f"gene_symbols={key!r}: expected a var column of gene symbols, found none by that name. "
            f"var columns: {list(adata.var.columns)}. Omit it when var_names already hold the symbols."
        )
    values = adata.var[key].astype(object).to_numpy()
    symbols = pd.Series(values).astype(str).str.strip().to_numpy()
    empty = pd.isna(values) | (symbols == "")
    if empty.any():
        raise XscaleInputError(
            f"adata.var[{key!r}]: expected a gene symbol for every gene, found {int(empty.sum())} missing or empty "
            f"(e.g. for {_examples(adata.var_names[empty])}). Fill them (e.g. with the var_name) or drop those "
            "genes first."
        )
    adata.var["xscale_var_id"] = np.asarray(adata.var_names, dtype=object)
    adata.var_names = pd.Index(symbols, name=None)
    logger.info("gene names from var[%r] (e.g. %s); the former var_names are in var['xscale_var_id']", key,
                _examples(adata.var_names, 3))
    return adata


def check_names(adata: ad.AnnData) -> None:
    """Duplicate gene names or cell ids -> :class:`XscaleInputError`."""
    check_gene_names(adata.var_names)
    obs = pd.Index(adata.obs_names)
    if obs.has_duplicates:
        dup = obs[obs.duplicated()].unique()
        raise XscaleInputError(
            f"adata.obs_names: expected unique cell ids, found {len(dup)} duplicated "
            f"(e.g. {_examples(dup)}). Call adata.obs_names_make_unique() (e.g. after "
            "concatenating slides, prefix ids with the slide name)."
        )


_XY_COLUMNS = (("x", "y"), ("X", "Y"), ("x_centroid", "y_centroid"), ("center_x", "center_y"),
               ("CenterX_global_px", "CenterY_global_px"), ("x_location", "y_location"), ("imagecol", "imagerow"))


def _coordinate_columns(columns: Any) -> list[str] | None:
    """A pair of obs columns that look like x, y coordinates (as Xenium, MERSCOPE, CosMx exports name them)."""
    present = set(map(str, columns))
    return next((list(p) for p in _XY_COLUMNS if set(p) <= present), None)


def check_spatial(adata: ad.AnnData, spatial_key: str) -> np.ndarray:
    """Coordinates ``obsm[spatial_key]`` as (n, 2) float64; errors for a missing key or NaN."""
    if spatial_key not in adata.obsm:
        pair = _coordinate_columns(adata.obs.columns)
        hint = (f" obs has coordinate columns {pair}: store them as "
                f"adata.obsm[{spatial_key!r}] = adata.obs[{pair}].to_numpy()." if pair else "")
        raise XscaleInputError(
            f"adata.obsm[{spatial_key!r}]: expected spatial coordinates, found no such key. "
            f"obsm keys present: {list(adata.obsm.keys())}. Pass spatial_key=<one of these> "
            f"(CLI: --spatial-key), or spatial_key=None for non-spatial data (level 1 only).{hint}"
        )
    coords = adata.obsm[spatial_key]
    coords = np.asarray(coords.to_numpy() if isinstance(coords, pd.DataFrame) else coords)
    if coords.ndim != 2 or coords.shape[1] < 2 or coords.dtype.kind not in "biuf":
        raise XscaleInputError(
            f"adata.obsm[{spatial_key!r}]: expected numeric (n_cells, 2) coordinates, found "
            f"shape {coords.shape} dtype {coords.dtype}. Store x, y as the first two columns."
        )
    coords = coords[:, :2].astype(np.float64)
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        raise XscaleInputError(
            f"adata.obsm[{spatial_key!r}]: expected finite coordinates, found NaN/inf for "
            f"{int(bad.sum())} cell(s) (e.g. {_examples(adata.obs_names[bad])}). Drop those cells, "
            f"e.g. adata = adata[np.isfinite(adata.obsm[{spatial_key!r}]).all(1)].copy()."
        )
    return coords


def check_slides(adata: ad.AnnData, slide_key: str) -> None:
    """``obs[slide_key]`` must exist and have no missing values."""
    if slide_key not in adata.obs.columns:
        raise XscaleInputError(
            f"adata.obs[{slide_key!r}]: expected a slide column, found no such column. "
            f"obs columns present: {list(adata.obs.columns)}. Pass slide_key=<one of these> "
            "(CLI: --slide-key), or slide_key=None for a single slide."
        )
    missing = adata.obs[slide_key].isna()
    if missing.any():
        raise XscaleInputError(
            f"adata.obs[{slide_key!r}]: expected a slide for every cell, found {int(missing.sum())} "
            "missing value(s). Fill them or drop those cells."
        )


def gene_columns(var_names: Sequence[str]) -> np.ndarray | None:
    """Columns of ``var_names`` that are genes, not control probes (:func:`~xscale.data.vocab.is_control_probe`);
    None when all are genes. A cell's total counts are summed over these."""
    is_gene = np.array([not is_control_probe(g) for g in map(str, var_names)], dtype=bool)
    return None if is_gene.all() else np.flatnonzero(is_gene)


def warn_zero_count(n_zero: int, n_cells: int, where: str, *, n_controls: int = 0) -> None:
    """The warning (and log line) for ``n_zero`` of ``n_cells`` cells dropped for zero total counts."""
    controls = f" (counts of the {n_controls} control probes aside)" if n_controls else ""
    msg = (f"Dropped {n_zero} of {n_cells} cells with zero total counts in {where}{controls} "
           "(they carry no expression to learn from).")
    warnings.warn(msg, UserWarning, stacklevel=3)
    logger.warning(msg)


def _empty_error(n_obs: int, n_vars: int, min_cells: int, what: str) -> XscaleInputError:
    return XscaleInputError(
        f"Empty dataset: expected at least {min_cells} cell(s) and 1 gene, found {n_obs} cells x "
        f"{n_vars} genes{what}. Check the file, the table chosen (table_key) and any filtering."
    )


def _to_csr32(block: Any) -> sp.csr_matrix:
    return sp.csr_matrix(block, dtype=np.float32)


def validate_adata(
    adata: ad.AnnData,
    *,
    spatial_key: str | None = "spatial",
    counts_layer: str | None = None,
    slide_key: str | None = None,
    min_cells: int = 1,
    copy: bool = True,
) -> ad.AnnData:
    """Check an AnnData at the boundary and return it with raw counts as CSR float32 in ``X``.

    Parameters
    ----------
    adata
        Cells × genes. Counts in ``X`` or ``layers[counts_layer]``; may be backed or dask-backed.
    spatial_key
        Key of the (n, 2) coordinates in ``obsm``; None for non-spatial data.
    counts_layer
        Layer holding raw counts (when ``X`` is normalised).
    slide_key
        Column of ``obs`` naming each cell's slide; None for a single slide.
    min_cells
        Fewest cells accepted after zero-count cells are dropped.
    copy
        Return a new object (True) or modify ``adata`` in place where possible (False).

    Returns
    -------
    AnnData with ``X`` (n', G) raw counts as CSR float32 (for a dask-backed input, a dask
    array of CSR float32 blocks, still lazy), ``obsm[spatial_key]`` (n', 2) float64, and
    zero-count cells dropped (a ``UserWarning`` gives their number). A counts layer is moved
    into ``X``.

    Raises
    ------
    XscaleInputError
        For any of the cases listed in the module docstring.
    """
    if adata.n_obs == 0 or adata.n_vars == 0 or adata.n_obs < min_cells:
        raise _empty_error(adata.n_obs, adata.n_vars, min_cells, "")
    layers = list(adata.layers.keys())
    x, where = counts_matrix(adata, counts_layer)
    check_names(adata)
    coords = check_spatial(adata, spatial_key) if spatial_key is not None else None
    if slide_key is not None:
        check_slides(adata, slide_key)
    genes = gene_columns(adata.var_names)
    summary = check_counts(x, where=where, layers=layers, total_columns=genes, raw_shape=raw_shape_of(adata))
    keep = summary.totals > 0
    n_zero = int((~keep).sum())
    if n_zero:
        warn_zero_count(n_zero, adata.n_obs, where, n_controls=0 if genes is None else adata.n_vars - genes.size)
    n_left = int(keep.sum())
    if n_left < min_cells:
        raise _empty_error(n_left, adata.n_vars, min_cells, f" after dropping {n_zero} zero-count cells")

    if _is_dask(x):
        x_out = x.map_blocks(_to_csr32, dtype=np.float32)
    elif sp.issparse(x) or isinstance(x, np.ndarray):
        x_out = sp.csr_matrix(x, dtype=np.float32)
    else:  # backed sparse / h5py dataset: convert block by block
        x_out = sp.vstack([_to_csr32(b) for _, b in iter_row_blocks(x)], format="csr")

    if adata.isbacked:  # a backed object cannot take a new X: rebuild around the converted one
        import anndata as ad

        out = ad.AnnData(
            X=x_out, obs=adata.obs.copy(), var=adata.var.copy(),
            obsm={k: np.asarray(v) for k, v in adata.obsm.items()}, uns=dict(adata.uns),
        )
    elif copy:
        out = adata.copy()
        out.X = x_out
    else:
        out = adata
        out.X = x_out
    if counts_layer is not None and counts_layer in out.layers:
        del out.layers[counts_layer]
    if coords is not None:
        out.obsm[spatial_key] = coords
    if n_zero:
        if copy or adata.isbacked:
            out = out[keep].copy()
        else:
            out._inplace_subset_obs(keep)
    return out
