"""Level-1 functions on AnnData: cell embeddings and decoded expression.

``embed_cells`` writes the K cell latents of every cell (flattened) to ``adata.obsm``;
``reconstruct`` decodes them back to expected counts in ``adata.layers``. A model
trained on one panel embeds any other panel through the genes both share; how many
it uses is logged and recorded in ``adata.uns``, and a warning says when that is too few
(:func:`low_overlap`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np
import torch
from anndata import AnnData

from xscale.data.anndata_dataset import AnnDataCellDataset
from xscale.data.batch import CellBatch, collate_cells
from xscale.models.gene_to_cell import GeneToCell
from xscale.models.levels import as_level_model

log = logging.getLogger(__name__)


#: embedding warns when the model uses fewer than this share of its vocabulary's genes ...
LOW_OVERLAP_VOCAB = 0.25
#: ... and fewer than this share of the panel's genes (a panel the model fully knows does not warn).
LOW_OVERLAP_PANEL = 0.5


def low_overlap(used: int, panel: int, n_vocab: int) -> bool:
    """True when a panel covers too little of a model to embed reliably: the model uses fewer than
    :data:`LOW_OVERLAP_VOCAB` (25%) of its vocabulary's genes *and* fewer than :data:`LOW_OVERLAP_PANEL`
    (50%) of the panel's genes (control probes aside). 12 of a 166-gene model's genes warns, and
    25 of a 960-gene panel with that model; the model's own panel, or 150 of its 166 genes within a
    960-gene panel, does not; nor does a panel the model knows whole, within a larger vocabulary
    (a model trained on several panels embedding one of them)."""
    return used < LOW_OVERLAP_VOCAB * n_vocab and used < LOW_OVERLAP_PANEL * max(panel, 0)


def _dataset(adata: AnnData, model: GeneToCell, counts_layer: str | None, min_genes: int) -> AnnDataCellDataset:
    ds = AnnDataCellDataset(adata, model.vocab, counts_layer=counts_layer, min_genes=min_genes)
    used, panel = ds.mappings[0].n_used, ds.mappings[0].n_panel
    n_vocab = len(model.config.genes)
    log.info("The model uses %d of the %d genes of this panel (model vocabulary: %d genes).",
             used, panel, n_vocab)
    if low_overlap(used, panel - ds.mappings[0].n_controls, n_vocab):
        log.warning(
            "The model uses only %d of the %d genes it knows (%.0f%%; %d of this panel's %d genes are in its "
            "vocabulary): latents from so few genes are unreliable. Expected at least %.0f%% of the model's "
            "genes or %.0f%% of the panel's. Embed with a model trained on this panel (xscale fit), or check "
            "that var_names hold the same gene symbols as the model's (e.g. %s).",
            used, n_vocab, 100 * used / max(n_vocab, 1), used, panel, 100 * LOW_OVERLAP_VOCAB,
            100 * LOW_OVERLAP_PANEL, list(model.config.genes[:5]),
        )
    empty = ds.empty_cells()
    if len(empty):
        log.warning(
            "%d of %d cells (e.g. %s) have no counts over the %d genes the model uses: their latents are "
            "those of an empty cell and carry no information. Filter them first "
            "(sc.pp.filter_cells(adata, min_counts=1), or on adata[:, genes the model knows]).",
            len(empty), adata.n_obs, list(map(str, adata.obs_names[empty[:3]])), used,
        )
    return ds


def _batches(ds: AnnDataCellDataset, model: GeneToCell, batch_size: int, seed: int,
             progress: bool = True) -> Iterator[tuple[int, CellBatch]]:
    """Batches in cell order. Panels longer than the model's context are cut per cell by
    :func:`~xscale.data.batch.inference_context` (a rule of the cell alone, so latents do not
    depend on ``batch_size``, cell order or ``seed``). A progress bar when ``progress`` and there
    are 20 batches or more."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    from tqdm.auto import tqdm

    starts = range(0, len(ds), batch_size)
    for start in tqdm(starts, desc="cells", unit="batch", disable=not progress or len(starts) < 20,
                      leave=False):
        items = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        yield start, collate_cells(items, max_genes=model.config.inference_context, deterministic=True)


def _device(model: GeneToCell) -> torch.device:
    return next(model.parameters()).device


