"""``build_report``: one self-contained ``report.html`` from a latent store, metrics and logs."""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xscale.errors import XscaleInputError
from xscale.report import sections as S
from xscale.report.embedding import EmbeddingMethod
from xscale.report.html import Page
from xscale.report.logs import HistorySource, load_histories
from xscale.report.metrics import comparison_groups, load_metrics, run_info

if TYPE_CHECKING:
    import anndata as ad

log = logging.getLogger(__name__)

SECTION_IDS = (
    "summary",
    "domains",
    "latents",
    "benchmark",
    "metrics",
    "training",
    "reconstruction",
)


def build_report(
    store_or_adata: ad.AnnData | str | Path,
    metrics: Mapping[str, Any] | str | Path | None,
    out_html: str | Path,
    *,
    history: Mapping[str, HistorySource] | str | Path | None = None,
    cell_type_key: str | None = None,
    domain_key: str | None = None,
    slide_key: str | None = None,
    holdout: str | Sequence[str] | None = None,
    predicted_domain_key: str = "xscale_domain",
    cell_latent_key: str = "X_xscale_cell",
    niche_latent_key: str = "X_xscale_niche",
    spatial_key: str = "spatial",
    expected_layer: str = "xscale_expected",
    genes: Sequence[str] | None = None,
    n_genes: int = 4,
    embedding: EmbeddingMethod = "auto",
    max_embedding_cells: int = 20_000,
    title: str = "xscale report",
    seed: int = 0,
) -> Path:
    """Write a self-contained HTML report (figures embedded as PNG, no network access).

    Parameters
    ----------
    store_or_adata
        AnnData, or the path of a latent store (``cells.zarr``) or ``.h5ad``. Read:
        ``obsm[spatial_key]`` (n, 2); ``obsm[cell_latent_key]`` / ``obsm[niche_latent_key]``
        ((n, K, D) or (n, F)); ``obs[predicted_domain_key]``, ``obs[domain_key]``,
        ``obs[cell_type_key]``, ``obs[slide_key]``; raw counts in ``X`` and
        ``layers[expected_layer]`` (n, G) expected counts decoded by xscale. Missing pieces
        leave a note in their section instead of failing.
    metrics
        Nested dict (or a JSON file of one) of scores. Any dict whose values include
        ``{method: {metric: number}}`` dicts is a comparison group; numbers beside the
        methods are context; top-level strings/numbers are run information. Methods named
        ``xscale*`` are xscale's own, others baselines. E.g.
        ``{"holdout": "BZ14", "domains": {"n_domains": 4, "xscale_niche": {"ari": .76, "nmi": .7},
        "pca_spatial_mean": {"ari": .715, "nmi": .68}}, "cell_type": {"xscale_cell":
        {"macro_f1": .6, "accuracy": .8}, "pca": {...}}}``; deeper nesting such as
        ``{"domains": {"heldout": {...}, "<slide>": {...}}, "reconstruction": {"heldout":
        {"xscale": {"pearson_gene": .4}}}}`` works too. See :mod:`xscale.report.metrics`.
    out_html
        Output file; written to a temporary sibling and renamed when complete.
    history
        Lightning CSV logs: ``{level name: run folder, metrics.csv or DataFrame}``, or one
        logs folder searched for ``metrics.csv`` (each run named by its sub-folder).
    cell_type_key, domain_key, slide_key, holdout
        Annotation columns and held-out slide(s). ``None`` takes them from
        ``uns["xscale"]`` / ``uns["xscale_dataset"]`` (keys ``label_key``, ``domain_key``,
        ``slide_key``, ``holdout``) when present, and the held-out slide from
        ``metrics["holdout"]``.
    genes, n_genes
        Genes shown in the reconstruction examples; default the ``n_genes`` most variable
        on the (first) held-out slide.
    embedding
        ``"umap"``, ``"pca"`` or ``"auto"`` (UMAP when umap-learn is installed).
    max_embedding_cells
        Cells drawn at random for the 2-D embeddings above this number.

    Returns
    -------
    Path of the written report.
    """
    t0 = time.perf_counter()
    adata = _read(store_or_adata)
    raw = load_metrics(metrics)
    groups = comparison_groups(raw)
    meta = _meta(adata)
    slide_key = _key(adata, slide_key, meta.get("slide_key"), "slide_key")
    cell_type_key = _key(adata, cell_type_key, meta.get("label_key"), "cell_type_key")
    domain_key = _key(adata, domain_key, meta.get("domain_key"), "domain_key")
    if holdout is None:
        holdout = meta.get("holdout") or raw.get("holdout")
    # slide names compare as strings (an integer slide column is read as '1', '2', ...)
    if holdout is None or isinstance(holdout, (str, int, float, np.integer, np.floating)):
        held = () if holdout is None else (str(holdout),)
    else:
        held = tuple(str(h) for h in holdout)
    n = adata.n_obs
    slides = adata.obs[slide_key].astype(str).to_numpy() if slide_key else np.full(n, "all cells")
    held = tuple(h for h in held if h in set(slides.tolist()))
    coords = (
        np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
        if spatial_key in adata.obsm
        else None
    )
    histories = load_histories(history)

    name = meta.get("name") or (raw.get("dataset") if isinstance(raw.get("dataset"), str) else None)
    page = Page(
        title,
        " · ".join(
            x
            for x in (
                name,
                f"{n:,} cells × {adata.n_vars:,} genes",
                _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            )
            if x
        ),
    )

    overview = {"cells": f"{n:,}", "genes in panel": f"{adata.n_vars:,}"}
    if cell_type_key:
        overview["cell types"] = f"{adata.obs[cell_type_key].nunique()} (obs['{cell_type_key}'])"
    if domain_key:
        overview["annotated domains"] = f"{adata.obs[domain_key].nunique()} (obs['{domain_key}'])"
    if predicted_domain_key in adata.obs:
        overview["xscale domains"] = (
            f"{adata.obs[predicted_domain_key].nunique()} (obs['{predicted_domain_key}'])"
        )
    for key, what in ((cell_latent_key, "cell latents"), (niche_latent_key, "niche latents")):
        if key in adata.obsm:
            overview[what] = f"obsm['{key}'], shape {tuple(np.shape(adata.obsm[key])[1:])} per cell"
    slide_rows = []
    if slide_key:
        names, counts = np.unique(slides, return_counts=True)
        slide_rows = [
            [s, f"{c:,}", "held out (never trained on)" if s in held else "training"]
            for s, c in sorted(
                zip(names.tolist(), counts.tolist(), strict=True),
                key=lambda t: (t[0] in held, t[0]),
            )
        ]
    page.add(
        "summary", "Summary", S.summary_section(groups, overview, slide_rows, held, run_info(raw))
    )

    timings: dict[str, float] = {}
    t = time.perf_counter()
    predicted, annotated = _labels(adata, predicted_domain_key), _labels(adata, domain_key)
    pred_colors: dict[str, str] = {}
    annot_colors: dict[str, str] = {}
    if predicted is not None:
        predicted, pred_colors, annot_colors = S.match_domains(predicted, annotated)
    page.add(
        "domains",
        "Spatial domains",
        S.domains_section(
            coords,
            slides,
            predicted,
            annotated,
            holdout=held,
            predicted_key=predicted_domain_key,
            annotated_key=domain_key,
            pred_colors=pred_colors,
            annot_colors=annot_colors,
        ),
    )
    timings["domains"] = time.perf_counter() - t

    t = time.perf_counter()
    sub = _subsample(n, max_embedding_cells, seed)
    labels: dict[str, tuple[np.ndarray, dict[str, str] | None]] = {}
    if cell_type_key:
        labels["cell type"] = (_labels(adata, cell_type_key)[sub], None)
    if slide_key:
        labels["slide"] = (
            np.array([f"{s} (held out)" if s in held else s for s in slides[sub]]),
            None,
        )
    if annotated is not None:
        labels["annotated domain"] = (annotated[sub], annot_colors or None)
    if predicted is not None:
        labels["xscale domain"] = (predicted[sub], pred_colors)
    page.add(
        "latents",
        "Latent space",
        S.latents_section(
            _latent(adata, cell_latent_key, sub),
            _latent(adata, niche_latent_key, sub),
            labels,
            method=embedding,
            seed=seed,
            cell_key=cell_latent_key,
            niche_key=niche_latent_key,
        ),
    )
    timings["latents"] = time.perf_counter() - t

    page.add("benchmark", "xscale vs baselines", S.benchmark_section(groups, held))
    page.add("metrics", "Metrics table", S.metrics_section(groups, raw))
    page.add("training", "Training curves", S.training_section(histories))

    t = time.perf_counter()
    page.add(
        "reconstruction",
        "Reconstruction",
        _reconstruction(adata, coords, slides, held, expected_layer, genes, n_genes),
    )
    timings["reconstruction"] = time.perf_counter() - t

    total = time.perf_counter() - t0
    log.info(
        "report sections built in %s; total %.1f s",
        ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()),
        total,
    )
    import xscale

    footer = f"xscale {xscale.__version__} · report built in {total:.0f} s · self-contained file, no network needed"
    out = Path(out_html)
    from xscale.utils.atomic import atomic_write_text

    atomic_write_text(out, page.render(footer))
    log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return out


