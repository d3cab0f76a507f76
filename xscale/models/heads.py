"""Small task heads on cell latents, used to fine-tune the Xpressor.

- :class:`ClassificationHead`: cell latents (B, K, D) -> class logits (B, n_classes).
  A registered model (``"classification-head"``) so a fine-tuned head saves and loads
  with :func:`xscale.models.io.save_model` / ``load_model`` like any model.
- :class:`SlideDiscriminator`: predicts a cell's slide from its latents through a
  gradient-reversal layer; minimising its loss trains the discriminator while the
  reversed gradient pushes the Xpressor to remove slide information.
- :func:`mmd_loss`: a kernel maximum mean discrepancy between the latents of each
  slide and the rest, the non-adversarial alternative.
- :func:`structure_loss`: how far the inner products between cells of the same slide
  moved from those of reference latents (the pretrained model's): keeps each slide's own
  geometry, spread included, while a slide penalty aligns the slides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from xscale.models.io import register_model

Pool = Literal["flatten", "mean"]


def _pool(latents: Tensor, pool: Pool) -> Tensor:
    if pool == "flatten":
        return latents.flatten(1)  # (B, K, D) -> (B, K·D)
    return latents.mean(1)  # (B, K, D) -> (B, D)


@dataclass
class HeadConfig:
    """A classification head on cell latents.

    dim, n_latents: the backbone's D and K. classes: label names in logit order.
    hidden: width of the hidden layer (0 = a linear head). pool: how the K latents
    are combined (``"flatten"`` keeps each latent's own weights).
    """

    dim: int
    n_latents: int
    classes: tuple[str, ...]
    hidden: int = 128
    pool: Pool = "flatten"
    dropout: float = 0.1

    def __post_init__(self) -> None:
        from xscale.models.io import check_finite_fields

        check_finite_fields(self)
        if len(self.classes) < 2:
            raise ValueError(f"A classification head needs at least 2 classes; got {list(self.classes)}.")
        if self.pool not in ("flatten", "mean"):
            raise ValueError(f"pool must be 'flatten' or 'mean'; got {self.pool!r}.")
        sizes = {"dim": self.dim, "n_latents": self.n_latents, "hidden": self.hidden}
        if any(isinstance(v, bool) or not isinstance(v, int) for v in sizes.values()):
            raise ValueError(f"HeadConfig sizes must be whole numbers; got {sizes}.")
        if self.dim < 1 or self.n_latents < 1:
            raise ValueError(f"HeadConfig.dim and n_latents must be >= 1; got {self.dim}, {self.n_latents}.")
        if self.hidden < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"hidden must be >= 0 and dropout in [0, 1); got {self.hidden}, {self.dropout}.")


def _mlp(width: int, hidden: int, out: int, dropout: float) -> nn.Module:
    # Feature-wise standardisation first (as MAE's linear probe, and like a probe's StandardScaler):
    # pretrained latents share a large per-feature offset; the cell-to-cell signal is the small rest.
    # momentum=None: running stats are the plain average since the last reset (the training plan
    # resets them every epoch), so the tiny feature variances are not swamped by the initial 1.0.
    norm = nn.BatchNorm1d(width, affine=False, momentum=None)
    if hidden == 0:
        return nn.Sequential(norm, nn.Linear(width, out))
    return nn.Sequential(norm, nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out))


@register_model("classification-head", HeadConfig)
class ClassificationHead(nn.Module):
    """Cell latents (B, K, D) -> logits (B, n_classes)."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        width = config.dim * (config.n_latents if config.pool == "flatten" else 1)
        self.net = _mlp(width, config.hidden, len(config.classes), config.dropout)

    def forward(self, latents: Tensor) -> Tensor:
        return self.net(_pool(latents, self.config.pool))  # (B, K, D) -> (B, n_classes)

    @torch.no_grad()
    def predict(self, latents: Tensor) -> list[str]:
        """Most likely class name of each cell. (B, K, D) -> B names."""
        idx = self(latents).argmax(-1).tolist()
        return [self.config.classes[i] for i in idx]


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return -ctx.scale * grad, None


def grad_reverse(x: Tensor, scale: float = 1.0) -> Tensor:
    """Identity forward; multiplies the gradient by ``-scale`` backward."""
    return _GradientReversal.apply(x, scale)


class SlideDiscriminator(nn.Module):
    """Predict the slide from cell latents behind a gradient-reversal layer.

    ``forward(latents (B, K, D)) -> logits (B, n_slides)``. Its cross-entropy trains the
    discriminator; the reversed gradient (times ``scale``) trains the encoder side to
    make slides indistinguishable.
    """

    def __init__(self, dim: int, n_latents: int, n_slides: int, *, hidden: int = 128, pool: Pool = "flatten") -> None:
        super().__init__()
        if n_slides < 2:
            raise ValueError(f"A slide discriminator needs at least 2 slides; got {n_slides}.")
        self.pool = pool
        self.scale = 1.0
        width = dim * (n_latents if pool == "flatten" else 1)
        self.net = _mlp(width, hidden, n_slides, 0.0)

    def forward(self, latents: Tensor) -> Tensor:
        return self.net(grad_reverse(_pool(latents, self.pool), self.scale))  # (B, K, D) -> (B, S)


def mmd_loss(features: Tensor, groups: Tensor, *, bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)) -> Tensor:
    """Mean over groups of the squared MMD between one group's rows and all other rows.

    features (B, F), groups (B,) integer codes. RBF kernels at ``bandwidths`` times the
    median pairwise distance, summed. Groups with fewer than 2 rows (or a batch of one
    group) contribute nothing. Returns a scalar.
    """
    x = features.flatten(1)
    d2 = torch.cdist(x, x).pow(2)  # (B, B)
    scale = d2.detach()[d2.detach() > 0].median() if (d2 > 0).any() else d2.new_tensor(1.0)
    k = sum(torch.exp(-d2 / (2 * scale * b * b)) for b in bandwidths)  # (B, B)
    losses = []
    for g in torch.unique(groups):
        a = groups == g
        if a.sum() < 2 or (~a).sum() < 2:
            continue
        kaa = k[a][:, a].mean()
        kbb = k[~a][:, ~a].mean()
        kab = k[a][:, ~a].mean()
        losses.append(kaa + kbb - 2 * kab)
    return torch.stack(losses).mean() if losses else x.sum() * 0.0


