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


# Registered embedders: name -> factory(n_genes=, dim=, genes=, **options) -> GeneEmbedder.
# ``genes`` is the model's vocabulary (normalised symbols), needed by file- or sequence-backed embedders.
GENE_EMBEDDERS: dict[str, type[GeneEmbedder]] = {"learned": LearnedGeneEmbedder}


def register_gene_embedder(name: str):
    """Class decorator adding an embedder to :data:`GENE_EMBEDDERS`."""

    def wrap(cls: type[GeneEmbedder]) -> type[GeneEmbedder]:
        GENE_EMBEDDERS[name] = cls
        return cls

    return wrap


def build_gene_embedder(name: str, *, n_genes: int, dim: int, genes: list[str],
                        options: dict | None = None) -> GeneEmbedder:
    """Build the embedder registered as ``name``. Options are passed as keyword arguments."""
    if name not in GENE_EMBEDDERS:
        import importlib

        importlib.import_module("xscale.models.plm")  # registers "table" and "protein-lm" when present
    if name not in GENE_EMBEDDERS:
        raise ValueError(f"Unknown gene embedder {name!r}. Registered: {sorted(GENE_EMBEDDERS)}.")
    cls = GENE_EMBEDDERS[name]
    if cls is LearnedGeneEmbedder:
        if options:
            raise ValueError(f"The 'learned' gene embedder takes no options; got {sorted(options)}.")
        return cls(n_genes, dim)
    return cls(n_genes=n_genes, dim=dim, genes=genes, **(options or {}))
