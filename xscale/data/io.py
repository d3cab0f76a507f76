"""Readers: ``.h5ad``, AnnData zarr and SpatialData zarr -> one validated AnnData.

:func:`read_dataset` recognises the format from the file itself (not the suffix), reads
lazily when asked (``backed=True``: ``X`` becomes a dask array read chunk by chunk through
``anndata.experimental.read_elem_lazy``; obs, var and obsm are small and read in full) and
validates at the boundary with :func:`xscale.data.validate.validate_adata`.

SpatialData: the table (``table_key``, or the only one) gives the cells; coordinates come
from ``table.obsm[spatial_key]`` or, when absent, from the centroids of the shapes/points
the table annotates (matched on the table's ``instance_key``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from xscale.errors import XscaleInputError

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

Format = Literal["h5ad", "anndata-zarr", "spatialdata-zarr"]

#: rows per lazy chunk of X when reading with ``backed=True``
LAZY_CHUNK_ROWS = 16384
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _zarr_attrs(path: Path) -> dict:
    """Root attributes of a zarr v2/v3 store, or raise a 'corrupted' error."""
    try:
        if (path / "zarr.json").exists():
            meta = json.loads((path / "zarr.json").read_text())
            return dict(meta.get("attributes", {}))
        if (path / ".zgroup").exists():
            json.loads((path / ".zgroup").read_text())
            zattrs = path / ".zattrs"
            return json.loads(zattrs.read_text()) if zattrs.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise _corrupted(path, err) from err
    raise XscaleInputError(
        f"{path}: expected an AnnData or SpatialData zarr store, found a directory without zarr "
        "metadata (no zarr.json or .zgroup). Pass a .h5ad file or a .zarr store."
    )


def _corrupted(path: Path, err: BaseException) -> XscaleInputError:
    return XscaleInputError(
        f"{path}: expected a readable zarr store, found a corrupted or incompletely written one "
        f"({type(err).__name__}: {err}). Re-create or re-download it."
    )


def detect_format(path: str | Path) -> Format:
    """``"h5ad"``, ``"anndata-zarr"`` or ``"spatialdata-zarr"``; XscaleInputError otherwise."""
    path = Path(path)
    if not path.exists():
        raise XscaleInputError(f"{path}: expected an .h5ad file or a .zarr store, found nothing at this path.")
    if path.is_file():
        with open(path, "rb") as fh:
            head = fh.read(8)
        if head == _HDF5_MAGIC:
            return "h5ad"
        raise XscaleInputError(
            f"{path}: expected AnnData (.h5ad, HDF5) or SpatialData/AnnData zarr, found a file that is "
            "neither. Convert it to AnnData first (e.g. scanpy.read_csv / read_10x_h5, then .write_h5ad)."
        )
    attrs = _zarr_attrs(path)
    if attrs.get("encoding-type") == "anndata":
        return "anndata-zarr"
    if "spatialdata_attrs" in attrs or (path / "tables").is_dir() or any(
        (path / d).is_dir() for d in ("shapes", "points", "images", "labels")
    ):
        return "spatialdata-zarr"
    raise XscaleInputError(
        f"{path}: expected an AnnData or SpatialData zarr store, found a zarr group with attributes "
        f"{sorted(attrs)} and neither an 'encoding-type: anndata' nor SpatialData elements."
    )


def _read_lazy_anndata(group, chunk_rows: int) -> ad.AnnData:
    """AnnData with dask X and layers from an open h5py/zarr group; obs, var, obsm, uns in memory."""
    import anndata as ad
    from anndata.experimental import read_elem_lazy
    from anndata.io import read_elem

    def is_csc(elem) -> bool:
        encoding = elem.attrs.get("encoding-type", "")
        return (encoding.decode() if isinstance(encoding, bytes) else str(encoding)) == "csc_matrix"

    def lazy(elem):
        shape = elem.attrs["shape"] if "shape" in elem.attrs else elem.shape
        if is_csc(elem):  # only its major axis (genes) can be chunked: blocks of cells re-read all of it
            logger.warning("%s is stored as CSC (by gene): each block of cells read from it reads the whole "
                           "matrix. Convert it to CSR once (a.layers[KEY] = a.layers[KEY].tocsr()) for speed.",
                           str(elem.name).strip("/"))
            return read_elem_lazy(elem, chunks=(shape[0], max(1, min(shape[1], 1024))))
        return read_elem_lazy(elem, chunks=(chunk_rows, shape[1]))

    if "X" in group and is_csc(group["X"]):
        raise XscaleInputError(
            "X: expected counts stored by cell (CSR or dense) to read them block by block, found a CSC "
            "(column-compressed) matrix, which would be read whole for every block of cells. Convert it once "
            "with anndata: a = anndata.read_h5ad(PATH) (or read_zarr); a.X = a.X.tocsr(); a.write_h5ad(NEW_PATH)."
        )
    x = lazy(group["X"]) if "X" in group else None
    obsm = {k: np.asarray(read_elem(group["obsm"][k])) for k in group["obsm"].keys()} if "obsm" in group else {}
    # every layer, lazily (nothing is read): messages can list them and counts_layer can pick one
    layers = {k: lazy(group["layers"][k]) for k in group["layers"].keys()} if "layers" in group else {}
    uns = read_elem(group["uns"]) if "uns" in group else {}
    # .raw (scanpy / CELLxGENE keep raw counts there), lazily: messages about normalised X point at it
    raw = {"X": read_elem_lazy(group["raw"]["X"]), "var": read_elem(group["raw"]["var"])} \
        if "raw" in group and "X" in group["raw"] else None
    return ad.AnnData(X=x, obs=read_elem(group["obs"]), var=read_elem(group["var"]), obsm=obsm, layers=layers, uns=uns,
                      raw=raw)


def _read_h5ad(path: Path, backed: bool, chunk_rows: int) -> ad.AnnData:
    import anndata as ad

    try:
        if backed:
            import h5py

            # the file stays open: the dask graph of X holds the h5py datasets
            return _read_lazy_anndata(h5py.File(path, "r"), chunk_rows)
        return ad.read_h5ad(path)
    except (OSError, KeyError) as err:
        raise XscaleInputError(
            f"{path}: expected an AnnData .h5ad file, found an HDF5 file anndata cannot read "
            f"({type(err).__name__}: {err}). Check that it was written by anndata and not truncated."
        ) from err


def _read_anndata_zarr(path: Path, backed: bool, chunk_rows: int) -> ad.AnnData:
    import anndata as ad
    import zarr

    try:
        if backed:
            return _read_lazy_anndata(zarr.open_group(path, mode="r"), chunk_rows)
        return ad.read_zarr(path)
    except XscaleInputError:
        raise
    except Exception as err:  # zarr raises many types for damaged stores; all mean the same here
        raise _corrupted(path, err) from err


def _centroids(sdata, region: str, cs: str | None) -> pd.DataFrame:
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    element = sdata[region]
    if cs is None:
        systems = list(get_transformation(element, get_all=True))
        cs = "global" if "global" in systems else systems[0]
    return sd.get_centroids(element, coordinate_system=cs).compute()


def cell_tables(tables: Any) -> list[str]:
    """Names of the tables of cells: all tables but the niche tables xscale wrote back
    (``<table>_niches``, marked in their ``uns``)."""
    from xscale.data.writeback import NICHE_TABLE_MARK

    return [name for name, t in tables.items() if NICHE_TABLE_MARK not in t.uns]


def spatialdata_tables(path: str | Path, *, chunk_rows: int = LAZY_CHUNK_ROWS, obs_only: bool = False,
                       names: list[str] | None = None) -> dict[str, ad.AnnData]:
    """The tables of a SpatialData zarr store by name (``names``, or all), each read from its own AnnData
    zarr group and never whole: X and layers as dask arrays of ``chunk_rows`` rows (obs, var, obsm, uns in
    memory; :func:`_read_lazy_anndata`), or with ``obs_only`` just obs and uns (the rows' names and keys)."""
    import anndata as ad
    import zarr
    from anndata.io import read_elem

    root = Path(path) / "tables"
    if names is None:
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if root.is_dir() else []

    def read(name: str) -> ad.AnnData:
        group = zarr.open_group(root / name, mode="r")
        if not obs_only:
            return _read_lazy_anndata(group, chunk_rows)
        return ad.AnnData(obs=read_elem(group["obs"]), uns=read_elem(group["uns"]) if "uns" in group else {})

    try:
        return {name: read(name) for name in names}
    except XscaleInputError:
        raise
    except Exception as err:  # damaged stores raise many types; all mean the same here
        raise _corrupted(Path(path), err) from err


def open_spatialdata(path: str | Path, *, backed: bool = True) -> tuple[Any, dict[str, ad.AnnData]]:
    """(SpatialData, its tables by name). ``backed``: spatialdata reads tables whole, so they are left
    out of its selection (images and labels stay lazy there) and only their obs and uns are read here
    (:func:`spatialdata_tables`); the one used is read lazily by :func:`read_spatialdata_table`."""
    import spatialdata as sd

    path = Path(path)
    try:
        if not backed:
            sdata = sd.read_zarr(path)
            return sdata, dict(sdata.tables)
        sdata = sd.read_zarr(path, selection=("images", "labels", "shapes", "points"))
        return sdata, spatialdata_tables(path, obs_only=True)
    except XscaleInputError:
        raise
    except Exception as err:  # damaged stores raise many types; all mean the same here
        raise _corrupted(path, err) from err


def read_spatialdata_table(
    path: str | Path, *, table_key: str | None = None, spatial_key: str | None = "spatial", backed: bool = False,
    chunk_rows: int = LAZY_CHUNK_ROWS,
) -> tuple[ad.AnnData, str]:
    """The annotating table of a SpatialData zarr store, with coordinates in ``obsm[spatial_key]``.

    Returns ``(table, table_key)``. The table's obsm gets the centroids of the annotated
    shapes/points when it has no ``spatial_key`` of its own. ``spatial_key=None`` (no coordinates
    needed, as for an .h5ad): the centroids go to ``obsm['spatial']`` when the table annotates
    elements of the store, and the table is returned without coordinates when it cannot have them.
    ``backed``: the table's X and layers are dask arrays of ``chunk_rows``-cell CSR blocks, read when
    computed (a table larger than memory).
    """
    path = Path(path)
    sdata, by_name = open_spatialdata(path, backed=backed)
    tables = list(by_name)
    if not tables:
        elements = [name for _, name, _ in sdata.gen_spatial_elements()]
        raise XscaleInputError(
            f"{path}: expected a SpatialData store with a table of cells x genes, found no table "
            f"(elements: {elements}). Add a TableModel table annotating the cells' shapes or points "
            "(sdata.tables['table'] = TableModel.parse(adata, region=..., region_key=..., instance_key=...))."
        )
    if table_key is None:
        cells = cell_tables(by_name)  # niche tables written back by xscale are not candidates
        if len(cells) != 1:
            raise XscaleInputError(
                f"{path}: expected one table or a table_key, found {len(tables)} tables: {tables}. "
                "Pass table_key=<name> (CLI: --table-key)."
            )
        table_key = cells[0]
    if table_key not in tables:
        raise XscaleInputError(
            f"{path}: table {table_key!r} not found; tables present: {tables}. Pass table_key=<one of these>."
        )
    # backed: every table's obs and uns so far; now the one used, with X and layers as dask blocks
    table = spatialdata_tables(path, chunk_rows=chunk_rows, names=[table_key])[table_key] if backed \
        else by_name[table_key]
    key = spatial_key or "spatial"
    if key in table.obsm:
        return table, table_key
    try:
        table.obsm[key] = _annotated_centroids(path, sdata, table, table_key, key)
    except XscaleInputError as err:
        if spatial_key is not None:
            raise
        logger.info("table %r read without coordinates (spatial_key=None): %s", table_key, err)
    return table, table_key


def _annotated_centroids(path: Path, sdata: Any, table: ad.AnnData, table_key: str, spatial_key: str) -> np.ndarray:
    """(n_cells, 2) centroids of the elements ``table`` annotates, in its row order; XscaleInputError when the
    table annotates nothing, an element is missing from the store or an instance id matches no element row."""
    attrs = table.uns.get("spatialdata_attrs", {})
    regions = attrs.get("region")
    region_key, instance_key = attrs.get("region_key"), attrs.get("instance_key")
    if regions is None or region_key is None or instance_key is None:
        raise XscaleInputError(
            f"{path}: table {table_key!r} has no obsm[{spatial_key!r}] and does not annotate any element "
            f"(spatialdata_attrs: {attrs}), so cells have no coordinates. Store coordinates in "
            f"table.obsm[{spatial_key!r}] or parse the table with region/region_key/instance_key, "
            "or pass spatial_key=None (CLI: --spatial-key none) for non-spatial use (level 1 only)."
        )
    regions = [regions] if isinstance(regions, str) else list(regions)
    elements = [name for _, name, _ in sdata.gen_spatial_elements()]
    missing = [r for r in regions if r not in elements]
    if missing:
        raise XscaleInputError(
            f"{path}: table {table_key!r} annotates element(s) {missing} (spatialdata_attrs region), found no "
            f"element by that name in the store; elements present: {elements}. Store coordinates in "
            f"table.obsm[{spatial_key!r}] and pass spatial_key={spatial_key!r} (CLI: --spatial-key {spatial_key}), "
            "add the element or re-parse the table with a region present, or pass spatial_key=None "
            "(CLI: --spatial-key none) for non-spatial use (level 1 only)."
        )
    coords = np.full((table.n_obs, 2), np.nan)
    for region in regions:
        cen = _centroids(sdata, region, None)  # indexed by instance id, columns x, y
        rows = np.flatnonzero(table.obs[region_key].astype(str).to_numpy() == region)
        inst = table.obs[instance_key].to_numpy()[rows]
        found = cen.reindex(inst)
        unmatched = found["x"].isna().to_numpy()
        if unmatched.any():
            raise XscaleInputError(
                f"{path}: table {table_key!r}: obs[{instance_key!r}] (the instance_key) names {int(unmatched.sum())} "
                f"of {len(rows)} cells of region {region!r} that are not in that element's index, so they have no "
                f"coordinates: e.g. {inst[unmatched][:3].tolist()}, while the element's index holds e.g. "
                f"{cen.index[:3].tolist()}. Make obs[{instance_key!r}] hold the element's index values, or store "
                f"coordinates in table.obsm[{spatial_key!r}]."
            )
        coords[rows] = found[["x", "y"]].to_numpy(dtype=np.float64)
    logger.info("coordinates of table %r from the centroids of %s", table_key, regions)
    return coords


def read_dataset(
    path: str | Path,
    *,
    table_key: str | None = None,
    spatial_key: str | None = "spatial",
    counts_layer: str | None = None,
    backed: bool = False,
    slide_key: str | None = None,
    validate: bool = True,
    chunk_rows: int = LAZY_CHUNK_ROWS,
    gene_symbols: str | None = None,
) -> ad.AnnData:
    """Read an .h5ad, AnnData zarr or SpatialData zarr dataset into a validated AnnData.

    Parameters
    ----------
    path
        File or store; the format is detected from its content.
    table_key
        SpatialData table to use (needed when the store holds several).
    spatial_key
        ``obsm`` key of the coordinates (None for non-spatial data).
    counts_layer
        Layer with raw counts when ``X`` is normalised.
    backed
        Read ``X`` lazily as a dask array of CSR row chunks (for files larger than memory).
    slide_key
        ``obs`` column with each cell's slide (checked when given).
    validate
        Run :func:`~xscale.data.validate.validate_adata` (skip only when a later step validates).
    chunk_rows
        Rows per lazy chunk of X when ``backed``.
    gene_symbols
        ``var`` column holding the gene symbols when ``var_names`` hold IDs (CELLxGENE:
        ``"feature_name"``): it becomes ``var_names`` (:func:`~xscale.data.validate.use_gene_symbols`).

    Returns
    -------
    AnnData: raw counts in ``X`` (CSR float32, or dask when ``backed``), coordinates in
    ``obsm[spatial_key]``, ``uns['xscale_source']`` = {path, format, table_key}.
    """
    from xscale.data.validate import use_gene_symbols, validate_adata

    path = Path(path)
    fmt = detect_format(path)
    if fmt == "h5ad":
        adata = _read_h5ad(path, backed, chunk_rows)
    elif fmt == "anndata-zarr":
        adata = _read_anndata_zarr(path, backed, chunk_rows)
    else:
        adata, table_key = read_spatialdata_table(path, table_key=table_key, spatial_key=spatial_key,
                                                  backed=backed, chunk_rows=chunk_rows)
    use_gene_symbols(adata, gene_symbols)
    if validate:
        adata = validate_adata(adata, spatial_key=spatial_key, counts_layer=counts_layer, slide_key=slide_key)
    adata.uns["xscale_source"] = {"path": str(path), "format": fmt, "table_key": table_key or ""}
    return adata


def read_source(
    source: str | Path,
    *,
    exclude_holdout: bool = False,
    gene_symbols: str | None = None,
    **read_kwargs: Any,
) -> ad.AnnData:
    """A bundled dataset by name, else :func:`read_dataset` of the path with ``read_kwargs``.

    What every command that takes "a bundled name or your file" reads with. The name wins over a
    file of that name. ``exclude_holdout`` drops a bundled dataset's held-out slide (never trained
    on; a path is read whole). ``gene_symbols`` applies to both (see
    :func:`~xscale.data.validate.use_gene_symbols`). Nothing at the path: an error that lists the
    bundled names too, since a mistyped name looks like a missing file.
    """
    import xscale.datasets as ds
    from xscale.data.validate import use_gene_symbols

    name = str(source)
    if name in ds.available():
        adata, info = ds.load(name), ds.info(name)
        if exclude_holdout and info.holdout is not None:
            adata = adata[adata.obs[info.slide_key].astype(str) != info.holdout].copy()
        return use_gene_symbols(adata, gene_symbols)
    ds.check_source(source)
    return read_dataset(source, gene_symbols=gene_symbols, **read_kwargs)


def read_sources(
    sources: list[str],
    *,
    gene_symbols: str | list[str | None] | None = None,
    **kwargs: Any,
) -> list[ad.AnnData]:
    """:func:`read_source` of each of several datasets (multi-dataset training).

    ``gene_symbols``: one var column for every dataset, or a list with one entry per dataset (None
    where var_names already hold symbols, e.g. ``[None, "feature_name"]`` for a bundled set beside a
    CELLxGENE file).
    """
    if gene_symbols is None or isinstance(gene_symbols, str):
        per_source = [gene_symbols] * len(sources)
    else:
        per_source = list(gene_symbols)
        if len(per_source) != len(sources):
            raise XscaleInputError(
                f"gene_symbols: expected one entry per dataset ({len(sources)}: {list(sources)}), found "
                f"{len(per_source)} ({per_source}). Use null for a dataset whose var_names are symbols, or give "
                "one column name for all."
            )
    return [read_source(s, gene_symbols=g, **kwargs) for s, g in zip(sources, per_source, strict=True)]
