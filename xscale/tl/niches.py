"""Niche embeddings, spatial domains and their plot (scverse-style functions on AnnData).

- :func:`embed_niches` writes one niche embedding per cell (the niche centred on it).
- :func:`domains` clusters niche latents into spatial domains (k-means by default).
- :func:`plot_domains` draws the domains in space, one panel per slide.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from xscale.errors import XscaleInputError

if TYPE_CHECKING:
    import anndata as ad

    from xscale.models.cell_to_tissue import CellToTissue

log = logging.getLogger(__name__)


def _obsm(adata: ad.AnnData, key: str, what: str, hint: str) -> np.ndarray:
    if key not in adata.obsm:
        raise XscaleInputError(
            f"{what} {key!r} not found in adata.obsm. Available: {sorted(adata.obsm)}. {hint}"
        )
    value = adata.obsm[key]
    return np.asarray(value.toarray() if hasattr(value, "toarray") else value)  # sparse -> dense


def _slides(adata: ad.AnnData, slide_key: str | None) -> np.ndarray | None:
    """(n,) slide names of ``obs[slide_key]``, or None; a missing column or label is an error."""
    if slide_key is None:
        return None
    if slide_key not in adata.obs:
        raise XscaleInputError(
            f"slide_key {slide_key!r} not found in adata.obs. Available: {list(adata.obs.columns)}. "
            "Pass slide_key=None for a single slide."
        )
    from xscale.data.validate import check_slides

    check_slides(adata, slide_key)  # a missing label is not a slide named "nan"
    return adata.obs[slide_key].astype(str).to_numpy()


def recorded_slide_key(adata: ad.AnnData) -> str | None:
    """The slide column xscale recorded for ``adata`` (``uns["xscale"]`` of a latent store,
    ``uns["xscale_dataset"]`` of a bundled dataset), when it is in ``obs``; else None."""
    for key in ("xscale", "xscale_dataset"):
        meta = adata.uns.get(key)
        recorded = meta.get("slide_key") if hasattr(meta, "get") else None
        if isinstance(recorded, str) and recorded and recorded in adata.obs:
            return recorded
    return None


def _niche_slide_key(adata: ad.AnnData, slide_key: str | None) -> str | None:
    """embed_niches' slide column: the one given, else the recorded one; warns when neither is
    known but a column named like a slide has several values (their niches would mix slides)."""
    if slide_key is not None:
        return slide_key
    recorded = recorded_slide_key(adata)
    if recorded is not None:
        log.info("embed_niches: niches stay within the slides of obs[%r] (the slide key recorded in uns); "
                 "pass slide_key= to choose another column", recorded)
        return recorded
    from xscale.query.store import SLIDE_KEY_CANDIDATES

    for cand in SLIDE_KEY_CANDIDATES:
        if cand in adata.obs and adata.obs[cand].nunique() > 1:
            log.warning(
                "embed_niches: slide_key=None treats all cells as one slide, but obs[%r] has %d values. If those "
                "are separate slides (their coordinates overlap), niches will mix cells of different slides: "
                "pass slide_key=%r.", cand, adata.obs[cand].nunique(), cand,
            )
            break
    return None


def niche_embeddings(
    model: CellToTissue,
    latents: np.ndarray,
    coords: np.ndarray,
    *,
    slides: np.ndarray | None = None,
    centres: np.ndarray | None = None,
    radius: float | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> np.ndarray:
    """Niche embeddings (T·D) of the niches centred on ``centres`` (default: every cell).

    latents (n, K·D) level-1 latents, coords (n, 2), slides (n,) or None. Returns (B, T·D) float32.
    """
    import torch
    from tqdm.auto import tqdm

    from xscale.train.level2 import NicheDataset, make_niches

    n = latents.shape[0]
    centres = np.arange(n) if centres is None else np.asarray(centres, dtype=np.int64)
    niches = make_niches(coords, centres, max_cells=model.config.max_cells, slides=slides, radius=radius)
    data = NicheDataset(latents, niches)
    model = model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for batch in tqdm(data.loader(batch_size, shuffle=False), disable=not progress, desc="niches",
                          unit="batch", leave=False):
            batch = batch.to(device)
            out.append(model.embed(batch.cell_latents, batch.rel_xy, batch.pad_mask).float().cpu().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, model.config.n_tissue_latents * model.config.dim))


def embed_niches(
    adata: ad.AnnData,
    model: CellToTissue | str | os.PathLike,
    *,
    key_added: str = "X_xscale_niche",
    cell_key: str = "X_xscale_cell",
    spatial_key: str = "spatial",
    slide_key: str | None = None,
    radius: float | None = None,
    batch_size: int = 256,
    copy: bool = False,
    progress: bool = True,
) -> ad.AnnData | None:
    """One niche embedding per cell: the T tissue latents of the niche centred on it.

    Parameters
    ----------
    adata
        Cells with level-1 latents in ``obsm[cell_key]`` (see ``xscale.tl.embed_cells``)
        and coordinates in ``obsm[spatial_key]``.
    model
        A trained :class:`~xscale.models.cell_to_tissue.CellToTissue`, or the directory it was
        saved to (``RUN/checkpoints/level2/model``); its ``config.max_cells`` sets the niche
        size (centre + nearest neighbours).
    key_added
        ``obsm`` key written: (n_cells, T·D) float32.
    slide_key
        ``obs`` column of slides; niches never cross slides. None: the slide column xscale
        recorded in ``uns`` (a bundled dataset, a store written by ``xscale run``), else one
        slide, with a warning when a column named like a slide (``slide``, ``sample``, ...)
        has several values.
    radius
        Optional neighbour radius in median nearest-neighbour distances.
    copy
        Return a modified copy instead of writing into ``adata``.
    progress
        Show a progress bar over the niche batches.

    Returns
    -------
    The AnnData with ``obsm[key_added]`` when ``copy``, else None.
    """
    from xscale.models.levels import as_level_model

    model = as_level_model(model, 2, "embed_niches")
    adata = adata.copy() if copy else adata
    latents = _obsm(adata, cell_key, "cell_key", "Run xscale.tl.embed_cells(adata, level1_model) first.")
    coords = _obsm(adata, spatial_key, "spatial_key", "Pass spatial_key= naming the (n, 2) coordinates.")
    if coords.ndim == 2 and coords.shape[1] > 2:
        log.warning("embed_niches: obsm[%r] has %d columns; niches use the first two (x, y) and ignore the rest "
                    "(e.g. z): neighbours are found in the plane.", spatial_key, coords.shape[1])
    coords = coords[:, :2]
    if latents.shape[1] != model.config.in_dim:
        raise XscaleInputError(
            f"obsm[{cell_key!r}] has width {latents.shape[1]} but the level-2 model expects in_dim="
            f"{model.config.in_dim}; embed the cells with the level-1 model this level 2 was trained on."
        )
    adata.obsm[key_added] = niche_embeddings(
        model, latents, coords, slides=_slides(adata, _niche_slide_key(adata, slide_key)), radius=radius,
        batch_size=batch_size,
        progress=progress,
    )
    return adata if copy else None


def center_groups(X: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each group's rows minus that group's mean row. (n, d), (n,) -> (n, d) float64."""
    X = np.array(X, dtype=np.float64)
    groups = np.asarray(groups)
    for g in np.unique(groups):  # a few slides: one vectorised mean each
        rows = groups == g
        X[rows] -= X[rows].mean(axis=0)
    return X


