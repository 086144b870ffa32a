"""KSG mutual information: oracle check against the Gaussian-channel closed form, and ordering on digits."""

from __future__ import annotations

import numpy as np
import pytest

from veil.defenses import create_defense
from veil.evaluation.mutual_information import MIConfig, gaussian_channel_bound, ksg_mi, mutual_information


@pytest.mark.parametrize("sigma", [0.3, 1.0])
def test_ksg_matches_gaussian_closed_form_in_low_dimension(sigma):
    rng = np.random.default_rng(0)
    scales = np.array([2.0, 1.0])
    x = rng.normal(size=(3000, 2)) * scales
    y = x + sigma * rng.normal(size=x.shape)
    true = gaussian_channel_bound(scales**2, sigma)  # exact for a Gaussian input
    assert ksg_mi(x, y, k=3) == pytest.approx(true, rel=0.1)


def test_independent_variables_give_about_zero():
    rng = np.random.default_rng(1)
    assert abs(ksg_mi(rng.normal(size=(2000, 3)), rng.normal(size=(2000, 3)))) < 0.05


def test_gaussian_bound_edges():
    assert gaussian_channel_bound(np.array([1.0, 4.0]), 0.0) == float("inf")
    assert gaussian_channel_bound(np.array([0.0, 0.0]), 1.0) == 0.0
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        gaussian_channel_bound(np.array([1.0]), -1.0)


def test_mi_orders_no_defense_above_destroying_defense(digits, make, fakes):
    cfg = MIConfig(samples=300, dims=4)
    clear = mutual_information(create_defense("none", input_shape=digits.input_shape, num_classes=2), digits, cfg)
    noise = mutual_information(make(fakes["pure-noise"], digits), digits, cfg)
    assert clear["ksg_normalised"] == pytest.approx(1.0)
    # the identity channel's estimate is the estimator's ceiling, psi(n) - psi(k) (less where records tie)
    assert 0.8 * clear["ksg_identity_closed_form"] < clear["ksg_identity"] <= clear["ksg_identity_closed_form"] + 1e-6
    assert noise["ksg_normalised"] < 0.05 < 0.9 < clear["ksg_normalised"]
    assert noise["config"] == cfg.to_dict() and "collapse" in noise["warning"]
    assert clear["gaussian_bound"] is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaussian_defense_ksg_stays_under_its_bound_on_the_same_reduction(digits, seed):
    """The bound restricted to the PCA components KSG sees (1/2 sum over those eigenvalues) is the oracle:
    I(PX; PX + PN) <= it for any X. KSG must stay under it at every noise level and seed, and must not be
    vacuous (it underestimates, but by less than a factor of four here)."""
    ksg = {}
    for sigma in (0.5, 1.0):
        d = create_defense("gaussian", input_shape=digits.input_shape, num_classes=2, sigma=sigma)
        r = mutual_information(d, digits, MIConfig(samples=300, dims=4, seed=seed))
        b = r["gaussian_bound"]
        assert b["sigma"] == sigma and 0 < b["pca"] <= b["full"]
        assert 0.25 * b["pca"] < r["ksg"] < b["pca"], (sigma, r["ksg"], b)
        ksg[sigma] = r["ksg"]
    assert ksg[0.5] > ksg[1.0]  # more noise, less information


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(k=0), "k must be >= 1"), (dict(dims=0), "dims must be >= 1"), (dict(samples=3), "samples must exceed"), (dict(exposure="x"), "unknown exposure")],
)
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MIConfig(**kwargs)


def test_ksg_rejects_mismatched_samples():
    with pytest.raises(ValueError, match="same number of samples"):
        ksg_mi(np.zeros((10, 1)), np.zeros((9, 1)))
