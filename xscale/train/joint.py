"""Joint training of both levels: :class:`HierarchyModule`.

Each batch is B niches. Level 1 encodes every cell of every niche from its counts
(gene tokens), the level-1 latents fill the niche's cell tokens, and level 2 encodes,
compresses and decodes them. The loss sums

- level 1's own loss (auto-encoding / masked genes / denoising NB NLL) on those cells;
- level 2's reconstruction (+ masked-cell) loss of the cells' latents (targets detached,
  so level 1 is shaped by its counts, not pulled towards easily predicted latents);
- the NB NLL of each cell's counts decoded from level 2's *rebuilt* latents through the
  level-1 decoder: the tissue latents must carry what each cell expressed.

Both models may start from staged checkpoints (pass the loaded models).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from xscale.data.anndata_dataset import AnnDataCellDataset
from xscale.data.batch import CellBatch, collate_cells
from xscale.data.niches import Niches
from xscale.errors import XscaleInputError
from xscale.models.cell_to_tissue import CellToTissue
from xscale.models.gene_to_cell import GeneToCell
from xscale.train.optim import adamw_one_cycle
from xscale.train.resumable_data import RNG_KEY, ResumableLoader, restore_rng_state, rng_state

log = logging.getLogger(__name__)


@dataclass
class JointBatch:
    """B niches with the counts of their cells.

    cells: :class:`CellBatch` of the N real (non-padding) slots, in row-major (B, C)
    order; rel_xy (B, C, 2); pad_mask (B, C) True = pad.
    """

    cells: CellBatch
    rel_xy: Tensor
    pad_mask: Tensor

    def to(self, device: torch.device | str) -> JointBatch:
        return JointBatch(self.cells.to(device), self.rel_xy.to(device), self.pad_mask.to(device))


class JointNicheDataset(Dataset):
    """Niches whose cells are read as :class:`~xscale.data.batch.CellItem` s (counts)."""

    def __init__(self, cells: AnnDataCellDataset, niches: Niches, *, max_genes: int | None, seed: int = 0) -> None:
        self.cells, self.niches, self.max_genes = cells, niches, max_genes
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.niches)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, items: list[int]) -> JointBatch:
        rows = np.asarray(items, dtype=np.int64)
        idx = self.niches.idx[rows]  # (B, C)
        pad = self.niches.pad_mask[rows]
        cell_items = [self.cells[int(r)] for r in idx[~pad]]  # row-major over real slots
        return JointBatch(
            cells=collate_cells(cell_items, max_genes=self.max_genes, rng=self.rng),
            rel_xy=torch.from_numpy(self.niches.rel_xy[rows]),
            pad_mask=torch.from_numpy(pad),
        )

    def loader(self, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
        """Batches of niches; resumable (a checkpoint keeps the epoch's order and position and ``rng``)."""
        g = torch.Generator().manual_seed(seed)
        return ResumableLoader(self, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate, generator=g,
                               rng_owner=self)


@dataclass
class JointLoss:
    """Summed loss and its parts (scalars): level1, level2 (latent reconstruction), counts."""

    loss: Tensor
    level1: Tensor
    level2: Tensor
    counts: Tensor


class HierarchyModule(lightning.LightningModule):
    """Both levels trained together; ``loss = w1·level1 + w2·level2 + wc·counts``."""

    def __init__(
        self,
        level1: GeneToCell,
        level2: CellToTissue,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        w_level1: float = 1.0,
        w_level2: float = 1.0,
        w_counts: float = 1.0,
    ) -> None:
        super().__init__()
        width = level1.config.latents_per_cell * level1.config.dim
        if level2.config.in_dim != width:
            raise XscaleInputError(
                f"Level 2 expects in_dim={level2.config.in_dim} but level 1 emits K·D={width}; "
                "build the level-2 config with in_dim = level1 latents_per_cell × dim."
            )
        self.level1, self.level2 = level1, level2
        self.lr, self.weight_decay = lr, weight_decay
        self.w_level1, self.w_level2, self.w_counts = w_level1, w_level2, w_counts
        self.save_hyperparameters({
            "level1": level1.config, "level2": level2.config, "lr": lr, "weight_decay": weight_decay,
            "w_level1": w_level1, "w_level2": w_level2, "w_counts": w_counts,
        })

    def compute_loss(self, batch: JointBatch) -> JointLoss:
        cb, pad = batch.cells, batch.pad_mask
        l1 = self.level1.loss(cb)
        latents = self.level1.encode(cb.gene_ids, cb.values, cb.pad_mask)  # (N, K, D)
        b, c = pad.shape
        flat = latents.flatten(1)  # (N, K·D)
        tokens = flat.new_zeros(b, c, flat.shape[1])
        tokens[~pad] = flat  # (N, K·D) -> (B, C, K·D)
        l2 = self.level2.loss(tokens, batch.rel_xy, pad, target=tokens.detach())
        rebuilt = l2.recon[~pad].view_as(latents)  # (B, C, K·D) -> (N, K, D)
        counts = cb.counts.masked_fill(cb.pad_mask, 0.0)
        nb = self.level1.decode(rebuilt, cb.gene_ids, counts.sum(-1), cb.pad_mask)
        real = (~cb.pad_mask).to(counts.dtype)
        counts_nll = -(nb.log_prob(counts) * real).sum() / real.sum().clamp_min(1.0)
        total = self.w_level1 * l1.total + self.w_level2 * l2.loss + self.w_counts * counts_nll
        return JointLoss(loss=total, level1=l1.total, level2=l2.loss, counts=counts_nll)

    def training_step(self, batch: JointBatch, batch_idx: int) -> Tensor:
        out = self.compute_loss(batch)
        b = batch.pad_mask.shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=b)
        self.log("train/level1", out.level1, batch_size=b)
        self.log("train/level2", out.level2, batch_size=b)
        self.log("train/counts", out.counts, batch_size=b)
        return out.loss

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch.to(device) if isinstance(batch, JointBatch) else super().transfer_batch_to_device(
            batch, device, dataloader_idx
        )

    def configure_optimizers(self) -> Any:
        return adamw_one_cycle(self, self.trainer, lr=self.lr, weight_decay=self.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the global generators (level 1's masks, level 2's cell masks): a resumed run draws the same."""
        checkpoint[RNG_KEY] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_rng_state(checkpoint, "joint")


def fit_joint(
    adata: Any,
    level1: GeneToCell,
    level2: CellToTissue,
    *,
    train_cells: np.ndarray | None = None,
    slide_key: str | None = None,
    spatial_key: str = "spatial",
    radius: float | None = None,
    max_epochs: int = 5,
    max_steps: int = -1,
    batch_size: int = 16,
    lr: float = 5e-4,
    seed: int = 0,
    ckpt_dir: str | os.PathLike | None = None,
    accelerator: str = "cpu",
    progress: bool = True,
    max_genes: int | None = None,
) -> tuple[GeneToCell, CellToTissue]:
    """Train both levels jointly on niches centred on ``train_cells`` of ``adata``.

    Parameters
    ----------
    adata
        Raw counts in ``X``, coordinates in ``obsm[spatial_key]``.
    level1, level2
        Models to train (fresh, or loaded from staged checkpoints); trained in place.
    train_cells
        (B,) rows used as niche centres (default: all); neighbours come from the same slide.
    batch_size
        Niches per batch (each holds up to ``level2.config.max_cells`` cells).
    max_genes
        Gene context per cell (default: the level-1 config's ``max_genes``).
    ckpt_dir
        Lightning checkpoints; a re-run resumes from ``last.ckpt``.

    Returns
    -------
    (level1, level2) in eval mode.
    """
    from xscale.train.checkpointing import fit_resumable
    from xscale.train.level2 import make_niches, niche_centres
    from xscale.train.quiet import log_interval, quiet_fit

    if spatial_key not in adata.obsm:
        raise XscaleInputError(f"spatial_key {spatial_key!r} not found in adata.obsm. Available: {sorted(adata.obsm)}.")
    lightning.seed_everything(seed, workers=True, verbose=False)
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
    if slide_key is not None:
        from xscale.data.validate import check_slides

        check_slides(adata, slide_key)
    slides = adata.obs[slide_key].astype(str).to_numpy() if slide_key is not None else None
    centres = niche_centres(train_cells, adata.n_obs)
    niches = make_niches(coords, centres, max_cells=level2.config.max_cells, slides=slides, radius=radius)
    cells = AnnDataCellDataset(adata, level1.vocab, slide_key=slide_key)
    data = JointNicheDataset(cells, niches, max_genes=max_genes or level1.config.max_genes, seed=seed)
    module = HierarchyModule(level1.train(), level2.train(), lr=lr)
    ckpt = Path(ckpt_dir) if ckpt_dir is not None else None
    kwargs: dict[str, Any] = dict(
        max_epochs=max_epochs, max_steps=max_steps, accelerator=accelerator, devices=1,
        logger=lightning.pytorch.loggers.CSVLogger(str(ckpt), name="logs") if ckpt else False,
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=1.0,
    )
    loader = data.loader(batch_size, shuffle=True, seed=seed)
    kwargs["log_every_n_steps"] = log_interval(len(loader), 10)
    if ckpt is not None:
        fit_resumable(module, train_dataloaders=loader, ckpt_dir=ckpt, trainer_kwargs=kwargs)
    else:
        with quiet_fit():
            lightning.Trainer(**kwargs, enable_checkpointing=False).fit(module, train_dataloaders=loader)
    return module.level1.cpu().eval(), module.level2.cpu().eval()