def cluster_domains(
    X: np.ndarray, n_domains: int, *, method: Literal["kmeans", "gmm"] = "kmeans", seed: int = 0,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Cluster rows of ``X`` (standardised per feature) into ``n_domains``. (n, d) -> (n,) int labels.

    ``"kmeans"``: k-means with 10 restarts. ``"gmm"``: Gaussian mixture with diagonal
    covariances initialised from k-means. ``groups`` (n,), e.g. slides: each group's rows
    are centred on their own mean first (:func:`center_groups`), so a shift of a whole
    slide does not become a domain of its own.
    """
    X = np.asarray(X, dtype=np.float64)
    if isinstance(n_domains, bool) or int(n_domains) != n_domains:
        raise XscaleInputError(f"n_domains: expected a whole number of domains, found {n_domains!r}.")
    n_domains = int(n_domains)
    if not np.isfinite(X).all():
        raise XscaleInputError(
            f"the latents to cluster have NaN or inf values in {int((~np.isfinite(X)).any(1).sum())} cells; "
            "drop those cells (e.g. cells without latents after a write-back) or re-embed them."
        )
    if groups is not None:
        if len(groups) != X.shape[0]:
            raise XscaleInputError(
                f"groups: expected one per row ({X.shape[0]}), found {len(groups)}."
            )
        X = center_groups(X, groups)
    sd = X.std(axis=0)
    Z = (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    if n_domains < 1 or n_domains > Z.shape[0]:
        raise XscaleInputError(f"n_domains: expected 1..{Z.shape[0]} (the number of cells), found {n_domains}.")
    if method == "kmeans":
        from sklearn.cluster import KMeans

        return KMeans(n_clusters=n_domains, n_init=10, random_state=seed).fit_predict(Z)
    if method == "gmm":
        from sklearn.mixture import GaussianMixture

        return GaussianMixture(n_components=n_domains, covariance_type="diag", random_state=seed).fit_predict(Z)
    raise XscaleInputError(f"method: expected 'kmeans' or 'gmm', found {method!r}.")


def domains(
    adata: ad.AnnData,
    n_domains: int,
    *,
    key_added: str = "xscale_domain",
    use_rep: str = "X_xscale_niche",
    method: Literal["kmeans", "gmm"] = "kmeans",
    seed: int = 0,
    slide_key: str | None = None,
    copy: bool = False,
) -> ad.AnnData | None:
    """Spatial domains: cluster the niche latents of all cells together.

    Each feature of ``obsm[use_rep]`` is standardised, then clustered by k-means
    (``method="kmeans"``, 10 restarts, the default) or a diagonal Gaussian mixture
    (``"gmm"``). Clustering all slides together keeps domain ids comparable across slides.
    With ``slide_key``, each slide's niche latents are first centred on that slide's mean:
    a shift between slides (a batch effect) then cannot claim a domain of its own. This
    assumes the slides hold the same kinds of regions in broadly similar proportions
    (sections of one organ); leave it None for slides of different regions.

    Parameters
    ----------
    adata
        Cells with niche latents in ``obsm[use_rep]`` (see :func:`embed_niches`).
    n_domains
        Number of domains.
    key_added
        ``obs`` column written: categorical domain ids ``"0"``, ``"1"``, ...
    seed
        Random state of the clustering.
    slide_key
        ``obs`` column of slides whose latents are centred per slide before clustering.

    Returns
    -------
    The AnnData with ``obs[key_added]`` when ``copy``, else None.
    """
    import pandas as pd

    adata = adata.copy() if copy else adata
    X = _obsm(adata, use_rep, "use_rep", "Run xscale.tl.embed_niches(adata, level2_model) first.")
    X = X.reshape(X.shape[0], -1)  # (n, T, D) latents as stored by some writers -> (n, T·D)
    groups = _slides(adata, slide_key)
    labels = cluster_domains(X, n_domains, method=method, seed=seed, groups=groups)
    n_domains = int(n_domains)  # cluster_domains checked it is whole
    cats = [str(i) for i in range(n_domains)]
    adata.obs[key_added] = pd.Categorical([str(v) for v in labels], categories=cats)
    centred = f", latents centred per obs[{slide_key!r}]" if slide_key is not None else ""
    log.info("Wrote %d domains to obs[%r]%s", n_domains, key_added, centred)
    return adata if copy else None


def plot_domains(
    adata: ad.AnnData,
    *,
    key: str = "xscale_domain",
    spatial_key: str = "spatial",
    slide_key: str | None = None,
    ax: Any = None,
    save: str | None = None,
    point_size: float = 4.0,
) -> Any:
    """Scatter of cells in space coloured by domain, one panel per slide.

    Parameters
    ----------
    key
        ``obs`` column with the domains (see :func:`domains`).
    slide_key
        ``obs`` column of slides: one panel each (None = one panel).
    ax
        A matplotlib Axes (single slide), or a sequence or array of Axes (one per slide, in
        sorted slide order; e.g. ``plt.subplots(2, 2)[1]``); made if None.
    save
        Path to save the figure (png/pdf/svg; missing folders are made); the figure is
        closed afterwards.

    Returns
    -------
    The matplotlib Figure.
    """
    import matplotlib.pyplot as plt  # the backend is the user's: a notebook keeps showing its plots

    from xscale.utils.colors import palette

    if key not in adata.obs:
        raise XscaleInputError(
            f"key {key!r} not found in adata.obs. Available: {list(adata.obs.columns)}. Run xscale.tl.domains first."
        )
    coords = _obsm(adata, spatial_key, "spatial_key", "Pass spatial_key= naming the coordinates.")
    labels = adata.obs[key].astype(str).to_numpy()
    slides = _slides(adata, slide_key)
    names = ["all"] if slides is None else sorted(set(slides))
    if ax is None:
        fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4.5), squeeze=False)
        axes = list(axes[0])
    else:
        axes = list(np.ravel(np.asarray(ax, dtype=object))) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
        if len(axes) != len(names):
            raise XscaleInputError(f"ax: expected {len(names)} axes (one per slide), found {len(axes)}.")
        fig = axes[0].figure
    cats = sorted(set(labels), key=lambda s: (len(s), s))
    colours = dict(zip(cats, palette(len(cats)), strict=True))  # tab20 repeated its colours beyond 20
    for name, a in zip(names, axes, strict=True):
        sel = np.ones(len(labels), bool) if slides is None else slides == name
        for c in cats:
            m = sel & (labels == c)
            a.scatter(coords[m, 0], coords[m, 1], s=point_size, color=colours[c], label=c, linewidths=0)
        a.set_title(name if slides is not None else key)
        a.set_aspect("equal")
        a.set_xticks([])
        a.set_yticks([])
    axes[-1].legend(title=key, markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    if save is not None:
        try:
            Path(save).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(save, dpi=120)
        finally:
            plt.close(fig)
    return fig
