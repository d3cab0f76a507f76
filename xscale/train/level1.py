"""Training level 1 (genes -> cells) with Lightning.

- :class:`GeneCellModule` receives a :class:`~xscale.models.gene_to_cell.GeneToCell`,
  owns the optimiser (AdamW, linear warm-up + cosine decay) and logs train/val losses.
- :class:`CellDataModule` wraps any dataset yielding :class:`~xscale.data.batch.CellItem`
  (the in-memory :class:`~xscale.data.anndata_dataset.AnnDataCellDataset`, or the
  streaming ``CellStream``); :meth:`CellDataModule.from_adatas` builds one over one or
  several AnnData objects with a random validation split.
- :func:`fit_level1` is the one-call entry point: data -> trained, saved model.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from xscale.data.anndata_dataset import AnnDataCellDataset, vocab_from_adatas
from xscale.data.batch import CellBatch, CellItem, collate_cells
from xscale.data.stream import EpochCounter, EpochLoader
from xscale.data.vocab import GeneVocab
from xscale.errors import XscaleInputError
from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
from xscale.models.io import save_model
from xscale.train.quiet import loop_defaults
from xscale.train.resumable_data import RNG_KEY, ResumableLoader, apply_generator_state, restore_rng_state, rng_state

log = logging.getLogger(__name__)

LoggerName = Literal["csv", "tensorboard", "none"]


class GeneCellModule(lightning.LightningModule):
    """LightningModule around a :class:`GeneToCell` network.

    Parameters
    ----------
    model
        The network (built by the caller from its config).
    lr, weight_decay
        AdamW settings.
    warmup_fraction
        Fraction of the run spent warming the learning rate up linearly; the rest
        decays along a cosine to 10 % of ``lr``.
    seed
        Seed of the generator drawing masks and thinning inside the loss.
    """

    def __init__(
        self, model: GeneToCell, *, lr: float = 2e-3, weight_decay: float = 0.01, warmup_fraction: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if lr <= 0 or weight_decay < 0 or not 0 <= warmup_fraction < 1:
            raise ValueError(f"Invalid optimiser settings lr={lr}, weight_decay={weight_decay}, "
                             f"warmup_fraction={warmup_fraction}.")
        self.model = model
        self.lr, self.weight_decay, self.warmup_fraction = lr, weight_decay, warmup_fraction
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._saved_generator: dict[str, Any] | None = None  # from a checkpoint, applied when the generator is made
        self.save_hyperparameters({"lr": lr, "weight_decay": weight_decay, "warmup_fraction": warmup_fraction,
                                   "seed": seed, "model_config": model.config})

    def _gen(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed + 1000 * self.global_rank)
            saved, self._saved_generator = self._saved_generator, None
            apply_generator_state(self._generator, saved, "level-1 masking")
        return self._generator

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the masking/thinning generator (and the global ones): a resumed run draws what this one would."""
        gen = self._generator
        if gen is None and self._saved_generator is not None:  # restored but not used yet: keep it as it was
            checkpoint[RNG_KEY] = {**rng_state(), "generators": {"mask": self._saved_generator}}
            return
        checkpoint[RNG_KEY] = rng_state({"mask": gen})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._saved_generator = restore_rng_state(checkpoint, "level-1").get("mask")
        self._generator = None  # made afresh on the next batch, from the saved state

    def training_step(self, batch: CellBatch, batch_idx: int) -> torch.Tensor:
        out = self.model.loss(batch, generator=self._gen(batch.counts.device))
        b = len(batch)
        self.log("train/loss", out.total, prog_bar=True, batch_size=b)
        for part in ("autoencode", "masked", "denoise", "readout"):
            self.log(f"train/{part}", getattr(out, part), batch_size=b)
        return out.total

    def validation_step(self, batch: CellBatch, batch_idx: int) -> None:
        g = torch.Generator(device=batch.counts.device).manual_seed(self.seed + batch_idx)  # same masks every epoch
        out = self.model.loss(batch, generator=g)
        b = len(batch)
        self.log("val/loss", out.total, prog_bar=True, batch_size=b, sync_dist=True)
        self.log("val/autoencode", out.autoencode, batch_size=b, sync_dist=True)

    def transfer_batch_to_device(self, batch: CellBatch, device: torch.device, dataloader_idx: int) -> CellBatch:
        return batch.to(device)

    def configure_optimizers(self) -> dict[str, Any]:
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and p.requires_grad]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2 and p.requires_grad]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = max(int(self.warmup_fraction * total), 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class CollateCells:
    """Picklable collate: ``collate_cells`` with a context limit and a seeded generator.

    In a DataLoader worker the generator is re-seeded from (seed, worker id) on first use:
    each worker is a copy of this object, and with one generator state they would all
    draw the same gene contexts. ``fixed=True`` (validation) seeds each batch from its first
    cells instead, so a panel longer than ``max_genes`` is scored on the same contexts every
    epoch and the validation loss moves only with the model.
    """

    def __init__(self, max_genes: int | None, seed: int = 0, *, fixed: bool = False) -> None:
        self.max_genes, self.seed, self.fixed = max_genes, seed, fixed
        self.rng = np.random.default_rng(seed)
        self._worker: int | None = None

    def __call__(self, items: list[CellItem]) -> CellBatch:
        from torch.utils.data import get_worker_info

        if self.fixed:  # validation: each batch's contexts depend on its cells only, the same every epoch
            key = [self.seed, *(int(it.dataset) for it in items[:1]), *(int(it.index) for it in items[:2]), len(items)]
            return collate_cells(items, max_genes=self.max_genes, rng=np.random.default_rng(key))
        info = get_worker_info()
        if info is not None and self._worker != info.id:
            self._worker = info.id
            self.rng = np.random.default_rng([self.seed, info.id])
        return collate_cells(items, max_genes=self.max_genes, rng=self.rng)


class CellDataModule(lightning.LightningDataModule):
    """DataModule over any dataset(s) yielding :class:`CellItem`.

    Parameters
    ----------
    train_dataset
        Map-style or iterable dataset of CellItems (``AnnDataCellDataset``, ``CellStream``, ...),
        or a batched ``CellStream(batch_size=B, max_genes=...)``, which yields ready CellBatches
        built per block with array operations (the fast path for stores; its ``max_genes`` must
        equal this DataModule's, and its ``batch_size`` replaces ``batch_size`` here).
    val_dataset
        Optional validation dataset of CellItems (or a batched ``CellStream``).
    max_genes
        Gene context per cell (longer panels are sampled: expressed genes first).
    batch_size, num_workers, seed
        DataLoader settings; map-style training data is shuffled with ``seed``.
    """

    def __init__(
        self,
        train_dataset: Dataset,
        val_dataset: Dataset | None = None,
        *,
        max_genes: int | None = 512,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise XscaleInputError(f"batch_size must be >= 1; got {batch_size}.")
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.max_genes, self.batch_size, self.num_workers, self.seed = max_genes, batch_size, num_workers, seed
        self._epoch = EpochCounter(self)  # stream epochs: the trainer's, or a count of loaders made

    @classmethod
    def from_adatas(
        cls,
        adatas,
        vocab: GeneVocab,
        *,
        val_fraction: float = 0.1,
        counts_layer: str | None = None,
        slide_key: str | None = None,
        min_genes: int = 10,
        max_genes: int | None = 512,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> CellDataModule:
        """In-memory DataModule over one or several AnnData objects; a random ``val_fraction`` of each validates."""
        adatas = [adatas] if not isinstance(adatas, (list, tuple)) else list(adatas)
        if not 0.0 <= val_fraction < 1.0:
            raise XscaleInputError(f"val_fraction must be in [0, 1); got {val_fraction}.")
        rng = np.random.default_rng(seed)
        train_sel, val_sel = [], []
        for a in adatas:
            is_val = rng.random(a.n_obs) < val_fraction
            train_sel.append(np.flatnonzero(~is_val))
            val_sel.append(np.flatnonzero(is_val))
        kw = dict(counts_layer=counts_layer, slide_key=slide_key, min_genes=min_genes)
        train = AnnDataCellDataset(adatas, vocab, cells=train_sel, **kw)
        n_val = sum(len(v) for v in val_sel)
        # the same panels as the training cells': their gene report was just logged
        val = AnnDataCellDataset(adatas, vocab, cells=val_sel, report_panel=False, **kw) if n_val > 0 else None
        log.info("Level-1 data: %d training cells, %d validation cells, %d dataset(s), genes used %s",
                 len(train), n_val, len(adatas), train.genes_used)
        return cls(train, val, max_genes=max_genes, batch_size=batch_size, num_workers=num_workers, seed=seed)

    def _batched(self, dataset: Dataset | None, name: str) -> bool:
        """True for a stream yielding ready CellBatches (``CellStream(batch_size=...)``); checks its context."""
        if getattr(dataset, "batch_size", None) is None:
            return False
        if dataset.max_genes != self.max_genes:
            raise XscaleInputError(
                f"{name}: the batched CellStream builds batches with max_genes={dataset.max_genes}, the "
                f"DataModule's max_genes is {self.max_genes}; pass the same value to both."
            )
        return True

    def train_dataloader(self) -> DataLoader:
        iterable = isinstance(self.train_dataset, IterableDataset)
        if iterable and hasattr(self.train_dataset, "set_epoch"):  # a stream: new block order every epoch
            if self._batched(self.train_dataset, "train_dataset"):  # batches come ready from the stream
                return EpochLoader(self.train_dataset, epoch=self._epoch, batch_size=None,
                                   num_workers=self.num_workers)
            return EpochLoader(self.train_dataset, epoch=self._epoch, batch_size=self.batch_size,
                               collate_fn=CollateCells(self.max_genes, self.seed), num_workers=self.num_workers)
        collate = CollateCells(self.max_genes, self.seed)
        if iterable:
            return DataLoader(self.train_dataset, batch_size=self.batch_size, collate_fn=collate,
                              num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        # resumable: a checkpoint keeps the epoch's order, position and gene-context generator
        return ResumableLoader(
            self.train_dataset, batch_size=self.batch_size, shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            drop_last=len(self.train_dataset) > self.batch_size, collate_fn=collate, rng_owner=collate,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        if self._batched(self.val_dataset, "val_dataset"):
            return DataLoader(self.val_dataset, batch_size=None, num_workers=self.num_workers,
                              persistent_workers=self.num_workers > 0)
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False,
                          collate_fn=CollateCells(self.max_genes, self.seed + 1, fixed=True),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


def fit_level1(
    adatas,
    config: GeneToCellConfig | str = "small",
    *,
    out_dir: str | os.PathLike,
    max_epochs: int | None = None,
    max_steps: int = -1,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    val_fraction: float = 0.1,
    counts_layer: str | None = None,
    slide_key: str | None = None,
    min_genes: int = 10,
    logger: LoggerName = "csv",
    log_dir: str | os.PathLike | None = None,
    accelerator: str = "auto",
    enable_progress_bar: bool = True,
    checkpoint_every_n_steps: int = 200,
    trainer_kwargs: dict[str, Any] | None = None,
    num_workers: int = 0,
) -> GeneToCell:
    """Train a level-1 model on one or several AnnData objects, or streamed from a store, and save it.

    Parameters
    ----------
    adatas
        AnnData or sequence of AnnData with raw counts (different panels allowed), or a store
        written by ``xscale prepare`` (path or :class:`~xscale.data.store.CellStore`): its cells are
        streamed block by block, never loaded whole (:func:`~xscale.train.level1_store.store_data`), and
        the input standardisation comes from a sample of up to 50,000 training cells
        (``level1_store.STORE_STATS_CELLS``).
    config
        A :class:`GeneToCellConfig`, or a preset name ("tiny", "small", "base") built
        on the union of the panels' genes.
    out_dir
        Run directory: the model goes to ``out_dir/"model"`` (:func:`save_model`),
        resumable checkpoints to ``out_dir/"checkpoints"`` (re-running resumes),
        logs to ``log_dir`` (default ``out_dir/"logs"``).
    max_epochs, max_steps
        Training length (Lightning semantics); if neither is given, 20 epochs.
    batch_size, lr, weight_decay, seed, val_fraction
        Cells per batch, peak AdamW learning rate, AdamW weight decay (on weight matrices and
        embedding tables; not on biases or norms), global seed, held-out validation fraction.
    counts_layer, slide_key, min_genes
        Where the raw counts are, which obs column names the slide, and how many of a
        panel's genes must be in the vocabulary (a store has its counts and slides already).
    num_workers
        DataLoader worker processes (0 = in the training process).
    logger
        "csv", "tensorboard" or "none".
    accelerator, enable_progress_bar, trainer_kwargs
        Passed to ``lightning.Trainer`` (``trainer_kwargs`` e.g. ``{"max_time": "00:00:03:00"}``).

    Returns
    -------
    The trained :class:`GeneToCell` in eval mode on the CPU.
    """
    from xscale.train.checkpointing import fit_resumable
    from xscale.train.level1_store import store_data, store_gene_stats

    store = _as_store(adatas)
    if store is None:
        adatas = [adatas] if not isinstance(adatas, (list, tuple)) else list(adatas)
    if isinstance(config, str):
        vocab = GeneVocab.union([store.genes]) if store is not None else vocab_from_adatas(adatas)
        config = GeneToCellConfig.preset(config, genes=vocab.genes)  # type: ignore[arg-type]
    from xscale.utils.atomic import make_output_dir

    out_dir = make_output_dir(out_dir)  # a file there: a clear error before any work
    lightning.seed_everything(seed, workers=True, verbose=False)
    model = GeneToCell(config)
    vocab = model.vocab
    if store is not None:
        dm = store_data(store, vocab, val_fraction=val_fraction, max_genes=config.max_genes, batch_size=batch_size,
                        min_genes=min_genes, num_workers=num_workers, seed=seed)
    else:
        dm = CellDataModule.from_adatas(
            adatas, vocab, val_fraction=val_fraction, counts_layer=counts_layer, slide_key=slide_key,
            min_genes=min_genes, max_genes=config.max_genes, batch_size=batch_size, num_workers=num_workers,
            seed=seed,
        )
    needs_stats = config.standardize_values or config.decoder_gene_bias
    stats = None
    if needs_stats and store is not None:  # data-derived starting points
        stats = store_gene_stats(store, vocab, rows=dm.train_dataset.rows_per_chunk.rows, seed=seed)
    elif needs_stats and hasattr(dm.train_dataset, "gene_stats"):
        stats = dm.train_dataset.gene_stats()
    if stats is not None:
        ids, share, v_mean, v_std = (torch.from_numpy(a) for a in stats)
        model.init_gene_bias(ids, share)
        model.init_value_scaling(ids, v_mean, v_std)
    elif needs_stats:
        log.warning("The training data gives no per-gene statistics: standardize_values / decoder_gene_bias "
                    "start from mean 0, sd 1, offset 0.")
    module = GeneCellModule(model, lr=lr, weight_decay=weight_decay, seed=seed)
    if max_epochs is None and max_steps == -1:
        max_epochs = 20
    kwargs: dict[str, Any] = dict(
        max_epochs=max_epochs, max_steps=max_steps, accelerator=accelerator, devices=1,
        logger=_make_logger(logger, Path(log_dir) if log_dir is not None else out_dir / "logs"),
        enable_progress_bar=enable_progress_bar, enable_model_summary=False,
        num_sanity_val_steps=0, gradient_clip_val=1.0, **loop_defaults(dm, default_interval=10),
    )
    kwargs.update(trainer_kwargs or {})
    trainer = fit_resumable(module, datamodule=dm, ckpt_dir=out_dir / "checkpoints", trainer_kwargs=kwargs,
                            every_n_train_steps=checkpoint_every_n_steps)
    model = module.model.cpu().eval()
    path = save_model(model, out_dir / "model")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    log.info("Level 1 trained for %d steps; saved to %s; metrics %s", trainer.global_step, path, metrics)
    return model


def _as_store(data: Any) -> Any:
    """A :class:`~xscale.data.store.CellStore` for a store (or its path), None for AnnData; any other path
    is an error that says what to do."""
    from xscale.data.store import CellStore, is_prepared_store

    if isinstance(data, CellStore):
        return data
    if isinstance(data, (str, os.PathLike)):
        if is_prepared_store(data):
            return CellStore(data)
        raise XscaleInputError(
            f"{data}: expected AnnData object(s) or a store written by xscale prepare, found a path that is no "
            "such store. Read the file first (anndata.read_h5ad / read_zarr), or convert it with xscale prepare.")
    return None


def _make_logger(name: LoggerName, save_dir: Path) -> Any:
    if name == "none":
        return False
    if name == "csv":
        return lightning.pytorch.loggers.CSVLogger(save_dir=str(save_dir), name="level1")
    if name == "tensorboard":
        return lightning.pytorch.loggers.TensorBoardLogger(save_dir=str(save_dir), name="level1")
    raise XscaleInputError(f"logger must be 'csv', 'tensorboard' or 'none'; got {name!r}.")


__all__: Sequence[str] = ["CellDataModule", "CollateCells", "GeneCellModule", "fit_level1"]
