"""Decode a cell latent back to expected expression with the level-1 model.

The level-1 decoder (``GeneToCell.decode``) turns K cell latents into a per-gene
negative-binomial distribution; its expected counts (at a chosen library size) say what a
latent *means* in expression space. This answers "what does this hit look like?" for any
query result.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from xscale.errors import XscaleInputError

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

    from xscale.query.index import Hit, LatentIndex

log = logging.getLogger(__name__)


def load_level1(checkpoint: str | Path | nn.Module) -> nn.Module:
    """Load a level-1 model (``GeneToCell``) saved with :func:`xscale.models.io.save_model`
    (its directory, the folder holding it as ``model/``, or a run's ``checkpoints`` folder);
    a loaded model is checked and returned."""
    from xscale.models.levels import as_level_model

    return as_level_model(checkpoint, 1, "--decode").eval()


def _model_genes(model: nn.Module) -> list[str]:
    genes = getattr(model.config, "genes", None)
    if not genes:
        raise XscaleInputError("The level-1 model's config lists no genes; cannot name decoded genes.")
    return list(genes)


def decode_latent(
    model: nn.Module, latent: np.ndarray, *, genes: Sequence[str] | None = None, library: float = 1e4
) -> pd.Series:
    """Expected counts of ``genes`` given one cell latent.

    Parameters
    ----------
    model
        Level-1 model with ``decode(latents (B, K, D), gene_ids (B, G), library (B,)) -> NBParams``.
    latent
        (K, D) or flattened (K*D,) cell latent.
    genes
        Gene symbols to report (default: every gene of the model's vocabulary). The latent is
        always decoded over the model's whole vocabulary and these genes are selected from it,
        so a gene's value does not depend on which other genes are asked for (the values
        ``xscale query --decode --genes`` prints).
    library
        Library size (total counts) of the cell over the model's whole vocabulary: the
        decoder's mean is a softmax over every vocabulary gene times ``library``, so the
        selected genes sum to at most ``library``.

    Returns
    -------
    Series indexed by gene symbol (as passed): expected counts at ``library``.
    """
    import pandas as pd
    import torch

    from xscale.data.vocab import GeneVocab

    vocab_genes = _model_genes(model)
    vocab = GeneVocab(vocab_genes)
    if isinstance(genes, str):
        genes = [genes]
    names = list(vocab.genes) if genes is None else list(genes)
    rows = vocab.index(names)  # where each requested gene sits in the decode over the whole vocabulary
    if (rows < 0).any():
        missing = [g for g, i in zip(names, rows, strict=True) if i < 0][:10]
        raise XscaleInputError(
            f"genes: {missing} are not in the level-1 model's vocabulary of {len(vocab)} genes "
            f"(e.g. {vocab.genes[:5]}); pass genes the model was trained on."
        )
    ids = np.arange(len(vocab), dtype=np.int64)  # decode the whole vocabulary: it shares the library
    cfg = model.config
    n_latents, dim = int(cfg.latents_per_cell), int(cfg.dim)
    lat = np.asarray(latent, dtype=np.float32).reshape(-1)
    if lat.size != n_latents * dim:
        raise XscaleInputError(
            f"Latent has {lat.size} values; this level-1 model decodes K*D = {n_latents}*{dim} = "
            f"{n_latents * dim}. Use the checkpoint that wrote the store's X_xscale_cell."
        )
    with torch.inference_mode():
        z = torch.from_numpy(lat).view(1, n_latents, dim)  # (1, K, D)
        gene_ids = torch.from_numpy(ids).view(1, -1)  # (1, G)
        params = model.decode(z, gene_ids, torch.tensor([float(library)]))
        expected = params.expected[0].float().numpy()[rows]  # (G_vocab,) -> the requested (G,)
    return pd.Series(expected, index=pd.Index(names, name="gene"), name="expected_counts")


def decode_hit(
    index: LatentIndex, hit: Hit | str, checkpoint: str | Path | nn.Module, *,
    genes: Sequence[str] | None = None, library: float = 1e4,
) -> pd.Series:
    """Decode a query hit's cell latent to expected expression.

    Parameters
    ----------
    index
        A cell-level :class:`~xscale.query.LatentIndex` (the hit's latent is read from it).
    hit
        A :class:`~xscale.query.Hit` or a cell id.
    checkpoint
        Level-1 model directory (``DIR/checkpoints/level1``) or a loaded model.
    genes, library
        As in :func:`decode_latent`: the latent is decoded over the model's whole vocabulary and
        ``genes`` selects from it, so ``decode_hit(..., genes=[g])[g]`` equals the full decode's
        value for ``g`` and what ``xscale query --decode CHECKPOINT --genes g`` prints.
    """
    if index.store.level != "cell":
        raise XscaleInputError("decode_hit decodes cell latents; open the index with level='cell'.")
    row = index.row(hit) if isinstance(hit, str) else hit.row
    model = load_level1(checkpoint)
    return decode_latent(model, index.store.latents[row], genes=genes, library=library)
