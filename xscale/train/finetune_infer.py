"""Inference with a fine-tuned level-1 model: cell latents of an AnnData, the classification
head's input statistics, predicted labels, and what a slide correction changed (latent spread: a collapse; slide
mixing). Re-exported by :mod:`xscale.train.finetune`."""
from __future__ import annotations

import warnings
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from xscale.data.anndata_dataset import AnnDataCellDataset
from xscale.data.batch import collate_cells
from xscale.models.gene_to_cell import GeneToCell
from xscale.models.heads import ClassificationHead

if TYPE_CHECKING:
    import anndata as ad
    from matplotlib.figure import Figure


def encode_cells(
    model: GeneToCell, adata: ad.AnnData, *, batch_size: int = 256, counts_layer: str | None = None, seed: int = 0,
    report_panel: bool = True,
) -> np.ndarray:
    """Cell latents of every row of ``adata`` in row order. Returns (n_obs, K, D) float32.

    Panels longer than ``model.config.inference_context`` use a gene context that depends only on
    each cell (:func:`~xscale.data.batch.inference_context`; ``seed`` is kept for callers and unused
    there). ``report_panel``: log the genes used at INFO (False: DEBUG,
    for cells whose panel was already reported).
    """
    from torch.utils.data import DataLoader

    ds = AnnDataCellDataset(adata, model.vocab, counts_layer=counts_layer, report_panel=report_panel)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False,
                        collate_fn=partial(collate_cells, max_genes=model.config.inference_context,
                                           deterministic=True))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(device)
            out.append(model.encode(batch.gene_ids, batch.values, batch.pad_mask).float().cpu().numpy())  # (B, K, D)
    model.train(was_training)
    if not out:  # no cells: an empty (0, K, D), as for any other row count
        return np.zeros((0, model.config.latents_per_cell, model.config.dim), dtype=np.float32)
    return np.concatenate(out)


def calibrate_head(head: ClassificationHead, latents: np.ndarray) -> None:
    """Set the head's input standardisation to the exact mean / variance of ``latents`` (n, K, D).

    Done once after training, on the training cells through the final model, so inference
    uses the statistics of the latents the head will actually see.
    """
    z = torch.from_numpy(latents).flatten(1) if head.config.pool == "flatten" else torch.from_numpy(latents).mean(1)
    norm = head.net[0]
    norm.running_mean.copy_(z.mean(0))
    norm.running_var.copy_(z.var(0, unbiased=True))


def predict_labels(
    model: GeneToCell, head: ClassificationHead, adata: ad.AnnData, *, key_added: str | None = None,
    batch_size: int = 256, counts_layer: str | None = None,
) -> np.ndarray:
    """Predicted class of every cell, (n_obs,) str; also written to ``adata.obs[key_added]`` if given."""
    latents = torch.from_numpy(encode_cells(model, adata, batch_size=batch_size, counts_layer=counts_layer))
    head.eval()
    with torch.no_grad():
        chunks = [head(chunk).argmax(-1) for chunk in latents.split(4096)]
    idx = torch.cat(chunks).numpy() if chunks else np.zeros(0, dtype=np.int64)
    pred = np.asarray(head.config.classes, dtype=object)[idx].astype(str)
    if key_added is not None:  # categorical, in the head's class order (as anndata would store it anyway)
        adata.obs[key_added] = pd.Categorical(pred, categories=list(head.config.classes))
    return pred


def score_held_out(model: GeneToCell, head: ClassificationHead, adata: ad.AnnData, label_key: str, *,
                   counts_layer: str | None = None) -> dict[str, float]:
    """``macro_f1`` and ``accuracy`` of the head's predictions on ``adata``'s cells against
    ``obs[label_key]`` (classes the head never saw count as errors); {} for no cells."""
    if adata.n_obs == 0:
        return {}
    from sklearn.metrics import accuracy_score, f1_score

    truth = adata.obs[label_key].astype(str).to_numpy()
    pred = predict_labels(model, head, adata, batch_size=256, counts_layer=counts_layer)
    return {"macro_f1": float(f1_score(truth, pred, average="macro")), "accuracy": float(accuracy_score(truth, pred))}


