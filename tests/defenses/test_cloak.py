"""Cloak (seed 002 Eq. 2-3): the output formula, the mask, the noise-maximising gradient (kept, not
zeroed), the three stages (pretrain, noise, suppress), and the knob lambda_ moving sigma, primary accuracy and an attacker on digits-lt5."""

from __future__ import annotations

import pytest
import torch

from veil.data.tasks import load_task
from veil.defenses import create_defense
from veil.evaluation.attack import AttackConfig, attribute_attack
from veil.training.loop import TrainConfig, accuracy, fit
from veil.training.run import build

SHAPE = (1, 8, 8)


def make(**kw):
    torch.manual_seed(0)
    return create_defense("cloak", input_shape=SHAPE, num_classes=2, **kw)


def _spread(d):
    """Give sigma and mu distinct per-entry values, a quarter of them above the threshold."""
    with torch.no_grad():
        d.r.copy_(torch.linspace(-2.0, 1.0, d.r.numel()).reshape(d.r.shape) / d.rho_scale)
        d.mu.copy_(torch.linspace(-0.5, 0.5, d.mu.numel()).reshape(d.mu.shape))


def test_output_is_eq2():
    d = make()
    _spread(d)
    x = torch.rand(5, *SHAPE)
    sigma = d.sigma()
    b = (sigma < d.threshold).float()
    assert 0 < b.mean() < 1, "test needs both kept and suppressed entries"
    state = torch.get_rng_state()
    out = d.encode(x)
    torch.set_rng_state(state)
    v = sigma * torch.randn_like(x)  # Eq. 3: v ~ N(0, sigma^2)
    torch.testing.assert_close(out, (x + v) * b + d.mu)
    # suppressed entries carry neither the record nor noise: exactly mu
    assert torch.equal(out[:, b == 0], d.mu[b == 0].expand(len(x), -1))


def test_sigma_is_bounded_and_starts_at_init_sigma():
    d = make(init_sigma=0.7, sigma_max=1.5)
    torch.testing.assert_close(d.sigma(), torch.full(SHAPE, 0.7))
    with torch.no_grad():
        d.r.fill_(1e3)
    assert d.sigma().max() <= 1.5


def test_noise_maximising_gradient_is_kept():
    d = make(lambda_=1.0)
    d.set_stage("noise")
    assert d.r.requires_grad and not d.mu.requires_grad
    d.penalty().backward()
    assert d.r.grad is not None and (d.r.grad < 0).all(), "the sigma-maximising term must push every rho up"
    before = d.sigma().mean()
    opt = torch.optim.Adam([d.r], lr=1e-2)
    opt.step()
    assert d.sigma().mean() > before


def test_stages_choose_what_trains():
    d = make()
    _spread(d)
    d.set_stage("noise")
    assert torch.equal(d.mask(), torch.ones(SHAPE)) and torch.equal(d.mu, torch.zeros(SHAPE))
    d.set_stage("suppress")
    assert not d.r.requires_grad and d.mu.requires_grad
    assert 0 < d.mask().mean() < 1
    with pytest.raises(ValueError, match="stage"):
        d.set_stage("bogus")


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="sigma_min"):
        make(sigma_min=3.0)
    with pytest.raises(ValueError, match="init_sigma"):
        make(init_sigma=5.0)
    with pytest.raises(ValueError, match="lambda_"):
        make(lambda_=-0.1)


@pytest.fixture(scope="module")
def digits():
    return load_task("digits-lt5", seed=0)


def _train(task, lam: float):
    torch.set_num_threads(1)
    cfg = TrainConfig(task="digits-lt5", defense="cloak", knob=lam, epochs=10, seed=0)
    _, d, model = build(cfg, task)
    fit(d, model, task, cfg, log=lambda s: None)
    return d, accuracy(d, model, task.test)


def test_knob_moves_noise_accuracy_and_attack(digits):
    attack = AttackConfig(attackers=("mlp",), epochs=10, patience=3, views=2, averaging_k=0, exposures=("inference",))
    low_d, low_acc = _train(digits, 0.0)
    high_d, high_acc = _train(digits, 0.3)
    with torch.no_grad():
        assert high_d.sigma().mean() > low_d.sigma().mean() + 0.3
        assert high_d.suppressed_fraction() > low_d.suppressed_fraction()
    assert high_acc < low_acc, (low_acc, high_acc)
    assert low_acc > 0.85
    low_att = attribute_attack(low_d, digits, attack, log=lambda s: None)["inference"]["attack_acc"]
    high_att = attribute_attack(high_d, digits, attack, log=lambda s: None)["inference"]["attack_acc"]
    assert high_att < low_att - 0.2, (low_att, high_att)


def test_pretrain_stage_trains_only_the_server_model_on_clean_records():
    """Cloak maximises sigma on a pre-trained model: the first stage is the model alone, no noise."""
    from veil.models import create_model
    from veil.training.loop import train_step

    d = make(lambda_=1.0)
    _spread(d)
    assert [s.name for s in d.stages()] == ["pretrain", "noise", "suppress"]
    pre = d.stages()[0]
    assert pre.train_model and not pre.use_labels
    d.set_stage("pretrain")
    assert not d.r.requires_grad and not d.mu.requires_grad
    x, y = torch.rand(8, *SHAPE), torch.tensor([0, 1] * 4)
    assert torch.equal(d.encode(x), x), "pretrain sends the clean record"
    model = create_model("cnn", SHAPE, 2)
    loss, _ = train_step(d, model, x, y, pre)
    loss.backward()
    assert float(d.penalty()) == 0.0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert d.r.grad is None and d.mu.grad is None


def test_fit_runs_pretrain_before_the_noise(digits):
    cfg = TrainConfig(task="digits-lt5", defense="cloak", knob=0.1, epochs=4, seed=0)
    _, d, model = build(cfg, digits)
    torch.set_num_threads(1)
    history = fit(d, model, digits, cfg, log=lambda s: None)
    assert [r["stage"] for r in history] == ["pretrain", "noise", "noise", "suppress"]
    assert history[0]["val_acc"] > 0.8, "the model is pre-trained on clean records"
