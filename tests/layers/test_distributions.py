"""Output distributions: reparameterised samples match their moments; KL is >= 0, zero at the prior and
matches torch.distributions' closed forms; constraints hold."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

from veil.layers import create_distribution, list_distributions


def test_registry_lists_all_and_rejects_unknown():
    assert {"gaussian", "laplace", "bernoulli", "binomial", "categorical", "multinomial"} <= set(list_distributions())
    with pytest.raises(ValueError, match="valid: .*gaussian"):
        create_distribution("poisson")
    with pytest.raises(ValueError, match="min_scale"):
        create_distribution("gaussian", min_scale=-1)


@pytest.mark.parametrize("name,ref", [("gaussian", D.Normal), ("laplace", D.Laplace)])
def test_continuous_kl_matches_torch_and_sample_moments(name, ref):
    torch.manual_seed(0)
    dist = create_distribution(name)
    raw = torch.randn(4, 2, 3)
    loc, scale = dist.constrain(raw)
    expected = D.kl_divergence(ref(loc, scale), ref(torch.zeros_like(loc), torch.ones_like(scale)))
    torch.testing.assert_close(dist.kl((loc, scale)), expected, atol=1e-5, rtol=1e-5)
    big = dist.rsample((torch.full((20000,), 0.7), torch.full((20000,), 0.3)))
    assert abs(big.mean() - 0.7) < 0.02
    std = 0.3 if name == "gaussian" else 0.3 * math.sqrt(2)
    assert abs(big.std() - std) < 0.02


@pytest.mark.parametrize("name", ["gaussian", "laplace"])
def test_kl_is_zero_at_the_prior(name):
    dist = create_distribution(name, min_scale=0.0)
    params = (torch.zeros(3), torch.ones(3))
    torch.testing.assert_close(dist.kl(params), torch.zeros(3), atol=1e-6, rtol=0)


def test_discrete_kl_matches_torch():
    dist = create_distribution("binomial", trials=3)
    (logit,) = dist.constrain(torch.randn(2, 1, 5))
    ref = 3 * D.kl_divergence(D.Bernoulli(logits=logit), D.Bernoulli(probs=torch.full_like(logit, 0.5)))
    torch.testing.assert_close(dist.kl((logit,)), ref, atol=1e-5, rtol=1e-5)
    cat = create_distribution("categorical")
    (logit,) = cat.constrain(torch.randn(2, 1, 4, 3))
    p = D.Categorical(logits=logit.movedim(1, -1))
    ref = D.kl_divergence(p, D.Categorical(logits=torch.zeros_like(logit.movedim(1, -1))))
    torch.testing.assert_close(cat.kl((logit,)).sum(1), ref, atol=1e-5, rtol=1e-5)


def test_bernoulli_sample_mean_follows_p():
    torch.manual_seed(0)
    dist = create_distribution("bernoulli", temperature=0.1)
    logit = torch.full((20000,), math.log(0.8 / 0.2))
    assert abs(dist.rsample((logit,)).mean() - 0.8) < 0.02


def test_wrong_number_of_raw_maps_is_named():
    with pytest.raises(ValueError, match=r"\(B, 2, \.\.\.\)"):
        create_distribution("gaussian").constrain(torch.zeros(2, 3, 4))
