"""Level-1 training data from a store written by ``xscale prepare``, streamed block by block.

:func:`store_data` builds the :class:`~xscale.train.level1.CellDataModule` (batched ``CellStream``s
over a seeded validation split and the rest); :func:`store_gene_stats` the per-gene statistics the
model's input standardisation and decoder offsets start from. :func:`~xscale.train.level1.fit_level1`
uses both when it is given a store.
"""
from __future__ import annotations

import logging

import numpy as np

from xscale.data.anndata_dataset import AnnDataCellDataset
from xscale.data.vocab import GeneVocab
from xscale.errors import XscaleInputError
from xscale.train.level1 import CellDataModule

log = logging.getLogger(__name__)

#: Cells of a store read to set the input standardisation / decoder offsets (a random sample beyond this).
STORE_STATS_CELLS = 50_000


def store_data(store, vocab: GeneVocab, *, val_fraction: float, max_genes: int | None, batch_size: int,
               min_genes: int = 10, num_workers: int = 0, seed: int = 0) -> CellDataModule:
    """A :class:`CellDataModule` streaming a prepared store (``xscale prepare``): batched ``CellStream``s over a
    random ``val_fraction`` of the cells (validation, same order every epoch) and the rest (training).

    ``store`` a path or :class:`~xscale.data.store.CellStore`; genes outside ``vocab`` (control probes
    among them) are left out; fewer than ``min_genes`` known genes raise :class:`XscaleInputError`.
    """
    from xscale.data.anndata_dataset import map_panel
    from xscale.data.store import CellStore
    from xscale.data.stream import CellStream

    store = store if isinstance(store, CellStore) else CellStore(store)
    if not 0.0 <= val_fraction < 1.0:
        raise XscaleInputError(f"val_fraction must be in [0, 1); got {val_fraction}.")
    mapping = map_panel(store.genes, vocab, min_genes=min_genes, what=f"store {store.path}")
    log.info("%s", mapping.describe(f"store {store.path} ({store.n_cells} cells × {store.n_genes} genes)", len(vocab)))
    gene_ids = vocab.index(store.genes)  # (G,) -1 = left out
    is_val = np.random.default_rng(seed).random(store.n_cells) < val_fraction
    kw = dict(gene_ids=gene_ids, batch_size=batch_size, max_genes=max_genes, seed=seed)
    train = CellStream(store, rows=None if not is_val.any() else np.flatnonzero(~is_val), **kw)
    val = CellStream(store, rows=np.flatnonzero(is_val), shuffle=False, **kw) if is_val.any() else None
    log.info("Level-1 data: %d training cells, %d validation cells streamed from %s", train.n_items,
             int(is_val.sum()), store.path)
    return CellDataModule(train, val, max_genes=max_genes, batch_size=batch_size, num_workers=num_workers, seed=seed)


def store_gene_stats(store, vocab: GeneVocab, *, rows: np.ndarray | None = None, n_cells: int = STORE_STATS_CELLS,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:meth:`AnnDataCellDataset.gene_stats` over at most ``n_cells`` cells of a store (a random sample of
    ``rows``, default all), read block by block: (gene_ids, share, value_mean, value_std)."""
    import anndata as ad
    import pandas as pd

    from xscale.data.store import CellStore

    store = store if isinstance(store, CellStore) else CellStore(store)
    rows = np.arange(store.n_cells) if rows is None else np.asarray(rows, dtype=np.int64)
    if rows.size > n_cells:
        rows = np.random.default_rng(seed).choice(rows, n_cells, replace=False)
    sample = ad.AnnData(X=store.read_selected(np.sort(rows)), var=pd.DataFrame(index=store.genes))
    return AnnDataCellDataset(sample, vocab, min_genes=1, report_panel=False).gene_stats()
