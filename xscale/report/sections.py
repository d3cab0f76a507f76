"""Body HTML of each report section, from arrays already pulled out of the AnnData."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from html import escape
from typing import TYPE_CHECKING, Any

import numpy as np

from xscale.report import figures as F
from xscale.report.embedding import EmbeddingMethod, embed_2d
from xscale.report.expression import plot_gene_correlations, plot_reconstruction
from xscale.report.html import figure_html, glossary, group_table, key_value_table, note, rows_table
from xscale.report.metrics import ComparisonGroup, headline

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


def match_domains(
    predicted: np.ndarray, annotated: np.ndarray | None
) -> tuple[np.ndarray, dict[str, str], dict[str, str]]:
    """Predicted domains renamed and coloured after the annotated domain each overlaps most.

    Predicted cluster ids carry no names; giving each the colour of the annotated domain it
    overlaps most (one-to-one, Hungarian on the overlap counts) lets the eye compare maps.
    Unmatched clusters keep their id and get other colours.

    Returns
    -------
    (n,) predicted labels as ``"3 (≈ L5)"``, their colours, and the annotated domains' colours.
    """
    from scipy.optimize import linear_sum_assignment

    pred_cats = sorted(set(predicted.tolist()), key=_natural)
    if annotated is None:
        return predicted, dict(zip(pred_cats, F.palette(len(pred_cats)), strict=True)), {}
    ann_cats = sorted(set(annotated[annotated != "nan"].tolist()), key=_natural)
    pal = F.palette(len(ann_cats) + len(pred_cats))
    ann_colors = dict(zip(ann_cats, pal, strict=False))
    overlap = np.array(
        [[np.sum((predicted == p) & (annotated == a)) for a in ann_cats] for p in pred_cats]
    )
    rows, cols = linear_sum_assignment(-overlap)
    names = {p: p for p in pred_cats}
    colors: dict[str, str] = {}
    for r, c in zip(rows, cols, strict=True):
        names[pred_cats[r]] = f"{pred_cats[r]} (≈ {ann_cats[c]})"
        colors[pred_cats[r]] = ann_colors[ann_cats[c]]
    spare = iter(pal[len(ann_cats) :])
    pred_colors = {names[p]: colors[p] if p in colors else next(spare) for p in pred_cats}
    renamed = np.array([names[p] for p in predicted.tolist()], dtype=object)
    return renamed, pred_colors, ann_colors


def _natural(s: str) -> tuple[int, Any]:
    return (0, int(s)) if s.isdigit() else (1, s)


def summary_section(
    groups: Sequence[ComparisonGroup],
    overview: Mapping[str, str],
    slide_rows: Sequence[Sequence[str]],
    holdout: Sequence[str],
    info: Mapping[str, str],
) -> str:
    lines = headline(groups)
    where = (
        "Slides marked <span class='holdout'>held out</span> were never seen during training: scores on "
        "them measure how well xscale generalises to new tissue."
        if holdout else
        "No slide was held out: every score is on cells the model was trained on, so scores say how well "
        "the latents describe these cells, not how well they carry over to new tissue."
    )
    parts = [f"<p class='lead'>What was run, on which cells, and the main result. {where}</p>"]
    if lines:
        parts.append(
            "<h3>Main results</h3><ul class='summary'>"
            + "".join(f"<li>{x}</li>" for x in lines)
            + "</ul>"
        )
    parts.append("<h3>Data</h3>" + key_value_table(overview))
    if slide_rows:
        classes = ["holdout" if r[0] in holdout else "" for r in slide_rows]
        parts.append(rows_table(["slide", "cells", "role"], slide_rows, row_classes=classes))
    if info:
        parts.append("<h3>Run</h3>" + key_value_table(info))
    return "".join(parts)


def domains_section(
    coords: np.ndarray | None,
    slides: np.ndarray,
    predicted: np.ndarray | None,
    annotated: np.ndarray | None,
    *,
    holdout: Sequence[str],
    predicted_key: str,
    annotated_key: str | None,
    pred_colors: Mapping[str, str],
    annot_colors: Mapping[str, str],
) -> str:
    if coords is None:
        return note(
            "No coordinates (<code>obsm['spatial']</code>): spatial maps need cell positions."
        )
    if predicted is None:
        return note(
            f"No predicted domains in <code>obs['{escape(predicted_key)}']</code>. Run "
            "<code>xscale.tl.domains(adata, n_domains)</code> (or <code>xscale domains</code>) first."
        )
    from sklearn.metrics import adjusted_rand_score

    scores = {}
    if annotated is not None:
        for s in set(slides.tolist()):
            m = (slides == s) & (annotated != "nan")
            if m.sum() > 1:
                scores[s] = float(adjusted_rand_score(annotated[m], predicted[m]))
    fig = F.plot_spatial_domains(
        coords,
        slides,
        predicted,
        annotated,
        holdout=holdout,
        pred_colors=pred_colors,
        annot_colors=annot_colors,
        scores=scores,
    )
    ann_txt = (
        f"Left: the annotated domains (<code>obs['{escape(annotated_key)}']</code>); right: "
        if annotated is not None
        else ""
    )
    cap = (
        f"<b>Spatial domains.</b> Each dot is a cell at its measured position (axes in the data's "
        f"coordinate units), one row per slide. {ann_txt}domains found by xscale, clustering the niche "
        f"latents (<code>obs['{escape(predicted_key)}']</code>). Cluster numbers are arbitrary; each "
        "cluster is coloured like the annotated domain it overlaps most, so matching colours mean "
        "agreement. ARI in the title compares the two partitions on that slide (1 = identical)."
        + (" The slide framed in red is held out: it was never used for training." if holdout else "")
    )
    return (
        "<p class='lead'>Do the tissue domains xscale finds follow the anatomy?</p>"
        + figure_html(fig, cap, alt="spatial maps of annotated and predicted domains")
    )


def latents_section(
    cell_latents: np.ndarray | None,
    niche_latents: np.ndarray | None,
    labels: Mapping[str, tuple[np.ndarray, Mapping[str, str] | None]],
    *,
    method: EmbeddingMethod,
    seed: int,
    cell_key: str,
    niche_key: str,
) -> str:
    if cell_latents is None and niche_latents is None:
        return note(
            f"No latents in <code>obsm['{escape(cell_key)}']</code> or "
            f"<code>obsm['{escape(niche_key)}']</code>. Run <code>xscale.tl.embed_cells</code> first."
        )
    parts = [
        (
            "<p class='lead'>Cells with similar latents sit close together. A good embedding groups "
            "cells by type and mixes slides (differences between slides are mostly technical).</p>"
        )
    ]
    for what, X, wanted in (
        ("cell", cell_latents, ("cell type", "slide")),
        ("niche", niche_latents, ("annotated domain", "xscale domain")),
    ):
        if X is None:
            continue
        panels = [
            (
                f"{what} latents by {name}",
                labels[name][0],
                labels[name][1] or _colors(labels[name][0]),
            )
            for name in wanted
            if name in labels
        ]
        if not panels:
            continue
        xy, axis = embed_2d(X, method=method, seed=seed)
        fig = F.plot_embedding(xy, panels, axis_label=axis)
        how = (
            "UMAP (a 2-D map that keeps each cell's nearest neighbours close)"
            if axis == "UMAP"
            else "the first two principal components (PCA; UMAP was not used, so clusters may overlap more than "
            "they truly do)"
        )
        key = cell_key if what == "cell" else niche_key
        subject = (
            "what each cell expresses"
            if what == "cell"
            else "each cell's neighbourhood (the niche centred on it)"
        )
        cap = (
            f"<b>{what.capitalize()} latents</b> (<code>obsm['{escape(key)}']</code>, summarising {subject}), "
            f"{len(xy):,} cells, shown with {how}. Axes have no units. Colours: "
            + ", ".join(escape(p[0].split(" by ")[1]) for p in panels)
            + "."
        )
        parts.append(figure_html(fig, cap, alt=f"{axis} of {what} latents"))
    return "".join(parts)


def _colors(labels: np.ndarray) -> dict[str, str]:
    cats = sorted(set(labels.tolist()), key=_natural)
    return dict(zip(cats, F.palette(len(cats)), strict=True))


def benchmark_section(groups: Sequence[ComparisonGroup], holdout: Sequence[str] = ()) -> str:
    if not groups:
        return note(
            "No metrics given: pass <code>metrics=</code> (e.g. the metrics.json of "
            "<code>xscale demo</code>) to compare xscale with the baselines."
        )
    if all(len(g.methods) < 2 for g in groups):
        return note(
            "The metrics hold no comparison (every task has one method); see the table below."
        )
    fig = F.plot_method_bars(groups)
    cap = (
        "<b>xscale against baselines.</b> One panel per task and score; orange bars are xscale, grey "
        "bars are baselines computed in the same run on the same cells; ★ marks the best. "
        "Arrows give the direction: ↑ higher is better, ↓ lower is better. "
        + ("Scores are on held-out cells unless the panel title says otherwise. " if holdout else
           "No slide was held out: scores are on the cells the model was trained on. ")
        + "The full numbers are in the table below."
    )
    return figure_html(fig, cap, alt="bar chart of xscale against baselines")


def metrics_section(groups: Sequence[ComparisonGroup], raw: Mapping[str, Any]) -> str:
    if not groups:
        return note("No metrics given.")
    names = [m for g in groups for m in g.metric_names]
    parts = [
        "<p class='lead'>Every score of the run; the best value per column in bold, xscale rows in orange.</p>"
    ]
    parts.extend(group_table(g) for g in groups)
    gl = glossary(names)
    if gl:
        parts.append("<h3>What the scores mean</h3>" + gl)
    parts.append(
        "<details><summary>raw metrics (JSON)</summary><pre>"
        + escape(json.dumps(raw, indent=2, default=str))
        + "</pre></details>"
    )
    return "".join(parts)


def training_section(histories: Mapping[str, pd.DataFrame]) -> str:
    empty = [k for k, v in histories.items() if not len(v)]
    missing = (
        note(
            "No metrics were logged for " + ", ".join(escape(k) for k in empty) + " (a run shorter "
            "than Lightning's logging interval logs nothing)."
        )
        if empty
        else ""
    )
    histories = {k: v for k, v in histories.items() if len(v)}
    if not histories:
        return missing or note(
            "No training logs given: pass <code>history=</code> (a logs folder of Lightning "
            "CSV logs, or <code>{level: folder}</code>)."
        )
    fig = F.plot_training_curves(histories)
    cap = (
        "<b>Training curves.</b> Loss against optimisation step, one panel per level (level 1: genes → cells, "
        "negative-binomial negative log-likelihood of the counts; level 2: cells → niches, error in "
        "reconstructing the cells' latents). Light lines are per-step values, dark lines their running "
        "mean; validation losses (on cells held aside from training), when logged, are dashed. A curve that "
        "flattens means training "
        "has converged; a validation loss rising while training loss falls would mean over-fitting."
    )
    return figure_html(fig, cap, alt="training curves") + missing


def reconstruction_section(
    coords: np.ndarray | None,
    observed: np.ndarray | None,
    decoded: np.ndarray | None,
    genes: Sequence[str],
    all_r: np.ndarray | None,
    *,
    slide: str,
    held_out: bool,
    layer: str,
    genes_how: str = "",
) -> str:
    if observed is None or decoded is None or coords is None:
        return note(
            f"No decoded expression in <code>layers['{escape(layer)}']</code> (or no counts in X / positions). "
            "Run <code>xscale.tl.reconstruct(adata, model)</code> to add it."
        )
    fig = plot_reconstruction(
        coords, observed, decoded, list(genes), slide=slide, held_out=held_out
    )
    cap = (
        "<b>Reconstruction.</b> xscale compresses each cell into a few latent tokens and can decode them "
        "back into expression. Left: measured expression; middle: expression decoded from the latents alone "
        "(the decoder never sees the measured values); right: decoded against measured per cell. Values are "
        "log1p(counts / total counts × 10,000), same colour scale in both maps. "
        + (f"Genes shown: {escape(genes_how)}." if genes_how else "")
    )
    out = figure_html(fig, cap, alt="observed vs decoded expression")
    if all_r is not None and np.isfinite(all_r).any():
        out += figure_html(
            plot_gene_correlations(all_r, slide=slide),
            "<b>Agreement over the whole panel.</b> Per gene, the Pearson correlation across cells "
            "between measured and decoded expression; the dashed line is the median.",
            alt="per-gene correlation histogram",
        )
    return out
