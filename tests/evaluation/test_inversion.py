"""Input-optimisation inversion: recovers the record through an identity client, fails through pure noise,
and its Gaussian likelihood path uses the mean and scale the client's messages really have."""

from __future__ import annotations

import pytest
import torch

from veil.defenses import create_defense, list_defenses
from veil.evaluation.inversion import MESSAGE_MODELS, InversionConfig, gaussian_message, inversion_attack, message_model, total_variation

FAST = InversionConfig(records=48, steps=120, restarts=2, tune_records=16, tv_weights=(0.0, 0.1))
QUIET = lambda s: None  # noqa: E731


def test_identity_client_gives_the_record_back(digits):
    d = create_defense("none", input_shape=digits.input_shape, num_classes=2)
    r, te, m, est = inversion_attack(d, digits, FAST, log=QUIET)
    assert r["path"] == "distance" and r["noise_draws"] == 1  # none is deterministic: one draw
    assert r["psnr"] >= 30 and r["ssim"] > 0.95
    assert r["psnr"] > r["baseline_psnr"] + 15
    assert est.shape == te.x.shape == (48, 1, 8, 8) and torch.equal(m, te.x)


def test_pure_noise_client_gives_nothing_back(digits):
    d = create_defense("gaussian", input_shape=digits.input_shape, num_classes=2, sigma=100.0)
    r, *_ = inversion_attack(d, digits, FAST, log=QUIET)
    assert r["path"] == "gaussian-likelihood"
    assert r["psnr"] < r["baseline_psnr"] + 1.0 and r["ssim"] < 0.3


def test_moderate_noise_is_partly_undone(digits):
    """Through x + 0.3 eps the estimate beats both the mean record and the raw message (prior at work)."""
    d = create_defense("gaussian", input_shape=digits.input_shape, num_classes=2, sigma=0.3)
    r, te, m, _ = inversion_attack(d, digits, FAST, log=QUIET)
    raw_mse = float((m - te.x).square().mean())
    assert r["mse"] < raw_mse and r["psnr"] > r["baseline_psnr"]


def test_time_cap_stops_the_steps(digits):
    d = create_defense("none", input_shape=digits.input_shape, num_classes=2)
    r, *_ = inversion_attack(d, digits, InversionConfig(records=8, steps=100_000, tune_records=4, tv_weights=(0.0,), time_cap=1.0), log=QUIET)
    assert r["time_capped"] and r["steps_run"] < 100_000


@pytest.mark.parametrize("name", ["gaussian", "ani", "cloak", "scnl", "scnl-private", "scnl-adaptive"])
def test_gaussian_message_matches_the_sent_messages(digits, name):
    """Oracle: the mean and std the likelihood uses equal the sample moments of many real encode() draws."""
    torch.manual_seed(0)
    d = create_defense(name, input_shape=digits.input_shape, num_classes=2).eval()
    if name == "cloak":
        d.set_stage("suppress")
    x = digits.test.x[:4]
    with torch.no_grad():
        draws = torch.stack([d.encode(x) for _ in range(3000)])  # (K, B, *message)
        mu, s = gaussian_message(d, x)
    assert message_model(d) == "gaussian-likelihood"
    assert mu.shape == s.shape == draws.shape[1:]
    tol = 4 * s.max() / 3000**0.5 + 1e-5
    assert float((draws.mean(0) - mu).abs().max()) < tol
    assert float((draws.std(0) - s).abs().max()) < 0.1 * float(s.max()) + 1e-5


@pytest.mark.parametrize("name", [n for n in list_defenses() if n not in ("scnl-detect",)])
def test_every_defense_has_a_named_path(digits, name):
    opts = {"selector_epochs": 0} if name == "scnl-region" else {}
    task_shape = (1, 40, 40) if name == "scnl-region" else digits.input_shape
    try:
        d = create_defense(name, input_shape=task_shape, num_classes=2, **opts)
    except ValueError:
        d = create_defense(name, input_shape=task_shape, num_classes=2)
    assert message_model(d) in MESSAGE_MODELS
    if message_model(d) == "gaussian-likelihood":
        x = torch.rand(2, *task_shape, requires_grad=True)
        mu, s = gaussian_message(d.eval(), x)
        mu.sum().backward()  # differentiable in the record
        assert x.grad is not None and (s >= 0).all()


def test_distance_path_is_refused_a_likelihood(digits):
    d = create_defense("none", input_shape=digits.input_shape, num_classes=2)
    with pytest.raises(ValueError, match="not Gaussian"):
        gaussian_message(d, digits.test.x[:2])


def test_total_variation_of_a_constant_is_zero_and_of_an_edge_is_its_height():
    x = torch.zeros(2, 1, 4, 4)
    x[1, :, :, 2:] = 1.0  # one vertical edge: 4 of the 12 horizontal neighbour pairs differ by 1
    assert total_variation(x).tolist() == pytest.approx([0.0, 4 / 12])


@pytest.mark.parametrize("bad", [dict(records=0), dict(steps=-1), dict(lr=0.0), dict(tv_weights=()), dict(tv_weights=(-1.0,)), dict(time_cap=float("nan"))])
def test_bad_config_raises(bad):
    with pytest.raises(ValueError):
        InversionConfig(**bad)
