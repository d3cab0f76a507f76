"""The anndata zarr write settings xscale pins, so its outputs do not change with anndata's defaults.

anndata 0.12 announces two default changes for its next minor release (each write says so
in a ``UserWarning``): AnnData zarr stores in format 3 instead of 2, and format-3 arrays
sharded automatically. xscale decides both itself:

- :func:`zarr_format_2`: whole AnnData objects (results such as ``cells.zarr``) are written in
  format 2, which every anndata and zarr reader (zarr-python 2 and 3) opens;
- :func:`unsharded`: the small elements (obs, var, obsm, obsp, uns) of xscale's format-3 stores
  (``xscale prepare``, ``tile_tissue``) are written unsharded, as before; their counts are
  chunked by xscale itself.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def zarr_format_2() -> Iterator[None]:
    """Inside: ``AnnData.write_zarr`` writes zarr format 2, without anndata's notice that its default will change."""
    import anndata as ad

    with ad.settings.override(zarr_write_format=2), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Writing zarr v2 data will no longer be the default",
                                category=UserWarning)
        yield


@contextlib.contextmanager
def unsharded() -> Iterator[None]:
    """Inside: anndata writes format-3 arrays without shards (its setting made explicit, so it does not warn)."""
    import anndata as ad

    with ad.settings.override(auto_shard_zarr_v3=False):
        yield


def write_unsharded(group: object, key: str, elem: object) -> None:
    """``anndata.io.write_elem(group, key, elem)`` inside :func:`unsharded` (for xscale's format-3 stores)."""
    from anndata.io import write_elem

    with unsharded():
        write_elem(group, key, elem)
