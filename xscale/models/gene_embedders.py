"""Gene identity embeddings: the seam between a gene vocabulary and the cell model.

A ``GeneEmbedder`` maps vocabulary indices (B, G) to vectors (B, G, D). The default
learns a table; file-backed and protein-language-model embedders plug in here too.
"""
from __future__ import annotations

from torch import Tensor, nn


class GeneEmbedder(nn.Module):
    """Interface: ``forward(gene_ids (B, G) long) -> (B, G, D)``; ``n_genes`` and ``dim`` attributes."""

    n_genes: int
    dim: int

    def forward(self, gene_ids: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class LearnedGeneEmbedder(GeneEmbedder):
    """A learned table, one row per vocabulary gene (the default)."""

    def __init__(self, n_genes: int, dim: int) -> None:
        super().__init__()
        self.n_genes, self.dim = n_genes, dim
        self.table = nn.Embedding(n_genes, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, gene_ids: Tensor) -> Tensor:
        return self.table(gene_ids)  # (B, G) -> (B, G, D)