def structure_loss(features: Tensor, reference: Tensor, groups: Tensor) -> Tensor:
    """Mean squared change of the inner products between cells of the same group, relative to ``reference``.

    features (B, F) and reference (B, F) describe the same cells (e.g. latents now and of
    the pretrained model), groups (B,) integer codes (slides). Each group's rows are centred
    on that group's mean in the batch; for every ordered pair of distinct cells of the same
    group the change of their inner product, ``f_i·f_j - r_i·r_j``, is divided by the mean
    squared norm of the centred reference rows, squared and averaged. Centring per group
    lets whole slides move (a shift, or a rotation, of one slide costs nothing); keeping
    inner products, not only angles, also keeps their spread, so the latents cannot
    collapse onto one point. Pairs across groups are free. A batch with no such pair gives
    0. Returns a scalar.
    """
    f, r = features.flatten(1), reference.flatten(1)
    codes, inverse = torch.unique(groups, return_inverse=True)
    onehot = nn.functional.one_hot(inverse, len(codes)).to(f.dtype)  # (B, S)
    per_group = onehot / onehot.sum(dim=0).clamp_min(1.0)  # (B, S): column s averages group s

    def centred(x: Tensor) -> Tensor:  # (B, F): each row minus its group's mean
        return x - onehot @ (per_group.T @ x)

    same = inverse[:, None] == inverse[None, :]  # (B, B)
    same.fill_diagonal_(False)
    if not same.any():
        return f.sum() * 0.0
    fc, rc = centred(f), centred(r)
    scale = rc.pow(2).sum(dim=1).mean().clamp_min(1e-12)  # reference's mean squared norm
    return ((fc @ fc.T - rc @ rc.T) / scale)[same].pow(2).mean()