def _read(src: ad.AnnData | str | Path) -> ad.AnnData:
    import anndata as ad

    if isinstance(src, ad.AnnData):
        return src
    p = Path(src)
    if not p.exists():
        raise XscaleInputError(
            f"store {str(p)!r} does not exist. Pass an AnnData, a cells.zarr store or an .h5ad file."
        )
    if p.is_dir() and (p / "cells.zarr").is_dir():  # a run folder of xscale run / demo / embed
        p = p / "cells.zarr"
    if p.suffix == ".h5ad":
        return ad.read_h5ad(p)
    try:
        return ad.read_zarr(p)
    except Exception as err:  # zarr raises many types for what is not a store
        raise XscaleInputError(
            f"store {str(p)!r}: expected an AnnData zarr store (e.g. RUN/cells.zarr) or an .h5ad file, found "
            f"something anndata cannot read ({type(err).__name__}). Pass the cells.zarr of a run."
        ) from err


def _meta(adata: ad.AnnData) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in ("xscale_dataset", "xscale"):
        v = adata.uns.get(k)
        if isinstance(v, Mapping):
            out.update({kk: vv for kk, vv in v.items() if vv not in ("", None)})
    if "domain_key" not in out and out.get("name"):
        import xscale.datasets as ds

        if out["name"] in ds.available():
            out["domain_key"] = ds.info(out["name"]).domain_key
    return out


