"""Level 1: genes -> cells. ``GeneToCell`` compresses a cell's gene tokens into K latents.

Pipeline (shapes in the alphabet of ARCHITECTURE.md)::

    gene identity (GeneEmbedder) + value embedding of log-normalised expression  (B, G, D)
    -> encoder ("full" | "criss-cross")                                          (B, G, D)
    -> bottleneck: Xpressor (B, K, D) | CLS token (B, 1, D) | masked mean (B, 1, D)
    -> Decompressor with gene-identity-only queries                              (B, G, D)
    -> NB / ZINB: mean = softmax over genes (padding excluded) × library, per-gene dispersion
    (optional) linear read-out: each gene's value = flattened latents · A(gene identity)  (B, G)

The bottleneck is the only thing ``pooling`` changes: CLS and mean pooling give one
vector that the *same* decoder reads, trained with the same objectives and budget.
Values arrive log-normalised in the batch; the model never normalises inside ``forward``.
The typed config and its presets live in ``xscale.models.gene_to_cell_config`` (re-exported here).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from xscale.data.transforms import binomial_thin, log_normalize
from xscale.data.vocab import GeneVocab
from xscale.errors import XscaleInputError
from xscale.models.gene_embedders import build_gene_embedder
from xscale.models.gene_to_cell_config import (  # noqa: F401  (re-exported: the public import path)
    _PRESETS,
    EncoderName,
    GeneToCellConfig,
    Likelihood,
    Pooling,
    PresetName,
)
from xscale.models.io import register_model
from xscale.models.likelihoods import NBParams
from xscale.nn.encoders import build_encoder
from xscale.nn.xpressor import Decompressor, Xpressor


@dataclass
class GeneToCellLoss:
    """Loss of one batch: ``total`` (weighted sum, differentiable) and its parts.

    NB parts are mean NLL per scored gene; ``readout`` is the linear read-out's mean squared
    error per gene (0 when ``w_readout`` is 0).
    """

    total: Tensor
    autoencode: Tensor
    masked: Tensor
    denoise: Tensor
    readout: Tensor


class ValueEncoder(nn.Module):
    """Gene-conditioned embedding of a scalar log-normalised value. (B, G), (B, G, D) -> (B, G, D).

    ``MLP(value) + value · W·gene_embedding``: the second term gives each gene its own
    value direction (derived from its identity, so file / protein-LM embedders work
    too), which makes pooled tokens a linear read-out of expression from the first step.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, dim), nn.GELU(), nn.Linear(dim, dim))
        self.gene_direction = nn.Linear(dim, dim)

    def forward(self, values: Tensor, gene_emb: Tensor) -> Tensor:
        v = values.unsqueeze(-1)  # (B, G) -> (B, G, 1)
        return self.net(v) + v * self.gene_direction(gene_emb)  # (B, G, D)


