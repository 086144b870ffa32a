"""SVD obfuscation (seed 003): oracle tests of Eq. 7-9 and Theorem 1, gradients, the knob's direction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from veil.data.tasks import load_task
from veil.defenses import create_defense
from veil.defenses.svd import SVDBoundedObfuscation, SVDObfuscation, decov_penalty, theorem1
from veil.defenses.saving import load_obfuscator, save_obfuscator
from veil.models import create_model
from veil.training.loop import TrainConfig, accuracy, fit, train_step
from veil.training.run import load_run, train_run

SHAPE = (1, 8, 8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two threads on a shared two-core machine are slower than one; restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def random_defense(cls=SVDObfuscation, **kw):
    torch.manual_seed(0)
    d = cls(input_shape=SHAPE, num_classes=2, **kw)
    with torch.no_grad():
        d.server_layer.weight.normal_()  # a generic W with distinct singular values
    d.refresh_basis()
    d.eval()
    return d


def pre_activation(d: SVDObfuscation, z: torch.Tensor) -> torch.Tensor:
    return z @ d.server_layer.weight.T + d.server_layer.bias


def test_distortion_free_leaves_the_server_layer_unchanged():
    d = random_defense()
    x = torch.rand(32, *SHAPE)
    z = d.features(x)  # (B, n)
    m = d.encode(x)
    assert m.shape == (32, d.rank) and d.rank < d.n  # only the r signal coefficients leave the client
    z_prime = m @ d.basis  # what decode rebuilds
    # oracle, the slow obvious way: projection onto the row space of W with the pseudo-inverse
    w = d.server_layer.weight.double()
    z_s = (torch.linalg.pinv(w) @ w @ z.double().T).T
    torch.testing.assert_close(z_prime.double(), z_s, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pre_activation(d, z_prime), pre_activation(d, z), atol=1e-4, rtol=1e-4)
    want = torch.relu(pre_activation(d, z)).view(32, *d.output_shape())
    torch.testing.assert_close(d.decode(m), want, atol=1e-4, rtol=1e-4)
    # the null content was really dropped: z' differs from z, is shorter, and W maps z - z' to 0
    assert (z - z_prime).norm(dim=1).min() > 1e-3
    assert torch.all(z_prime.norm(dim=1) <= z.norm(dim=1) + 1e-5)


def test_top_m_prime_sends_m_prime_coefficients_and_reports_the_ratio():
    d = random_defense(keep=0.25)
    x = torch.rand(8, *SHAPE)
    m = d.encode(x)
    k = round(0.25 * d.rank)
    assert m.shape == (8, k)
    assert d.communication_ratio() == pytest.approx(k / d.n)
    torch.testing.assert_close(m, d.features(x) @ d.basis[:k].T)  # alpha_k = v_k^T z, Eq. 7
    # the dropped directions are the smallest singular values: W's output error is Lemma 4's sum
    z, zp = d.features(x), m @ d.basis[:k]
    err = (pre_activation(d, z) - pre_activation(d, zp)).norm(dim=1)
    alpha = z @ d.basis.T
    lemma4 = ((alpha[:, k:] * d.singular_values[k:]) ** 2).sum(1).sqrt()
    torch.testing.assert_close(err, lemma4, atol=1e-4, rtol=1e-4)


def brute_force_theorem1(alpha: np.ndarray, s: np.ndarray, eps: float) -> tuple[np.ndarray, int]:
    """Eq. 8 written out literally, one record, 1-based k as in the paper."""
    r = len(alpha)
    eps_k = [np.sqrt(sum(alpha[i - 1] ** 2 * s[i - 1] ** 2 for i in range(k + 1, r + 1))) for k in range(r + 1)]
    m_prime = min(k for k in range(r + 1) if eps_k[k] <= eps)
    out = np.zeros(r)
    for k in range(1, r + 1):
        if k < m_prime:
            out[k - 1] = alpha[k - 1]
        elif k == m_prime:
            gamma = np.sqrt(eps**2 - eps_k[m_prime] ** 2) / s[m_prime - 1]
            out[k - 1] = alpha[k - 1] - gamma * np.sign(alpha[k - 1])
    return out, m_prime


def test_theorem1_matches_the_equation_and_meets_the_budget():
    g = torch.Generator().manual_seed(3)
    alpha = torch.randn(20, 12, generator=g, dtype=torch.float64)
    s = torch.sort(torch.rand(12, generator=g, dtype=torch.float64) * 3 + 0.1, descending=True).values
    full = (alpha * s).norm(dim=1)
    eps = full * torch.linspace(0, 1.1, 20, dtype=torch.float64)
    out, m_prime = theorem1(alpha, s, eps)
    for i in range(20):
        want, want_m = brute_force_theorem1(alpha[i].numpy(), s.numpy(), float(eps[i]))
        assert int(m_prime[i]) == want_m
        np.testing.assert_allclose(out[i].numpy(), want, atol=1e-9)
    distortion = ((alpha - out) * s).norm(dim=1)  # ||W(z - z')||, Lemma 4
    assert torch.all(distortion <= eps + 1e-9)
    spent = m_prime > 0
    torch.testing.assert_close(distortion[spent], eps[spent])  # the whole budget is used (Theorem 1)
    assert torch.all(out.abs() <= alpha.abs() + 1e-12)  # the m'-th coefficient shrinks, never flips
    assert int(m_prime[0]) == 12 and int(m_prime[-1]) == 0  # eps = 0: distortion-free; eps > ||Wz||: nothing


def test_bounded_defense_respects_its_budget_on_the_server_layer():
    d = random_defense(SVDBoundedObfuscation, epsilon=0.4)
    x = torch.rand(16, *SHAPE)
    z = d.features(x)
    m = d.encode(x)
    zp = m @ d.basis
    err = (pre_activation(d, z) - pre_activation(d, zp)).norm(dim=1)
    budget = 0.4 * (z @ d.server_layer.weight.T).norm(dim=1)
    assert torch.all(err <= budget * (1 + 1e-4))
    assert torch.all(err >= budget * 0.99)  # budget used up to its end
    nonzero = (m != 0).sum(1)
    assert torch.equal(nonzero, d.last_kept)  # m' coefficients are non-zero, the rest need not be sent
    assert d.communication_ratio() < d.rank / d.n


def test_decov_penalty_is_zero_for_uncorrelated_and_positive_for_correlated():
    z = torch.randn(4096, 3, generator=torch.Generator().manual_seed(0))
    assert float(decov_penalty(z)) < 5e-3
    zc = torch.cat([z[:, :1], z[:, :1], z[:, 1:2]], 1)
    assert float(decov_penalty(zc)) == pytest.approx(1.0, abs=0.1)  # cov(z0, z0) = 1 twice, times 1/2


def test_gradients_reach_client_in_both_stages_and_w_only_in_pretrain():
    d = random_defense(keep=0.25)
    model = create_model("cnn", d.output_shape(), 2)
    x, y = torch.rand(16, *SHAPE), torch.randint(0, 2, (16,))
    for stage in d.stages():
        d.set_stage(stage.name)
        d.train()
        d.zero_grad(set_to_none=True)
        loss, _ = train_step(d, model, x, y, stage)
        loss.backward()
        assert d.client[0].weight.grad is not None and d.client[0].weight.grad.abs().sum() > 0
        if stage.name == "pretrain":
            assert d.server_layer.weight.grad.abs().sum() > 0
        else:
            assert not d.server_layer.weight.requires_grad and d.server_layer.weight.grad is None


def test_finetune_recomputes_the_svd_of_the_trained_layer():
    d = random_defense()
    d.set_stage("pretrain")
    with torch.no_grad():
        d.server_layer.weight.mul_(2.0)
    d.set_stage("finetune")
    w = d.server_layer.weight
    torch.testing.assert_close(torch.linalg.svdvals(w), d.singular_values, atol=1e-4, rtol=1e-4)


def test_bad_options_and_messages_are_named():
    with pytest.raises(ValueError, match="keep"):
        SVDObfuscation(input_shape=SHAPE, num_classes=2, keep=0)
    with pytest.raises(ValueError, match="epsilon"):
        SVDBoundedObfuscation(input_shape=SHAPE, num_classes=2, epsilon=1.5)
    d = random_defense()
    with pytest.raises(ValueError, match="shape"):
        d.decode(torch.zeros(2, d.rank + 1))


# --------------------------------------------------------------------------------- trained on digits-lt5
@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    task = load_task("digits-lt5", seed=0)
    cfg = TrainConfig(task="digits-lt5", defense="svd", epochs=10, lr=3e-3, batch_size=64, model="mlp", defense_options={"client_channels": 0})
    d = create_defense("svd", input_shape=task.input_shape, num_classes=2, client_channels=0)
    model = create_model("mlp", d.output_shape(), 2)
    fit(d, model, task, cfg, log=lambda s: None)
    return task, d, model


def attack_accuracy(d, task) -> float:
    with torch.no_grad():
        tr, te = d.encode(task.train.x).numpy(), d.encode(task.test.x).numpy()
    clf = LogisticRegression(max_iter=2000).fit(tr, task.train.z.numpy())
    return float(clf.score(te, task.test.z.numpy()))


def test_keep_moves_accuracy_privacy_and_communication(trained):
    task, d, model = trained
    out = {}
    for keep in (1 / d.rank, 1.0):
        d.keep = keep
        out[keep] = (accuracy(d, model, task.test), attack_accuracy(d, task), d.communication_ratio())
    small, full = out[1 / d.rank], out[1.0]
    assert full[0] > 0.85  # distortion-free keeps the task
    assert small[0] < full[0]  # fewer directions: less accurate ...
    assert small[1] < full[1] - 0.2  # ... and much less for an attacker to read the digit from
    assert small[2] < full[2]  # ... and fewer numbers sent


def test_epsilon_moves_accuracy_and_privacy(trained):
    task, d_svd, model = trained
    out = {}
    for eps in (0.0, 0.8):
        d = SVDBoundedObfuscation(input_shape=task.input_shape, num_classes=2, epsilon=eps, client_channels=0)
        d.load_state_dict(d_svd.state_dict())
        d.eval()
        out[eps] = (accuracy(d, model, task.test), attack_accuracy(d, task), d.communication_ratio())
    assert out[0.8][0] < out[0.0][0]
    assert out[0.8][1] < out[0.0][1] - 0.1
    assert out[0.8][2] < out[0.0][2]


def test_save_load_keeps_the_basis(trained, tmp_path):
    task, d, _ = trained
    d.keep = 0.5
    save_obfuscator(tmp_path / "o.safetensors", d)
    d2 = load_obfuscator(tmp_path / "o.safetensors")
    d2.eval()
    x = task.test.x[:16]
    torch.testing.assert_close(d2.encode(x), d.encode(x))
    torch.testing.assert_close(d2.decode(d2.encode(x)), d.decode(d.encode(x)))


def test_runs_through_train_run_and_reloads(tmp_path):
    cfg = TrainConfig(task="digits-lt5", defense="svd-bounded", knob=0.2, epochs=2, model="mlp")
    metrics = train_run(cfg, tmp_path / "run", log=lambda s: None)
    assert metrics["knob"] == "epsilon" and metrics["knob_value"] == 0.2
    _, task, d, model = load_run(tmp_path / "run")
    assert d.stage is None and d.epsilon == 0.2
    assert accuracy(d, model, task.test) == pytest.approx(metrics["primary_acc"])


@pytest.mark.parametrize("keep", [1 / 16, 0.5])
def test_client_cost_counts_the_projection_and_the_server_cost_counts_w(keep):
    """Client: conv block + m' projections (2 m' n FLOPs); W (2 m n FLOPs, m n + m numbers) is the server's."""
    from veil.models import count_flops, count_parameters
    from veil.training.run import client_cost

    d = random_defense(keep=keep)  # (1, 8, 8) -> conv 3x3 to 4 channels, pool: n = 4*4*4 = 64; W is m x n, m = 4*2*2 = 16
    n, m, k = 64, 16, d.kept()
    assert (d.n, d.m) == (n, m) and k == max(1, round(keep * 16))
    model = create_model("cnn", d.output_shape(), 2)
    cost = client_cost(d, model)
    conv = 2 * 9 * 1 * 4 * 8 * 8  # multiply-adds of the 3x3 convolution, counted as 2 FLOPs each
    assert cost["client_flops"] == conv + 2 * k * n
    # the server rebuilds z' = V_m' alpha (2 m' n) and applies W (2 m n) before its model
    assert cost["server_flops"] == 2 * k * n + 2 * m * n + count_flops(lambda h: model(h), d.output_shape())
    assert cost["client_params"] == (4 * 9 + 4) + k * n  # conv block + the m' basis rows it projects on
    assert cost["server_params"] == count_parameters(model) + m * n + m
