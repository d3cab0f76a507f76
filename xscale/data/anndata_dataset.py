"""In-memory level-1 dataset over one or several AnnData objects.

Each AnnData's panel maps into one shared :class:`~xscale.data.vocab.GeneVocab`; a cell
yields the vocabulary ids of its panel's known genes and their raw counts as a
:class:`~xscale.data.batch.CellItem`. Panels of different sizes and contents train
one model together; genes outside the vocabulary are dropped (and reported).
Never imports ``xscale.models``.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from torch.utils.data import Dataset

from xscale.data.batch import CellItem
from xscale.data.transforms import TARGET_LIBRARY
from xscale.data.vocab import GeneVocab, is_control_probe
from xscale.errors import XscaleInputError

log = logging.getLogger(__name__)


@dataclass
class PanelMapping:
    """How one AnnData's panel maps into the vocabulary.

    columns (g,) positions in ``var_names`` of the known genes; gene_ids (g,) their
    vocabulary ids; n_panel the panel size; unknown a few example symbols not in the vocabulary
    (control probes aside); n_controls the panel's control probes outside the vocabulary.
    """

    columns: np.ndarray
    gene_ids: np.ndarray
    n_panel: int
    unknown: list[str]
    n_controls: int = 0

    def describe(self, what: str, vocab_size: int) -> str:
        """One line: how many panel genes are used, and which are not (for the log)."""
        line = f"{what}: using {self.n_used} of {self.n_panel} panel genes (vocabulary {vocab_size})"
        if self.n_controls:
            line += f"; {self.n_controls} control probe(s) left out"
        if self.unknown:
            line += f"; not in vocabulary e.g. {self.unknown}"
        return line

    @property
    def n_used(self) -> int:
        return int(self.columns.size)


def map_panel(var_names: Sequence[str], vocab: GeneVocab, *, min_genes: int = 10,
              what: str = "dataset") -> PanelMapping:
    """Map a panel into ``vocab``; raise :class:`XscaleInputError` for duplicated gene names (a gene
    would enter a cell twice) or if fewer than ``min_genes`` are known."""
    from xscale.data.validate import check_gene_names

    check_gene_names([str(v) for v in var_names])
    idx = vocab.panel_overlap(list(var_names), min_genes=min(min_genes, len(vocab)), what=what)
    columns = np.flatnonzero(idx >= 0)
    missing = [str(var_names[i]) for i in np.flatnonzero(idx < 0)]
    unknown = [g for g in missing if not is_control_probe(g)]
    return PanelMapping(columns=columns, gene_ids=idx[columns], n_panel=len(var_names), unknown=unknown[:10],
                        n_controls=len(missing) - len(unknown))


def vocab_from_adatas(adatas: Sequence, *, keep_control_probes: bool = False) -> GeneVocab:
    """Shared vocabulary over the panels of several AnnData objects (first-seen order), without the
    platforms' control probes unless ``keep_control_probes`` (:meth:`GeneVocab.union`)."""
    return GeneVocab.union([list(map(str, a.var_names)) for a in adatas], keep_control_probes=keep_control_probes)


def counts_matrix(adata, counts_layer: str | None = None) -> sp.csr_matrix:
    """Raw counts as CSR float32 from ``adata.X`` or ``adata.layers[counts_layer]``.

    Raises :class:`XscaleInputError` (naming ``counts_layer``) for values that are not finite,
    non-negative integers: normalised or scaled data (``sc.pp.normalize_total`` / ``log1p`` in
    place) would otherwise be read as counts.
    """
    from xscale.data.validate import check_counts

    if counts_layer is None:
        X = adata.X
    else:
        if counts_layer not in adata.layers:
            raise XscaleInputError(
                f"counts_layer={counts_layer!r} not found in adata.layers. Available: {list(adata.layers)}. "
                "Pass counts_layer=None to read raw counts from adata.X."
            )
        X = adata.layers[counts_layer]
    where = "adata.X" if counts_layer is None else f"adata.layers[{counts_layer!r}]"
    X = sp.csr_matrix(_in_memory(X), dtype=np.float32)
    check_counts(X, where=where, layers=list(adata.layers))
    return X


def _in_memory(X):
    """``X`` of a backed AnnData (``read_h5ad(backed="r")``: anndata's sparse dataset or an h5py
    dataset) or a dask array, read into memory; anything else as it is. For data larger than
    memory use a prepared store (``xscale prepare``, :func:`xscale.tl.store_embed.embed_store_cells`)."""
    if hasattr(X, "to_memory"):  # anndata's backed CSR / CSC dataset
        return X.to_memory()
    if hasattr(X, "compute"):  # dask
        return X.compute()
    if type(X).__module__.startswith("h5py"):  # a dense backed matrix
        return X[()]
    return X