SUMMARY_CELLS = 512  # training cells on which latent_summary compares a slide correction's before and after
SUMMARY_NEIGHBOURS = 15  # k of the slide mixing and the neighbourhood preservation in those summaries
COLLAPSE_RATIO = 0.1  # latents spread less than this fraction of before: a collapsed correction
# Fewer of each cell's within-slide neighbours kept than this: a correction that reshuffled the slides' own
# neighbourhoods. In benchmarks/peft.py's tuning runs (NOTES) every correction below it lost 0.012-0.22 of kNN
# cell-type purity, on STARmap and on seqFISH; above it is no guarantee (seqFISH: 0.51-0.68 kept, 0.07-0.12 lost).
PRESERVATION_WARN = 0.5
# With labels (finetune(label_key=) on a slide correction, used for this check only): a kNN cell-type purity
# drop of at least this much on the summary sample is warned about. The tolerance of issue 7's goal; in
# benchmarks/peft.py (NOTES) MMD corrections on seqFISH, whose embryos differ in composition, lost 0.02-0.04.
PURITY_DROP_WARN = 0.02


def summary_sample(train: np.ndarray, seed: int, n: int = SUMMARY_CELLS) -> np.ndarray:
    """Sorted rows (<= n,) of the training cells (train: (n_obs,) bool) that :func:`latent_summary` reads."""
    rows = np.flatnonzero(train)
    return np.sort(np.random.default_rng(seed).choice(rows, min(n, rows.size), replace=False))


def latent_summary(model: GeneToCell, adata: ad.AnnData, slides: np.ndarray,
                   counts_layer: str | None = None, labels: np.ndarray | None = None
                   ) -> tuple[dict[str, float], np.ndarray]:
    """What a slide correction changes, over the cells of ``adata`` (slides: (n_obs,) their slides).

    Returns the summary and the flattened latents (n_obs, K·D). ``latent_spread``: mean over
    latent features of their standard deviation across cells (near 0 = collapsed).
    ``slide_mixing``: :func:`~xscale.eval.metrics.slide_mixing` of the flattened latents among
    :data:`SUMMARY_NEIGHBOURS` (15) nearest neighbours (1 = slides fully mixed; left out when the cells come from one
    slide). ``knn_purity``, with ``labels`` ((n_obs,) cell types, None / NaN = unlabelled): the
    :func:`~xscale.eval.metrics.knn_purity` of the labelled cells among themselves (left out with
    fewer than 2 labels or too few labelled cells). Leaves torch's random state as it was (a
    DataLoader draws a seed from it), so measuring during fine-tuning changes nothing in training.
    """
    from xscale.eval.metrics import knn_purity, slide_mixing

    with torch.random.fork_rng(devices=[]):
        z = encode_cells(model, adata, counts_layer=counts_layer, report_panel=False)  # (n, K, D): a sample
    flat = z.reshape(len(z), -1)  # (n, K*D)
    out = {"latent_spread": float(flat.std(axis=0).mean())}
    if len(set(slides)) > 1 and len(flat) > SUMMARY_NEIGHBOURS:
        out["slide_mixing"] = slide_mixing(flat, slides, k=SUMMARY_NEIGHBOURS)
    if labels is not None:
        known = pd.notna(labels)
        y = np.asarray(labels, dtype=object)[known].astype(str)
        if known.sum() > SUMMARY_NEIGHBOURS and len(set(y)) > 1:
            out["knn_purity"] = knn_purity(flat[known], y, k=SUMMARY_NEIGHBOURS)
    return out, flat


def kept_neighbours(before: np.ndarray, after: np.ndarray, slides: np.ndarray) -> dict[str, float]:
    """``{"neighbourhood_preservation": ...}`` of the same cells' flattened latents before and after a
    correction (:func:`~xscale.eval.metrics.neighbourhood_preservation` within each slide), or ``{}``
    when no slide of the sample has more cells than :data:`SUMMARY_NEIGHBOURS`."""
    from xscale.eval.metrics import neighbourhood_preservation

    if np.unique(slides, return_counts=True)[1].max() <= SUMMARY_NEIGHBOURS:
        return {}
    return {"neighbourhood_preservation": neighbourhood_preservation(before, after, slides, k=SUMMARY_NEIGHBOURS)}


def correction_figure(before: np.ndarray, after: np.ndarray, slides: np.ndarray, metrics: dict[str, float], *,
                      seed: int = 0, cell_types: np.ndarray | None = None) -> Figure:
    """Two-panel figure of the summary sample (flattened latents before / after, each laid out by
    :func:`~xscale.report.embedding.embed_2d`: UMAP, or PCA without umap-learn), coloured by slide; the
    titles give :func:`check_correction`'s slide mixing, kept neighbours and (with labels) cell-type purity. With
    ``cell_types`` ((n,) labels, None / NaN = unlabelled) a second row colours the same cells by cell type."""
    from xscale.report.embedding import embed_2d
    from xscale.report.figures import plot_correction

    (xy0, axis), (xy1, _) = (embed_2d(z, seed=seed) for z in (before, after))  # the same method for both

    def mixing(key: str) -> str:
        return f": slide mixing {metrics[key]:.2f}" if key in metrics else ""

    before_t = "before" + mixing("slide_mixing_before")
    after_t = "after" + mixing("slide_mixing_after")
    if "neighbourhood_preservation" in metrics:
        after_t += f", kept neighbours {metrics['neighbourhood_preservation']:.2f}"
    if "knn_purity_before" in metrics:  # label_key given
        before_t += f"\ncell-type purity {metrics['knn_purity_before']:.2f}"
        after_t += f"\ncell-type purity {metrics['knn_purity_after']:.2f}"
    fig = plot_correction(xy0, xy1, slides, axis_label=axis, titles=(before_t, after_t), cell_types=cell_types)
    fig.suptitle(f"Cell latents of {len(slides)} training cells, before and after the slide correction")
    return fig


