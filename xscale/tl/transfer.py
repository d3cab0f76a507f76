"""Label transfer by nearest-neighbour vote in latent space."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from xscale.errors import XscaleInputError

if TYPE_CHECKING:
    import anndata as ad

log = logging.getLogger(__name__)


def _rep(adata: ad.AnnData, use_rep: str, what: str) -> np.ndarray:
    if use_rep not in adata.obsm:
        raise XscaleInputError(
            f"{what}: {use_rep!r} not found in adata.obsm. Available: {sorted(adata.obsm)}. "
            "Embed the cells first (xscale.tl.embed_cells) or pass use_rep=."
        )
    X = np.asarray(adata.obsm[use_rep], dtype=np.float32)
    return np.ascontiguousarray(X.reshape(X.shape[0], -1))


def transfer_labels(
    query: ad.AnnData,
    reference: ad.AnnData,
    *,
    key: str,
    k: int = 15,
    use_rep: str = "X_xscale_cell",
    key_added: str | None = None,
    weighting: str = "uniform",
) -> None:
    """Transfer ``reference.obs[key]`` to ``query`` by a vote of the k nearest reference cells.

    Neighbours are searched exactly (faiss, L2) in ``obsm[use_rep]`` (latents flattened to
    (n, K*D)); reference cells with a missing label do not vote.

    Parameters
    ----------
    query, reference
        AnnData objects with the same latent representation in ``obsm[use_rep]``.
    key
        Label column of ``reference.obs``.
    k
        Number of voting neighbours.
    use_rep
        ``obsm`` key of the latents (``"X_xscale_cell"``, ``"X_xscale_niche"``, or any other).
    key_added
        Column written to ``query.obs``; default ``f"{key}_transferred"``.
    weighting
        ``"uniform"`` (one vote each) or ``"distance"`` (votes weighted by 1 / (distance + eps)).

    Writes
    ------
    ``query.obs[key_added]``: predicted label (categorical);
    ``query.obs[f"{key_added}_confidence"]``: share of the (weighted) votes the winner got, in (0, 1].
    """
    import faiss
    import pandas as pd

    if key not in reference.obs.columns:
        raise XscaleInputError(
            f"Label key {key!r} not found in reference.obs. Available: {list(reference.obs.columns)}."
        )
    if weighting not in ("uniform", "distance"):
        raise XscaleInputError(f"Unknown weighting {weighting!r}; expected 'uniform' or 'distance'.")
    if k < 1:
        raise XscaleInputError(f"k must be >= 1; got {k}.")
    Xr = _rep(reference, use_rep, "reference")
    Xq = _rep(query, use_rep, "query")
    if Xr.shape[1] != Xq.shape[1]:
        raise XscaleInputError(
            f"Latent sizes differ: reference {use_rep} has {Xr.shape[1]} values per cell, query {Xq.shape[1]}. "
            "Embed both with the same model."
        )
    labels = reference.obs[key]
    known = labels.notna().to_numpy()
    if known.sum() == 0:
        raise XscaleInputError(f"reference.obs[{key!r}] has no non-missing labels to transfer.")
    if (~known).any():
        log.warning("transfer_labels: %d reference cells without a %r label do not vote", int((~known).sum()), key)
    codes, classes = pd.factorize(labels[known].astype(str), sort=True)
    index = faiss.IndexFlatL2(Xr.shape[1])
    index.add(Xr[known])
    k_eff = min(k, int(known.sum()))
    D, idx = index.search(Xq, k_eff)  # (n_query, k) squared distances, rows of the known reference
    votes = codes[idx]  # (n_query, k)
    w = np.ones_like(D) if weighting == "uniform" else 1.0 / (np.sqrt(np.maximum(D, 0)) + 1e-6)
    tally = np.zeros((Xq.shape[0], len(classes)), dtype=np.float64)
    np.add.at(tally, (np.repeat(np.arange(Xq.shape[0]), k_eff), votes.ravel()), w.ravel())
    best = tally.argmax(1)
    confidence = tally[np.arange(len(best)), best] / tally.sum(1)
    out = key_added or f"{key}_transferred"
    query.obs[out] = pd.Categorical(np.asarray(classes)[best], categories=list(classes))
    query.obs[f"{out}_confidence"] = confidence.astype(np.float32)
    log.info("transferred %r to %d cells (k=%d); mean confidence %.3f", key, Xq.shape[0], k_eff, confidence.mean())
