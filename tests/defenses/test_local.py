"""The on-device baseline ``local``: only the client's decision leaves, as a class template."""

from __future__ import annotations

import pytest
import torch

from veil.data import load_task
from veil.defenses import create_defense
from veil.defenses.local import LocalDecision
from veil.models import create_model
from veil.training.loop import TrainConfig, accuracy, fit
from veil.training.run import client_cost


def test_message_is_the_template_of_the_decision_and_ignores_the_label():
    torch.manual_seed(0)
    d = create_defense("local", input_shape=(1, 8, 8), num_classes=3)
    d.eval()
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 3, (32,))
    m = d.encode(x)
    decision = d.logits(x).argmax(1)
    # class k's template lights the k-th of K equal segments of the flattened record: with 64 entries and
    # K = 3, entries 0-21, 22-42 and 43-63 (i * 3 // 64), written here from that rule, not the code
    bounds = [(0, 22), (22, 43), (43, 64)]
    expected = torch.zeros(32, 64)
    for i, k in enumerate(decision.tolist()):
        expected[i, bounds[k][0] : bounds[k][1]] = 1.0
    expected = expected.reshape(32, 1, 8, 8)
    assert torch.equal(m, expected)
    assert torch.equal(d.encode(x, y), m)  # the label supervises the classifier, it is never sent
    assert torch.equal(d.predict(x), decision)


def test_training_forward_sends_the_same_hard_decision():
    torch.manual_seed(0)
    d = create_defense("local", input_shape=(1, 8, 8), num_classes=2)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 2, (16,))
    d.train()
    m_train = d.encode(x, y)
    assert d.penalty() > 0  # the classifier's cross-entropy on the known label
    d.eval()
    assert torch.equal(m_train, d.encode(x))


def test_trained_on_digits_server_reads_the_client_decision():
    task = load_task("digits-lt5")
    torch.manual_seed(0)
    d = create_defense("local", input_shape=task.input_shape, num_classes=2)
    model = create_model("cnn", d.output_shape(), 2)
    fit(d, model, task, TrainConfig(task="digits-lt5", defense="local", epochs=6, batch_size=32), log=lambda s: None)
    client_acc = float((d.predict(task.test.x) == task.test.y).float().mean())
    assert client_acc > 0.85
    # the server sees only the decision, so it can at best repeat it
    assert accuracy(d, model, task.test) == pytest.approx(client_acc, abs=0.02)


def test_client_cost_is_a_few_percent_of_the_cnn_server_on_mnist():
    d = create_defense("local", input_shape=(1, 28, 28), num_classes=2)
    share = client_cost(d, create_model("cnn", d.output_shape(), 2))["client_flops_share"]
    assert 0.01 < share < 0.06


@pytest.mark.parametrize("bad", [{"width": 0}, {"hidden": 1.5}, {"classifier_weight": -1.0}, {"lr_scale": 0}])
def test_bad_options_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LocalDecision(input_shape=(1, 8, 8), num_classes=2, **bad)


# ----------------------------------------------------------------------------- architectures, distillation
def test_dsconv_is_a_batch_normalised_depthwise_separable_cnn_within_the_budget():
    from torch import nn

    from veil.defenses.budget import client_share, fit_client_budget

    for arch in ("tiny", "dsconv"):
        options, share = fit_client_budget("local", 0.01, {"arch": arch}, input_shape=(1, 40, 40), num_classes=10, model="resnet")
        assert share <= 0.01
        bigger = client_share("local", {**options, "width": options["width"] + 1}, (1, 40, 40), 10, "resnet")
        assert bigger > 0.01  # the largest width that fits
    d = create_defense("local", input_shape=(1, 28, 28), num_classes=2, arch="dsconv", width=8)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert any(c.groups == c.in_channels > 1 for c in convs)  # depthwise
    assert any(isinstance(m, nn.BatchNorm2d) for m in d.modules())
    with pytest.raises(ValueError, match="arch"):
        create_defense("local", input_shape=(1, 8, 8), num_classes=2, arch="big")


def test_distillation_loss_is_the_temperature_scaled_kl_of_the_soft_labels():
    from veil.defenses.local import distillation_loss

    torch.manual_seed(0)
    s, t, temp = torch.randn(5, 4), torch.randn(5, 4), 3.0
    # written from Hinton et al.'s definition with torch.distributions, not from the code
    p, q = torch.distributions.Categorical(logits=t / temp), torch.distributions.Categorical(logits=s / temp)
    expected = temp**2 * torch.distributions.kl_divergence(p, q).mean()
    assert distillation_loss(s, t, temp) == pytest.approx(float(expected), rel=1e-5)
    assert distillation_loss(t, t, temp) == pytest.approx(0.0, abs=1e-6)


def test_a_distilled_local_learns_from_a_reference_run_and_refuses_a_bad_one(tmp_path):
    from veil.training import TrainConfig, train_run

    ref = tmp_path / "ref"
    train_run(TrainConfig(task="digits-lt5", defense="none", epochs=2, batch_size=64, train_size=600), ref, log=lambda s: None)
    cfg = TrainConfig(task="digits-lt5", defense="local", epochs=2, batch_size=64, train_size=600, defense_options={"distill_from": str(ref)})
    m = train_run(cfg, tmp_path / "student", log=lambda s: None)
    assert m["primary_acc"] > 0.8
    d = create_defense("local", input_shape=(1, 8, 8), num_classes=2, distill_from=str(ref))
    d.train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 2, (8,))
    d.encode(x, y)
    plain = create_defense("local", input_shape=(1, 8, 8), num_classes=2)
    plain.load_state_dict(d.state_dict())
    plain.train()
    plain.encode(x, y)
    assert not torch.allclose(d.penalty(), plain.penalty())  # the teacher's soft labels enter the loss
    assert "_teacher" not in "".join(d.state_dict())  # the teacher is never part of the client
    other = tmp_path / "other"
    train_run(TrainConfig(task="digits-lt5", defense="gaussian", epochs=1, batch_size=64, train_size=200), other, log=lambda s: None)
    for bad, msg in ((tmp_path / "missing", "not a finished run"), (other, "undefended")):
        d = create_defense("local", input_shape=(1, 8, 8), num_classes=2, distill_from=str(bad))
        d.train()
        with pytest.raises(ValueError, match=msg):
            d.encode(x, y)
