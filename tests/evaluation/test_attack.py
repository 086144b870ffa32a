"""The attribute-inference attack can tell a leaking channel from a destroyed one (digits-lt5)."""

from __future__ import annotations

import math

import pytest
import torch

from veil.defenses import create_defense
from veil.evaluation.attack import AttackConfig, attribute_attack, attackers_for, build_attacker, ignores_label, is_deterministic


def tolerance(p: float, n: int) -> float:
    """Four binomial standard deviations of an accuracy p measured on n test records."""
    return 4 * math.sqrt(p * (1 - p) / n)


# small effort in tests, through options (the defaults stay strong)
FAST = dict(epochs=8, patience=3, views=1, averaging_k=0)


def test_no_defense_attack_is_far_above_floor_with_every_architecture(digits):
    d = create_defense("none", input_shape=digits.input_shape, num_classes=2)
    r = attribute_attack(d, digits, AttackConfig(exposures=("inference",), **FAST), log=lambda s: None)
    inf = r["inference"]
    assert set(inf["attackers"]) == {"linear", "mlp", "cnn", "cnn-bn"}
    assert inf["attack_acc"] > 0.85 > r["primary_only_floor"] + 0.5
    assert inf["best"] == max(inf["attackers"], key=lambda a: inf["attackers"][a]["val_acc"])
    assert inf["attack_acc"] == inf["attackers"][inf["best"]]["test_acc"]
    assert abs(r["primary_only_floor"] - 0.2) < 0.03 and abs(r["majority_floor"] - 0.1) < 0.03
    assert r["config"]["epochs"] == 8


def test_destroying_defense_falls_to_the_floor(digits, make, fakes):
    d = make(fakes['pure-noise'], digits)
    r = attribute_attack(d, digits, AttackConfig(attackers=("linear", "mlp", "cnn"), **FAST), log=lambda s: None)
    n, floor = len(digits.test), r["majority_floor"]
    for exposure in ("inference", "training"):
        assert r[exposure]["attack_acc"] <= floor + tolerance(floor, n), r[exposure]
    assert r["training"]["same_as_inference"] is True


def test_training_exposure_is_attacked_separately(digits, make, fakes):
    d = make(fakes['label-only'], digits)
    assert not ignores_label(d, digits.val.x[:32], digits.val.y[:32])
    r = attribute_attack(d, digits, AttackConfig(attackers=("linear", "mlp"), **FAST), log=lambda s: None)
    n, maj, prim = len(digits.test), r["majority_floor"], r["primary_only_floor"]
    assert r["inference"]["attack_acc"] <= maj + tolerance(maj, n)
    # the known label leaks at the training exposure: the attacker reaches the primary-only floor, no further
    assert abs(r["training"]["attack_acc"] - prim) <= tolerance(prim, n)
    assert r["training"]["same_as_inference"] is False


def test_averaging_attack_gains_on_independent_noise(digits):
    d = create_defense("gaussian", input_shape=digits.input_shape, num_classes=2, sigma=1.5)
    cfg = AttackConfig(attackers=("linear", "mlp"), epochs=10, patience=3, views=2, averaging_k=16, exposures=("inference",))
    r = attribute_attack(d, digits, cfg, log=lambda s: None)["inference"]
    assert r["averaging"]["k"] == 16 and r["averaging"]["attacker"] == r["best"]
    assert r["averaging"]["test_acc"] > r["attack_acc"] + 0.1


def test_deterministic_defense_skips_averaging(digits):
    d = create_defense("none", input_shape=digits.input_shape, num_classes=2)
    assert is_deterministic(d, digits.val.x[:16])
    r = attribute_attack(d, digits, AttackConfig(attackers=("linear",), epochs=3, patience=2, views=1, averaging_k=4, exposures=("inference",)), log=lambda s: None)
    assert "deterministic" in r["inference"]["averaging"]["note"]


def test_vector_messages_get_mlp_attackers(digits, make, fakes):
    d = make(fakes['flatten'], digits)
    names, skipped = attackers_for((64,), ("linear", "mlp", "cnn", "cnn-bn"))
    assert names == ["linear", "mlp", "mlp-bn"] and skipped == ["cnn", "cnn-bn"]
    r = attribute_attack(d, digits, AttackConfig(attackers=("linear", "cnn"), epochs=4, patience=2, views=1, averaging_k=0, exposures=("inference",)), log=lambda s: None)
    inf = r["inference"]
    assert inf["message_shape"] == [64]
    assert set(inf["attackers"]) == {"linear", "mlp-bn"}
    assert "not image-shaped" in inf["skipped"]["cnn"]
    assert inf["attack_acc"] > 0.7


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
    ],
)
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttackConfig(**kwargs)


def test_cnn_on_vector_raises():
    with pytest.raises(ValueError, match="image-shaped"):
        build_attacker("cnn", (64,), 10)