class AnnDataCellDataset(Dataset):
    """Map-style dataset of :class:`CellItem` over one or several AnnData objects.

    Parameters
    ----------
    adatas
        One AnnData or a sequence; raw counts in ``X`` (or ``counts_layer``).
    vocab
        Shared gene vocabulary (e.g. the model's, or :func:`vocab_from_adatas`).
    counts_layer
        Layer holding raw counts; None reads ``X``.
    slide_key
        obs column with the slide of each cell (encoded as ``CellItem.slide``); None gives 0.
    min_genes
        Fewest panel genes that must be in the vocabulary; fewer raises :class:`XscaleInputError`.
    cells
        Optional per-AnnData row selections (integer positions or boolean masks).
    report_panel
        Log each panel's genes used / not in the vocabulary at INFO (False: DEBUG, e.g. for a
        second selection of the same AnnData objects).

    Attributes
    ----------
    mappings
        One :class:`PanelMapping` per AnnData: how many panel genes are used.
    """

    def __init__(
        self,
        adatas,
        vocab: GeneVocab,
        *,
        counts_layer: str | None = None,
        slide_key: str | None = None,
        min_genes: int = 10,
        cells: Sequence[np.ndarray | None] | None = None,
        report_panel: bool = True,
    ) -> None:
        adatas = [adatas] if not isinstance(adatas, (list, tuple)) else list(adatas)
        if not adatas:
            raise XscaleInputError("AnnDataCellDataset needs at least one AnnData; got none.")
        if cells is not None and len(cells) != len(adatas):
            raise XscaleInputError(f"cells has {len(cells)} selections for {len(adatas)} AnnData objects.")
        self.vocab = vocab
        self.mappings: list[PanelMapping] = []
        self._X: list[sp.csr_matrix] = []
        self._rows: list[np.ndarray] = []
        self._slides: list[np.ndarray] = []
        self.slide_names: list[list[str]] = []
        for d, adata in enumerate(adatas):
            what = f"dataset {d} ({adata.n_obs} cells × {adata.n_vars} genes)"
            mapping = map_panel(list(map(str, adata.var_names)), vocab, min_genes=min_genes, what=what)
            log.log(logging.INFO if report_panel else logging.DEBUG, "%s", mapping.describe(what, len(vocab)))
            self.mappings.append(mapping)
            self._X.append(counts_matrix(adata, counts_layer)[:, mapping.columns].tocsr())
            sel = cells[d] if cells is not None else None
            rows = np.arange(adata.n_obs) if sel is None else np.asarray(sel)
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
            self._rows.append(rows.astype(np.int64))
            if slide_key is None:
                self._slides.append(np.zeros(adata.n_obs, dtype=np.int64))
                self.slide_names.append(["0"])
            else:
                if slide_key not in adata.obs:
                    raise XscaleInputError(
                        f"slide_key={slide_key!r} not found in adata.obs of {what}. "
                        f"Available: {list(adata.obs.columns)}. Pass slide_key=None if there is one slide."
                    )
                from xscale.data.validate import check_slides

                check_slides(adata, slide_key)  # a missing label is not a slide named "nan"
                codes, names = _codes(adata.obs[slide_key])
                self._slides.append(codes)
                self.slide_names.append(names)
        self._offsets = np.cumsum([0] + [len(r) for r in self._rows])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> CellItem:
        if not 0 <= i < len(self):
            raise IndexError(i)
        d = int(np.searchsorted(self._offsets, i, side="right") - 1)
        row = int(self._rows[d][i - self._offsets[d]])
        X = self._X[d]
        counts = np.zeros(X.shape[1], dtype=np.float32)
        lo, hi = X.indptr[row], X.indptr[row + 1]
        counts[X.indices[lo:hi]] = X.data[lo:hi]
        return CellItem(
            gene_ids=self.mappings[d].gene_ids, counts=counts, index=row, dataset=d, slide=int(self._slides[d][row])
        )

    def gene_stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per vocabulary gene over this dataset's cells: mean share of the library, and the
        mean and standard deviation of the log-normalised value (``log1p(count / library × 1e4)``).

        Returns (gene_ids (g,), share (g,), value_mean (g,), value_std (g,)) for the genes of
        the union of panels; each is averaged over the cells whose panel measured the gene.
        """
        n = len(self.vocab)
        share_sum, v_sum, v_sq, seen = (np.zeros(n) for _ in range(4))
        for X, rows, mapping in zip(self._X, self._rows, self.mappings, strict=True):
            sub = X[rows]
            lib = np.asarray(sub.sum(1)).ravel()
            ok = lib > 0
            shares = (sp.diags(1.0 / lib[ok]) @ sub[ok]).tocsr()  # (n, g) each cell's composition
            share_sum[mapping.gene_ids] += np.asarray(shares.sum(0)).ravel()
            logv = shares.copy()
            logv.data = np.log1p(logv.data * TARGET_LIBRARY)  # as log_normalize
            v_sum[mapping.gene_ids] += np.asarray(logv.sum(0)).ravel()
            v_sq[mapping.gene_ids] += np.asarray(logv.multiply(logv).sum(0)).ravel()
            seen[mapping.gene_ids] += ok.sum()
        ids = np.flatnonzero(seen > 0)
        mean = v_sum[ids] / seen[ids]
        std = np.sqrt(np.maximum(v_sq[ids] / seen[ids] - mean**2, 0.0))
        return ids, share_sum[ids] / seen[ids], mean, std

    def empty_cells(self, d: int = 0) -> np.ndarray:
        """Rows of AnnData ``d`` (among the selected ones) with no counts over the genes the
        vocabulary knows: their latents encode an empty cell. (n_empty,) int64 positions."""
        rows = self._rows[d]
        totals = np.asarray(self._X[d][rows].sum(1)).ravel()
        return rows[totals == 0]

    @property
    def genes_used(self) -> list[int]:
        """Number of panel genes in the vocabulary, per AnnData."""
        return [m.n_used for m in self.mappings]


def _codes(column) -> tuple[np.ndarray, list[str]]:
    values = np.asarray(column.astype(str))
    names, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int64), [str(n) for n in names]
