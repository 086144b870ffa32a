"""scnl-gate / scnl-gate-z: gates close what the task does not use; the adversary moves the obfuscator; no
mask reaches a mask-free defense; known secrets reach only a known-secret defense."""

import pytest
import torch
from torch.nn import functional as F

from veil.data import load_task
from veil.data.tasks import Split, Task
from veil.defenses import create_defense
from veil.layers.gates import open_probability
from veil.models import create_model
from veil.training.loop import TrainConfig, fit, known_secrets


def _half_noise_task(seed: int = 0) -> Task:
    """Left half of a 16x16 record: a bright bar whose row says y (4 classes); right half: pure noise."""
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        y = torch.randint(0, 4, (n,), generator=gen)
        x = torch.zeros(n, 1, 16, 16)
        for i in range(n):
            x[i, 0, 4 * int(y[i]) : 4 * int(y[i]) + 4, :8] = 1.0
        x[:, :, :, 8:] = torch.rand(n, 1, 16, 8, generator=gen)
        return Split(x, y, torch.zeros(n, dtype=torch.long))

    return Task("half-noise", split(512), split(128), split(128), num_primary=4, num_secondary=2)


def test_gates_close_the_half_that_is_noise_unrelated_to_y():
    torch.manual_seed(0)
    task = _half_noise_task()
    d = create_defense("scnl-gate", input_shape=(1, 16, 16), num_classes=4, lambda_=1.0, init_open=1.0, lr_scale=20.0)
    model = create_model("cnn", (1, 16, 16), 4)
    fit(d, model, task, TrainConfig(task="half-noise", defense="scnl-gate", epochs=6, batch_size=32, lr=2e-3), log=lambda s: None)
    d.eval()
    with torch.no_grad():
        g, _ = d.gates(task.test.x)
        bars = task.test.x[:, :, :, :8] > 0.5
    right = float(g[:, :, :, 8:].mean())
    on_bars = float(g[:, :, :, :8][bars].mean())
    assert right < 0.1, f"the noise half stayed {right:.0%} open"
    assert on_bars > 0.5, f"the pixels that carry y were closed too ({on_bars:.0%} open)"


def test_lambda_closes_gates():
    x = torch.rand(4, 1, 12, 12)
    d = create_defense("scnl-gate", input_shape=(1, 12, 12), num_classes=3, lambda_=1.0, init_open=0.0).train()
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    before = float(open_probability(d.client.selector(x)).mean())
    for _ in range(20):
        d.encode(x)
        opt.zero_grad()
        d.penalty().backward()
        opt.step()
    assert float(open_probability(d.client.selector(x)).mean()) < before - 0.2


def test_closed_pixels_do_not_carry_the_value():
    d = create_defense("scnl-gate", input_shape=(1, 8, 8), num_classes=2, closed_scale=0.0, open_scale=0.0).eval()
    g = torch.zeros(2, 1, 8, 8)
    g[:, :, :4] = 1
    a, b = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    ha, hb = d.message(a, g), d.message(b, g)
    assert torch.equal(ha[:, :, 4:], hb[:, :, 4:])  # closed: the template, whatever the record
    assert torch.equal(ha[:, :, :4], a[:, :, :4])  # open: the record


def test_adversary_loss_moves_the_obfuscator():
    torch.manual_seed(0)
    shape = (1, 12, 12)
    d = create_defense("scnl-gate-z", input_shape=shape, num_classes=2, lambda_=0.0, secret_classes=3).train()
    x = torch.rand(16, *shape)
    z = torch.arange(16) % 3
    d.encode(x, secret=z)
    d.penalty().backward()
    grads = [p.grad for p in d.client.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0

    def adversary_loss() -> float:  # the same noise draw before and after the obfuscator's step
        torch.manual_seed(1)
        with torch.no_grad():
            h = d.encode(x)
            return float(F.cross_entropy(d.adversary(h), z))

    before = adversary_loss()
    opt = torch.optim.SGD(d.client.parameters(), lr=0.5)  # the obfuscator only; the adversary stays
    for _ in range(5):
        opt.zero_grad()
        torch.manual_seed(1)
        d.encode(x, secret=z)
        d.penalty().backward()
        opt.step()
    assert adversary_loss() > before  # the reversed gradient makes the obfuscator raise the adversary's loss


def test_no_mask_reaches_a_mask_free_defense_and_secrets_only_a_known_secret_one():
    task = load_task("digits-overlay", seed=0, train_size=96)
    assert task.train.mask is not None
    seen: dict[str, list] = {}
    for name in ("scnl-gate", "scnl-gate-z"):
        d = create_defense(name, input_shape=task.input_shape, num_classes=10)
        calls = seen.setdefault(name, [])
        original = d.encode

        def spy(x, y=None, _orig=original, _calls=calls, **kw):
            _calls.append(dict(kw))
            return _orig(x, y, **kw)

        d.encode = spy
        model = create_model("cnn", d.output_shape(), 10)
        fit(d, model, task, TrainConfig(task="digits-overlay", defense=name, epochs=1, batch_size=32), log=lambda s: None)
    assert seen["scnl-gate"] and all(kw == {} for kw in seen["scnl-gate"])
    secrets = [kw["secret"] for kw in seen["scnl-gate-z"] if "secret" in kw]
    assert secrets and all("mask" not in kw for kw in seen["scnl-gate-z"])
    known = torch.cat(secrets) >= 0
    assert 0 < int(known.sum()) <= round(0.1 * 96) + 1


def test_known_secrets_keep_a_fixed_fraction():
    task = load_task("digits-tag", seed=0, train_size=200)
    a, b = known_secrets(task.train, 0.1, 0), known_secrets(task.train, 0.1, 0)
    assert int((a.z >= 0).sum()) == 20 and torch.equal(a.z, b.z)
    assert torch.equal(a.z[a.z >= 0], task.train.z[a.z >= 0])
    with pytest.raises(ValueError, match="secret_fraction"):
        known_secrets(task.train, 1.5, 0)


def test_bad_secret_is_named():
    d = create_defense("scnl-gate-z", input_shape=(1, 8, 8), num_classes=2, secret_classes=3).train()
    with pytest.raises(ValueError, match="secret labels"):
        d.encode(torch.rand(2, 1, 8, 8), secret=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="secret_fraction"):
        create_defense("scnl-gate-z", input_shape=(1, 8, 8), num_classes=2, secret_fraction=2.0)
