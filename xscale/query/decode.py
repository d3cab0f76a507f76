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
        Gene symbols to decode (default: every gene of the model's vocabulary).
    library
        Library size (total counts) shared by the decoded genes: the decoder's mean is a
        softmax over ``genes`` times ``library``, so decode the panel of interest as a whole.

    Returns
    -------
    Series indexed by gene symbol: expected counts at ``library``.
    """
    import pandas as pd
    import torch

    from xscale.data.vocab import GeneVocab

    vocab_genes = _model_genes(model)
    vocab = GeneVocab(vocab_genes)
    names = list(vocab.genes) if genes is None else list(genes)
    ids = vocab.index(names)
    if (ids < 0).any():
        missing = [g for g, i in zip(names, ids, strict=True) if i < 0][:10]
        raise XscaleInputError(
            f"Genes {missing} are not in the level-1 model's vocabulary of {len(vocab)} genes; "
            "pass genes the model was trained on."
        )
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
        expected = params.expected[0].float().numpy()  # (G,)
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
        As in :func:`decode_latent`.
    """
    if index.store.level != "cell":
        raise XscaleInputError("decode_hit decodes cell latents; open the index with level='cell'.")
    row = index.row(hit) if isinstance(hit, str) else hit.row
    model = load_level1(checkpoint)
    return decode_latent(model, index.store.latents[row], genes=genes, library=library)
