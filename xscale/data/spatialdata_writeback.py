"""Results written back into the SpatialData store a dataset came from (``--write-back``).

:func:`write_to_spatialdata` puts a prepared store's cell latents into ``obsm`` of the table it was
prepared from, matched to the table's rows by name (:func:`_store_rows_in_table`) and reordered out
of core (:class:`~xscale.data.reorder.SourceOrderLatents`), and niche latents into a second table
annotating the same elements; :func:`write_adata_to_spatialdata` does the same from an in-memory
AnnData read from that table (``xscale embed --write-back``). Only the elements that change are
written, each under a temporary name renamed into place; the counts are never read nor rewritten.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xscale.data.store import CellStore
from xscale.data.zarr_settings import unsharded
from xscale.errors import XscaleInputError
from xscale.utils.atomic import replace_dir

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd

logger = logging.getLogger(__name__)

NICHE_TABLE_MARK = "xscale_niche_table"  # uns key of the niche-latent tables written back


def write_to_spatialdata(sdata_path: str | Path, store: str | Path | CellStore, *, table_key: str | None = None,
                         cell_key: str | None = "X_xscale_cell", niche_key: str | None = None,
                         niche_table: str | None = None, obs_keys: tuple[str, ...] = ()) -> ad.AnnData:
    """Put results of a store prepared from a SpatialData store back into it.

    Cell latents ``obsm[cell_key]`` of the store go to ``obsm[cell_key]`` of the table;
    niche latents ``obsm[niche_key]`` go to a second table (default ``<table>_niches``)
    annotating the same elements, with the latents as X (n, T·D). Cells dropped at
    validation get NaN. ``table_key`` None: the table the store was prepared from, when
    ``sdata_path`` is its source (:attr:`CellStore.source`), else the only table of cells. The cell
    latents are reordered to the table's rows block by block, out of core
    (:class:`~xscale.data.reorder.SourceOrderLatents`), and so is the niche table's X. The
    ``obs_keys`` columns of the store's obs that exist (e.g. ``xscale_domain``) go to the table's obs
    (missing for dropped cells).
    Returns the cell table's obs and uns with the latents in obsm (a dask array of the written
    array; its counts are neither read nor rewritten).
    """
    from xscale.data.reorder import SourceOrderLatents

    store = store if isinstance(store, CellStore) else CellStore(store)
    own_source = store.source == str(Path(sdata_path).resolve())
    if table_key is None and own_source:
        table_key = store.source_table_key  # the table the store was prepared from
    elif own_source and store.source_table_key and table_key != store.source_table_key:
        raise XscaleInputError(
            f"table_key: expected the table {store.path} was prepared from, {store.source_table_key!r}, found "
            f"{table_key!r}: its rows are other cells. Leave out the table key (CLI: --table-key), or prepare "
            f"{table_key!r} itself (xscale prepare {sdata_path} STORE --table-key {table_key}) and embed that.")
    matched: dict[str, np.ndarray] = {}  # the table row of each store cell, matched once

    def targets(table: ad.AnnData) -> np.ndarray:
        if "rows" not in matched:
            matched["rows"] = _store_rows_in_table(store, table, sdata_path)
        return matched["rows"]

    def obs_columns(table: ad.AnnData) -> dict[str, pd.Series]:
        return _store_columns(store, obs_keys, table.obs_names, targets(table)) if obs_keys else {}

    return _put_latents(sdata_path, table_key,
                        lambda key, table: SourceOrderLatents(store, key, table.n_obs, targets=targets(table)),
                        cell_key, niche_key, niche_table, obs_columns)


def _store_rows_in_table(store: CellStore, table: ad.AnnData, where: str | Path) -> np.ndarray:
    """(n_store,) the table row of each store cell, matched by the input's cell names the store keeps
    (obs_names), and checked on the region and instance ids of a SpatialData table where the store has
    them: rows re-sorted since ``prepare`` still land on their cells; a table of other cells is refused."""
    from anndata.io import read_elem

    names = store.obs_names()
    redo = (f"The store was prepared from another table or input ({store.source or 'unrecorded'}"
            f"{', table ' + repr(store.source_table_key) if store.source_table_key else ''}): write into that "
            f"one, or prepare this table (xscale prepare {where} STORE --table-key NAME) and embed that store.")
    if table.obs_names.is_unique:
        rows = table.obs_names.get_indexer(names)  # -1: not in the table
        if (rows < 0).any():
            missing = names[rows < 0]
            raise XscaleInputError(
                f"{where}: expected every cell of the store {store.path} in the table, found {missing.size} of "
                f"{names.size} that are not (e.g. {list(missing[:3])}). {redo}")
    else:  # duplicate names: only rows still where prepare found them can be matched
        rows = store.source_index()
        if rows.max(initial=-1) >= table.n_obs or (np.asarray(table.obs_names[rows]).astype(str) != names).any():
            raise XscaleInputError(
                f"{where}: the table has duplicate obs_names and its rows are not those the store was prepared "
                f"from, so the cells cannot be matched. Make the names unique (table.obs_names_make_unique()), "
                f"prepare again and embed. {redo}")
    attrs = table.uns.get("spatialdata_attrs", {}) or {}
    for key in (attrs.get("region_key"), attrs.get("instance_key")):
        if key and key in table.obs and key in store.root["obs"]:
            ours = np.asarray(read_elem(store.root["obs"][key])).astype(str)
            theirs = np.asarray(table.obs[key].to_numpy()[rows]).astype(str)
            if (ours != theirs).any():
                bad = int((ours != theirs).sum())
                raise XscaleInputError(
                    f"{where}: expected the store's cells to be the table's, found {bad} of {names.size} whose "
                    f"obs[{key!r}] differs between the store and the table row of the same name. {redo}")
    return rows


def _store_columns(store: CellStore, keys: tuple[str, ...], names: pd.Index,
                   targets: np.ndarray) -> dict[str, pd.Series]:
    """The ``keys`` columns of the store's obs that exist, in the table's row order (indexed by ``names``,
    the table's obs_names; missing for its rows that are not store cells). ``targets``: (n_store,) the
    table row of each store cell."""
    import pandas as pd
    from anndata.io import read_elem

    obs = store.root["obs"]
    store_row = np.full(len(names), -1, dtype=np.int64)  # (n_table,) each table row's store row, -1: none
    store_row[targets] = np.arange(store.n_cells)
    out = {}
    for key in keys:
        if key in obs:
            values = pd.Series(read_elem(obs[key]))  # (n_store,) in store order
            col = values.reindex(store_row)  # -1 -> missing; the dtype (e.g. categorical) is kept
            col.index = names
            out[key] = col
    return out


def write_adata_to_spatialdata(sdata_path: str | Path, adata: ad.AnnData, *, table_key: str | None = None,
                               cell_key: str | None = "X_xscale_cell", niche_key: str | None = None,
                               niche_table: str | None = None, obs_keys: tuple[str, ...] = ()) -> ad.AnnData:
    """Put latents held in ``adata.obsm`` back into the table of the SpatialData store it was read from.

    Rows are matched by ``obs_names`` (those of the table, as :func:`~xscale.data.io.read_dataset`
    keeps them); table rows missing from ``adata`` (cells dropped at validation) get NaN. Cell
    latents go to ``obsm[cell_key]`` of the table, niche latents to a second table, as in
    :func:`write_to_spatialdata`; the ``obs_keys`` columns of ``adata`` that exist (e.g.
    ``xscale_domain``) go to the table's obs. Returns the cell table's obs and uns with the latents
    in obsm (its counts are neither read nor rewritten).
    """
    def rows_in(table: ad.AnnData) -> np.ndarray:
        """(n_adata,) the table row of each cell of ``adata``."""
        if not table.obs_names.is_unique:
            raise XscaleInputError(f"{sdata_path}: the table has duplicate obs_names, so rows cannot be matched "
                                   "by name. Make them unique (table.obs_names_make_unique()) and embed again.")
        rows = table.obs_names.get_indexer(adata.obs_names)  # -1 = not in the table
        if (rows < 0).any():
            missing = list(adata.obs_names[rows < 0][:3])
            raise XscaleInputError(f"{sdata_path}: expected every cell of the embedding in the table, found "
                                   f"{int((rows < 0).sum())} that are not (e.g. {missing}).")
        return rows

    def in_table_order(key: str, table: ad.AnnData) -> np.ndarray:
        if key not in adata.obsm:
            raise XscaleInputError(f"obsm[{key!r}]: expected the latents to write back, found obsm keys "
                                   f"{list(adata.obsm)}.")
        lat = np.asarray(adata.obsm[key], dtype=np.float32)
        out = np.full((table.n_obs, *lat.shape[1:]), np.nan, dtype=np.float32)
        out[rows_in(table)] = lat
        return out

    def obs_columns(table: ad.AnnData) -> dict[str, pd.Series]:
        rows_in(table)  # the same checks before any column moves
        return {k: adata.obs[k].reindex(table.obs_names) for k in obs_keys if k in adata.obs}

    return _put_latents(sdata_path, table_key, in_table_order, cell_key, niche_key, niche_table, obs_columns)


def _put_latents(sdata_path: str | Path, table_key: str | None, in_table_order: Any, cell_key: str | None,
                 niche_key: str | None, niche_table: str | None, obs_columns: Any = None) -> ad.AnnData:
    """Write ``in_table_order(key, table)`` latents (n_table, ...) into the table (cells) and a second table
    (niches), and the columns ``obs_columns(table)`` (indexed like the table) into the table's obs.

    Only the tables' obs and uns are read, and only the elements that change are written
    (``obsm/<cell_key>``, ``obs``, the niche table): the counts are never read nor rewritten, nor are the
    store's shapes, points, images or labels read. Latents given as arrays are in memory already; an
    object with ``write_to`` (:class:`~xscale.data.reorder.SourceOrderLatents`) writes itself block by
    block, into ``obsm/<cell_key>`` or into the niche table's X (never whole in memory)."""
    import anndata as ad_mod
    import pandas as pd
    import spatialdata as sd
    from spatialdata.models import TableModel

    from xscale.data.io import cell_tables, spatialdata_tables

    _remove_stale_temps(Path(sdata_path) / "tables")  # of a write-back that was killed
    tables = spatialdata_tables(sdata_path, obs_only=True)  # rows and keys: neither counts nor elements
    sdata = sd.SpatialData()  # an empty handle on the store: writes the niche table, rewrites the metadata
    sdata.path = Path(sdata_path)
    if table_key is None:
        cells = cell_tables(tables)
        if len(cells) != 1:
            raise XscaleInputError(f"{sdata_path}: expected one table or a table_key, found {list(tables)}.")
        table_key = cells[0]
    if table_key not in tables:
        raise XscaleInputError(f"{sdata_path}: table {table_key!r} not found; tables present: {list(tables)}.")
    table = tables[table_key]  # obs and uns only
    table_dir = Path(sdata_path) / "tables" / table_key
    niche_name = niche_table or f"{table_key}_niches"
    if niche_key is not None and niche_name in tables and NICHE_TABLE_MARK not in tables[niche_name].uns:
        raise XscaleInputError(  # before any write: a table of the user's is never replaced
            f"{sdata_path}: table {niche_name!r} is there already and was not written by xscale (no uns"
            f"[{NICHE_TABLE_MARK!r}]): expected a free name for the niche table. Pass another niche table name "
            f"(niche_table=...), or rename or delete that table first.")
    columns = obs_columns(table) if obs_columns is not None else {}
    cell_latents = in_table_order(cell_key, table) if cell_key is not None else None  # errors before any write
    niche_latents = in_table_order(niche_key, table) if niche_key is not None else None
    for name, col in columns.items():
        table.obs[name] = col
    if columns:
        _replace_element(table_dir, "obs", table.obs)
    if cell_latents is not None:
        _replace_element(table_dir / "obsm", cell_key, cell_latents)
        if not isinstance(cell_latents, np.ndarray):  # written out of core: the result, read lazily
            import dask.array as da

            cell_latents = da.from_zarr(str(table_dir / "obsm" / cell_key))
        table.obsm[cell_key] = cell_latents
    if niche_latents is not None:
        streamed = hasattr(niche_latents, "write_to")  # written block by block into the table's X below
        if not streamed:
            niche_latents = np.asarray(niche_latents, dtype=np.float32)
        attrs = table.uns.get("spatialdata_attrs", {})
        obs = table.obs[[attrs["region_key"], attrs["instance_key"]]].copy() if attrs else table.obs[[]].copy()
        var = pd.DataFrame(index=[f"niche_latent_{i}" for i in range(niche_latents.shape[1])])
        nt = ad_mod.AnnData(X=None if streamed else niche_latents, obs=obs, var=var)
        nt.uns[NICHE_TABLE_MARK] = {"cells_table": table_key}  # not a table of cells: skipped as a default
        if attrs:
            nt = TableModel.parse(nt, region=attrs["region"], region_key=attrs["region_key"],
                                  instance_key=attrs["instance_key"])
        sdata.tables[niche_name] = nt
        _write_table(sdata, niche_name, x=niche_latents if streamed else None)
    elif sdata.has_consolidated_metadata():  # _write_table rewrites it; the parts replaced above need it too
        sdata.write_consolidated_metadata()
    return table


_TMP_ELEMENT = re.compile(r".+_xscale_tmp_(\d+)")  # an element being written back: <name>_xscale_tmp_<pid>


def _remove_stale_temps(tables_dir: Path) -> None:
    """Remove the temporaries a killed write-back left in a SpatialData store (a table, or an obsm / obs
    element of a table, named ``<name>_xscale_tmp_<pid>``; spatialdata would list them as tables), and
    the old copies ``replace_dir`` moves aside; those of a process still running are kept."""
    from xscale.utils.atomic import _pid_alive, remove_stale_temps

    if not tables_dir.is_dir():
        return
    for table in [tables_dir, *(p for p in tables_dir.iterdir() if p.is_dir())]:
        for group in (table, table / "obsm"):
            if not group.is_dir():
                continue
            for p in list(group.iterdir()):
                m = _TMP_ELEMENT.fullmatch(p.name)
                if m is not None and not _pid_alive(int(m.group(1))):
                    logger.info("removing %s, left by an interrupted write-back", p)
                    shutil.rmtree(p, ignore_errors=True)
                elif p.is_dir() and m is None:
                    remove_stale_temps(p)  # <name>.tmp-<pid>-old<hex>: moved aside by replace_dir


def _replace_element(group_dir: Path, name: str, value: Any) -> None:
    """Write ``value`` as element ``name`` of the AnnData zarr group at ``group_dir`` (e.g. a table's
    ``obsm``): under a temporary name beside it first, renamed into place once complete, so a failed
    write leaves the element as it was and no temporary behind. ``value``: an array, or an object that
    writes itself block by block (``value.write_to(group, name)``)."""
    import zarr

    from xscale.data.zarr_settings import write_unsharded

    tmp_name = f"{name}_xscale_tmp_{os.getpid()}"
    try:
        group = zarr.open_group(group_dir, mode="a")
        if hasattr(value, "write_to"):  # streams itself (SourceOrderLatents)
            with unsharded():
                value.write_to(group, tmp_name)
        else:
            write_unsharded(group, tmp_name, value)
        replace_dir(group_dir / tmp_name, group_dir / name, check=False)
    finally:
        shutil.rmtree(group_dir / tmp_name, ignore_errors=True)


def _write_table(sdata: Any, name: str, *, x: Any = None) -> None:
    """Write ``sdata.tables[name]`` (the niche table) into its SpatialData zarr store; a table already
    there is replaced only once the new one is complete (a failed write leaves it as it was, and no
    partial table that would stop the store from reading). ``x``: an object that writes the table's X
    block by block (``x.write_to(group, "X")``, :class:`~xscale.data.reorder.SourceOrderLatents`), for a
    table held without X; None: X is the table's own.

    The table is written under a temporary element name beside it, then renamed into place
    (:func:`~xscale.utils.atomic.replace_dir`, which moves an existing table aside first) and
    the store's consolidated metadata, if it has any, is rewritten.
    """
    final = Path(sdata.path) / "tables" / name
    tmp_name = f"{name}_xscale_tmp_{os.getpid()}"
    tmp_dir = final.with_name(tmp_name)
    sdata.tables[tmp_name] = sdata.tables[name]
    try:
        with unsharded():
            sdata.write_element(tmp_name)
            if x is not None:
                import zarr

                x.write_to(zarr.open_group(tmp_dir, mode="a"), "X")
        replace_dir(tmp_dir, final, check=False)  # the niche table xscale wrote, replaced on request
    finally:  # success or not: no temporary element left, in memory, on disk or in the metadata
        del sdata.tables[tmp_name]
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if sdata.has_consolidated_metadata():
            sdata.write_consolidated_metadata()
