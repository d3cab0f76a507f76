"""Typed configuration of the level-1 model (:class:`GeneToCellConfig`) and its named presets.

Kept apart from the model (``xscale.models.gene_to_cell``, which re-exports these names) so
the settings, their validation and the presets read on their own.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from xscale.data.vocab import normalize_symbol

Pooling = Literal["xpressor", "cls", "mean"]
Likelihood = Literal["nb", "zinb"]
EncoderName = Literal["full", "criss-cross"]
PresetName = Literal["tiny", "small", "base"]

_PRESETS: dict[str, dict[str, Any]] = {
    # tests and smoke runs: seconds on a CPU
    "tiny": dict(dim=32, heads=2, depth=1, n_latents=4, xpressor_depth=1, decoder_depth=1, max_genes=256),
    # demo / benchmark: a few CPU minutes on a few thousand cells. Context 192 = every gene of a
    # panel up to 192 genes (no sampled zeros: deterministic embeddings); 16 latents; per-gene
    # standardised inputs. Chosen on a STARmap split without the held-out slide (benchmarks/cell_level.py NOTES).
    # Embedding reads panels up to 512 genes whole (deterministic; seqFISH tuning split: +0.02).
    "small": dict(dim=32, heads=2, depth=1, n_latents=16, xpressor_depth=1, decoder_depth=1, max_genes=192,
                  inference_max_genes=512, standardize_values=True, w_readout=3.0),
    # GPU-sized
    "base": dict(dim=256, heads=8, depth=6, n_latents=16, xpressor_depth=2, decoder_depth=2, max_genes=2048),
}


@dataclass
class GeneToCellConfig:
    """Typed configuration of :class:`GeneToCell`; checks itself on construction.

    ``genes`` is the vocabulary (normalised symbols) and travels with the checkpoint.
    Objective weights: ``w_autoencode`` (clean input), ``w_masked`` (a fraction
    ``mask_fraction`` of the value embeddings replaced by a mask token, scored on the
    hidden genes), ``w_denoise`` (input binomially thinned to ``denoise_keep``, full
    counts as target). The weights are the shares of each batch's cells given each
    objective (one encoder pass per batch) and weight the parts in the total; a
    weight of 0 switches that objective off.

    ``w_readout``: weight of the linear read-out term, added on top of the NB parts. A bilinear
    head predicts every gene's input value (log-normalised, standardised when
    ``standardize_values``) from the flattened latents, linearly: value[b, g] = z[b] · A(gene_g)
    + bias_g, scored by mean squared error on the clean values whatever the cell's objective.
    The NB decoder alone leaves expression in the latents but not linearly (a linear probe on
    them trailed log-normalised expression by ~0.13 macro-F1); this term makes a linear image
    of expression part of every embedding (benchmarks/cell_level.py NOTES). The head starts
    with its default weights scaled by 1/sqrt(K·D): unscaled, its first predictions erred by
    ~135 (squared, against z-scores of variance ~1), and that error's gradient through the
    latents swamped the decoder's in short runs (the demo's budget decoded an unseen slide at
    per-gene Pearson 0.44 instead of 0.91).

    ``standardize_values``: the encoder sees each gene's log-normalised value as a z-score
    (per-gene mean / sd buffers, set from the training cells by ``fit_level1``), so genes of
    low expression weigh as much as abundant ones. ``decoder_gene_bias``: the decoder adds
    a per-gene offset, started at the centred log mean share of each gene, to its logits.
    """

    genes: list[str]
    dim: int = 64
    heads: int = 4
    depth: int = 2
    encoder: EncoderName = "full"
    encoder_latents: int = 32  # M, criss-cross only
    n_latents: int = 8  # K
    xpressor_depth: int = 1
    # The Xpressor reads a learned softmax mix of the encoder's input tokens and every layer's
    # output (uniform start) instead of the last layer only; finetune(layer_mix=True) adds it.
    xpressor_layer_mix: bool = False
    decoder_depth: int = 1
    decoder_self_attend: bool = False
    decoder_gene_bias: bool = False  # per-gene logit offset (gene mean share), set from data by fit_level1
    standardize_values: bool = False  # encoder input (value - gene mean) / gene sd, stats set by fit_level1
    pooling: Pooling = "xpressor"
    likelihood: Likelihood = "nb"
    w_autoencode: float = 0.2
    w_masked: float = 1.0
    w_denoise: float = 1.0
    w_readout: float = 0.0
    mask_fraction: float = 0.25
    denoise_keep: float = 0.5
    max_genes: int = 512  # gene context per cell in training
    # Gene context when embedding / decoding (embed_cells, reconstruct, store and dask embedding,
    # encode_cells); None = max_genes. Panels up to this many genes are read whole (every cell's
    # embedding uses all its genes, no sampled zeros); longer ones keep the expressed genes plus
    # seeded sampled zeros up to it.
    inference_max_genes: int | None = None
    gene_embedder: str = "learned"
    gene_embedder_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from xscale.models.io import check_finite_fields

        check_finite_fields(self)
        genes = [normalize_symbol(g) for g in self.genes]
        if not genes:
            raise ValueError("GeneToCellConfig.genes is empty; pass the gene vocabulary (list of symbols).")
        dup = sorted({g for g in genes if genes.count(g) > 1}) if len(set(genes)) != len(genes) else []
        if dup:
            raise ValueError(f"GeneToCellConfig.genes has duplicates after normalisation: {dup[:10]}.")
        self.genes = genes
        for name in ("dim", "heads", "depth", "encoder_latents", "n_latents", "xpressor_depth",
                     "decoder_depth", "max_genes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GeneToCellConfig.{name} must be a positive integer; got {value!r}.")
        ctx = self.inference_max_genes
        if ctx is not None and (not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 1):
            raise ValueError("GeneToCellConfig.inference_max_genes must be a positive integer or None; "
                             f"got {ctx!r}.")
        if self.dim % self.heads:
            raise ValueError(f"GeneToCellConfig.dim={self.dim} must be divisible by heads={self.heads}.")
        _check_choice("encoder", self.encoder, ("full", "criss-cross"))
        _check_choice("pooling", self.pooling, ("xpressor", "cls", "mean"))
        if self.xpressor_layer_mix and self.pooling != "xpressor":
            raise ValueError("GeneToCellConfig.xpressor_layer_mix needs pooling='xpressor'; "
                             f"got pooling={self.pooling!r}.")
        _check_choice("likelihood", self.likelihood, ("nb", "zinb"))
        weights = (self.w_autoencode, self.w_masked, self.w_denoise)
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"Objective weights must be >= 0 with a positive sum; got {weights}.")
        if self.w_readout < 0:
            raise ValueError(f"GeneToCellConfig.w_readout must be >= 0; got {self.w_readout}.")
        if not 0.0 < self.mask_fraction < 1.0:
            raise ValueError(f"GeneToCellConfig.mask_fraction must be in (0, 1); got {self.mask_fraction}.")
        if not 0.0 < self.denoise_keep <= 1.0:
            raise ValueError(f"GeneToCellConfig.denoise_keep must be in (0, 1]; got {self.denoise_keep}.")
        if not isinstance(self.gene_embedder_options, dict):
            raise ValueError("GeneToCellConfig.gene_embedder_options must be a dict of keyword options.")
        # files the embedder reads, as absolute paths: a saved model then loads from any working directory
        for key in _PATH_OPTIONS:
            value = self.gene_embedder_options.get(key)
            if isinstance(value, str) and value and not os.path.isabs(value) and os.path.exists(value):
                self.gene_embedder_options[key] = os.path.abspath(value)

    @classmethod
    def preset(cls, name: PresetName, *, genes: list[str], **overrides: Any) -> GeneToCellConfig:
        """Named preset ("tiny", "small", "base"); ``overrides`` replace fields (unknown names raise)."""
        if name not in _PRESETS:
            raise ValueError(f"Unknown GeneToCellConfig preset {name!r}; choose one of {sorted(_PRESETS)}.")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"Unknown GeneToCellConfig fields {unknown}.")
        return cls(genes=list(genes), **{**_PRESETS[name], **overrides})

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def inference_context(self) -> int:
        """Gene context per cell when embedding / decoding: ``inference_max_genes`` or ``max_genes``."""
        return self.max_genes if self.inference_max_genes is None else self.inference_max_genes

    @property
    def latents_per_cell(self) -> int:
        """K for the Xpressor; 1 for CLS / mean pooling."""
        return self.n_latents if self.pooling == "xpressor" else 1

    @property
    def embedding_dim(self) -> int:
        """Width of :meth:`GeneToCell.embed` output: latents_per_cell × dim."""
        return self.latents_per_cell * self.dim


_PATH_OPTIONS = ("path", "model_dir", "fasta")  # gene_embedder_options naming files (table, protein-LM)


def _check_choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"GeneToCellConfig.{name} must be one of {list(options)}; got {value!r}.")
