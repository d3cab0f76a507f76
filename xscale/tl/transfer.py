"""Label transfer by nearest-neighbour vote in latent space."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from xscale.errors import XscaleInputError

if TYPE_CHECKING:
    import anndata as ad

log = logging.getLogger(__name__)

FAR_RATIO = 2.0  # nn_distance_ratio above which transfer_labels warns


def _rep(adata: ad.AnnData, use_rep: str, what: str) -> np.ndarray:
    if use_rep not in adata.obsm:
        raise XscaleInputError(
            f"{what}: {use_rep!r} not found in adata.obsm. Available: {sorted(adata.obsm)}. "
            "Embed the cells first (xscale.tl.embed_cells) or pass use_rep=."
        )
    X = adata.obsm[use_rep]
    X = X.toarray() if hasattr(X, "toarray") else X  # a sparse representation
    X = np.asarray(X, dtype=np.float32)
    if X.shape[0] == 0:
        raise XscaleInputError(f"{what}: expected at least one cell, found none.")
    X = np.ascontiguousarray(X.reshape(X.shape[0], -1))
    bad = ~np.isfinite(X).all(1)
    if bad.any():
        raise XscaleInputError(
            f"{what}: obsm[{use_rep!r}] has NaN or inf values in {int(bad.sum())} cells (e.g. "
            f"{list(map(str, adata.obs_names[np.flatnonzero(bad)[:3]]))}); their neighbours are undefined. "
            "Drop those cells (e.g. cells dropped at validation get NaN latents in a write-back) or re-embed them."
        )
    return X


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
        Column written to ``query.obs``; default ``f"{key}_transferred"``. An existing column of that
        name is replaced, with a UserWarning when xscale did not write it (a name not starting with
        ``xscale_`` and not an earlier ``transfer_labels`` result).
    weighting
        ``"uniform"`` (one vote each) or ``"distance"`` (votes weighted by 1 / (distance + eps)).

    Writes
    ------
    ``query.obs[key_added]``: predicted label (categorical);
    ``query.obs[f"{key_added}_confidence"]``: share of the (weighted) votes the winner got, in (0, 1];
    ``query.uns[f"{key_added}_params"]``: the settings and ``nn_distance_ratio``, the median distance
    from a query cell to its nearest reference cell over that between reference cells (about 1 when
    both share one latent space; above 2 logs a warning, e.g. for two panels embedded from all
    their genes: embed both from the genes they share instead; the warning counts and names them,
    comparing symbols as the model's vocabulary does, so ``Gad1`` and ``GAD1`` are one gene).
    """
    import faiss
    import pandas as pd

    if key not in reference.obs.columns:
        raise XscaleInputError(
            f"Label key {key!r} not found in reference.obs. Available: {list(reference.obs.columns)}."
        )
    if weighting not in ("uniform", "distance"):
        raise XscaleInputError(f"Unknown weighting {weighting!r}; expected 'uniform' or 'distance'.")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise XscaleInputError(f"k: expected a whole number >= 1, found {k!r}.")
    k = int(k)
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
    values = labels[known]
    try:  # labels keep their type (integer cluster ids stay integers), sorted
        codes, classes = pd.factorize(values.astype(values.cat.categories.dtype) if hasattr(values, "cat")
                                      else values, sort=True)
    except TypeError:  # mixed types that do not sort together
        codes, classes = pd.factorize(values.astype(str), sort=True)
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
    _warn_overwrite(query, out, key)
    query.obs[out] = pd.Categorical(np.asarray(classes)[best], categories=list(classes))
    query.obs[f"{out}_confidence"] = confidence.astype(np.float32)
    ratio = _distance_ratio(index, Xr[known], D)
    query.uns[f"{out}_params"] = {"key": key, "k": k_eff, "use_rep": use_rep, "weighting": weighting,
                                  "nn_distance_ratio": ratio}
    log.info("transferred %r to %d cells (k=%d); mean confidence %.3f", key, Xq.shape[0], k_eff, confidence.mean())
    if ratio > FAR_RATIO:
        log.warning("transfer_labels: %s", _far_message(ratio, out, query, reference))


