"""veil.layers.gates: hard-concrete samples against the paper's closed form; gradient reversal."""

import torch

from veil.layers.gates import hard_concrete_mean, hard_concrete_sample, open_probability, reverse_gradient


def test_open_probability_matches_the_frequency_of_nonzero_samples():
    # Eq. 12 of Louizos et al. against a Monte Carlo count of Eq. 10's samples
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).repeat(40000, 1)
    g = hard_concrete_sample(log_alpha, generator=torch.Generator().manual_seed(0))
    assert g.min() >= 0 and g.max() <= 1
    freq = (g > 0).float().mean(0)
    assert torch.allclose(freq, open_probability(log_alpha[0]), atol=0.01)
    assert (g == 0).any() and (g == 1).any()  # exact zeros and ones occur


def test_mean_gate_is_monotone_and_saturates():
    m = hard_concrete_mean(torch.tensor([-10.0, 0.0, 10.0]))
    assert m[0] == 0 and m[2] == 1 and 0 < m[1] < 1


def test_reverse_gradient_flips_the_sign():
    x = torch.ones(3, requires_grad=True)
    (reverse_gradient(x, 2.0) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-2.0, -4.0, -6.0]))
