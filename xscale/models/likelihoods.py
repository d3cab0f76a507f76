"""Negative-binomial and zero-inflated negative-binomial log-likelihoods.

Parameterisation (as in scVI): mean ``mu > 0`` and inverse dispersion ``theta > 0``,
so that Var = mu + mu² / theta. Zero inflation is given as logits of the dropout
probability. All functions work element-wise on tensors of any (broadcastable) shape
and are written in log space to stay finite for tiny means and huge dispersions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-8


def _wide(t: Tensor) -> Tensor:
    """float16 / bfloat16 (autocast, a .half() model) as float32; other dtypes as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def nb_log_prob(x: Tensor, mu: Tensor, theta: Tensor) -> Tensor:
    """log NB(x; mu, theta), element-wise. x counts (any shape), mu mean, theta inverse dispersion.

    Equal to ``torch.distributions.NegativeBinomial(total_count=theta,
    logits=log(mu) - log(theta)).log_prob(x)`` (up to ``EPS`` for means near 0). Computed in at
    least float32: in float16 ``EPS`` rounds to 0 (``0 * log 0`` = NaN) and ``lgamma`` of large
    counts loses whole nats in bfloat16.
    """
    x, mu, theta = _wide(x), _wide(mu), _wide(theta)
    log_theta_mu = torch.log(theta + mu + EPS)
    return (
        theta * (torch.log(theta + EPS) - log_theta_mu)
        + x * (torch.log(mu + EPS) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def zinb_log_prob(x: Tensor, mu: Tensor, theta: Tensor, zi_logits: Tensor) -> Tensor:
    """log ZINB(x; mu, theta, pi = sigmoid(zi_logits)), element-wise.

    P(0) = pi + (1 - pi) NB(0); P(x > 0) = (1 - pi) NB(x). Computed with softplus /
    logsumexp so large |zi_logits| stay finite.
    """
    x, mu, theta, zi_logits = _wide(x), _wide(mu), _wide(theta), _wide(zi_logits)
    log_one_minus_pi = -F.softplus(zi_logits)  # log(1 - sigmoid(l)) = -softplus(l)
    log_nb = nb_log_prob(x, mu, theta)
    log_nb_zero = theta * (torch.log(theta + EPS) - torch.log(theta + mu + EPS))  # log NB(0)
    # log P(0) = log(pi + (1-pi) NB(0)) = logaddexp(zi_logits, log NB(0)) - softplus(zi_logits)
    zero_case = torch.logaddexp(zi_logits, log_nb_zero) - F.softplus(zi_logits)
    nonzero_case = log_nb + log_one_minus_pi
    return torch.where(x < 0.5, zero_case, nonzero_case)


def nb_deviance(x: Tensor, mu: Tensor, theta: Tensor) -> Tensor:
    """Unit NB deviance 2·(log NB(x; x, θ) − log NB(x; mu, θ)), element-wise, ≥ 0."""
    return 2.0 * (nb_log_prob(x, x, theta) - nb_log_prob(x, mu, theta))


@dataclass
class NBParams:
    """Decoded per-gene count distribution.

    mean (B, G) expected counts (softmax over genes × library), theta (B, G) inverse
    dispersion, zi_logits (B, G) dropout logits or None (plain NB), pad_mask (B, G)
    True = padding or None.
    """

    mean: Tensor
    theta: Tensor
    zi_logits: Tensor | None = None
    pad_mask: Tensor | None = None

    def log_prob(self, counts: Tensor) -> Tensor:
        """Element-wise log-likelihood of raw counts (B, G); padding positions give 0."""
        if self.zi_logits is None:
            lp = nb_log_prob(counts, self.mean, self.theta)
        else:
            lp = zinb_log_prob(counts, self.mean, self.theta, self.zi_logits)
        if self.pad_mask is not None:
            lp = lp.masked_fill(self.pad_mask, 0.0)
        return lp

    @property
    def expected(self) -> Tensor:
        """Expected counts (B, G): (1 - pi) · mean under ZINB, mean under NB."""
        if self.zi_logits is None:
            return self.mean
        return torch.sigmoid(-self.zi_logits) * self.mean
