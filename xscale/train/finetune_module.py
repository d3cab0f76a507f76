"""The Lightning training plan of :func:`xscale.train.finetune.finetune`: losses and optimiser.

Cell-type fine-tuning: weighted cross-entropy of a classification head on the latents.
Slide correction: an adversarial slide classifier (gradient reversal) or an MMD between
slides, the model's own reconstruction, and optionally :func:`~xscale.models.heads.structure_loss`
against a frozen copy of the pretrained model.
"""
from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from xscale.data.batch import CellBatch, thin_batch
from xscale.models.gene_to_cell import GeneToCell
from xscale.models.heads import ClassificationHead, SlideDiscriminator, mmd_loss, structure_loss

Task = Literal["cell_type", "batch_correction"]
Correction = Literal["adversarial", "mmd"]


def frozen_stem(model: GeneToCell) -> bool:
    """True when ``model``'s :meth:`~GeneToCell.encoder_states` cannot differ from those of a
    frozen copy: nothing before the bottleneck trains (gene embedder, its norm, value
    encoder, encoder) or draws dropout, and the model has a bottleneck after the encoder
    (not CLS pooling)."""
    if model.config.pooling == "cls":
        return False
    stem = (model.gene_embedder, model.gene_norm, model.value_encoder, model.encoder)
    trains = any(p.requires_grad for m in stem for p in m.parameters())
    dropout = any(isinstance(x, nn.Dropout) and x.p > 0 for m in stem for x in m.modules())
    return not trains and not dropout


class FinetuneModule(L.LightningModule):
    """Training plan for :func:`finetune`. Receives the networks; owns losses and the optimiser.

    labels (n_rows,) long: class code per AnnData row, -1 = unlabelled (looked up by
    ``CellBatch.index``). The discriminator's gradient-reversal scale ramps from 0 to
    1 over training (DANN schedule) so the adversary starts gently. reference: a frozen
    copy of the pretrained model whose latents :func:`structure_loss` compares against
    (needed when ``structure_weight`` > 0).
    """

    def __init__(
        self,
        model: GeneToCell,
        *,
        task: Task,
        head: ClassificationHead | None = None,
        discriminator: SlideDiscriminator | None = None,
        labels: Tensor | None = None,
        class_weights: Tensor | None = None,
        correction: Correction = "adversarial",
        reconstruction_weight: float = 0.0,
        correction_weight: float = 1.0,
        structure_weight: float = 0.0,
        reference: GeneToCell | None = None,
        thinning: float | None = None,
        share_encoder: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__()
        if task == "cell_type" and (head is None or labels is None):
            raise ValueError("task='cell_type' needs a head and labels.")
        if task == "batch_correction" and correction == "adversarial" and discriminator is None:
            raise ValueError("correction='adversarial' needs a discriminator.")
        if structure_weight > 0 and reference is None:
            raise ValueError("structure_weight > 0 needs the reference model.")
        # frozen; in eval mode from each epoch's start (train mode until then: Lightning warns about
        # submodules in eval mode when fitting starts)
        self.reference = reference.requires_grad_(False).train() if reference is not None else None
        self.structure_weight = structure_weight
        # the structure term's reference pass can reuse the model's encoder states
        self.share_encoder = (share_encoder and task == "batch_correction" and structure_weight > 0
                              and reference is not None and frozen_stem(model))
        self.model, self.head, self.discriminator = model, head, discriminator
        self.task, self.correction = task, correction
        self.register_buffer("labels", labels if labels is not None else torch.empty(0, dtype=torch.long))
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.empty(0))
        self.reconstruction_weight, self.correction_weight = reconstruction_weight, correction_weight
        self.thinning = thinning
        self.lr, self.weight_decay = lr, weight_decay

    def on_train_epoch_start(self) -> None:
        # Input standardisation of head / discriminator: average over this epoch's latents only,
        # since the Xpressor moves them while it trains.
        for m in self.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.reset_running_stats()
        if self.reference is not None:
            self.reference.eval()

    def training_step(self, batch: CellBatch, batch_idx: int) -> Tensor:
        if self.thinning is not None:  # augmentation: a fresh capture efficiency per cell and step
            batch = thin_batch(batch, self.thinning)
        states = None
        if self.share_encoder:
            # 1 or depth + 1 × (B, G, D)
            states = self.model.encoder_states(batch.gene_ids, batch.values, batch.pad_mask)
            latents = self.model.compress(states, batch.pad_mask)  # (B, K, D)
        else:
            latents = self.model.encode(batch.gene_ids, batch.values, batch.pad_mask)  # (B, K, D)
        total = latents.new_zeros(())
        if self.task == "cell_type":
            y = self.labels[batch.index]  # (B,)
            keep = y >= 0
            weight = self.class_weights if self.class_weights.numel() else None
            ce = F.cross_entropy(self.head(latents[keep]), y[keep], weight=weight)
            self.log("train/cross_entropy", ce, prog_bar=True, batch_size=len(batch))
            total = total + ce
        else:
            if self.correction == "adversarial":
                p = min(1.0, self.global_step / max(1, self.trainer.estimated_stepping_batches))
                self.discriminator.scale = 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0
                pen = F.cross_entropy(self.discriminator(latents), batch.slide)
            else:
                pen = mmd_loss(latents.flatten(1), batch.slide)
            self.log(f"train/{self.correction}", pen, prog_bar=True, batch_size=len(batch))
            total = total + self.correction_weight * pen
            if self.structure_weight > 0:
                with torch.no_grad():  # the frozen model's latents; its encoder states are the model's own
                    if states is not None:
                        ref = self.reference.compress(states, batch.pad_mask)  # (B, K, D)
                    else:
                        ref = self.reference.encode(batch.gene_ids, batch.values, batch.pad_mask)  # (B, K, D)
                keep = structure_loss(latents.flatten(1), ref.flatten(1), batch.slide)
                self.log("train/structure", keep, prog_bar=True, batch_size=len(batch))
                total = total + self.structure_weight * keep
        if self.reconstruction_weight > 0:
            rec = self.model.loss(batch).total
            self.log("train/reconstruction", rec, prog_bar=True, batch_size=len(batch))
            total = total + self.reconstruction_weight * rec
        self.log("train/loss", total, batch_size=len(batch))
        return total

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