def embed_cells(
    adata: AnnData,
    model: GeneToCell | str | os.PathLike,
    *,
    key_added: str = "X_xscale_cell",
    batch_size: int = 256,
    counts_layer: str | None = None,
    min_genes: int = 10,
    seed: int = 0,
    copy: bool = False,
    compile: bool = False,
    progress: bool = True,
) -> AnnData | None:
    """Embed every cell with a level-1 model.

    Parameters
    ----------
    adata
        Cells × genes with raw counts in ``X`` (or ``counts_layer``); var_names are gene symbols.
    model
        A trained :class:`~xscale.models.gene_to_cell.GeneToCell`, or the directory it was saved
        to (e.g. ``RUN/checkpoints/level1/model``; ``RUN/checkpoints`` also works).
    key_added
        ``obsm`` key written.
    batch_size
        Cells per forward pass.
    counts_layer
        Layer holding raw counts; None reads ``X``.
    min_genes
        Fewest panel genes the model must know; fewer raises :class:`~xscale.errors.XscaleInputError`.
    seed
        Kept for compatibility; does not change the result. Panels longer than the model's
        ``config.inference_context`` (``inference_max_genes``, else ``max_genes``) are cut per
        cell by :func:`~xscale.data.batch.inference_context` (expressed genes, the highest
        counts first, then zeros in a fixed order), so latents do not depend on ``batch_size``,
        cell order or the store's chunking.
    copy
        Return a modified copy instead of writing into ``adata``.
    compile
        Run the encoder through ``torch.compile`` (dynamic shapes). Pays a one-off compile
        (4-20 s on a CPU, measured) for faster batches: worth it for large datasets only
        (benchmarks/throughput.py: 1.58x cells/s on one CPU thread, median of 5 passes). Needs a
        C compiler.
    progress
        Show a progress bar (from 20 batches on).

    Returns
    -------
    None (or the copy if ``copy=True``). Writes ``adata.obsm[key_added]``: (n_cells, K·D)
    float32 cell latents, and ``adata.uns[key_added + "_params"]`` with ``genes_used``,
    ``panel_genes``, ``empty_cells`` (cells without counts over the genes used, embedded as
    empty cells; a warning names them) and ``latent_shape``.
    """
    model = as_level_model(model, 1, "embed_cells")
    adata = adata.copy() if copy else adata
    ds = _dataset(adata, model, counts_layer, min_genes)
    was_training = model.training
    model.eval()
    out = np.empty((adata.n_obs, model.config.embedding_dim), dtype=np.float32)
    device = _device(model)
    embed = torch.compile(model.embed, dynamic=True) if compile else model.embed
    with torch.inference_mode():
        for start, batch in _batches(ds, model, batch_size, seed, progress):
            b = batch.to(device)
            out[start : start + len(b)] = embed(b.gene_ids, b.values, b.pad_mask).float().cpu().numpy()
    model.train(was_training)
    adata.obsm[key_added] = out
    adata.uns[f"{key_added}_params"] = {
        "genes_used": int(ds.mappings[0].n_used),
        "panel_genes": int(ds.mappings[0].n_panel),
        "empty_cells": int(len(ds.empty_cells())),
        "latent_shape": [int(model.config.latents_per_cell), int(model.config.dim)],
    }
    return adata if copy else None


def reconstruct(
    adata: AnnData,
    model: GeneToCell | str | os.PathLike,
    *,
    layer_added: str = "xscale_expected",
    batch_size: int = 256,
    counts_layer: str | None = None,
    min_genes: int = 10,
    seed: int = 0,
    copy: bool = False,
    progress: bool = True,
) -> AnnData | None:
    """Decode each cell's latents back to expected counts.

    Each cell is encoded as in :func:`embed_cells` and decoded over *all* of its
    panel's genes known to the model, with the cell's total counts over those genes
    as library size.

    Parameters
    ----------
    adata, model, batch_size, counts_layer, min_genes, seed, copy, progress
        As for :func:`embed_cells`.
    layer_added
        ``layers`` key written.

    Returns
    -------
    None (or the copy). Writes ``adata.layers[layer_added]``: dense (n_cells, n_genes)
    float32 expected counts (NaN for genes the model does not know), and
    ``adata.var[layer_added + "_modelled"]`` (bool).
    """
    model = as_level_model(model, 1, "reconstruct")
    adata = adata.copy() if copy else adata
    ds = _dataset(adata, model, counts_layer, min_genes)
    mapping = ds.mappings[0]
    was_training = model.training
    model.eval()
    out = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
    device = _device(model)
    all_ids = torch.as_tensor(mapping.gene_ids, device=device)  # (G_known,)
    with torch.inference_mode():
        for start, batch in _batches(ds, model, batch_size, seed, progress):
            b = batch.to(device)
            latents = model.encode(b.gene_ids, b.values, b.pad_mask)  # (B, K, D)
            n = len(b)
            full_counts = np.stack([ds[i].counts for i in range(start, start + n)])  # (B, G_known)
            library = torch.as_tensor(full_counts.sum(1), device=device, dtype=latents.dtype)  # (B,)
            params = model.decode(latents, all_ids.expand(n, -1), library)  # over every known gene
            block = np.full((n, adata.n_vars), np.nan, dtype=np.float32)
            block[:, mapping.columns] = params.expected.float().cpu().numpy()
            out[start : start + n] = block
    model.train(was_training)
    adata.layers[layer_added] = out
    modelled = np.zeros(adata.n_vars, dtype=bool)
    modelled[mapping.columns] = True
    adata.var[f"{layer_added}_modelled"] = modelled
    return adata if copy else None
