"""ANI (seed 002 §4): Eq. 5 holds for the w that f_psi gives, Eq. 24's penalty, gradients, client budget,
and the knob lambda_ moving noise, primary accuracy and a retrained attacker's accuracy on digits-lt5."""

from __future__ import annotations

import math

import pytest
import torch

from veil.data.tasks import load_task
from veil.defenses import create_defense
from veil.defenses.ani import log_one_minus_tanh_exp
from veil.evaluation.attack import AttackConfig, attribute_attack
from veil.models import create_model
from veil.training.loop import TrainConfig, accuracy, fit
from veil.training.run import build, client_cost

SHAPE = (1, 8, 8)


def make(**kw):
    torch.manual_seed(0)
    return create_defense("ani", input_shape=SHAPE, num_classes=2, **kw)


def test_output_is_eq5_for_the_w_of_f_psi():
    d = make()
    x = torch.rand(6, *SHAPE)
    w = d.weights(x)
    state = torch.get_rng_state()
    out = d.encode(x)
    torch.set_rng_state(state)
    v = torch.randn_like(x)  # the draw encode made
    torch.testing.assert_close(out, w * x + (1 - w) * v)
    # w = tanh(exp(a)) lies in (0, 1) and is the Exp -> Tanh output of the decoder
    assert (w > 0).all() and (w < 1).all()
    torch.testing.assert_close(w, torch.tanh(torch.exp(d.f_psi.logits(x))))


def test_penalty_is_eq24_second_term():
    d = make(lambda_=0.3)
    x = torch.rand(5, *SHAPE)
    d.encode(x)
    w = d.weights(x).double()
    naive = -0.3 * torch.log(1 - w).flatten(1).sum(1).mean()
    torch.testing.assert_close(d.penalty().double(), naive, rtol=1e-4, atol=1e-4)


def test_log_one_minus_w_is_stable_where_w_rounds_to_one():
    a = torch.tensor([-5.0, 0.0, 1.0, 3.0, 10.0])
    got = log_one_minus_tanh_exp(a)
    assert torch.isfinite(got).all()
    naive = torch.log(1 - torch.tanh(torch.exp(a.double())))
    ok = torch.isfinite(naive)
    torch.testing.assert_close(got[ok].double(), naive[ok], rtol=1e-4, atol=1e-6)
    assert not ok.all(), "test should cover a w that rounds to 1"
    assert got[-1] < -1e4  # ln(1 - w) ~ -2 exp(10): a huge (finite) penalty, not -inf


def test_penalty_gradient_lowers_w():
    d = make(lambda_=1.0)
    x = torch.rand(8, *SHAPE)
    d.encode(x)
    d.penalty().backward()
    grads = {n: p.grad for n, p in d.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads.keys()
    before = d.weights(x).mean()
    with torch.no_grad():
        for p in d.parameters():
            p -= 0.05 * p.grad
    assert d.weights(x).mean() < before


def test_label_is_not_used():
    d = make()
    x, y = torch.rand(4, *SHAPE), torch.tensor([0, 1, 0, 1])
    torch.manual_seed(3)
    a = d.encode(x)
    torch.manual_seed(3)
    torch.testing.assert_close(d.encode(x, y), a)


def test_client_share_of_flops_on_mnist_is_within_budget():
    d = create_defense("ani", input_shape=(1, 28, 28), num_classes=2)
    cost = client_cost(d, create_model("cnn", d.output_shape(), 2))
    assert 0 < cost["client_flops_share"] <= 0.05, cost


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="lambda_"):
        make(lambda_=-1.0)
    with pytest.raises(ValueError, match="hidden"):
        make(hidden=0)


@pytest.fixture(scope="module")
def digits():
    return load_task("digits-lt5", seed=0)


def _train(task, lam: float):
    torch.set_num_threads(1)
    cfg = TrainConfig(task="digits-lt5", defense="ani", knob=lam, epochs=8, seed=0)
    _, d, model = build(cfg, task)
    fit(d, model, task, cfg, log=lambda s: None)
    with torch.no_grad():
        noise = float((1 - d.weights(task.test.x)).mean())
    return d, accuracy(d, model, task.test), noise


def test_knob_moves_noise_accuracy_and_attack(digits):
    attack = AttackConfig(attackers=("mlp",), epochs=10, patience=3, views=2, averaging_k=0, exposures=("inference",))
    low_d, low_acc, low_noise = _train(digits, 0.0)
    high_d, high_acc, high_noise = _train(digits, 0.01)
    assert high_noise > low_noise + 0.3, (low_noise, high_noise)
    assert high_acc < low_acc, (low_acc, high_acc)
    assert low_acc > 0.85
    low_att = attribute_attack(low_d, digits, attack, log=lambda s: None)["inference"]["attack_acc"]
    high_att = attribute_attack(high_d, digits, attack, log=lambda s: None)["inference"]["attack_acc"]
    assert high_att < low_att - 0.2, (low_att, high_att)
    assert math.isfinite(high_att)