@register_model("gene_to_cell", GeneToCellConfig)
class GeneToCell(nn.Module):
    """Level-1 model. See the module docstring for the data flow."""

    def __init__(self, config: GeneToCellConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.gene_embedder = build_gene_embedder(
            c.gene_embedder, n_genes=c.n_genes, dim=c.dim, genes=c.genes, options=c.gene_embedder_options
        )
        # Identity at the same scale as the value embedding, so neither drowns the other at init.
        self.gene_norm = nn.LayerNorm(c.dim)
        self.value_encoder = ValueEncoder(c.dim)
        self.mask_token = nn.Parameter(torch.randn(c.dim) * 0.02)  # (D,) replaces a masked value embedding
        self.encoder = build_encoder(c.encoder, dim=c.dim, depth=c.depth, heads=c.heads, n_latents=c.encoder_latents)
        if c.pooling == "xpressor":
            self.xpressor: Xpressor | None = Xpressor(c.dim, c.n_latents, c.xpressor_depth, c.heads)
        else:
            self.xpressor = None
        # (depth + 1,) logits of the Xpressor's mix over encoder depths; zeros = uniform
        self.layer_mix = nn.Parameter(torch.zeros(c.depth + 1)) if c.xpressor_layer_mix else None
        self.cls_token = nn.Parameter(torch.randn(c.dim) * 0.02) if c.pooling == "cls" else None
        self.pool_norm = nn.LayerNorm(c.dim) if c.pooling != "xpressor" else None
        self.query_proj = nn.Sequential(nn.LayerNorm(c.dim), nn.Linear(c.dim, c.dim))
        self.decoder = Decompressor(c.dim, c.decoder_depth, c.heads, self_attend=c.decoder_self_attend)
        self.head = nn.Linear(c.dim, 2 if c.likelihood == "zinb" else 1)
        # log mean share of each gene: the decoder then only models a cell's deviation from it
        self.gene_bias = nn.Parameter(torch.zeros(c.n_genes)) if c.decoder_gene_bias else None
        if c.standardize_values:  # per vocabulary gene; buffers travel with the weights
            self.register_buffer("value_mean", torch.zeros(c.n_genes))
            self.register_buffer("value_std", torch.ones(c.n_genes))
        # Per vocabulary gene. Starts at theta = e² ≈ 7: theta = 1 makes the NB flat in the mean, and
        # log-theta moves only ~lr per Adam step, which slowed short CPU runs down.
        self.log_theta = nn.Parameter(torch.full((c.n_genes,), 2.0))
        if c.w_readout > 0:  # linear read-out: gene identity -> a direction in the flattened latents
            self.readout = nn.Linear(c.dim, c.embedding_dim)
            with torch.no_grad():  # small random start: first predictions near 0, the z-scored targets' mean
                self.readout.weight.mul_(c.embedding_dim ** -0.5)
                self.readout.bias.zero_()
            self.readout_bias = nn.Parameter(torch.zeros(c.n_genes))
        else:
            self.readout, self.readout_bias = None, None

    # ------------------------------------------------------------------ public API
    @property
    def vocab(self) -> GeneVocab:
        return GeneVocab(self.config.genes)

    def add_layer_mix(self) -> None:
        """Let the Xpressor read a learned mix of encoder depths (uniform start), in place.

        For a model pretrained without it (parameter-efficient fine-tuning: the mix's depth + 1
        weights train with the Xpressor). No-op when the model already has one.
        """
        if self.layer_mix is not None:
            return
        if self.xpressor is None:
            raise XscaleInputError(f"layer_mix=True feeds the Xpressor; this model pools with "
                                   f"{self.config.pooling!r}. Pass layer_mix=False.")
        self.config = dataclasses.replace(self.config, xpressor_layer_mix=True)
        ref = next(self.parameters())
        self.layer_mix = nn.Parameter(torch.zeros(self.config.depth + 1, device=ref.device, dtype=ref.dtype))

    def encode(
        self, gene_ids: Tensor, values: Tensor, pad_mask: Tensor | None = None, *, value_mask: Tensor | None = None,
        gene_emb: Tensor | None = None,
    ) -> Tensor:
        """Cell latents. gene_ids (B, G) long, values (B, G) log-normalised, pad_mask (B, G) True = pad.

        ``value_mask`` (B, G) bool replaces those genes' value embedding by the mask token.
        ``gene_emb`` (B, G, D): ``self.gene_embedder(gene_ids)`` if already computed (it is otherwise).
        Returns (B, K, D) for the Xpressor, (B, 1, D) for CLS / mean pooling.
        """
        if self.config.pooling == "cls":
            tokens = self._tokens(gene_ids, _zero_padding(values, pad_mask), value_mask, gene_emb)  # (B, G, D)
            b = tokens.shape[0]
            cls = self.cls_token.expand(b, 1, -1)  # (D,) -> (B, 1, D)
            tokens = torch.cat([cls, tokens], dim=1)  # (B, 1 + G, D)
            if pad_mask is not None:
                pad_mask = torch.cat([pad_mask.new_zeros(b, 1), pad_mask], dim=1)
            return self.pool_norm(self.encoder(tokens, pad_mask)[:, :1])  # (B, 1, D)
        states = self.encoder_states(gene_ids, values, pad_mask, value_mask=value_mask, gene_emb=gene_emb)
        return self.compress(states, pad_mask)

    def encoder_states(
        self, gene_ids: Tensor, values: Tensor, pad_mask: Tensor | None = None, *, value_mask: Tensor | None = None,
        gene_emb: Tensor | None = None,
    ) -> list[Tensor]:
        """What the bottleneck reads, before it: the first half of :meth:`encode` (arguments as there).

        With ``layer_mix``: the input tokens and every encoder layer's output, depth + 1 × (B, G, D)
        before the final norm; without: one (B, G, D), the encoder's output. Not for CLS pooling
        (its token runs through the encoder). Two models with the same frozen embedders and
        encoder give the same states, so a caller can compute them once for both
        (:meth:`compress` each).
        """
        if self.config.pooling == "cls":
            raise ValueError("encoder_states: CLS pooling reads its token out of the encoder; call encode().")
        tokens = self._tokens(gene_ids, _zero_padding(values, pad_mask), value_mask, gene_emb)  # (B, G, D)
        if self.layer_mix is not None:
            return self.encoder.layer_states(tokens, pad_mask)  # depth + 1 × (B, G, D)
        return [self.encoder(tokens, pad_mask)]  # (B, G, D)

    def compress(self, states: list[Tensor], pad_mask: Tensor | None = None) -> Tensor:
        """The second half of :meth:`encode`: :meth:`encoder_states` -> latents (B, K, D) or (B, 1, D)."""
        if self.layer_mix is not None:
            if len(states) != len(self.layer_mix):
                raise ValueError(f"compress: expected {len(self.layer_mix)} encoder states (layer_mix), "
                                 f"found {len(states)}.")
            share = torch.softmax(self.layer_mix, dim=0)  # (depth + 1,)
            hidden = self.encoder.norm(sum(w * h for w, h in zip(share, states, strict=True)))
        elif len(states) != 1:
            raise ValueError(f"compress: expected the encoder's output only (1 state), found {len(states)}.")
        else:
            hidden = states[0]  # (B, G, D)
        if self.xpressor is not None:
            return self.xpressor(hidden, pad_mask)  # (B, G, D) -> (B, K, D)
        keep = (~pad_mask).to(hidden.dtype) if pad_mask is not None else hidden.new_ones(hidden.shape[:2])
        pooled = (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1.0)  # (B, D)
        return self.pool_norm(pooled[:, None])  # (B, 1, D)

    def forward(self, gene_ids: Tensor, values: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        """Same as :meth:`encode`. (B, G) -> (B, K, D)."""
        return self.encode(gene_ids, values, pad_mask)

    def embed(self, gene_ids: Tensor, values: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        """Flattened cell embedding. (B, G) -> (B, K·D)."""
        return self.encode(gene_ids, values, pad_mask).flatten(1)  # (B, K, D) -> (B, K·D)

    def decode(
        self, latents: Tensor, gene_ids: Tensor, library: Tensor, pad_mask: Tensor | None = None, *,
        gene_emb: Tensor | None = None,
    ) -> NBParams:
        """Count distribution of ``gene_ids`` given latents.

        latents (B, K, D); gene_ids (B, G) the genes to decode (any genes of the
        vocabulary, not necessarily those encoded); library (B,) total counts the
        decoded genes share; pad_mask (B, G) True = padding. Returns :class:`NBParams`
        with mean (B, G) = softmax over the non-padding genes × library. ``gene_emb`` as in :meth:`encode`.
        """
        queries = self.query_proj(self._gene_emb(gene_ids, gene_emb))  # (B, G, D): identity only
        out = self.head(self.decoder(queries, latents, pad_mask))  # (B, G, D) -> (B, G, 1|2)
        logits = out[..., 0]
        if self.gene_bias is not None:
            logits = logits + self.gene_bias[gene_ids]  # (G_vocab,) -> (B, G)
        if pad_mask is not None:
            logits = logits.masked_fill(pad_mask, -math.inf)
        share = torch.softmax(logits, dim=-1)  # (B, G)
        share = torch.nan_to_num(share, nan=0.0)  # a fully padded row
        mean = share * library[:, None].to(share.dtype)
        theta = self.log_theta.clamp(-7.0, 9.0).exp()[gene_ids]  # (G_vocab,) -> (B, G)
        zi = out[..., 1] if self.config.likelihood == "zinb" else None
        return NBParams(mean=mean, theta=theta, zi_logits=zi, pad_mask=pad_mask)

    def readout_values(self, latents: Tensor, gene_ids: Tensor, *, gene_emb: Tensor | None = None) -> Tensor:
        """Linear read-out of each gene's input value. latents (B, K, D), gene_ids (B, G) -> (B, G).

        Values are on the encoder's input scale (standardised when ``standardize_values``).
        Needs ``w_readout > 0`` (the head is trained only by that term). ``gene_emb`` as in :meth:`encode`.
        """
        if self.readout is None:
            raise ValueError("This GeneToCell has no linear read-out head (config.w_readout is 0).")
        genes = self.gene_norm(self._gene_emb(gene_ids, gene_emb))  # (B, G, D)
        z = latents.flatten(1).to(genes.dtype)  # (B, K, D) -> (B, K·D)
        # z · (W g + c) = g · (zᵀW) + z · c: never builds the (B, G, K·D) gene directions
        u = z @ self.readout.weight  # (B, K·D) @ (K·D, D) -> (B, D)
        return (genes * u[:, None]).sum(-1) + (z @ self.readout.bias)[:, None] + self.readout_bias[gene_ids]

    def readout_values_naive(self, latents: Tensor, gene_ids: Tensor) -> Tensor:
        """Reference for :meth:`readout_values`: builds every gene's (K·D) direction. (B, G)."""
        directions = self.readout(self.gene_norm(self.gene_embedder(gene_ids)))  # (B, G, K·D)
        return torch.einsum("be,bge->bg", latents.flatten(1), directions) + self.readout_bias[gene_ids]

    def loss(self, batch: Any, generator: torch.Generator | None = None) -> GeneToCellLoss:
        """Auto-encoding, masked-gene and denoising NB/ZINB NLLs in one encoder pass.

        ``batch`` is a :class:`xscale.data.batch.CellBatch`. Each cell is assigned one
        objective, drawn with probabilities proportional to the weights: its input is
        left clean (auto-encode), has a fraction ``mask_fraction`` of its value
        embeddings replaced by the mask token (masked genes; scored on the hidden genes
        only) or is binomially thinned to ``denoise_keep`` (denoise; full counts as
        target). One pass over the batch thus costs what a single objective costs. Each
        part is the mean negative log-likelihood per scored gene (0 when no cell drew
        it); ``total`` is the weighted sum of the parts, scaled by (sum of all three weights) /
        (sum of the weights of the parts some cell drew), so that a batch missing a part keeps the
        same overall scale, plus ``w_readout`` × the linear read-out error on the clean input values.
        The decoded library is the batch's counts summed over its gene context.
        """
        c = self.config
        pad = batch.pad_mask
        counts = batch.counts.masked_fill(pad, 0.0)
        library = counts.sum(-1)  # (B,) library of the decoded context
        b = counts.shape[0]
        # the draw on the generator's device, so a GPU generator seeds it too (it fell back to the global RNG)
        weights = torch.tensor([c.w_autoencode, c.w_masked, c.w_denoise],
                               device=generator.device if generator is not None else None)
        task = torch.multinomial(weights, b, replacement=True, generator=generator).to(pad.device)  # (B,)
        values = batch.values
        hide = None
        if c.w_masked > 0:
            u = torch.rand(pad.shape, generator=generator, device=pad.device)
            hide = (u < c.mask_fraction) & ~pad & (task == 1)[:, None]  # (B, G)
        if c.w_denoise > 0:
            thinned = binomial_thin(counts, c.denoise_keep, generator=generator)
            thin_library = (batch.library - (counts - thinned).sum(-1)).clamp_min(0.0)
            thin_values = log_normalize(thinned, thin_library).masked_fill(pad, 0.0)
            values = torch.where((task == 2)[:, None], thin_values.to(values.dtype), values)
        gene_emb = self.gene_embedder(batch.gene_ids)  # (B, G, D), once: a protein-LM embedder is costly
        latents = self.encode(batch.gene_ids, values, pad, value_mask=hide, gene_emb=gene_emb)  # (B, K, D)
        lp = self.decode(latents, batch.gene_ids, library, pad, gene_emb=gene_emb).log_prob(counts)  # (B, G)
        real = ~pad
        scored = {
            "autoencode": real & (task == 0)[:, None],
            "masked": hide if hide is not None else torch.zeros_like(pad),
            "denoise": real & (task == 2)[:, None],
        }
        parts, total, weight_sum = {}, counts.new_zeros(()), 0.0
        for (name, mask), w in zip(scored.items(), weights.tolist(), strict=True):
            n = mask.sum()
            parts[name] = -(lp * mask).sum() / n.clamp_min(1)
            if w > 0 and bool(n > 0):
                total = total + w * parts[name]
                weight_sum += w
        total = total * (sum(weights.tolist()) / max(weight_sum, 1e-12))
        parts["readout"] = counts.new_zeros(())
        if self.readout is not None:
            target = self._input_values(batch.gene_ids, batch.values)  # (B, G) clean input, encoder scale
            pred = self.readout_values(latents, batch.gene_ids, gene_emb=gene_emb)  # (B, G)
            err = (pred - target).square().masked_fill(pad, 0.0)
            parts["readout"] = err.sum() / real.sum().clamp_min(1)
            total = total + c.w_readout * parts["readout"]
        return GeneToCellLoss(total=total, **parts)

    @torch.no_grad()
    def init_gene_bias(self, gene_ids: Tensor, share: Tensor) -> None:
        """Set the decoder's per-gene offset to log(mean share): gene_ids (g,) long, share (g,) >= 0.

        Genes never seen keep their offset; no-op without ``decoder_gene_bias``.
        """
        if self.gene_bias is None:
            return
        share = share.to(self.gene_bias.dtype).clamp_min(1e-8)
        self.gene_bias[gene_ids] = share.log() - share.log().mean()

    @torch.no_grad()
    def init_value_scaling(self, gene_ids: Tensor, mean: Tensor, std: Tensor) -> None:
        """Per-gene input standardisation statistics: gene_ids (g,), mean (g,), std (g,) of log-normalised values.

        No-op without ``standardize_values``.
        """
        if not self.config.standardize_values:
            return
        self.value_mean[gene_ids] = mean.to(self.value_mean.dtype)
        self.value_std[gene_ids] = std.to(self.value_std.dtype).clamp_min(0.1)

    # ------------------------------------------------------------------ internals
    def _input_values(self, gene_ids: Tensor, values: Tensor) -> Tensor:
        """Log-normalised values on the encoder's scale: per-gene z-scores with ``standardize_values``. (B, G)."""
        if self.config.standardize_values:
            return (values - self.value_mean[gene_ids]) / self.value_std[gene_ids]
        return values

    def _gene_emb(self, gene_ids: Tensor, gene_emb: Tensor | None) -> Tensor:
        """Raw gene embeddings (B, G, D): ``gene_emb`` when the caller computed them, else the embedder's."""
        return self.gene_embedder(gene_ids) if gene_emb is None else gene_emb

    def _tokens(
        self, gene_ids: Tensor, values: Tensor, value_mask: Tensor | None, gene_emb: Tensor | None = None
    ) -> Tensor:
        gene_emb = self.gene_norm(self._gene_emb(gene_ids, gene_emb))  # (B, G, D), unit scale whatever the embedder
        values = self._input_values(gene_ids, values)
        value_emb = self.value_encoder(values.to(gene_emb.dtype), gene_emb)  # (B, G, D)
        if value_mask is not None:
            value_emb = torch.where(value_mask[..., None], self.mask_token.expand_as(value_emb), value_emb)
        return gene_emb + value_emb  # (B, G, D)


def _zero_padding(values: Tensor, pad_mask: Tensor | None) -> Tensor:
    """Values at padding set to 0: attention masks padded keys, but 0 x NaN is still NaN in the
    weighted sum, so a NaN or inf at a padded slot reached the real tokens."""
    return values if pad_mask is None else values.masked_fill(pad_mask, 0.0)
