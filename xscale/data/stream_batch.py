"""Ready level-1 batches built from CSR counts, and their compact hand-off from DataLoader workers.

:class:`~xscale.data.stream.CellStream` in batched mode cuts each batch out of a CSR pool
of rows. In the process that trains, :func:`cell_batch` turns it into a
:class:`~xscale.data.batch.CellBatch`. In a DataLoader worker it yields a
:class:`PackedCells` instead: the batch's CSR counts (about a quarter of the bytes of the
dense counts + values for typical panels) that pickle through the worker's result pipe as
plain arrays and unpickle, in the main process, as the same ``CellBatch``.

Why not send the dense ``CellBatch``: torch moves every tensor leaving a worker into a
fresh shared-memory segment (create, size, map, fault in every page; ~0.9 ms per MB here)
and passes its file descriptor over an authenticated socket, one per tensor — measured at
about half of the CPU time of a streamed epoch, more than reading and decoding the store.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from xscale.data.batch import CellBatch
from xscale.data.transforms import TARGET_LIBRARY


def cell_batch(gene_ids: np.ndarray, counts: np.ndarray, rows: np.ndarray, dataset: int,
               slides: np.ndarray) -> CellBatch:
    """A CellBatch of one panel without padding, with the values ``collate_cells`` would give.

    gene_ids (G,) int64, counts (B, G) float32 raw counts, rows (B,) store rows, slides (B,).
    ``gene_ids`` and ``pad_mask`` of the result are broadcast (stride-0) views: read-only.
    """
    b, g = counts.shape
    counts_t = torch.from_numpy(np.ascontiguousarray(counts, dtype=np.float32))
    library = counts_t.sum(dim=1)  # (B,)
    # log_normalize's operations in the same order, in place: one (B, G) buffer, no temporaries
    values = torch.div(counts_t, library.clamp_min(1e-8)[:, None]).mul_(TARGET_LIBRARY).log1p_()
    return CellBatch(
        gene_ids=torch.from_numpy(np.asarray(gene_ids, dtype=np.int64)).expand(b, g),
        counts=counts_t,
        values=values,
        pad_mask=torch.zeros(1, dtype=torch.bool).expand(b, g),
        library=library,
        index=torch.from_numpy(np.asarray(rows, dtype=np.int64)),
        dataset=torch.full((b,), dataset, dtype=torch.long),
        slide=torch.from_numpy(np.asarray(slides, dtype=np.int64)),
    )


def _index_dtype(n_genes: int) -> type:
    return np.uint8 if n_genes <= 1 << 8 else np.uint16 if n_genes <= 1 << 16 else np.int32


class PackedCells:
    """A batch in transit from a DataLoader worker; unpickles as a :class:`CellBatch`.

    gene_ids (G,), rows (B,), slides (B,), counts (B, G) CSR of raw counts.
    """

    def __init__(self, gene_ids: np.ndarray, rows: np.ndarray, dataset: int, slides: np.ndarray,
                 counts: sp.csr_matrix) -> None:
        self.gene_ids, self.rows, self.dataset, self.slides, self.counts = gene_ids, rows, dataset, slides, counts

    def __len__(self) -> int:
        return self.rows.size

    def unpack(self) -> CellBatch:
        return cell_batch(self.gene_ids, self.counts.toarray(), self.rows, self.dataset, self.slides)

    def __reduce__(self) -> tuple:
        c = self.counts
        g = c.shape[1]
        data = c.data.astype(np.uint16)  # counts are integers, nearly always < 65536: half the bytes
        if not np.array_equal(data, c.data):
            data = c.data
        return _unpack, (self.gene_ids, self.rows, self.dataset, self.slides.astype(np.int32), data,
                         c.indices.astype(_index_dtype(g)), c.indptr.astype(np.int32), g)


def _unpack(gene_ids: np.ndarray, rows: np.ndarray, dataset: int, slides: np.ndarray, data: np.ndarray,
            indices: np.ndarray, indptr: np.ndarray, n_genes: int) -> CellBatch:
    counts = sp.csr_matrix((data.astype(np.float32, copy=False), indices.astype(np.int32), indptr),
                           shape=(rows.size, n_genes)).toarray()
    return cell_batch(gene_ids, counts, rows, dataset, slides)
