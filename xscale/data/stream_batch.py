"""Ready level-1 batches built from compact CSR counts, and their hand-off from DataLoader workers.

:class:`~xscale.data.stream.CellStream` in batched mode keeps its shuffle pool as CSR rows
with uint16 counts (:func:`compact_csr`) and cuts every batch out of it as a
:class:`PackedCells`: views of one contiguous run of the shuffled pool, gene positions as
uint8/uint16 when the panel allows. :meth:`PackedCells.unpack` builds the
:class:`~xscale.data.batch.CellBatch` by scattering the non-zeros into the dense ``(B, G)``
arrays (scipy's CSR-to-dense loop; log-normalised on the non-zeros only). In the process
that trains this happens at once; in a DataLoader worker the ``PackedCells`` itself is
yielded: it pickles through the worker's result pipe as a few small arrays (3 bytes per
non-zero for a panel of <= 256 genes) and unpickles, in the main process, as the identical
``CellBatch``.

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


def index_dtype(n_genes: int) -> type:
    """Smallest unsigned dtype holding gene positions 0..n_genes-1 (int32 beyond 65536 genes)."""
    return np.uint8 if n_genes <= 1 << 8 else np.uint16 if n_genes <= 1 << 16 else np.int32


def compact_counts(data: np.ndarray) -> np.ndarray:
    """Raw counts (nnz,) as uint16 when that is exact (integers < 65536: nearly always), else float32."""
    small = data.astype(np.uint16)
    return small if np.array_equal(small, data) else np.asarray(data, dtype=np.float32)


def compact_csr(counts: sp.csr_matrix) -> sp.csr_matrix:
    """The same (n, G) CSR with canonical rows, compact counts (:func:`compact_counts`) and int32 indices.

    scipy gathers rows of such a matrix several times faster than of the float32 original.
    """
    counts.sum_duplicates()  # only a check when already canonical (sorted, no duplicates), as stores usually are
    return sp.csr_matrix((compact_counts(counts.data), counts.indices.astype(np.int32, copy=False), counts.indptr),
                         shape=counts.shape)


def cell_batch_from_csr(gene_ids: np.ndarray, rows: np.ndarray, dataset: int, slides: np.ndarray,
                        data: np.ndarray, indices: np.ndarray, indptr: np.ndarray) -> CellBatch:
    """A CellBatch of one panel without padding, with the values ``collate_cells`` would give.

    gene_ids (G,) vocabulary ids of the panel; rows (B,) store rows; slides (B,); the counts
    as CSR: data (nnz,) raw counts, indices (nnz,) positions in the panel, indptr (B + 1,).
    ``gene_ids`` and ``pad_mask`` of the result are broadcast (stride-0) views: read-only.
    """
    b, g = len(rows), len(gene_ids)
    nz = data.astype(np.float32)  # (nnz,) a fresh array: the counts, then the values in place
    csr = sp.csr_matrix((nz, indices.astype(np.int32), indptr), shape=(b, g))
    counts_t = torch.from_numpy(csr.toarray())  # (B, G): scipy's own C loop scatters CSR fastest
    library = counts_t.sum(dim=1)  # (B,), summed as collate_cells / the dense path would
    # log_normalize's operations in the same order, on the non-zeros only (zeros stay 0 = log1p(0))
    lib_nz = torch.from_numpy(np.repeat(library.clamp_min(1e-8).numpy(), np.diff(indptr)))  # (nnz,)
    torch.from_numpy(nz).div_(lib_nz).mul_(TARGET_LIBRARY).log1p_()
    csr.data = nz  # the values now (scipy may hold a view of nz, or a copy)
    values = csr.toarray()  # (B, G)
    return CellBatch(
        gene_ids=torch.from_numpy(np.asarray(gene_ids, dtype=np.int64)).expand(b, g),
        counts=counts_t,
        values=torch.from_numpy(values),
        pad_mask=torch.zeros(1, dtype=torch.bool).expand(b, g),
        library=library,
        index=torch.from_numpy(np.asarray(rows, dtype=np.int64)),
        dataset=torch.full((b,), dataset, dtype=torch.long),
        slide=torch.from_numpy(np.asarray(slides, dtype=np.int64)),
    )


class PackedCells:
    """A batch in compact CSR form (in transit from a DataLoader worker it unpickles as a :class:`CellBatch`).

    gene_ids (G,) vocabulary ids; rows (B,) store rows; slides (B,) slide codes; data (nnz,)
    raw counts (uint16 or float32); indices (nnz,) panel positions (uint8/uint16/int32);
    indptr (B + 1,) starting at 0.
    """

    __slots__ = ("gene_ids", "rows", "dataset", "slides", "data", "indices", "indptr")

    def __init__(self, gene_ids: np.ndarray, rows: np.ndarray, dataset: int, slides: np.ndarray,
                 data: np.ndarray, indices: np.ndarray, indptr: np.ndarray) -> None:
        self.gene_ids, self.rows, self.dataset, self.slides = gene_ids, rows, dataset, slides
        self.data, self.indices, self.indptr = data, indices, indptr

    @classmethod
    def from_csr(cls, gene_ids: np.ndarray, rows: np.ndarray, dataset: int, slides: np.ndarray,
                 counts: sp.csr_matrix) -> PackedCells:
        """From (B, G) CSR counts, in the compact dtypes."""
        return cls(gene_ids, rows, dataset, slides, compact_counts(counts.data),
                   counts.indices.astype(index_dtype(counts.shape[1])), counts.indptr.astype(np.int64))

    def __len__(self) -> int:
        return len(self.rows)

    def unpack(self) -> CellBatch:
        return cell_batch_from_csr(self.gene_ids, self.rows, self.dataset, self.slides, self.data,
                                   self.indices, self.indptr)

    def __reduce__(self) -> tuple:
        ptr = self.indptr.astype(np.int32) if self.indptr[-1] < 1 << 31 else self.indptr
        return cell_batch_from_csr, (self.gene_ids, self.rows, self.dataset, self.slides.astype(np.int32),
                                     self.data, self.indices, ptr)
