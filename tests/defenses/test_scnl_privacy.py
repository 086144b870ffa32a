"""Privacy of the SCNL family on digits-lt5, measured by retrained attackers (not by the noise scale).

The headline method (`scnl-private` at its default knob) must leave an attacker retrained on its messages
within 3 binomial standard deviations of the primary-only floor; the same layer with its content channel
open at lambda 0 (no information charge) must leave it far above. Both sides are measured the same way, so a broken knob, a
broken attacker or a defense that leaks its content fails one of the two.
"""

from __future__ import annotations

import math

import pytest
import torch

from veil.defenses import defense_class
from veil.evaluation.attack import AttackConfig, attribute_attack
from veil.training.loop import TrainConfig, accuracy, fit
from veil.training.run import build

ATTACK = dict(attackers=("linear", "mlp", "cnn"), epochs=30, patience=6, views=4, averaging_k=0, exposures=("inference",))


def _train_and_attack(knob: float, seed: int, **options) -> tuple[float, float, float, int]:
    torch.set_num_threads(1)
    cfg = TrainConfig(task="digits-lt5", defense="scnl-private", knob=knob, defense_options=options, epochs=15, seed=seed)
    task, defense, model = build(cfg)
    fit(defense, model, task, cfg, log=lambda s: None)
    primary = accuracy(defense, model, task.test)
    res = attribute_attack(defense, task, AttackConfig(seed=seed, **ATTACK), log=lambda s: None)
    return primary, res["inference"]["attack_acc"], res["primary_only_floor"], res["inference"]["test_records"]


@pytest.mark.parametrize("seed", [0, 1])
def test_headline_method_attack_within_three_sd_of_floor(seed):
    default = defense_class("scnl-private")(input_shape=(1, 8, 8), num_classes=2).knob_value()
    assert default and default > 0
    primary, attack, floor, n = _train_and_attack(default, seed)
    sd = math.sqrt(floor * (1 - floor) / n)
    assert primary > 0.85, f"scnl-private lost the task: primary {primary:.3f}"
    assert abs(attack - floor) <= 3 * sd, f"attack {attack:.3f} not within 3 s.d. ({3 * sd:.3f}) of the floor {floor:.3f}"


def test_same_layer_open_at_lambda_zero_far_above_floor_and_knob_lowers_it():
    # the same layer with its content channel open (init_gain 1): nothing charged at lambda 0, the
    # information bottleneck charge at lambda 10
    primary0, attack0, floor, n = _train_and_attack(0.0, 0, init_gain=1.0)
    sd = math.sqrt(floor * (1 - floor) / n)
    assert primary0 > 0.9
    assert attack0 >= floor + 10 * sd, f"lambda 0 attack {attack0:.3f} is not far above the floor {floor:.3f}"
    _, attack10, _, _ = _train_and_attack(10.0, 0, init_gain=1.0)
    assert attack10 <= attack0 - 5 * sd, f"lambda 10 did not lower the attack: {attack10:.3f} vs {attack0:.3f} at lambda 0"
