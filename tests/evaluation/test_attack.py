"""The attribute-inference attack can tell a leaking channel from a destroyed one (digits-lt5), and its
attackers are at least as strong as the engine: the server's own model, records disjoint from the
defense's, y at the training exposures, the train-mode messages attacked where they differ."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from veil.data import load_task
from veil.defenses import create_defense, list_defenses
from veil.evaluation.attack import (
    AttackConfig,
    attacker_splits,
    attackers_for,
    attribute_attack,
    build_attacker,
    ignores_label,
    is_deterministic,
    make_attacker,
    training_time_differs,
)
from veil.models import count_parameters, create_model


def tolerance(p: float, n: int) -> float:
    """Four binomial standard deviations of an accuracy p measured on n test records."""
    return 4 * math.sqrt(p * (1 - p) / n)


def rows(split) -> set[bytes]:
    """Each record of a split as bytes, to compare record sets."""
    return {r.numpy().tobytes() for r in split.x.reshape(len(split), -1)}


# small effort in tests, through options (the defaults stay strong)
FAST = dict(epochs=8, patience=3, views=1, averaging_k=0)
QUIET = dict(log=lambda s: None)


def test_no_defense_attack_is_far_above_floor_with_every_architecture(digits):
    d = create_defense("none", input_shape=digits.input_shape, num_classes=2)
    r = attribute_attack(d, digits, AttackConfig(exposures=("inference",), **FAST), **QUIET)
    inf = r["inference"]
    assert set(inf["attackers"]) == {"linear", "mlp", "cnn", "cnn-bn", "server"}
    assert inf["attack_acc"] > 0.85 > r["primary_only_floor"] + 0.5
    assert inf["attackers"]["server"]["test_acc"] > 0.85
    assert inf["best"] == max(inf["attackers"], key=lambda a: inf["attackers"][a]["val_acc"])
    assert inf["attack_acc"] == inf["attackers"][inf["best"]]["test_acc"]
    assert abs(r["primary_only_floor"] - 0.2) < 0.03 and abs(r["majority_floor"] - 0.1) < 0.03
    assert r["config"]["epochs"] == 8
    # as many attacker records as the defense had, none of them the defense's
    rec = inf["records"]
    assert rec["train_records"] == rec["defense_train_records"] == len(digits.train) and rec["disjoint_from_defense_training"] is True


def test_attacker_records_are_disjoint_from_the_defense_training_records(digits):
    tr, va, rec = attacker_splits(digits, None, None, seed=0)
    assert not rows(tr) & rows(digits.train) and not rows(va) & rows(digits.train)
    assert not rows(tr) & rows(va) and not rows(tr) & rows(digits.test)
    assert len(tr) == len(digits.train) and rec["from_held_out"] == len(tr) and rec["note"] is None
    # fewer held-out records than the defense had: topped up from the validation split, still disjoint
    big = load_task("digits-lt5", seed=0, train_size=900)
    tr, va, rec = attacker_splits(big, None, 100, seed=0)
    assert not rows(tr) & rows(big.train) and not rows(tr) & rows(va)
    assert rec["from_held_out"] == len(big.held_out) and rec["from_val"] == len(big.val) - 100 and len(va) == 100
    assert len(tr) < 900 and "only" in rec["note"]
    # a task that does not say which records the defense saw is flagged, not silently trusted
    big.held_out = None
    assert attacker_splits(big, 50, None, seed=0)[2]["disjoint_from_defense_training"] is None


def test_server_attacker_has_at_least_the_server_models_capacity(digits):
    m = torch.rand(64, *digits.input_shape)
    server = create_model("cnn", digits.input_shape, digits.num_primary)
    attacker = make_attacker("server", m, digits.num_secondary, AttackConfig())
    assert count_parameters(attacker) >= count_parameters(server)
    assert [type(a) for a in attacker.net] == [type(s) for s in server]  # the same architecture
    for name in ("cnn", "cnn-bn"):  # the other CNNs are at least as wide as the server's 32 channels
        first = next(p for p in build_attacker(name, digits.input_shape, 10, AttackConfig().width).parameters())
        assert first.shape[0] >= 32
    assert count_parameters(make_attacker("server", m, 10, AttackConfig(), server_model="mlp")) >= count_parameters(create_model("mlp", digits.input_shape, 2))


def test_destroying_defense_falls_to_the_floor(digits, make, fakes):
    d = make(fakes["pure-noise"], digits)
    r = attribute_attack(d, digits, AttackConfig(attackers=("linear", "mlp", "cnn"), **FAST), **QUIET)
    n, maj, prim = len(digits.test), r["majority_floor"], r["primary_only_floor"]
    assert r["inference"]["attack_acc"] <= maj + tolerance(maj, n), r["inference"]
    # the training exposure's attacker reads y: the primary-only floor, no further
    assert abs(r["training"]["attack_acc"] - prim) <= tolerance(prim, n), r["training"]
    assert r["training"]["same_messages_as_inference"] is True and r["training"]["attacker_gets_label"] is True
    # the train-mode messages are the eval-mode ones: that channel is not attacked twice
    assert r["training-time"]["same_as"] == "training"


def test_training_exposure_attacker_reads_y(digits, make, fakes):
    """A message that carries nothing: with y the attacker reaches the primary-only floor, without it the majority floor."""
    d = make(fakes["constant"], digits)
    r = attribute_attack(d, digits, AttackConfig(attackers=("linear",), exposures=("inference", "training"), **FAST), **QUIET)
    maj, prim = r["majority_floor"], r["primary_only_floor"]
    assert prim - maj > 0.08  # the two floors are far enough apart to tell
    assert r["inference"]["attack_acc"] <= maj + 0.04
    assert r["training"]["attack_acc"] >= prim - 0.04


class IgnoresItsInput(torch.nn.Module):
    """Stands for an under-trained attacker: one learnt bias per class, whatever the message and y."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(num_classes))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(h), -1)


