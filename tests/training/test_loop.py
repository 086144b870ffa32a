"""The one training loop: how epochs are shared among stages and which optimizer a defense trains with."""

from __future__ import annotations

import math

import pytest
import torch

from veil.data.tasks import load_task
from veil.defenses.base import Recipe, Stage
from veil.training.loop import TrainConfig, fit, stage_epochs
from veil.training.run import build


def stages(*shares: float) -> list[Stage]:
    return [Stage(f"s{i}", epoch_share=s) for i, s in enumerate(shares)]


@pytest.mark.parametrize("shares", [(0.5, 0.5), (0.25, 0.5, 0.25), (1, 1, 1), (0.1, 0.9), (1, 2, 3, 4)])
@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 5, 7, 10, 50])
def test_stage_epochs_sum_exactly_and_every_stage_runs(shares, epochs):
    counts = stage_epochs(stages(*shares), epochs)
    assert len(counts) == len(shares) and min(counts) >= 1
    if epochs >= len(shares):
        assert sum(counts) == epochs, (shares, epochs, counts)
        # no stage is further than one epoch from its exact quota, unless lifted to its minimum of 1
        for n, s in zip(counts, shares):
            quota = epochs * s / sum(shares)
            assert abs(n - quota) < 1 or n == 1
    else:
        assert counts == [1] * len(shares)


def test_stage_epochs_known_values():
    # the cases: 3 and 5 epochs over two halves were rounded to 4 before
    assert stage_epochs(stages(0.5, 0.5), 3) == [2, 1]
    assert stage_epochs(stages(0.5, 0.5), 5) == [3, 2]
    assert stage_epochs(stages(0.25, 0.5, 0.25), 4) == [1, 2, 1]
    assert stage_epochs(stages(0.1, 0.9), 10) == [1, 9]
    with pytest.raises(ValueError, match="epochs"):
        stage_epochs(stages(1), 0)
    with pytest.raises(ValueError, match="epoch_share"):
        stage_epochs(stages(1, 0), 4)


@pytest.fixture(scope="module")
def digits():
    return load_task("digits-lt5", seed=0, train_size=256)


def _optimizers(task, defense: str, epochs: int = 2, **cfg_kw) -> tuple[list, list[dict]]:
    torch.set_num_threads(1)
    cfg = TrainConfig(task="digits-lt5", defense=defense, epochs=epochs, batch_size=64, **cfg_kw)
    _, d, model = build(cfg, task)
    seen: list = []
    history = fit(d, model, task, cfg, log=lambda s: None, on_epoch_end=lambda si, ep, opt, rec: seen.append((ep, opt, opt.param_groups[0]["lr"])))
    return seen, history


def test_ani_trains_with_its_papers_sgd_and_cosine_annealing(digits):
    seen, history = _optimizers(digits, "ani", epochs=2)
    assert len(history) == 2
    (_, opt, lr_mid), (_, _, lr_end) = seen
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.9
    # cosine annealing from 0.1 over 2 epochs of 4 steps (256 records / 64): the last step of epoch 1
    # is step 3 of 8, the last of epoch 2 step 7 of 8
    assert lr_mid == pytest.approx(0.05 * (1 + math.cos(math.pi * 3 / 8)), rel=1e-6)
    assert lr_end == pytest.approx(0.05 * (1 + math.cos(math.pi * 7 / 8)), rel=1e-6)


def test_a_defense_without_a_recipe_uses_the_runs_adam_settings(digits):
    seen, _ = _optimizers(digits, "gaussian", epochs=1, lr=3e-3)
    ((_, opt, lr),) = seen
    assert type(opt) is torch.optim.Adam and lr == 3e-3


def test_a_two_stage_defense_gets_exactly_the_epochs_asked_for(digits):
    _, history = _optimizers(digits, "shredder", epochs=3)
    assert [r["stage"] for r in history] == ["pretrain", "pretrain", "noise"]


def test_recipe_validates_its_fields():
    with pytest.raises(ValueError, match="optimizer"):
        Recipe(optimizer="rmsprop")
    with pytest.raises(ValueError, match="momentum"):
        Recipe(optimizer="sgd", momentum=1.5)
    with pytest.raises(ValueError, match="schedule"):
        Recipe(schedule="step")


