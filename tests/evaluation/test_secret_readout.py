"""Secrets read from reconstructions: a clean-record classifier reads z from what inversion recovers in the
clear, and reads nothing from what it recovers through pure noise."""

from __future__ import annotations

import json

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


def test_a_cached_reader_is_reused_only_for_the_same_records_and_settings(digits, tmp_path):
    lines: list[str] = []
    config = AttackConfig(epochs=2, patience=2, min_epochs=0)
    first = train_secret_reader(digits, config, architectures=("mlp",), cache_dir=tmp_path, log=lines.append)
    assert not first.from_cache and len(list(tmp_path.glob("secret-reader-*.safetensors"))) == 1
    again = train_secret_reader(digits, config, architectures=("mlp",), cache_dir=tmp_path, log=lines.append)
    assert again.from_cache and again.clean_val_acc == first.clean_val_acc and any("loaded mlp" in s for s in lines)
    x = digits.test.x[:64]
    assert (again.model(x, None).argmax(1) == first.model(x, None).argmax(1)).all()
    other_attack = AttackConfig(epochs=2, patience=2, min_epochs=0, attackers=("linear",), views=1, exposures=("inference",))
    assert train_secret_reader(digits, other_attack, architectures=("mlp",), cache_dir=tmp_path, log=QUIET).from_cache  # settings the readers never see
    other = train_secret_reader(digits, AttackConfig(epochs=2, patience=2, min_epochs=0, seed=1), architectures=("mlp",), cache_dir=tmp_path, log=QUIET)
    assert not other.from_cache and len(list(tmp_path.glob("secret-reader-*.safetensors"))) == 2


def test_a_cached_reader_that_does_not_check_out_is_trained_again(digits, tmp_path):
    config = AttackConfig(epochs=2, patience=2, min_epochs=0)
    train_secret_reader(digits, config, architectures=("mlp",), cache_dir=tmp_path, log=QUIET)
    meta = next(tmp_path.glob("secret-reader-*.json"))
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({**record, "clean_val_acc": record["clean_val_acc"] - 0.2}))  # weights that do not score what was recorded
    lines: list[str] = []
    assert not train_secret_reader(digits, config, architectures=("mlp",), cache_dir=tmp_path, log=lines.append).from_cache
    assert any("training again" in s for s in lines)