def test_an_attacker_below_the_floor_it_can_reach_is_flagged_under_trained(digits, make, fakes, monkeypatch):
    d = make(fakes["constant"], digits)
    cfg = AttackConfig(attackers=("linear",), exposures=("training",), **FAST)
    fair = attribute_attack(d, digits, cfg, **QUIET)["training"]
    assert fair["under_trained"] is False and fair["reachable_floor"] == pytest.approx(0.2, abs=0.03)
    # given y, any sound attacker reaches the primary-only floor (~0.2); one that ignores y stays at ~0.1
    monkeypatch.setattr("veil.evaluation.attackers.build_attacker", lambda name, shape, n, width=32, **k: IgnoresItsInput(n))
    weak = attribute_attack(d, digits, cfg, **QUIET)["training"]
    assert weak["attack_acc"] < 0.11 and weak["under_trained"] is True


def test_train_mode_messages_are_attacked_where_they_differ(digits, make, fakes):
    d = make(fakes["leaks-in-train-mode"], digits)
    x, y = digits.val.x[:32], digits.val.y[:32]
    assert training_time_differs(d, x, y) and not training_time_differs(make(fakes["pure-noise"], digits), x, y)
    r = attribute_attack(d, digits, AttackConfig(attackers=("linear", "mlp"), **FAST), **QUIET)
    n, maj = len(digits.test), r["majority_floor"]
    assert r["inference"]["attack_acc"] <= maj + tolerance(maj, n)
    assert r["training-time"]["same_as"] is None and r["training-time"]["attacker_gets_label"] is True
    assert r["training-time"]["attack_acc"] > 0.8  # the leak at training time is found


def test_scnl_train_mode_messages_differ():
    """SCNL mixes hard and selector-selected records in train mode: its training-time messages are attacked."""
    d = create_defense("scnl", input_shape=(1, 8, 8), num_classes=2)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 2, (32,))
    assert training_time_differs(d, x, y)
    assert not training_time_differs(create_defense("gaussian", input_shape=(1, 8, 8), num_classes=2), x, y)


def test_label_dependent_messages_are_attacked_separately(digits, make, fakes):
    d = make(fakes["label-only"], digits)
    assert not ignores_label(d, digits.val.x[:32], digits.val.y[:32])
    r = attribute_attack(d, digits, AttackConfig(attackers=("linear", "mlp"), exposures=("inference", "training"), **FAST), **QUIET)
    n, maj, prim = len(digits.test), r["majority_floor"], r["primary_only_floor"]
    assert r["inference"]["attack_acc"] <= maj + tolerance(maj, n)
    assert abs(r["training"]["attack_acc"] - prim) <= tolerance(prim, n)
    assert r["training"]["same_messages_as_inference"] is False


