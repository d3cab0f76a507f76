from __future__ import annotations

import torch
from torch.distributions import NegativeBinomial

from xscale.models.likelihoods import NBParams, nb_deviance, nb_log_prob, zinb_log_prob


def _random(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (64, 37)
    x = torch.poisson(torch.rand(shape, generator=g) * 20, generator=g)
    x[:, :5] = 0.0
    mu = torch.rand(shape, generator=g) * 30 + 1e-3
    theta = torch.exp(torch.randn(shape, generator=g) * 2)
    logits = torch.randn(shape, generator=g) * 3
    return x.double(), mu.double(), theta.double(), logits.double()


def test_level1_nb_matches_torch_distributions():
    x, mu, theta, _ = _random()
    ref = NegativeBinomial(total_count=theta, logits=mu.log() - theta.log()).log_prob(x)
    torch.testing.assert_close(nb_log_prob(x, mu, theta), ref, rtol=1e-5, atol=1e-5)


def test_level1_zinb_matches_mixture_reference():
    x, mu, theta, logits = _random(1)
    pi = torch.sigmoid(logits)
    nb = NegativeBinomial(total_count=theta, logits=mu.log() - theta.log()).log_prob(x)
    ref = torch.where(x == 0, torch.log(pi + (1 - pi) * nb.exp()), torch.log1p(-pi) + nb)
    torch.testing.assert_close(zinb_log_prob(x, mu, theta, logits), ref, rtol=1e-5, atol=1e-5)


def test_level1_likelihoods_finite_at_extremes():
    x = torch.tensor([0.0, 0.0, 5.0, 1000.0])
    mu = torch.tensor([1e-9, 1e4, 1e-9, 1e-3])
    theta = torch.tensor([1e-4, 1e6, 1e6, 1e-4])
    logits = torch.tensor([-50.0, 50.0, 50.0, -50.0])
    assert torch.isfinite(nb_log_prob(x, mu, theta)).all()
    assert torch.isfinite(zinb_log_prob(x, mu, theta, logits)).all()


def test_level1_deviance_zero_at_saturation_and_pad_ignored():
    x, mu, theta, logits = _random(2)
    assert torch.allclose(nb_deviance(x, x, theta), torch.zeros_like(x), atol=1e-6)
    assert (nb_deviance(x, mu, theta) >= -1e-6).all()
    pad = torch.zeros_like(x, dtype=torch.bool)
    pad[:, -3:] = True
    lp = NBParams(mean=mu, theta=theta, zi_logits=logits, pad_mask=pad).log_prob(x)
    assert (lp[:, -3:] == 0).all() and (lp[:, :-3] < 0).all()
