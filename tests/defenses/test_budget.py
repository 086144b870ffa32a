"""--client-budget: one number sizes every defense's client network; measured share <= budget, and the
next size up would not fit; impossible budgets are refused with the smallest reachable share."""

from __future__ import annotations

import pytest

from veil.defenses import defense_class, list_defenses
from veil.defenses.budget import client_share, fit_client_budget
from veil.training import TrainConfig, train_run

SHAPE = (1, 28, 28)


@pytest.mark.parametrize("name", [n for n in list_defenses() if defense_class(n).budget_option])
def test_budget_is_met_and_is_the_largest_size_that_fits(name):
    try:
        options, share = fit_client_budget(name, 0.03, {}, input_shape=SHAPE, num_classes=2, model="cnn")
    except ValueError as err:
        assert "cannot fit" in str(err)
        return
    key = defense_class(name).budget_option
    assert share <= 0.03
    assert share == pytest.approx(client_share(name, options, SHAPE, 2, "cnn"))
    bigger = client_share(name, {key: options[key] + 1}, SHAPE, 2, "cnn")
    assert bigger > 0.03 or options[key] == 256


def test_a_smaller_budget_gives_a_smaller_client():
    small, s_small = fit_client_budget("scnl", 0.005, {}, input_shape=SHAPE, num_classes=2, model="cnn")
    large, s_large = fit_client_budget("scnl", 0.03, {}, input_shape=SHAPE, num_classes=2, model="cnn")
    assert small["selector_width"] < large["selector_width"] and s_small < s_large <= 0.03


@pytest.mark.parametrize("name, budget", [("svd", 0.01), ("scnl-adaptive", 0.005)])
def test_impossible_budgets_are_refused_with_the_smallest_share(name, budget):
    with pytest.raises(ValueError, match=r"cannot fit a client budget .* takes \d"):
        fit_client_budget(name, budget, {}, input_shape=SHAPE, num_classes=2, model="cnn")


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, float("nan")])
def test_bad_budgets_are_named(budget):
    with pytest.raises(ValueError, match="budget"):
        fit_client_budget("scnl", budget, {}, input_shape=SHAPE, num_classes=2, model="cnn")
    with pytest.raises(ValueError, match="client_budget"):
        TrainConfig(client_budget=budget)


def test_train_records_the_measured_share_within_the_budget(tmp_path):
    cfg = TrainConfig(task="digits-lt5", defense="local", epochs=1, client_budget=0.02)
    metrics = train_run(cfg, tmp_path / "run", log=lambda s: None)
    assert 0 < metrics["client_flops_share"] <= 0.02
