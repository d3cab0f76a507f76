"""A gene vocabulary shared across datasets and panels.

Symbols are normalised (stripped, upper-cased) so that mouse and human orthologs
that differ only in case (``Gad1`` / ``GAD1``) share one token. Each cell uses the
genes its panel measured; a panel maps into the vocabulary by :meth:`GeneVocab.index`.

Imaging platforms report control features beside the genes (Xenium ``NegControlProbe_*``,
``NegControlCodeword_*``, ``UnassignedCodeword_*``, ``DeprecatedCodeword_*``,
``Intergenic_Region_*``, older ``BLANK_*``; CosMx ``NegPrb*``, ``SystemControl*``; MERSCOPE
``Blank-*``). They measure background, not expression: :meth:`GeneVocab.union` (hence every
vocabulary xscale builds from data) leaves them out, so they are neither tokens nor part of a
cell's library. :func:`is_control_probe` says which names count.
"""
from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

from xscale.errors import XscaleInputError

log = logging.getLogger(__name__)

#: Names of control features (matched at the start, any case). Real symbols that look close,
#: such as NEGR1 or BLNK, do not match.
CONTROL_PROBE_PATTERN = re.compile(
    r"^(negprb|neg_?control|negctrl|negative[_ -]?control|systemcontrol|blank(?:[_-]|\d|$)|unassigned_?codeword"
    r"|deprecated_?codeword|genomic_?control|intergenic_?region|antisense_|falsecode)",
    re.IGNORECASE,
)


def is_control_probe(name: str) -> bool:
    """True for a platform's control feature (negative-control probe, blank / unassigned codeword, ...)."""
    return CONTROL_PROBE_PATTERN.match(str(name).strip()) is not None


def control_probes(names: Iterable[str]) -> list[str]:
    """The names among ``names`` that :func:`is_control_probe` takes for control features, in order."""
    return [str(n) for n in names if is_control_probe(n)]


#: Ensembl gene IDs (ENSG..., ENSMUSG..., with an optional version suffix): what CELLxGENE and many
#: pipelines put in var_names, with the symbols in a var column (CELLxGENE: ``feature_name``).
ENSEMBL_ID_PATTERN = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$", re.IGNORECASE)


def looks_like_ensembl(names: Sequence[str]) -> bool:
    """True when most of ``names`` (at least half of up to the first 200) are Ensembl gene IDs."""
    sample = [str(n).strip() for n in list(names)[:200]]
    return bool(sample) and sum(ENSEMBL_ID_PATTERN.match(n) is not None for n in sample) * 2 >= len(sample)


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
    def union(cls, panels: Iterable[Sequence[str]], *, keep_control_probes: bool = False) -> GeneVocab:
        """Vocabulary over several panels, in first-seen order.

        Control features (:func:`is_control_probe`) are left out, and logged, unless
        ``keep_control_probes``. Panels named by Ensembl IDs beside panels named by symbols
        (:func:`looks_like_ensembl`) share no tokens: a warning says which.
        """
        panels = [[str(g) for g in panel] for panel in panels]
        kinds = [looks_like_ensembl(panel) for panel in panels]
        if any(kinds) and not all(kinds):
            warnings.warn(
                f"Panels {[i for i, k in enumerate(kinds) if k]} are named by Ensembl gene IDs and panels "
                f"{[i for i, k in enumerate(kinds) if not k]} by gene symbols: they share no gene tokens, so the model "
                "cannot relate them. Read the ID-named ones with gene_symbols= (--gene-symbols COLUMN), e.g. "
                "CELLxGENE's 'feature_name'.", UserWarning, stacklevel=2)
        genes = [g for panel in panels for g in panel]
        if keep_control_probes:
            return cls(genes)
        controls = set(control_probes(genes))
        if controls:
            examples = sorted(controls)[:5]
            log.info("Left %d control probe(s) out of the gene vocabulary (e.g. %s): they measure background, "
                     "not expression (vocab_from_adatas(..., keep_control_probes=True) keeps them).", len(controls),
                     examples)
            if len(controls) == len(set(genes)):
                raise XscaleInputError(
                    f"var_names: expected gene symbols, found only control probes ({len(controls)}, e.g. "
                    f"{examples}). Check that var_names hold the genes of the panel.")
        return cls(g for g in genes if g not in controls)

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
            hint = ("Check that var_names hold gene symbols (not Ensembl IDs) or train a model on this panel.")
            if looks_like_ensembl(symbols) and not looks_like_ensembl(self.genes):
                hint = ("Its var_names are Ensembl IDs, the vocabulary holds gene symbols: pass the var "
                        "column of symbols as gene_symbols= to read_dataset / prepare, or --gene-symbols COLUMN on "
                        "the command line (CELLxGENE files keep them in 'feature_name'); in memory, "
                        "adata.var_names = adata.var[COLUMN].astype(str).")
            raise XscaleInputError(
                f"The {what} shares {n} of its {len(symbols)} genes with the model's vocabulary "
                f"of {len(self)} genes; at least {min_genes} are needed. Examples not in the "
                f"vocabulary: {missing}. {hint}"
            )
        return idx
