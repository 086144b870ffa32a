"""The best attack counts every attribute attack, the secrets read from reconstructions among them."""

from __future__ import annotations

from veil.evaluation.report import flatten
from veil.evaluation.sweep import ATTACK_KEYS, best_attack


def test_best_attack_counts_the_secret_read_from_a_reconstruction():
    row = {"attack_acc": 0.3, "attack_acc_training": 0.35, "averaging_attack_acc": None, "secret_from_inversion_acc": 0.6}
    assert best_attack(row) == (0.6, "secret_from_inversion_acc")
    assert best_attack({"attack_acc": 0.3}) == (0.3, "attack_acc")
    assert best_attack({}) == (None, None)
    assert {"secret_from_reconstruction_acc", "secret_from_prior_reconstruction_acc", "secret_from_inversion_acc"} <= set(ATTACK_KEYS)


def test_report_rows_name_the_best_attack():
    p = {"task": "t", "defense": "d", "attack_acc": 0.4, "secret_from_prior_reconstruction_acc": 0.5,
         "inversion": {"psnr": 31.0, "path": "distance"}, "evaluation_config": {"strength": "strong"}}
    row = flatten(p)
    assert row["best_attack"] == 0.5 and row["best_attack_name"] == "secret_from_prior_reconstruction_acc"
    assert row["inversion_psnr"] == 31.0 and row["strength"] == "strong"
    assert flatten({"task": "t", "defense": "d", "attack_acc": 0.4})["strength"] == "standard"