# ------------------------------------------------------------------ training on records already encoded
def _records(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 2, (n,), generator=g)


def _small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))


def test_messages_train_the_model_alone_and_pass_through_decode():
    from veil.defenses import create_defense
    from veil.training.loop import Messages

    x, y = _records()
    defense = create_defense("gaussian", input_shape=(1, 8, 8), num_classes=2)
    decoded: list[torch.Tensor] = []
    defense.decode = lambda m: decoded.append(m) or m  # the server's step is applied to every batch
    before = {k: v.clone() for k, v in defense.state_dict().items()}
    model = _small_model()
    w0 = model[1].weight.detach().clone()
    history = fit(defense, model, Messages(x, y), TrainConfig(epochs=2, batch_size=16), log=lambda s: None)
    assert [r["stage"] for r in history] == ["engine", "engine"] and "val_acc" not in history[0]
    assert sum(len(m) for m in decoded) == 2 * len(x)
    assert not torch.equal(model[1].weight, w0)
    assert all(torch.equal(v, before[k]) for k, v in defense.state_dict().items())


def test_proximal_term_holds_the_model_near_its_start():
    """FedProx's mu/2 ||w - w0||^2: a large mu keeps the weights much closer to where they started."""
    from veil.training.loop import Messages

    x, y = _records(256)
    drift = {}
    for mu in (0.0, 100.0):
        model = _small_model()
        w0 = [p.detach().clone() for p in model.parameters()]
        fit(None, model, Messages(x, y), TrainConfig(epochs=3, batch_size=32, lr=1e-2), proximal_mu=mu, log=lambda s: None)
        drift[mu] = sum(float(((p.detach() - a) ** 2).sum()) for p, a in zip(model.parameters(), w0))
    assert drift[100.0] < drift[0.0] / 10, drift


def test_fit_refuses_what_it_cannot_do(digits):
    from veil.training.loop import Messages
    from veil.training.screening import Screening

    with pytest.raises(ValueError, match="needs the defense"):
        fit(None, _small_model(), digits, TrainConfig(epochs=1), log=lambda s: None)
    _, d, model = build(TrainConfig(task="digits-lt5", defense="gaussian", epochs=1), digits)
    with pytest.raises(ValueError, match="screening applies"):
        fit(d, model, digits, TrainConfig(epochs=1), screening=Screening(0.25), log=lambda s: None)
    with pytest.raises(ValueError, match="same length"):
        Messages(torch.zeros(3, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="proximal_mu"):
        fit(None, _small_model(), Messages(*_records()), TrainConfig(epochs=1), proximal_mu=-1.0, log=lambda s: None)


def test_training_imports_nothing_above_it():
    """training/ sits below evaluation/, federated/, workflows/ and detection/ (the orchestration that
    needs both lives above them; detection runs its epochs in training's loop): none of its modules
    imports those packages."""
    import pathlib
    import re

    import veil.training

    root = pathlib.Path(veil.training.__file__).parent
    upward = re.compile(r"^\s*(from|import)\s+veil\.(evaluation|federated|workflows|serving|detection)\b", re.M)
    offenders = {p.name: upward.findall(p.read_text()) for p in root.glob("*.py") if upward.search(p.read_text())}
    assert offenders == {}


def test_the_log_says_when_a_defense_sets_up_and_how_long_it_took(digits):
    torch.set_num_threads(1)

    def lines(defense: str) -> list[str]:
        cfg = TrainConfig(task="digits-lt5", defense=defense, epochs=2, batch_size=64)
        _, d, model = build(cfg, digits)
        out: list[str] = []
        fit(d, model, digits, cfg, log=out.append)
        return [s for s in out if "setup" in s]

    said = lines("sample-and-hold")  # its setup derives the hold windows from the data, once per stage
    assert len(said) == 4
    for begin, done in zip(said[::2], said[1::2]):
        assert begin.endswith(f"setup on {len(digits.train.y)} training records") and "setup done (" in done
    assert lines("gaussian") == []  # nothing to set up: no line
