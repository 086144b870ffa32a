"""Fisher bound: the Cramér-Rao closed forms for x + sigma*eps and for an x-dependent scale; singular and
non-Gaussian cases say so."""

from __future__ import annotations

import math

import pytest
import torch

from veil.defenses import create_defense
from veil.evaluation.fisher import FisherConfig, fisher_bound, fisher_information, mse_bounds


@pytest.mark.parametrize("sigma", [0.1, 0.5, 2.0])
def test_additive_gaussian_bound_is_sigma_squared(digits, sigma):
    """x + sigma*eps: I = I_d / sigma^2, so tr(I^-1)/d = d/tr(I) = sigma^2, and the PSNR ceiling is 10 log10(1/sigma^2)."""
    d = create_defense("gaussian", input_shape=digits.input_shape, num_classes=2, sigma=sigma)
    r = fisher_bound(d, digits, FisherConfig(records=3))
    assert r["applicable"] and r["records"] == 3 and r["singular_records"] == 0
    assert r["mse_bound"] == pytest.approx(sigma**2, rel=1e-5)
    assert r["mse_bound_dfil"] == pytest.approx(sigma**2, rel=1e-5)
    assert r["psnr_ceiling"] == pytest.approx(10 * math.log10(r["data_range"] ** 2 / sigma**2), rel=1e-5)


def test_scaled_mean_and_x_dependent_scale_match_the_closed_form():
    """m ~ N(a x, (c x)^2) per element: I_ii = a^2/(c x_i)^2 + 2 c^2/(c x_i)^2 (the variance carries information too)."""
    a, c = 3.0, 0.5
    x = torch.tensor([[[0.5, 1.0], [2.0, 4.0]]])  # (1, 2, 2)
    info = fisher_information(lambda v: (a * v, c * v), x)
    expected = torch.diag(((a**2 + 2 * c**2) / (c * x.flatten()) ** 2).double())
    assert torch.allclose(info, expected, rtol=1e-6)
    b = mse_bounds(info)
    assert b["mse_bound"] == pytest.approx(float((1 / expected.diagonal()).mean()), rel=1e-6)
    assert b["mse_bound_dfil"] <= b["mse_bound"]  # d / tr(I) <= tr(I^-1) / d (Jensen)


def test_correlated_mean_gives_the_matrix_inverse():
    """m ~ N(A x, I) with A invertible: I = A^T A and tr((A^T A)^-1)/d, not the diagonal's inverse."""
    A = torch.tensor([[1.0, 0.9], [0.0, 0.5]])
    x = torch.tensor([[[0.3, 0.7]]])  # (1, 1, 2)
    info = fisher_information(lambda v: ((A @ v.flatten(1).T).T, torch.ones(len(v), 2)), x)
    exact = float(torch.linalg.inv((A.T @ A).double()).trace()) / 2
    assert mse_bounds(info)["mse_bound"] == pytest.approx(exact, rel=1e-6)


def test_a_record_the_message_ignores_has_no_finite_bound():
    """mu constant in x (a closed content channel): I = 0, no unbiased estimator has finite error."""
    info = fisher_information(lambda v: (torch.zeros_like(v), torch.ones_like(v)), torch.rand(1, 2, 2))
    b = mse_bounds(info)
    assert b["mse_bound"] is None and b["mse_bound_dfil"] is None and b["uninformative_directions"] == 4


def test_non_gaussian_and_deterministic_defenses_are_not_bounded(digits, make, fakes):
    none = create_defense("none", input_shape=digits.input_shape, num_classes=2)
    r = fisher_bound(none, digits)
    assert r["applicable"] is False and "deterministic" in r["reason"]
    r = fisher_bound(make(fakes["pure-noise"], digits), digits)
    assert r["applicable"] is False and "not Gaussian" in r["reason"]


def test_bad_config_raises():
    with pytest.raises(ValueError):
        FisherConfig(records=0)