def test_averaging_attack_gains_on_independent_noise(digits):
    d = create_defense("gaussian", input_shape=digits.input_shape, num_classes=2, sigma=1.5)
    cfg = AttackConfig(attackers=("linear", "mlp"), epochs=10, patience=3, views=2, averaging_k=16, exposures=("inference",))
    r = attribute_attack(d, digits, cfg, **QUIET)["inference"]
    assert r["averaging"]["k"] == 16 and r["averaging"]["attacker"] == r["best"]
    assert r["averaging"]["test_acc"] > r["attack_acc"] + 0.1


NOISY = [name for name in list_defenses() if not is_deterministic(create_defense(name, input_shape=(1, 8, 8), num_classes=2), torch.rand(8, 1, 8, 8))]


def test_every_stochastic_defense_is_in_the_averaging_check():
    assert {"gaussian", "scnl", "cloak"} <= set(NOISY) and "none" not in NOISY


@pytest.mark.parametrize("name", NOISY)
def test_averaging_never_makes_the_attack_much_worse(name, digits):
    """On every registered noisy defense (untrained, tiny effort): the mean of k draws loses no information an
    attacker can use, so the averaging attacker is not far below the single-draw one."""
    torch.manual_seed(0)
    d = create_defense(name, input_shape=digits.input_shape, num_classes=2)
    cfg = AttackConfig(attackers=("linear",), epochs=6, patience=3, views=1, averaging_k=4, exposures=("inference",))
    r = attribute_attack(d, digits, cfg, **QUIET)["inference"]
    single, averaged = r["attack_acc"], r["averaging"]["test_acc"]
    assert "note" not in r["averaging"]  # it was really retrained on averaged messages
    assert averaged >= single - tolerance(max(single, 0.1), len(digits.test)), (single, averaged)


def test_deterministic_defense_skips_averaging(digits):
    d = create_defense("none", input_shape=digits.input_shape, num_classes=2)
    assert is_deterministic(d, digits.val.x[:16])
    r = attribute_attack(d, digits, AttackConfig(attackers=("linear",), epochs=3, patience=2, views=1, averaging_k=4, exposures=("inference",)), **QUIET)
    assert "deterministic" in r["inference"]["averaging"]["note"]


def test_vector_messages_get_mlp_attackers_and_the_server_model_after_decode(digits, make, fakes):
    d = make(fakes["flatten"], digits)
    names, skipped = attackers_for((64,), ("linear", "mlp", "cnn", "cnn-bn", "server"))
    assert names == ["linear", "mlp", "server", "mlp-bn"] and skipped == ["cnn", "cnn-bn"]
    cfg = AttackConfig(attackers=("linear", "cnn", "server"), epochs=4, patience=2, views=1, averaging_k=0, exposures=("inference",))
    inf = attribute_attack(d, digits, cfg, **QUIET)["inference"]
    assert inf["message_shape"] == [64]
    assert set(inf["attackers"]) == {"linear", "server", "mlp-bn"}
    assert "not image-shaped" in inf["skipped"]["cnn"]
    assert inf["attack_acc"] > 0.7 and inf["attackers"]["server"]["test_acc"] > 0.7  # the server CNN reads decode(m)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 4, 4), (8, 2, 2), (1, 3, 5)])
@pytest.mark.parametrize("name", ["linear", "mlp", "cnn", "cnn-bn"])
def test_attackers_build_for_any_image_shape(name, shape):
    net = build_attacker(name, shape, 10)
    net.eval()
    assert net(torch.rand(3, *shape)).shape == (3, 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attackers=("resnet",)), "unknown attacker 'resnet'"),
        (dict(attackers=()), "at least one"),
        (dict(epochs=0), "epochs must be >= 1"),
        (dict(lr=-1.0), "lr must be a positive"),
        (dict(train_size=1), "train_size must be >= 2"),
        (dict(exposures=("serving",)), "unknown exposure 'serving'"),
        (dict(averaging_k=-2), "averaging_k must be >= 0"),
        (dict(device="tpu"), "device must be cpu, cuda"),
    ],
)
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttackConfig(**kwargs)


def test_cnn_on_vector_raises():
    with pytest.raises(ValueError, match="image-shaped"):
        build_attacker("cnn", (64,), 10)


def test_no_disjoint_records_left_is_named():
    task = load_task("digits-lt5", seed=0)
    task.val = task.val.subset(np.arange(2))
    with pytest.raises(ValueError, match="no records disjoint"):
        attacker_splits(task, None, 2, seed=0)