def collapsed(spread_before: float, spread_after: float) -> bool:
    """True when the latents' spread fell below :data:`COLLAPSE_RATIO` of what it was."""
    return spread_after < COLLAPSE_RATIO * spread_before


def check_correction(metrics: dict[str, float], before: dict[str, float], after: dict[str, float],
                     weight: float) -> None:
    """Record :func:`latent_summary` before and after a slide correction (``<key>_before`` /
    ``<key>_after`` in ``metrics``, and ``neighbourhood_preservation`` if ``after`` has it); warn
    when the latents collapsed or each slide's own neighbourhoods were reshuffled.

    A slide penalty that outweighs the reconstruction can map every cell to nearly the same
    latents (measured: MMD weight 5 for 12 epochs on STARmap shrank the spread ~500-fold and
    separated the slides further). Such latents mix nothing and describe no cell. A penalty
    can also keep the spread but move cells among each other's neighbours within a slide
    (:func:`~xscale.eval.metrics.neighbourhood_preservation`, needing no labels): in
    ``benchmarks/peft.py``'s tuning runs every correction that kept less than
    :data:`PRESERVATION_WARN` of the neighbours lost 0.012-0.22 of cell-type kNN purity (STARmap
    and seqFISH). The warning is one-sided: on seqFISH, corrections keeping 0.51-0.68 lost
    0.07-0.12, so a silent run is no proof that cell types stayed apart.
    """
    for key in before:
        metrics[f"{key}_before"], metrics[f"{key}_after"] = before[key], after[key]
    s0, s1 = before["latent_spread"], after["latent_spread"]
    if collapsed(s0, s1):
        warnings.warn(
            f"Slide correction collapsed the cell latents: their spread (mean per-feature std over "
            f"up to {SUMMARY_CELLS} training cells) fell from {s0:.4g} to {s1:.4g}, below {COLLAPSE_RATIO:g}x. "
            f"The slide penalty outweighs the reconstruction: lower correction_weight (now {weight:g}) or the "
            "epochs, or raise reconstruction_weight.", UserWarning, stacklevel=3)
    kept = after.get("neighbourhood_preservation")
    if kept is not None:
        metrics["neighbourhood_preservation"] = kept
        if kept < PRESERVATION_WARN and not collapsed(s0, s1):
            warnings.warn(
                f"Slide correction reshuffled each slide's own neighbourhoods: on average {kept:.2f} of a cell's "
                f"{SUMMARY_NEIGHBOURS} nearest neighbours within its slide (up to {SUMMARY_CELLS} training cells) "
                "are still among them, "
                f"below {PRESERVATION_WARN:g}. Cell types may now be mixed: lower correction_weight (now {weight:g}) "
                "or the epochs, or raise structure_weight.", UserWarning, stacklevel=3)
    if "knn_purity" in before and "knn_purity" in after and not collapsed(s0, s1):
        p0, p1 = before["knn_purity"], after["knn_purity"]
        if p0 - p1 >= PURITY_DROP_WARN:
            warnings.warn(
                f"Slide correction mixed cell types: the kNN purity of the labelled cells among up to {SUMMARY_CELLS} "
                f"training cells ({SUMMARY_NEIGHBOURS} neighbours) fell from {p0:.3f} to {p1:.3f}, a drop of "
                f"{p0 - p1:.3f} >= {PURITY_DROP_WARN:g}. Slides that differ in cell-type composition cannot be "
                f"matched whole without moving cells onto other types: lower correction_weight (now {weight:g}) or "
                "the epochs, or raise structure_weight, and compare.", UserWarning, stacklevel=3)


__all__ = ["calibrate_head", "check_correction", "collapsed", "correction_figure", "encode_cells", "kept_neighbours",
           "latent_summary", "predict_labels", "score_held_out", "summary_sample"]
