"""Level-2 training: niches of level-1 latents → :class:`~xscale.models.cell_to_tissue.CellToTissue`.

- :class:`NicheDataset`: in-memory niches (centre + nearest neighbours, padded) over a
  latent matrix (n, K·D); batches are :class:`NicheBatch`.
- :class:`TissueModule`: the LightningModule (optimiser, logging) around the model.
- :class:`NicheDataModule`: train / validation loaders over niche datasets.
- :func:`fit_level2`: build niches of the training cells and fit, resumably.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from xscale.data.niches import Niches, build_niches, slide_scales, spatial_graph
from xscale.errors import XscaleInputError
from xscale.models.cell_to_tissue import CellToTissue, CellToTissueConfig
from xscale.train.optim import adamw_one_cycle
from xscale.train.resumable_data import RNG_KEY, ResumableLoader, restore_rng_state, rng_state

log = logging.getLogger(__name__)


@dataclass
class NicheBatch:
    """A batch of niches. cell_latents (B, C, K·D), rel_xy (B, C, 2), pad_mask (B, C) True = pad,
    cells (B, C) int64 rows of the cells (-1 = pad; column 0 = centre)."""

    cell_latents: Tensor
    rel_xy: Tensor
    pad_mask: Tensor
    cells: Tensor

    def to(self, device: torch.device | str) -> NicheBatch:
        return NicheBatch(*(t.to(device) for t in (self.cell_latents, self.rel_xy, self.pad_mask, self.cells)))


def make_niches(
    coords: np.ndarray,
    centres: np.ndarray,
    *,
    max_cells: int,
    slides: np.ndarray | None = None,
    radius: float | None = None,
) -> Niches:
    """Niches of ``centres``: the nearest ``max_cells - 1`` neighbours in the same slide.

    coords (n, 2), centres (B,) rows, slides (n,) or None. ``radius`` (in median
    nearest-neighbour distances) keeps only neighbours within it. Returns
    :class:`~xscale.data.niches.Niches` with idx (B, C), rel_xy (B, C, 2), pad_mask (B, C).
    """
    graph = spatial_graph(coords, slides=slides, n_neighbors=max(max_cells - 1, 1), radius=radius)
    scale = slide_scales(coords, slides)
    return build_niches(graph, coords, centres, max_cells=max_cells, slides=slides, scale=scale)


class NicheDataset(Dataset):
    """Niches over an in-memory latent matrix. Item i -> (idx (C,), rel_xy (C, 2), pad (C,)).

    latents (n, K·D) float32, shared by all items; gathered in :meth:`collate`.
    """

    def __init__(self, latents: np.ndarray, niches: Niches) -> None:
        latents = np.ascontiguousarray(latents, dtype=np.float32)
        if latents.ndim != 2:
            raise XscaleInputError(f"latents: expected a (n_cells, K·D) matrix, found shape {latents.shape}.")
        self.latents = torch.from_numpy(latents)
        self.idx = torch.from_numpy(niches.idx)
        self.rel_xy = torch.from_numpy(niches.rel_xy)
        self.pad_mask = torch.from_numpy(niches.pad_mask)

    def __len__(self) -> int:
        return self.idx.shape[0]

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, items: list[int]) -> NicheBatch:
        rows = torch.as_tensor(items, dtype=torch.long)
        idx = self.idx[rows]  # (B, C)
        pad = self.pad_mask[rows]
        lat = self.latents[idx.clamp_min(0)]  # (B, C) -> (B, C, K·D)
        lat = lat.masked_fill(pad[..., None], 0.0)
        return NicheBatch(cell_latents=lat, rel_xy=self.rel_xy[rows], pad_mask=pad, cells=idx)

    def loader(self, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
        """Batches of niches; resumable (a checkpoint keeps the epoch's order and position)."""
        g = torch.Generator().manual_seed(seed)
        return ResumableLoader(self, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate, generator=g)


class TissueModule(lightning.LightningModule):
    """LightningModule around :class:`CellToTissue`: AdamW, cosine decay, logs the loss parts."""

    def __init__(self, model: CellToTissue, *, lr: float = 1e-3, weight_decay: float = 1e-2) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.save_hyperparameters({"config": model.config, "lr": lr, "weight_decay": weight_decay})

    def training_step(self, batch: NicheBatch, batch_idx: int) -> Tensor:
        out = self.model.loss(batch.cell_latents, batch.rel_xy, batch.pad_mask)
        b = batch.pad_mask.shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=b)
        self.log("train/reconstruction", out.reconstruction, batch_size=b)
        self.log("train/masked", out.masked, batch_size=b)
        if self.model.composition is not None:
            self.log("train/composition", out.composition, batch_size=b)
        return out.loss

    def validation_step(self, batch: NicheBatch, batch_idx: int) -> None:
        out = self.model.loss(batch.cell_latents, batch.rel_xy, batch.pad_mask, mask=False)
        self.log("val/reconstruction", out.reconstruction, prog_bar=True, batch_size=batch.pad_mask.shape[0])

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch.to(device) if isinstance(batch, NicheBatch) else super().transfer_batch_to_device(
            batch, device, dataloader_idx
        )

    def configure_optimizers(self) -> Any:
        return adamw_one_cycle(self, self.trainer, lr=self.lr, weight_decay=self.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the global generators (the cell masks draw from them): a resumed run draws what this one would."""
        checkpoint[RNG_KEY] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_rng_state(checkpoint, "level-2")


class NicheDataModule(lightning.LightningDataModule):
    """Loaders over in-memory :class:`NicheDataset` s (train shuffled, validation in order)."""

    def __init__(
        self, train: NicheDataset, *, val: NicheDataset | None = None, batch_size: int = 64, seed: int = 0
    ) -> None:
        super().__init__()
        self.train, self.val, self.batch_size, self.seed = train, val, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        return self.train.loader(self.batch_size, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val is None else self.val.loader(self.batch_size, shuffle=False)


def fit_level2(
    latents: np.ndarray,
    coords: np.ndarray,
    *,
    config: CellToTissueConfig | None = None,
    preset: Literal["tiny", "small", "base"] = "small",
    train_cells: np.ndarray | None = None,
    slides: np.ndarray | None = None,
    radius: float | None = None,
    max_epochs: int = 20,
    max_steps: int = -1,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    ckpt_dir: str | os.PathLike | None = None,
    accelerator: str = "cpu",
    progress: bool = True,
) -> CellToTissue:
    """Fit a level-2 model on niches centred on ``train_cells``.

    Parameters
    ----------
    latents
        (n, K·D) level-1 latents of every cell (e.g. ``adata.obsm["X_xscale_cell"]``).
    coords
        (n, 2) spatial coordinates (any unit: niches use the slide's median NN distance).
    config, preset
        The model config; when None, ``CellToTissueConfig.preset(preset, in_dim=K·D)``.
    train_cells
        (B,) rows used as niche centres (default: all). Neighbours may be any cell of the
        same slide, so pass whole slides when holding slides out.
    slides
        (n,) slide of each cell (no niche crosses slides); None = one slide.
    radius
        Optional neighbour radius in median NN distances (default: k nearest only).
    max_epochs, max_steps, batch_size, lr, seed
        Training budget and optimiser settings.
    ckpt_dir
        Where Lightning checkpoints go; a re-run resumes from ``last.ckpt`` there.

    Returns
    -------
    The trained :class:`CellToTissue` in eval mode.
    """
    latents = np.asarray(latents, dtype=np.float32)
    coords = np.asarray(coords, dtype=np.float64)
    if latents.shape[0] != coords.shape[0]:
        raise XscaleInputError(
            f"latents has {latents.shape[0]} rows but coords has {coords.shape[0]}; both need one row per cell."
        )
    bad = ~np.isfinite(latents).all(axis=1)
    if bad.any():
        raise XscaleInputError(
            f"latents: expected finite values, found NaN/inf in {int(bad.sum())} cells (rows e.g. "
            f"{np.flatnonzero(bad)[:5].tolist()}); they would make every weight NaN. Drop those cells or re-embed them."
        )
    if config is None:
        config = CellToTissueConfig.preset(preset, in_dim=latents.shape[1])
    lightning.seed_everything(seed, workers=True, verbose=False)
    centres = niche_centres(train_cells, latents.shape[0])
    niches = make_niches(coords, centres, max_cells=config.max_cells, slides=slides, radius=radius)
    data = NicheDataModule(NicheDataset(latents, niches), batch_size=batch_size, seed=seed)
    model = CellToTissue(config)
    model.set_latent_scaling(torch.from_numpy(latents[np.unique(centres)]))
    log.info("Level 2: %d niches of <= %d cells, in_dim %d", len(niches), config.max_cells, config.in_dim)
    return train_tissue(TissueModule(model, lr=lr), data, ckpt_dir=ckpt_dir, max_epochs=max_epochs,
                        max_steps=max_steps, accelerator=accelerator, progress=progress)


def niche_centres(train_cells: np.ndarray | None, n: int) -> np.ndarray:
    """Rows (k,) int64 of the niche centres to train on: all ``n`` cells for None; a boolean mask
    (n,) or row numbers otherwise (a boolean mask was read as rows 0 and 1)."""
    if train_cells is None:
        return np.arange(n)
    cells = np.asarray(train_cells)
    if cells.dtype == bool:
        if cells.shape != (n,):
            raise XscaleInputError(f"train_cells: a boolean mask needs one value per cell ({n}), found {cells.shape}.")
        centres = np.flatnonzero(cells)
    else:
        if cells.size and (cells.dtype.kind not in "iu" or cells.min() < 0 or cells.max() >= n):
            raise XscaleInputError(f"train_cells: expected a boolean mask or row numbers in [0, {n}), found "
                                   f"{cells.dtype} values {cells[:5].tolist()}....")
        centres = cells.astype(np.int64)
    if centres.size == 0:
        raise XscaleInputError("train_cells is empty: level 2 needs at least one niche centre to train on.")
    return centres


def train_tissue(
    module: TissueModule,
    data: lightning.LightningDataModule,
    *,
    ckpt_dir: str | os.PathLike | None,
    max_epochs: int,
    max_steps: int,
    accelerator: str,
    progress: bool,
) -> CellToTissue:
    """Fit a :class:`TissueModule` on any level-2 DataModule (in-memory or streamed).

    With ``ckpt_dir`` the fit resumes from ``last.ckpt`` there and logs CSV beside it.
    Returns the trained model in eval mode.
    """
    from xscale.train.checkpointing import fit_resumable
    from xscale.train.quiet import loop_defaults, quiet_fit

    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
    trainer_kwargs: dict[str, Any] = dict(
        max_epochs=max_epochs,
        max_steps=max_steps,
        accelerator=accelerator,
        devices=1,
        logger=lightning.pytorch.loggers.CSVLogger(str(ckpt_dir), name="logs") if ckpt_dir else False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        **loop_defaults(data),
    )
    if ckpt_dir is not None:
        fit_resumable(module, datamodule=data, ckpt_dir=ckpt_dir, trainer_kwargs=trainer_kwargs)
    else:
        with quiet_fit():
            lightning.Trainer(**trainer_kwargs, enable_checkpointing=False).fit(module, datamodule=data)
    return module.model.eval()
