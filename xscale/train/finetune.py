"""Parameter-efficient fine-tuning of a pretrained :class:`GeneToCell`: train the Xpressor only.

The Xpressor is a small transformer on top of the encoder; its K latents are the cell
embedding. Freezing the gene embedder, value encoder, encoder and decoder and training
only the Xpressor (plus a small head) adapts what the latents keep, at a fraction of
the parameters. Two tasks:

- ``"cell_type"``: a :class:`~xscale.models.heads.ClassificationHead` on the latents,
  cross-entropy on the labelled training cells.
- ``"batch_correction"``: the model's own reconstruction loss (through the frozen
  decoder, so the latents still describe the cell) plus a penalty that makes slides
  indistinguishable: an adversarial slide classifier behind gradient reversal
  (``correction="adversarial"``) or an MMD between slides (``correction="mmd"``).
  A third term (``structure_weight``, on by default) keeps the inner products between
  cells of the same slide where the pretrained model had them, so aligning the slides
  neither reshuffles each slide's own neighbourhoods nor collapses the latents.

:func:`finetune` is the Python API, ``xscale finetune`` the CLI; both report
``trainable_fraction`` (trainable / all parameters of model + head).
"""
from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import lightning as L
import numpy as np
import torch
from torch import nn

from xscale.data.anndata_dataset import AnnDataCellDataset
from xscale.data.batch import collate_cells
from xscale.errors import XscaleInputError
from xscale.models.gene_to_cell import GeneToCell
from xscale.models.heads import ClassificationHead, HeadConfig, SlideDiscriminator
from xscale.models.io import save_model
from xscale.models.levels import as_level_model
from xscale.train.finetune_infer import (
    calibrate_head,
    check_correction,
    correction_figure,
    encode_cells,
    kept_neighbours,
    latent_summary,
    predict_labels,  # noqa: F401  (re-exported: xscale.train.finetune.predict_labels)
    score_held_out,
    summary_sample,
)
from xscale.train.finetune_inputs import (  # noqa: F401  (DEFAULT_STRUCTURE_WEIGHT re-exported)
    DEFAULT_STRUCTURE_WEIGHT,
    cell_type_codes,
    check_options,
    correction_slides,
    train_cells,
)
from xscale.train.finetune_module import Correction, FinetuneModule, Task
from xscale.train.optim import EMAWeights
from xscale.train.quiet import log_interval, quiet_fit
from xscale.utils.atomic import atomic_dir, check_replaceable

if TYPE_CHECKING:
    import anndata as ad
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