def test_sizes_that_would_exhaust_memory_are_refused():
    import pytest

    from veil.evaluation.attack import AttackConfig

    for bad in (dict(views=1_000_000), dict(width=100_000), dict(averaging_k=10_000)):
        with pytest.raises(ValueError, match="must be <="):
            AttackConfig(**bad)


def test_svd_train_mode_messages_of_varying_width_meet_every_attacker():
    """SVD in train mode sends a random number of coefficients: every draw of the training-time messages
    must have the eval-mode width (a view narrower than the first crashed the server attacker)."""
    import torch

    from veil.data import load_task
    from veil.evaluation.attack import AttackConfig, _messages, common_width, train_attacker
    from veil.training.loop import TrainConfig, fit
    from veil.training.run import build

    torch.manual_seed(0)
    cfg = TrainConfig(task="digits-lt5", defense="svd", knob=1.0, epochs=2)
    task, defense, model = build(cfg, load_task("digits-lt5", train_size=500))
    fit(defense, model, task, cfg, log=lambda s: None)
    width = defense.eval().encode(task.val.x[:2]).shape[1]
    split = task.val.subset(torch.arange(40))  # one batch per call: its own widest is often narrower
    views = common_width(*[_messages(defense, split, "training-time", k=2) for _ in range(6)])  # as attack_exposure does
    assert {v.shape[1] for v in views} == {width}
    model, rec = train_attacker("server", views, split.z, views[0], split.z, task.num_secondary, AttackConfig(epochs=1),
                                y_train=split.y, y_val=split.y, defense=defense, num_labels=2, server_model="cnn", log=lambda s: None)
    assert 0 <= rec["val_acc"] <= 1


def test_messages_of_different_widths_are_padded_to_a_common_width():
    """SVD with keep < 1 sends a varying number of coefficients, so two calls (training views, validation,
    test) can have different widths: the headline's svd keep=0.3 run crashed on 106 against 89."""
    import torch

    from veil.evaluation.attack import common_width

    a, b, c = torch.ones(4, 106), torch.ones(3, 89), torch.ones(2, 106)
    out = common_width(a, b, c)
    assert [tuple(t.shape) for t in out] == [(4, 106), (3, 106), (2, 106)]
    assert torch.equal(out[1][:, :89], b) and float(out[1][:, 89:].abs().sum()) == 0  # not sent reads as 0
    images = [torch.ones(2, 1, 4, 4), torch.ones(3, 1, 4, 4)]
    assert all(x is y for x, y in zip(common_width(*images), images))


def test_attacker_never_stops_before_min_epochs_and_flags_a_cap_hit_while_improving():
    """Early stopping inside an attacker's first plateau is a false privacy claim: min_epochs holds it off."""
    from veil.evaluation.attack import AttackConfig, train_attacker

    gen = torch.Generator().manual_seed(0)
    noise, z = torch.randn(200, 1, 8, 8, generator=gen), torch.randint(0, 4, (200,), generator=gen)  # nothing to learn
    runs = {}
    for min_epochs in (0, 7):
        cfg = AttackConfig(attackers=("linear",), epochs=9, patience=1, min_epochs=min_epochs, views=1, averaging_k=0)
        _, rec = train_attacker("linear", [noise[:150]], z[:150], noise[150:], z[150:], 4, cfg, log=lambda s: None)
        runs[min_epochs] = rec
    assert runs[0]["epochs_run"] < 7 <= runs[7]["epochs_run"]
    # a learnable secret and a cap of 2 epochs: the best epoch is the last one, so the report says "still improving"
    z2 = torch.randint(0, 4, (2000,), generator=gen)
    x = torch.randn(2000, 1, 8, 8, generator=gen)
    x[torch.arange(2000), 0, z2, 0] += 1.0  # a faint signal: a slow learner still gains in its second epoch
    cfg = AttackConfig(attackers=("linear",), epochs=2, lr=1e-4, batch_size=256, views=1, averaging_k=0)
    _, rec = train_attacker("linear", [x[:1500]], z2[:1500], x[1500:], z2[1500:], 4, cfg, log=lambda s: None)
    assert rec["best_epoch"] == rec["epochs_run"] == 2 and rec["still_improving"] is True
    assert runs[7]["still_improving"] is False


@pytest.mark.parametrize("bad", [-1, 10_001, 2.5, True])
def test_min_epochs_refuses_bad_values(bad):
    from veil.evaluation.attack import AttackConfig

    with pytest.raises(ValueError, match="min_epochs"):
        AttackConfig(min_epochs=bad)
