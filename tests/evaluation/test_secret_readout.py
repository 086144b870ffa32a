"""Secrets read from reconstructions: a clean-record classifier reads z from what inversion recovers in the
clear, and reads nothing from what it recovers through pure noise."""

from __future__ import annotations

import pytest

from veil.defenses import create_defense
from veil.evaluation.attack import AttackConfig
from veil.evaluation.inversion import InversionConfig, inversion_attack
from veil.evaluation.secret_readout import train_secret_reader

QUIET = lambda s: None  # noqa: E731
INV = InversionConfig(records=120, steps=100, restarts=1, tune_records=8, tv_weights=(0.0,))


@pytest.fixture(scope="module")
def reader(digits):
    return train_secret_reader(digits, AttackConfig(epochs=15, patience=4), architectures=("mlp", "cnn"), log=QUIET)


def test_secret_is_read_from_records_recovered_in_the_clear(digits, reader):
    none = create_defense("none", input_shape=digits.input_shape, num_classes=2)
    _, te, _, est = inversion_attack(none, digits, INV, log=QUIET)
    r = reader.read(est, te.z)
    assert reader.clean_val_acc > 0.85 and reader.architecture in ("mlp", "cnn")
    assert r["acc"] >= 0.85 and r["records"] == 120  # z is the digit: 10 classes, chance about 0.1


def test_nothing_is_read_from_records_recovered_through_pure_noise(digits, reader):
    noise = create_defense("gaussian", input_shape=digits.input_shape, num_classes=2, sigma=100.0)
    _, te, _, est = inversion_attack(noise, digits, INV, log=QUIET)
    assert reader.read(est, te.z)["acc"] < 0.3
