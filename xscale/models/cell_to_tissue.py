"""Level 2 — cells → tissue niches (``CellToTissue``).

A niche is a centre cell plus up to C-1 spatial neighbours (column 0 = centre). Each
cell token is its level-1 latents (K·D flattened, projected to the level-2 width) plus
Fourier features of its position relative to the centre (in units of the slide's
median nearest-neighbour distance). An encoder ("criss-cross" by default, "full"
available) mixes the cell tokens, an :class:`~xscale.nn.xpressor.Xpressor` compresses
them into T tissue latents, and a :class:`~xscale.nn.xpressor.Decompressor` whose
queries carry *relative position only* rebuilds every cell's level-1 latents from
those T latents. Masked-cell objective: some cells' latents are replaced by a learned
mask token in the input (their position stays), and must still be rebuilt. Composition
term (``w_composition``): a linear head on the flattened tissue latents gives the mean of
the niche's cells' latents, so the niche's make-up, what spatial domains are made of, is
linearly readable from the embedding.

Shapes: B niches, C cell tokens, K·D level-1 latent width (``in_dim``), T tissue
latents, D level-2 width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from xscale.models.io import register_model
from xscale.nn.embeddings import FourierFeatures
from xscale.nn.encoders import build_encoder
from xscale.nn.xpressor import Decompressor, Xpressor

XpressorInput = Literal["encoder", "tokens", "both"]


@dataclass
class CellToTissueConfig:
    """Typed configuration of :class:`CellToTissue`.

    Parameters
    ----------
    in_dim
        Width of one cell's level-1 latents, K·D (flattened).
    dim, heads
        Level-2 model width D and attention heads (``dim % heads == 0``).
    encoder
        ``"criss-cross"`` (O(C·M·D), default) or ``"full"`` (O(C²·D)).
    encoder_depth, encoder_latents
        Encoder layers; M sketch tokens of the criss-cross encoder (ignored by nothing:
        only read when ``encoder == "criss-cross"``; must still be a positive integer).
    n_tissue_latents
        T, tissue latents per niche (Xpressor queries).
    xpressor_depth, decoder_depth
        Layers of the Xpressor and of the Decompressor.
    xpressor_reads
        What the Xpressor cross-attends into: ``"encoder"`` outputs, the raw cell
        ``"tokens"``, or ``"both"`` (concatenated along C).
    n_frequencies, position_scale
        Fourier features of relative positions: frequencies ~ N(0, 1/scale²) per unit
        of median nearest-neighbour distance.
    mask_ratio
        Fraction of real cells whose latents are hidden in the input during training.
    masked_weight
        Extra weight of the masked cells in the reconstruction loss (0 = plain average).
    w_composition
        Weight of the composition term: a linear head on the flattened tissue latents must
        give the mean (standardised) latents of the niche's real cells. It makes what spatial
        domains are made of, the niche's cell make-up, linearly readable from the niche
        embedding (0 = off: no head is built).
    max_cells
        C, the niche size the model is meant for (centre included); used by data code.
    """

    in_dim: int
    dim: int = 64
    heads: int = 4
    encoder: Literal["full", "criss-cross"] = "criss-cross"
    encoder_depth: int = 2
    encoder_latents: int = 8
    n_tissue_latents: int = 4
    xpressor_depth: int = 1
    decoder_depth: int = 1
    xpressor_reads: XpressorInput = "encoder"
    n_frequencies: int = 16
    position_scale: float = 2.0
    mask_ratio: float = 0.25
    masked_weight: float = 1.0
    w_composition: float = 0.0
    max_cells: int = 16

    PRESETS: ClassVar[dict[str, dict[str, object]]] = {
        "tiny": dict(dim=32, heads=2, encoder_depth=1, encoder_latents=4, n_tissue_latents=2,
                     max_cells=11, w_composition=10.0),
        # C=16 niches, T=8 tissue latents, the Xpressor reading encoder outputs and cell tokens: best
        # mean ARI on STARmap's two training slices (benchmarks/tissue_level.py MODEL_SELECTION).
        # w_composition=10: chosen among 0/1/3/10/30 with level 2 trained on one training slice and
        # scored on it and on the other, unseen one (MODEL_SELECTION; never the held-out slice)
        "small": dict(
            dim=64, heads=4, encoder_depth=2, encoder_latents=8, n_tissue_latents=8, max_cells=16,
            xpressor_reads="both", w_composition=10.0,
        ),
        "base": dict(
            dim=128, heads=8, encoder_depth=4, encoder_latents=16, n_tissue_latents=8,
            xpressor_depth=2, decoder_depth=2, max_cells=32, w_composition=10.0,
        ),
    }

    def __post_init__(self) -> None:
        from xscale.models.io import check_finite_fields

        check_finite_fields(self)
        for name in ("in_dim", "dim", "heads", "encoder_depth", "encoder_latents", "n_tissue_latents",
                     "xpressor_depth", "decoder_depth", "n_frequencies", "max_cells"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CellToTissueConfig.{name} must be a positive integer; got {value!r}.")
        if self.dim % self.heads != 0:
            raise ValueError(f"CellToTissueConfig.dim={self.dim} must be divisible by heads={self.heads}.")
        if self.encoder not in ("full", "criss-cross"):
            raise ValueError(f"CellToTissueConfig.encoder must be 'full' or 'criss-cross'; got {self.encoder!r}.")
        if self.xpressor_reads not in ("encoder", "tokens", "both"):
            raise ValueError(
                f"CellToTissueConfig.xpressor_reads must be 'encoder', 'tokens' or 'both'; got {self.xpressor_reads!r}."
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"CellToTissueConfig.mask_ratio must be in [0, 1); got {self.mask_ratio!r}.")
        if self.w_composition < 0:
            raise ValueError(
                f"CellToTissueConfig.w_composition must be >= 0; got {self.w_composition!r}."
            )
        if self.masked_weight < 0 or self.position_scale <= 0:
            raise ValueError(
                f"CellToTissueConfig needs masked_weight >= 0 and position_scale > 0; "
                f"got masked_weight={self.masked_weight!r}, position_scale={self.position_scale!r}."
            )

    @classmethod
    def preset(cls, name: Literal["tiny", "small", "base"], *, in_dim: int, **overrides: object) -> CellToTissueConfig:
        """A named preset (``"tiny"``, ``"small"``, ``"base"``) with ``overrides`` applied (unknown keys fail)."""
        if name not in cls.PRESETS:
            raise ValueError(f"Unknown CellToTissue preset {name!r}; choose one of {sorted(cls.PRESETS)}.")
        return cls(in_dim=in_dim, **{**cls.PRESETS[name], **overrides})  # type: ignore[arg-type]


@dataclass
class TissueLoss:
    """Level-2 loss terms (scalars). ``loss`` is what is optimised.

    ``reconstruction`` = mean squared error over all real cells; ``masked`` = the same
    over the masked cells only (0 when none are masked); ``composition`` = squared error
    per feature of the linear composition head (0 when ``w_composition`` is 0); ``n_cells``
    real cells scored; ``recon`` (B, C, K·D) the rebuilt cell latents (joint training
    decodes them further).
    """

    loss: Tensor
    reconstruction: Tensor
    masked: Tensor
    composition: Tensor
    n_cells: int
    recon: Tensor


@register_model("cell_to_tissue", CellToTissueConfig)
class CellToTissue(nn.Module):
    """Cells → tissue niche auto-encoder. (B, C, K·D) + (B, C, 2) -> (B, T, D) -> (B, C, K·D)."""

    def __init__(self, config: CellToTissueConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        # Per-feature centre / scale of the level-1 latents, fitted on the training cells
        # (set_latent_scaling). Level-1 latents vary little across cells around a large
        # shared offset; without this the loss is dominated by that offset.
        self.register_buffer("latent_mean", torch.zeros(c.in_dim))
        self.register_buffer("latent_std", torch.ones(c.in_dim))
        self.in_norm = nn.LayerNorm(c.in_dim)
        self.in_proj = nn.Linear(c.in_dim, c.dim)
        self.position = FourierFeatures(c.dim, n_frequencies=c.n_frequencies, scale=c.position_scale)
        self.mask_token = nn.Parameter(torch.randn(c.dim) * 0.02)
        self.encoder = build_encoder(
            c.encoder, dim=c.dim, depth=c.encoder_depth, heads=c.heads, n_latents=c.encoder_latents
        )
        self.xpressor = Xpressor(c.dim, c.n_tissue_latents, c.xpressor_depth, c.heads)
        self.query_position = FourierFeatures(c.dim, n_frequencies=c.n_frequencies, scale=c.position_scale, seed=1)
        self.decoder = Decompressor(c.dim, c.decoder_depth, c.heads)
        self.out_proj = nn.Linear(c.dim, c.in_dim)
        # composition head: flattened tissue latents (T·D) -> mean standardised cell latents (K·D)
        self.composition = (
            nn.Linear(c.n_tissue_latents * c.dim, c.in_dim) if c.w_composition > 0 else None
        )

    # ---------------------------------------------------------------- scaling
    @torch.no_grad()
    def set_latent_scaling(self, cell_latents: Tensor, *, eps: float = 1e-6) -> None:
        """Fit the per-feature mean and std of level-1 latents (N, K·D) of training cells."""
        x = cell_latents.reshape(-1, self.config.in_dim).to(self.latent_mean)
        self.latent_mean.copy_(x.mean(dim=0))
        self.latent_std.copy_(x.std(dim=0).clamp_min(eps) if x.shape[0] > 1 else torch.ones_like(self.latent_std))

    def standardize(self, cell_latents: Tensor) -> Tensor:
        """Level-1 latents -> standardised units. (..., K·D) -> (..., K·D)."""
        return (cell_latents - self.latent_mean) / self.latent_std

    def unstandardize(self, z: Tensor) -> Tensor:
        """Standardised units -> level-1 latents. (..., K·D) -> (..., K·D)."""
        return z * self.latent_std + self.latent_mean

    # ---------------------------------------------------------------- encoding
    def _check(self, cell_latents: Tensor, rel_xy: Tensor, pad_mask: Tensor) -> None:
        b, n, w = cell_latents.shape
        if w != self.config.in_dim:
            raise ValueError(
                f"cell_latents have width {w}; this model was built for in_dim={self.config.in_dim} (K·D of level 1)."
            )
        if rel_xy.shape != (b, n, 2) or pad_mask.shape != (b, n) or pad_mask.dtype != torch.bool:
            raise ValueError(
                f"Expected rel_xy (B, C, 2)=({b}, {n}, 2) and bool pad_mask (B, C); "
                f"found rel_xy {tuple(rel_xy.shape)}, pad_mask {tuple(pad_mask.shape)} {pad_mask.dtype}."
            )

    def tokens(self, cell_latents: Tensor, rel_xy: Tensor, cell_mask: Tensor | None = None) -> Tensor:
        """Cell tokens: projected latents (or the mask token where ``cell_mask``) + position. (B, C, D)."""
        x = self.in_proj(self.in_norm(self.standardize(cell_latents)))  # (B, C, K·D) -> (B, C, D)
        if cell_mask is not None:
            x = torch.where(cell_mask[..., None], self.mask_token.to(x.dtype), x)
        return x + self.position(rel_xy)

    def encode(
        self, cell_latents: Tensor, rel_xy: Tensor, pad_mask: Tensor, *, cell_mask: Tensor | None = None
    ) -> Tensor:
        """Tissue latents of each niche.

        Parameters
        ----------
        cell_latents
            (B, C, K·D) level-1 latents of the niche's cells (padding rows are ignored).
        rel_xy
            (B, C, 2) positions relative to the centre cell, in median-NN-distance units.
        pad_mask
            (B, C) bool, True = padding.
        cell_mask
            Optional (B, C) bool, True = hide this cell's latents behind the mask token.

        Returns
        -------
        (B, T, D) tissue latents.
        """
        self._check(cell_latents, rel_xy, pad_mask)
        # padding rows as zeros: masked keys still enter the attention sum with weight 0, and 0 x NaN = NaN
        cell_latents = cell_latents.masked_fill(pad_mask[..., None], 0.0)
        rel_xy = rel_xy.masked_fill(pad_mask[..., None], 0.0)
        tokens = self.tokens(cell_latents, rel_xy, cell_mask)  # (B, C, D)
        encoded = self.encoder(tokens, pad_mask)  # (B, C, D)
        reads = self.config.xpressor_reads
        if reads == "encoder":
            return self.xpressor(encoded, pad_mask)  # (B, C, D) -> (B, T, D)
        if reads == "tokens":
            return self.xpressor(tokens, pad_mask)
        both = torch.cat([encoded, tokens], dim=1)  # (B, 2C, D)
        return self.xpressor(both, torch.cat([pad_mask, pad_mask], dim=1))

    def embed(self, cell_latents: Tensor, rel_xy: Tensor, pad_mask: Tensor) -> Tensor:
        """Niche embedding: the T tissue latents flattened. (B, C, K·D) -> (B, T·D)."""
        latents = self.encode(cell_latents, rel_xy, pad_mask)
        return latents.flatten(1)  # (B, T, D) -> (B, T·D)

    # ---------------------------------------------------------------- decoding
    def decode_hidden(self, tissue_latents: Tensor, rel_xy: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        """Decoder states at the given relative positions. (B, T, D) + (B, C, 2) -> (B, C, D)."""
        queries = self.query_position(rel_xy)  # (B, C, 2) -> (B, C, D): position only, never values
        return self.decoder(queries, tissue_latents, pad_mask)

    def decode(self, tissue_latents: Tensor, rel_xy: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        """Rebuild each cell's level-1 latents from the tissue latents. -> (B, C, K·D)."""
        return self.unstandardize(self.out_proj(self.decode_hidden(tissue_latents, rel_xy, pad_mask)))

    # ---------------------------------------------------------------- training
    def sample_cell_mask(self, pad_mask: Tensor, *, generator: torch.Generator | None = None) -> Tensor | None:
        """Random (B, C) bool mask over real cells, ``mask_ratio`` of them (at least one real cell kept)."""
        ratio = self.config.mask_ratio
        if ratio <= 0:
            return None
        u = torch.rand(pad_mask.shape, generator=generator, device=pad_mask.device)
        mask = (u < ratio) & ~pad_mask
        # Keep every niche readable: never hide all of its real cells.
        all_hidden = (mask | pad_mask).all(dim=1)
        if all_hidden.any():
            mask[all_hidden] = False
        return mask

    @staticmethod
    def niche_mean(z: Tensor, pad_mask: Tensor) -> Tensor:
        """Mean over each niche's real cells of latents z. (B, C, K·D) -> (B, K·D)."""
        real = (~pad_mask).to(z.dtype)[..., None]  # (B, C, 1)
        return (z * real).sum(dim=1) / real.sum(dim=1).clamp_min(1.0)

    def forward(
        self, cell_latents: Tensor, rel_xy: Tensor, pad_mask: Tensor, *, cell_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Encode then decode. Returns (tissue latents (B, T, D), reconstruction (B, C, K·D))."""
        latents = self.encode(cell_latents, rel_xy, pad_mask, cell_mask=cell_mask)
        return latents, self.decode(latents, rel_xy, pad_mask)

    def loss(
        self,
        cell_latents: Tensor,
        rel_xy: Tensor,
        pad_mask: Tensor,
        *,
        cell_mask: Tensor | None = None,
        mask: bool = True,
        target: Tensor | None = None,
    ) -> TissueLoss:
        """Reconstruction (+ masked-cell) loss of a batch of niches.

        ``cell_mask`` defaults to a fresh random mask when ``mask`` is True and the
        model is in training mode; pass ``mask=False`` for plain auto-encoding.
        ``target`` (B, C, K·D) defaults to ``cell_latents`` (joint training passes them
        detached, so level 1 is not pulled towards latents that are merely easy to predict).
        """
        if cell_mask is None and mask and self.training:
            cell_mask = self.sample_cell_mask(pad_mask)
        target = cell_latents if target is None else target
        latents, recon = self(cell_latents, rel_xy, pad_mask, cell_mask=cell_mask)
        # scored in standardised units: every latent feature counts equally
        target_z = self.standardize(target)  # (B, C, K·D), shared by both terms below
        err = (self.standardize(recon) - target_z).pow(2).mean(dim=-1)  # (B, C)
        real = (~pad_mask).to(err.dtype)
        n_real = real.sum().clamp_min(1.0)
        reconstruction = (err * real).sum() / n_real
        if cell_mask is not None and cell_mask.any():
            hidden = cell_mask.to(err.dtype)
            masked = (err * hidden).sum() / hidden.sum()
        else:
            masked = err.new_zeros(())
        total = reconstruction + self.config.masked_weight * masked
        composition = err.new_zeros(())
        if self.composition is not None:  # mean of all real cells, masked ones too: the make-up
            pred = self.composition(latents.flatten(1))  # (B, T·D) -> (B, K·D)
            composition = (pred - self.niche_mean(target_z, pad_mask)).pow(2).mean()
            total = total + self.config.w_composition * composition
        return TissueLoss(
            loss=total, reconstruction=reconstruction, masked=masked, composition=composition,
            n_cells=int(real.sum().item()), recon=recon,
        )
