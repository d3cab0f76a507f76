"""A gene vocabulary shared across datasets and panels.

Symbols are normalised (stripped, upper-cased) so that mouse and human orthologs
that differ only in case (``Gad1`` / ``GAD1``) share one token. Each cell uses the
genes its panel measured; a panel maps into the vocabulary by :meth:`GeneVocab.index`.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from xscale.errors import XscaleInputError


def normalize_symbol(symbol: str) -> str:
    """Canonical form of a gene symbol: stripped and upper-case."""
    return str(symbol).strip().upper()


class GeneVocab:
    """Ordered, duplicate-free list of normalised gene symbols."""

    def __init__(self, genes: Iterable[str]) -> None:
        self.genes: list[str] = []
        self._index: dict[str, int] = {}
        for g in genes:
            s = normalize_symbol(g)
            if s not in self._index:
                self._index[s] = len(self.genes)
                self.genes.append(s)
        if not self.genes:
            raise XscaleInputError("A gene vocabulary needs at least one gene; got none.")

    @classmethod
    def union(cls, panels: Iterable[Sequence[str]]) -> GeneVocab:
        """Vocabulary over several panels, in first-seen order."""
        return cls(g for panel in panels for g in panel)

    def __len__(self) -> int:
        return len(self.genes)

    def __contains__(self, symbol: str) -> bool:
        return normalize_symbol(symbol) in self._index

    def index(self, symbols: Sequence[str]) -> np.ndarray:
        """Vocabulary index of each symbol, -1 where absent. (G,) int64."""
        return np.array([self._index.get(normalize_symbol(s), -1) for s in symbols], dtype=np.int64)

    def panel_overlap(self, symbols: Sequence[str], *, min_genes: int = 1, what: str = "dataset") -> np.ndarray:
        """Indices of ``symbols`` in the vocabulary, with a clear error when too few are known.

        Returns (G,) int64 with -1 for unknown genes. Raises :class:`XscaleInputError`
        if fewer than ``min_genes`` are in the vocabulary.
        """
        idx = self.index(symbols)
        n = int((idx >= 0).sum())
        if n < min_genes:
            missing = [s for s, i in zip(symbols, idx, strict=True) if i < 0][:10]
            raise XscaleInputError(
                f"The {what} shares {n} of its {len(symbols)} genes with the model's vocabulary "
                f"of {len(self)} genes; at least {min_genes} are needed. Examples not in the "
                f"vocabulary: {missing}. Check that var_names hold gene symbols (not Ensembl IDs) "
                "or train a model on this panel."
            )
        return idx