def _distance_ratio(index, Xr: np.ndarray, D: np.ndarray, *, n_sample: int = 2000, seed: int = 0) -> float:
    """Median distance from a query cell to its nearest reference cell, over the median distance
    from a reference cell to its nearest other reference cell (up to ``n_sample`` of them).

    About 1 when query and reference share one latent space (measured 0.98-1.0 between slides of
    one dataset); far above when they do not (6-16 between CosMx and MERFISH panels embedded
    from all of their genes). NaN when the reference has a single cell or all its cells coincide.
    """
    if Xr.shape[0] < 2:
        return float("nan")
    rows = np.random.default_rng(seed).choice(Xr.shape[0], min(n_sample, Xr.shape[0]), replace=False)
    Dr, _ = index.search(Xr[rows], 2)  # (s, 2): itself (0) and its nearest other cell
    ref = float(np.median(np.sqrt(np.maximum(Dr[:, 1], 0))))
    qry = float(np.median(np.sqrt(np.maximum(D[:, 0], 0))))
    return qry / ref if ref > 0 else float("nan")


def _warn_overwrite(query: ad.AnnData, out: str, key: str) -> None:
    """Warn (UserWarning) before replacing a ``query.obs`` column xscale did not write: one not named
    ``xscale_*`` and not an earlier transfer_labels result (which leaves ``uns[f"{out}_params"]``)."""
    import warnings

    if out not in query.obs.columns or out.startswith("xscale_"):
        return
    params = query.uns.get(f"{out}_params")
    if isinstance(params, dict) and {"key", "use_rep", "nn_distance_ratio"} <= set(params):
        return  # an earlier transfer_labels wrote it: a rerun replaces it quietly
    col = query.obs[out]
    examples = list(map(str, col.dropna().unique()[:3]))
    warnings.warn(
        f"transfer_labels: key_added={out!r} names an existing query.obs column ({col.dtype}, e.g. {examples}) "
        f"that xscale did not write; it is replaced by the labels transferred from reference.obs[{key!r}]. "
        f"Pass another key_added= (e.g. {out + '_xscale'!r}) to keep it.", UserWarning, stacklevel=3)


def _symbols(names) -> dict[str, str]:
    """Normalised symbol (as the model's vocabulary compares genes: stripped, upper-case) -> first name."""
    from xscale.data.vocab import normalize_symbol

    out: dict[str, str] = {}
    for g in map(str, names):
        out.setdefault(normalize_symbol(g), g)
    return out


def _far_message(ratio: float, out: str, query: ad.AnnData, reference: ad.AnnData) -> str:
    q, r = _symbols(query.var_names), _symbols(reference.var_names)
    head = (f"query cells lie {ratio:.1f}x further from their nearest reference cell than reference cells "
            f"lie from each other (query.uns[{out + '_params'!r}]['nn_distance_ratio']; about 1 for slides of "
            "one dataset): the two "
            "are not in one latent space and the transferred labels are unreliable.")
    if set(q) != set(r):
        shared = [g for g in r if g in q]
        counts = (f"({len(shared)} genes shared of the query's {len(q)} and the reference's {len(r)}) with symbols "
                  "compared as the model's vocabulary does (stripped, upper-case")
        if not shared:
            return (f"{head} Their panels differ {counts}): they share no gene, so no model can place them "
                    "in one space. Transfer from a reference measured on genes of the query's panel.")
        return (f"{head} Their panels differ {counts}; e.g. {shared[:5]}): embed both from those "
                f"{len(shared)} genes with the same model: shared = set(query.var_names.str.strip().str.upper()) "
                "& set(reference.var_names.str.strip().str.upper()); then, for each, "
                "adata = adata[:, adata.var_names.str.strip().str.upper().isin(shared)].copy() and "
                "xscale.tl.embed_cells(adata, model).")
    return (f"{head} Check that both were embedded with the same model, or align the slides first "
            "(xscale finetune --task batch_correction).")
