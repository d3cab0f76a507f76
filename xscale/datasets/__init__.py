"""Bundled real datasets (raw integer counts in ``X``, coordinates in ``obsm['spatial']``).

Each folder holds the ``.h5ad`` and its ``SOURCE.txt`` (origin, licence, units,
labels). See the README for citations.

>>> import xscale
>>> adata = xscale.datasets.load("starmap_mpfc")
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from xscale.errors import XscaleInputError

if TYPE_CHECKING:
    import anndata as ad

_HERE = Path(__file__).parent


@dataclass(frozen=True)
class DatasetInfo:
    """What a bundled dataset holds and how it is split for evaluation."""

    name: str
    file: str
    label_key: str
    slide_key: str | None
    holdout: str | None
    drop_labels: tuple[str, ...] = ()
    domain_key: str | None = None
    spatial: bool = True


DATASETS: dict[str, DatasetInfo] = {
    "starmap_mpfc": DatasetInfo(
        "starmap_mpfc", "starmap_mpfc.h5ad", "cell_type", "slice", "20180424_BZ14_control",
        domain_key="domain_name",
    ),
    "seqfish_embryo_wsir": DatasetInfo(
        "seqfish_embryo_wsir", "seqfish_embryo_wsir.h5ad", "cell_type", "embryo", "embryo3",
        drop_labels=("Low quality",),
    ),
    "cosmx_nsclc_profast": DatasetInfo(
        "cosmx_nsclc_profast", "cosmx_nsclc_profast.h5ad", "cell_type", None, None
    ),
    "merfish_lung_tessera": DatasetInfo(
        "merfish_lung_tessera", "merfish_lung_tessera.h5ad", "cell_type", None, None
    ),
    "pbmc3k_subset_profast": DatasetInfo(
        "pbmc3k_subset_profast", "pbmc3k_subset.h5ad", "cell_type", None, None, spatial=False
    ),
}


def available() -> list[str]:
    """Names accepted by :func:`load`."""
    return list(DATASETS)


def path(name: str) -> Path:
    """Path of a bundled dataset's ``.h5ad`` file."""
    return _HERE / info(name).name / info(name).file


def resolve(source: str, slide_key: str | None = None) -> tuple[str, str | None]:
    """``source`` as a path: a bundled dataset's name becomes its ``.h5ad`` file and, unless
    ``slide_key`` is given, its slide key; anything else is returned as given (the name wins over a
    file of that name). Lets the command line take a bundled name where it reads a file."""
    if source not in DATASETS:
        return source, slide_key
    return str(path(source)), slide_key or info(source).slide_key


def check_source(source: str | Path, option: str | None = None) -> None:
    """XscaleInputError naming the bundled datasets when ``source`` is neither one of them nor an
    existing path (a mistyped name looks like a missing file); ``option`` (e.g. ``"--data"``) names
    the command-line option it came from."""
    if str(source) not in DATASETS and not Path(source).exists():
        given = f"{option} {str(source)!r}" if option else str(source)
        raise XscaleInputError(
            f"{given}: expected a bundled dataset name ({', '.join(available())}) or a path to your data "
            "(an .h5ad file or a .zarr store), found nothing at this path."
        )


def info(name: str) -> DatasetInfo:
    """Metadata (label key, slide key, held-out slide) of a bundled dataset."""
    if name not in DATASETS:
        raise XscaleInputError(
            f"Unknown dataset {name!r}. Available: {available()}. "
            "Pass one of these names to xscale.datasets.load()."
        )
    return DATASETS[name]


def source(name: str) -> str:
    """The dataset's ``SOURCE.txt``: origin, licence, units, labels."""
    return (_HERE / info(name).name / "SOURCE.txt").read_text()


def load(name: str) -> ad.AnnData:
    """Load a bundled dataset into memory.

    Returns
    -------
    AnnData with raw integer counts in ``X`` (CSR, float32), unique ``var_names``
    (gene symbols) and ``obs_names``, labels in ``obs`` and, for spatial datasets,
    coordinates in ``obsm['spatial']`` (n_cells, 2). ``uns['xscale_dataset']`` records
    the name, label, slide and held-out keys.
    """
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    meta = info(name)
    adata = ad.read_h5ad(path(name))
    X = adata.X
    X = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
    adata.X = X.astype(np.float32)
    adata.var_names_make_unique()
    adata.obs_names_make_unique()
    if meta.spatial:
        adata.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    adata.uns["xscale_dataset"] = {
        "name": meta.name,
        "label_key": meta.label_key,
        "slide_key": meta.slide_key or "",
        "holdout": meta.holdout or "",
    }
    return adata