def _key(adata: ad.AnnData, given: str | None, default: Any, what: str) -> str | None:
    if given is not None:
        if given not in adata.obs:
            raise XscaleInputError(
                f"{what}={given!r} is not a column of adata.obs. Available: {list(adata.obs.columns)}. "
                f"Pass one of these, or {what}=None."
            )
        return given
    return default if isinstance(default, str) and default in adata.obs else None


def _labels(adata: ad.AnnData, key: str | None) -> np.ndarray | None:
    if not key or key not in adata.obs:
        return None
    return adata.obs[key].astype(str).to_numpy()


def _subsample(n: int, cap: int, seed: int) -> np.ndarray:
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


def _latent(adata: ad.AnnData, key: str, rows: np.ndarray) -> np.ndarray | None:
    if key not in adata.obsm:
        return None
    X = np.asarray(adata.obsm[key])[rows]
    return X.reshape(len(X), -1).astype(np.float32)


def _reconstruction(
    adata: ad.AnnData,
    coords: np.ndarray | None,
    slides: np.ndarray,
    held: Sequence[str],
    layer: str,
    genes: Sequence[str] | None,
    n_genes: int,
) -> str:
    import scipy.sparse as sp

    if layer not in adata.layers or coords is None or adata.n_vars == 0:
        return S.reconstruction_section(
            None, None, None, [], None, slide="", held_out=False, layer=layer
        )
    E_all = adata.layers[layer]
    # writers may decode some slides only and leave NaN for unmodelled genes: the other rows are 0 or
    # NaN (dense), or hold no entries (CSR: only those rows are made dense here)
    if sp.issparse(E_all):
        E_csr = sp.csr_matrix(E_all)
        decoded_rows = np.diff(E_csr.indptr) > 0
    else:
        E_dense = np.asarray(E_all, dtype=np.float32)  # (n, G)
        decoded_rows = np.nansum(np.abs(E_dense), axis=1) > 0
    if not decoded_rows.any():
        return S.reconstruction_section(
            None, None, None, [], None, slide="", held_out=False, layer=layer
        )
    names_, counts_ = np.unique(slides[decoded_rows], return_counts=True)
    held_decoded = [h for h in held if h in set(names_.tolist())]
    slide = held_decoded[0] if held_decoded else str(names_[np.argmax(counts_)])
    m = (slides == slide) & decoded_rows
    X = adata.X[m]
    counts = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)
    expected = (E_csr[m].toarray() if sp.issparse(E_all) else E_dense[m]).astype(np.float64)
    modelled = np.isfinite(expected).all(axis=0)  # (G,) genes the model decoded
    if not modelled.any():
        return S.reconstruction_section(
            None, None, None, [], None, slide="", held_out=False, layer=layer
        )
    # both sides scaled by the counts of the decoded genes: the decoder's library
    lib = np.maximum(counts[:, modelled].sum(axis=1, keepdims=True), 1e-8)
    obs_ln = np.log1p(counts / lib * 1e4)  # (n, G)
    dec_ln = np.log1p(np.maximum(expected, 0) / lib * 1e4)  # (n, G)
    names = adata.var_names.astype(str)
    if genes is None:
        var = np.where(modelled, obs_ln.var(axis=0), -np.inf)
        pick = np.argsort(-var)[: min(n_genes, int(modelled.sum()))]
        how = f"the {len(pick)} most variable on this slide"
    else:
        missing = [g for g in genes if g not in set(names)]
        if missing:
            raise XscaleInputError(
                f"genes {missing} are not in adata.var_names. Pick genes of the panel, or genes=None."
            )
        pick = np.array([names.get_loc(g) for g in genes])
        how = "chosen by the caller"
    with np.errstate(invalid="ignore", divide="ignore"):
        o = obs_ln - obs_ln.mean(0)
        d = dec_ln - dec_ln.mean(0)
        r = (o * d).sum(0) / np.sqrt((o**2).sum(0) * (d**2).sum(0))  # (G,) per-gene Pearson
    r = np.where(modelled, r, np.nan)
    return S.reconstruction_section(
        coords[m],
        obs_ln[:, pick],
        dec_ln[:, pick],
        [names[i] for i in pick],
        r,
        slide=slide,
        held_out=slide in held,
        layer=layer,
        genes_how=how,
    )