Trainable = Literal["xpressor", "head", "all"]


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    model: the fine-tuned GeneToCell (eval mode). head: the classification head
    (``task="cell_type"``) or None. trainable_fraction = n_trainable / n_parameters
    over model + head. metrics: held-out ``macro_f1`` / ``accuracy`` (cell_type, when
    labelled cells outside ``train_mask`` exist) and ``final_loss``; for batch_correction,
    on up to 512 training cells, ``latent_spread_before`` / ``_after``, ``slide_mixing_before`` /
    ``_after`` and ``neighbourhood_preservation`` (the share of each cell's 15 nearest
    neighbours within its slide that are still among them after the correction).
    """

    model: GeneToCell
    head: ClassificationHead | None
    trainable_fraction: float
    n_trainable: int
    n_parameters: int
    metrics: dict[str, float] = field(default_factory=dict)
    output_dir: Path | None = None


def set_trainable(model: GeneToCell, head: nn.Module | None, trainable: Trainable) -> tuple[int, int]:
    """Freeze ``model`` except the part named by ``trainable``; the head always trains.

    ``"xpressor"``: the Xpressor blocks (latent queries, cross/self-attention, MLPs,
    final norm) and, if the model has one, its mix over encoder depths (``layer_mix``).
    ``"head"``: nothing in the model. ``"all"``: everything the model itself leaves trainable
    (a frozen gene table or frozen protein-LM layers stay frozen). Returns (n_trainable,
    n_parameters) over model + head.
    """
    if trainable not in ("xpressor", "head", "all"):
        raise XscaleInputError(f"trainable must be 'xpressor', 'head' or 'all'; got {trainable!r}.")
    if trainable != "all":  # "all" keeps the model's own flags: its frozen parts were frozen on purpose
        model.requires_grad_(False)
    if trainable == "xpressor":
        if model.xpressor is None:
            raise XscaleInputError(
                f"trainable='xpressor' needs a model with an Xpressor; this one pools with "
                f"{model.config.pooling!r}. Pass trainable='all' or 'head'."
            )
        model.xpressor.requires_grad_(True)
        if model.layer_mix is not None:  # the Xpressor's input: its mix over encoder depths
            model.layer_mix.requires_grad_(True)
    if head is not None:
        head.requires_grad_(True)
    modules = [model] + ([head] if head is not None else [])
    n_total = sum(p.numel() for m in modules for p in m.parameters())
    n_train = sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
    return n_train, n_total


def _load(model: str | os.PathLike | GeneToCell) -> GeneToCell:
    return as_level_model(model, 1, "finetune")  # type: ignore[return-value]


#: What a finetune output folder holds (all of it replaced on a re-run).
FINETUNE_ENTRIES = frozenset({"finetune.json", "model", "head", "correction.png", ".xscale-complete"})


def check_output_dir(path: str | os.PathLike, option: str = "output_dir") -> None:
    """``path`` (the finetune output, ``option`` in messages) must be new, empty or an earlier finetune output
    holding only what finetune writes: it is replaced whole, so a run's output written into it later
    (cells.zarr, checkpoints/) or a saved model is never deleted."""
    out = Path(path)
    check_replaceable(out)  # a file, a user's folder or zarr store: refused
    if not out.is_dir() or out.is_symlink():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if "finetune.json" not in entries:
        raise XscaleInputError(
            f"{option} {str(path)!r}: expected a new, empty or earlier `xscale finetune` output directory, found one "
            f"without finetune.json ({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}; another "
            "xscale output, e.g. a saved model). finetune replaces the folder as a whole: pass a new path.")
    foreign = [name for name in entries if name not in FINETUNE_ENTRIES]
    if foreign:
        raise XscaleInputError(
            f"{option} {str(path)!r}: expected an earlier `xscale finetune` output holding only what finetune writes "
            f"({', '.join(sorted(FINETUNE_ENTRIES - {'.xscale-complete'}))}), found also {', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''} (written by another command or by you). finetune replaces "
            "the folder as a whole and would delete them: pass a new path.")


def finetune(
    model: str | os.PathLike | GeneToCell,
    adata: ad.AnnData,
    *,
    task: Task = "cell_type",
    label_key: str | None = None,
    slide_key: str | None = None,
    train_mask: np.ndarray | str | None = None,
    trainable: Trainable = "xpressor",
    correction: Correction = "mmd",
    correction_weight: float = 1.0,
    structure_weight: float | None = None,
    reconstruction_weight: float | None = None,
    balance_classes: bool = True,
    head_hidden: int = 128,
    layer_mix: bool = False,
    ema_decay: float | None = None,
    thinning: float | None = None,
    max_epochs: int = 10,
    max_steps: int = -1,
    batch_size: int = 64,
    lr: float = 1e-3,
    counts_layer: str | None = None,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    log_dir: str | os.PathLike | None = None,
    accelerator: str = "auto",
    progress: bool = True,
    callbacks: Sequence[L.Callback] = (),
) -> FinetuneResult:
    """Fine-tune a pretrained level-1 model on ``adata``, training only the Xpressor by default.

    Parameters
    ----------
    model
        A :class:`GeneToCell` or a directory written by ``save_model``. It is modified in place.
    adata
        Raw counts in ``X`` (or ``layers[counts_layer]``); var_names are gene symbols.
    task
        ``"cell_type"`` (needs ``label_key``) or ``"batch_correction"`` (needs ``slide_key``).
    label_key
        obs column of cell types. ``cell_type``: the labels the head learns. ``batch_correction``
        (optional): never trained on; the kNN purity of the labelled cells among up to 512 training
        cells is recorded before and after (``knn_purity_before`` / ``_after`` in ``metrics``), with
        a warning when it falls by 0.02 or more (the correction mixed cell types).
    train_mask
        Boolean (n_obs,) array or obs column: cells to train on (default all). For
        ``cell_type``, labelled cells outside it are scored into ``metrics``.
    trainable
        ``"xpressor"`` (default; parameter-efficient), ``"head"`` (model frozen) or ``"all"``.
    correction, correction_weight
        Slide penalty for ``batch_correction``: ``"mmd"`` (default) or ``"adversarial"``
        (gradient-reversal slide classifier), and its weight.
    structure_weight
        ``batch_correction`` only: weight of :func:`~xscale.models.heads.structure_loss`, the
        change of the inner products between cells of the same slide (each slide centred on
        its mean) relative to the model as loaded (a frozen copy: per step one more pass of its
        Xpressor, or of the whole model when the encoder trains too). Keeps each slide's own
        geometry, so cell types stay apart and the latents do not collapse while the slides are
        aligned. None = 1 for ``batch_correction`` (a guard against collapse: on
        ``benchmarks/peft.py``'s STARmap tuning runs it scored level with the run's choice,
        MMD 1 for 12 epochs without it), 0 = off.
    reconstruction_weight
        Weight of the model's NB reconstruction loss; default 0 for cell_type, 1 for batch_correction.
    balance_classes
        Weight the cross-entropy by inverse class frequency (favours macro-F1).
    layer_mix
        Let the Xpressor read a learned softmax mix of the frozen encoder's input tokens and
        every layer's output (uniform start; depth + 1 extra weights) instead of the last layer
        only (:meth:`GeneToCell.add_layer_mix`). Helps when the pretrained encoder's last layer
        carries little of what the new panel's labels need (``benchmarks/peft.py`` NOTES).
    ema_decay
        If given (e.g. 0.98), the result keeps an exponential moving average of the trained
        weights, updated every step (:class:`~xscale.train.optim.EMAWeights`): steadier than
        the last step's weights on small labelled sets. None = the last step's weights. The
        average lives in a copy of the model and head (twice their memory while training).
    thinning
        If given (e.g. 0.5), every training step sees each cell binomially thinned: it keeps each
        molecule with a probability drawn uniformly from ``[thinning, 1]`` for that cell
        (:func:`~xscale.data.batch.thin_batch`), as if captured less efficiently. Augmentation for
        small labelled sets; scoring and embedding always use the cells as measured. None = off.
        On ``benchmarks/peft.py``'s validation split it raised PEFT's macro-F1 by ~0.03 (NOTES).
    output_dir
        If given, writes ``model/`` (GeneToCell), ``head/`` (cell_type) and ``finetune.json``
        (task, classes, trainable_fraction, metrics) there, atomically. It must be new, empty or an
        earlier fine-tuning output (:func:`~xscale.utils.atomic.check_replaceable`): it is replaced whole.
    log_dir
        Lightning CSV logs go here (none if None).
    callbacks
        Extra Lightning callbacks (e.g. to score a validation split after chosen epochs); they
        see the :class:`FinetuneModule` (``.model``, ``.head``).

    Returns
    -------
    :class:`FinetuneResult`.
    """
    structure_weight = check_options(task, correction, structure_weight, reconstruction_weight, thinning, layer_mix,
                                     trainable)
    ema = EMAWeights(ema_decay) if ema_decay is not None else None  # checks the decay before any work
    if output_dir is not None:
        check_output_dir(output_dir)  # before training: the result replaces output_dir as a whole
    L.seed_everything(seed, verbose=False)
    net = _load(model)
    if layer_mix:
        net.add_layer_mix()  # XscaleInputError for a model without an Xpressor
    cfg = net.config
    requested = train_cells(adata, train_mask)
    train = requested
    head = discriminator = labels = class_weights = None
    slide_names: list[str] = []
    if task == "cell_type":
        codes, classes = cell_type_codes(adata, label_key, train)
        train = train & (codes >= 0)
        labels = torch.from_numpy(codes)
        head = ClassificationHead(HeadConfig(dim=cfg.dim, n_latents=cfg.latents_per_cell, classes=classes,
                                             hidden=head_hidden))
        if balance_classes:
            freq = np.bincount(codes[train], minlength=len(classes)).astype(np.float64)
            class_weights = torch.tensor(freq.sum() / (len(classes) * np.maximum(freq, 1.0)), dtype=torch.float32)
        rec_w = 0.0 if reconstruction_weight is None else reconstruction_weight
    else:
        if trainable == "head":
            raise XscaleInputError("task='batch_correction' changes the latents; pass trainable='xpressor' or 'all'.")
        slide_names = correction_slides(adata, slide_key, label_key, train)
        if correction == "adversarial":
            discriminator = SlideDiscriminator(cfg.dim, cfg.latents_per_cell,
                                               len(set(adata.obs[slide_key].astype(str))))
        rec_w = 1.0 if reconstruction_weight is None else reconstruction_weight
    # the model as loaded, frozen: what structure_loss keeps each slide's similarities close to
    reference = copy.deepcopy(net) if structure_weight > 0 else None
    summary_before = None
    figure = None  # batch_correction with output_dir: the sample of cells before / after, by slide
    if task == "batch_correction":  # on a sample of training cells: spread (a collapse?) and slide mixing
        sample = summary_sample(train, seed)
        sample_slides = adata.obs[slide_key].astype(str).to_numpy()[sample]
        sample_labels = None  # label_key on a correction: cell types scored before / after, never trained on
        if label_key is not None:
            sample_labels = adata.obs[label_key].to_numpy()[sample]
        summary_before, z_before = latent_summary(net, adata[sample], sample_slides, counts_layer, sample_labels)
    flags = {name: p.requires_grad for name, p in net.named_parameters()}
    n_train, n_total = set_trainable(net, head, trainable)
    fraction = n_train / n_total
    log.info("Fine-tuning %s (%s): %d of %d parameters trainable (%.2f%%)", task, trainable, n_train, n_total,
             100 * fraction)

    from torch.utils.data import DataLoader

    ds = AnnDataCellDataset(adata, net.vocab, counts_layer=counts_layer,
                            slide_key=slide_key if task == "batch_correction" else None, cells=[train])
    loader = DataLoader(ds, batch_size=min(batch_size, len(ds)), shuffle=True, drop_last=len(ds) > batch_size,
                        collate_fn=partial(collate_cells, max_genes=cfg.max_genes, rng=np.random.default_rng(seed)))
    module = FinetuneModule(
        net, task=task, head=head, discriminator=discriminator, labels=labels, class_weights=class_weights,
        correction=correction, reconstruction_weight=rec_w, correction_weight=correction_weight,
        structure_weight=structure_weight, reference=reference, thinning=thinning, lr=lr,
    )
    net.train()
    logger = L.pytorch.loggers.CSVLogger(str(log_dir), name="finetune") if log_dir is not None else False
    with quiet_fit():
        trainer = L.Trainer(
            max_epochs=max_epochs, max_steps=max_steps, accelerator=accelerator, devices=1, logger=logger,
            enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
            gradient_clip_val=1.0, num_sanity_val_steps=0, log_every_n_steps=log_interval(len(loader)),
            callbacks=([ema] if ema is not None else []) + list(callbacks),  # the average first: others may score it
        )
        trainer.fit(module, train_dataloaders=loader)  # with ema: ends holding the averaged weights
    net.eval()
    for name, p in net.named_parameters():
        p.requires_grad_(flags[name])  # give back the caller's (e.g. a frozen protein LM's) settings
    metrics: dict[str, float] = {}
    final = trainer.callback_metrics.get("train/loss")
    if final is not None:
        metrics["final_loss"] = float(final)
    if summary_before is not None:
        summary_after, z_after = latent_summary(net, adata[sample], sample_slides, counts_layer, sample_labels)
        summary_after.update(kept_neighbours(z_before, z_after, sample_slides))
        check_correction(metrics, summary_before, summary_after, correction_weight)
        if output_dir is not None:
            figure = correction_figure(z_before, z_after, sample_slides, metrics, seed=seed, cell_types=sample_labels)
    if head is not None:
        head.eval().requires_grad_(True)
        calibrate_head(head, encode_cells(net, adata[train], counts_layer=counts_layer, report_panel=False))
        if train_mask is not None:  # every labelled cell outside train_mask, classes the head never saw included
            held = ~requested & adata.obs[label_key].notna().to_numpy()
            metrics.update(score_held_out(net.cpu(), head.cpu(), adata[held], label_key, counts_layer=counts_layer))
            if "macro_f1" in metrics:
                log.info("Held-out cells (%d): macro-F1 %.3f, accuracy %.3f", int(held.sum()), metrics["macro_f1"],
                         metrics["accuracy"])
    result = FinetuneResult(net.cpu(), head, fraction, n_train, n_total, metrics)
    if output_dir is not None:
        result.output_dir = _write(result, Path(output_dir), task=task, trainable=trainable, slides=slide_names,
                                    ema_decay=ema_decay, thinning=thinning, reconstruction_weight=rec_w,
                                    correction={"method": correction, "weight": correction_weight,
                                                "structure_weight": structure_weight}
                                    if task == "batch_correction" else None, figure=figure)
    return result


def _write(result: FinetuneResult, out: Path, *, task: str, trainable: str, slides: list[str],
           ema_decay: float | None, thinning: float | None = None, reconstruction_weight: float = 0.0,
           correction: dict[str, str | float] | None = None, figure: Figure | None = None) -> Path:
    doc = {
        "task": task, "trainable": trainable, "ema_decay": ema_decay, "thinning": thinning,
        "reconstruction_weight": reconstruction_weight,
        "correction": correction,
        "trainable_fraction": result.trainable_fraction,
        "n_trainable": result.n_trainable, "n_parameters": result.n_parameters, "metrics": result.metrics,
        "classes": list(result.head.config.classes) if result.head is not None else None, "slides": slides or None,
    }
    with atomic_dir(out) as tmp:  # an earlier result is moved aside, not deleted, until this one is in place
        save_model(result.model, tmp / "model")
        if result.head is not None:
            save_model(result.head, tmp / "head")
        (tmp / "finetune.json").write_text(json.dumps(doc, indent=2))
        if figure is not None:
            figure.savefig(tmp / "correction.png", dpi=120)
    log.info("Wrote the fine-tuned model to %s", out)
    return out
