"""The level-1 item and batch format shared by in-memory and streaming datasets.

A dataset yields :class:`CellItem` (one cell: the vocabulary ids of its panel genes
and their raw counts). :func:`collate_cells` pads a list of items into a
:class:`CellBatch` of tensors, choosing a gene context when a panel is longer than
``max_genes`` (all expressed genes first, then zeros): sampled at random for training
(:func:`sample_context`), by a fixed rule of the cell alone at inference
(:func:`inference_context`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from xscale.data.transforms import log_normalize


@dataclass
class CellItem:
    """One cell. gene_ids (g,) int64 vocabulary ids; counts (g,) float32 raw counts."""

    gene_ids: np.ndarray
    counts: np.ndarray
    index: int  # row of the cell in its source (store or AnnData)
    dataset: int = 0  # which dataset of a multi-dataset run
    slide: int = 0  # slide code within the dataset


@dataclass
class CellBatch:
    """Padded level-1 batch.

    gene_ids (B, G) long, counts (B, G) float raw counts, values (B, G) float
    log-normalised input, pad_mask (B, G) bool (True = padding), library (B,) float
    total counts over the whole panel (not only the sampled context), index (B,)
    long, dataset (B,) long, slide (B,) long.
    """

    gene_ids: torch.Tensor
    counts: torch.Tensor
    values: torch.Tensor
    pad_mask: torch.Tensor
    library: torch.Tensor
    index: torch.Tensor
    dataset: torch.Tensor
    slide: torch.Tensor

    def to(self, device: torch.device | str) -> CellBatch:
        return CellBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.gene_ids.shape[0]


def thin_batch(batch: CellBatch, min_keep: float, *, generator: torch.Generator | None = None) -> CellBatch:
    """The batch as if captured less efficiently: augmentation for fine-tuning on few labelled cells.

    Each cell keeps each of its molecules with a probability drawn uniformly from
    ``[min_keep, 1]`` for that cell (binomial thinning), and its input values are
    log-normalised again. ``library`` shrinks with the thinned counts; molecules of genes
    outside a sampled context (panels longer than ``max_genes``) are not in the batch, so
    their share of the library is scaled by the cell's keep probability (its expectation).
    Padding stays zero; ids, masks and labels are unchanged.
    """
    if not 0.0 < min_keep <= 1.0:
        raise ValueError(f"min_keep: expected a keep fraction in (0, 1], found {min_keep}.")
    b = len(batch)
    u = torch.rand(b, 1, generator=generator, dtype=batch.counts.dtype)  # (B, 1)
    keep = min_keep + (1.0 - min_keep) * u  # (B, 1) per-cell keep probability
    counts = torch.binomial(batch.counts, keep.expand_as(batch.counts), generator=generator)  # (B, G)
    outside = (batch.library - batch.counts.sum(dim=1)).clamp_min(0.0)  # (B,) counts not in the context
    library = counts.sum(dim=1) + outside * keep[:, 0]  # (B,)
    values = log_normalize(counts, library).masked_fill(batch.pad_mask, 0.0)
    return CellBatch(gene_ids=batch.gene_ids, counts=counts, values=values, pad_mask=batch.pad_mask,
                     library=library, index=batch.index, dataset=batch.dataset, slide=batch.slide)


def sample_context(counts: np.ndarray, max_genes: int, rng: np.random.Generator) -> np.ndarray:
    """Positions to keep for a panel longer than ``max_genes``: expressed genes first, then zeros.

    If more than ``max_genes`` genes are expressed, a random subset of them is kept.
    Returns sorted positions (≤ max_genes,) int64.
    """
    if counts.shape[0] <= max_genes:
        return np.arange(counts.shape[0])
    expressed = np.flatnonzero(counts > 0)
    zeros = np.flatnonzero(counts == 0)
    if expressed.size >= max_genes:
        keep = rng.choice(expressed, size=max_genes, replace=False)
    else:
        keep = np.concatenate([expressed, rng.choice(zeros, size=max_genes - expressed.size, replace=False)])
    return np.sort(keep)


def panel_order(gene_ids: np.ndarray) -> np.ndarray:
    """The fixed pseudo-random order of a panel's positions used by :func:`inference_context`.

    Positions are ordered by a bijective hash (splitmix64) of their genes' vocabulary ids:
    the same in every process and run, and the same genes get the same order whatever their
    column order in the panel. gene_ids (G,) -> (G,) int64, a permutation of ``range(G)``.
    """
    x = np.asarray(gene_ids).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return np.argsort(x, kind="stable").astype(np.int64)


def inference_context(counts: np.ndarray, max_genes: int, order: np.ndarray) -> np.ndarray:
    """Positions to keep at inference for a panel longer than ``max_genes``: a rule of the cell alone.

    Unlike :func:`sample_context` (training), nothing random and nothing outside the cell's own
    counts (batch, position in a stream, generator) changes the result. Every expressed gene is
    kept if they fit; otherwise the ``max_genes`` with the highest counts, ties broken by
    ``order``. Remaining places are filled with unexpressed genes taken in ``order``
    (:func:`panel_order` of the panel's gene ids), which spreads them over the panel rather
    than its first genes. counts (G,) raw counts, order (G,) a permutation of ``range(G)``.
    Returns sorted positions (min(G, max_genes),) int64; a panel that fits is kept whole.
    """
    g = counts.shape[0]
    if g <= max_genes:
        return np.arange(g)
    rank = np.empty(g, dtype=np.int64)
    rank[order] = np.arange(g)  # rank[p]: where position p comes in the fixed order
    best = np.lexsort((rank, -np.asarray(counts, dtype=np.float64)))  # highest count first, then fixed order
    return np.sort(best[:max_genes])


def collate_cells(
    items: list[CellItem], *, max_genes: int | None = None, rng: np.random.Generator | None = None,
    deterministic: bool = False,
) -> CellBatch:
    """Pad items to the longest (context-limited) panel in the batch. -> CellBatch with G = that length.

    Panels longer than ``max_genes`` are cut to a gene context: drawn with ``rng``
    (:func:`sample_context`, training), or with ``deterministic=True`` (embedding, decoding)
    by :func:`inference_context`, so a cell's context, and its latents, do not depend on the
    batch it is in, its position or a seed (``rng`` is then unused).
    """
    if not deterministic:
        rng = rng if rng is not None else np.random.default_rng()
    libraries = np.array([it.counts.sum() for it in items], dtype=np.float32)
    chosen = []
    orders: dict[int, np.ndarray] = {}  # one panel_order per panel (items of a panel share gene_ids)
    for it in items:
        n = it.counts.shape[0]
        if not max_genes or n <= max_genes:
            pos = np.arange(n)
        elif deterministic:
            order = orders.get(id(it.gene_ids))
            if order is None:
                order = orders[id(it.gene_ids)] = panel_order(it.gene_ids)
            pos = inference_context(it.counts, max_genes, order)
        else:
            pos = sample_context(it.counts, max_genes, rng)
        chosen.append((it.gene_ids[pos], it.counts[pos]))
    g = max(len(ids) for ids, _ in chosen)
    b = len(items)
    gene_ids = np.zeros((b, g), dtype=np.int64)
    counts = np.zeros((b, g), dtype=np.float32)
    pad = np.ones((b, g), dtype=bool)
    for i, (ids, cnt) in enumerate(chosen):
        gene_ids[i, : len(ids)] = ids
        counts[i, : len(ids)] = cnt
        pad[i, : len(ids)] = False
    counts_t = torch.from_numpy(counts)
    library_t = torch.from_numpy(libraries)
    return CellBatch(
        gene_ids=torch.from_numpy(gene_ids),
        counts=counts_t,
        values=log_normalize(counts_t, library_t).masked_fill(torch.from_numpy(pad), 0.0),
        pad_mask=torch.from_numpy(pad),
        library=library_t,
        index=torch.tensor([it.index for it in items], dtype=torch.long),
        dataset=torch.tensor([it.dataset for it in items], dtype=torch.long),
        slide=torch.tensor([it.slide for it in items], dtype=torch.long),
    )
