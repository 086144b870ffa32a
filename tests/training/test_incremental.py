"""Incremental training with obfuscated data: steps over p, screening, resume, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from veil.data.tasks import load_task
from veil.io import load_weights
from veil.models import create_model
from veil.training.incremental import IncrementalConfig, run_incremental
from veil.training.loop import Messages, TrainConfig, fit, model_accuracy
from veil.training.screening import Screening, screen
from veil.workflows.incremental import run as run_with_attack

torch.set_num_threads(1)


def _config(**kw) -> IncrementalConfig:
    base = dict(task="digits-lt5", defense="gaussian", start=10, step=10, max_p=20, target=1.0, clean_epochs=2, obfuscator_epochs=1, resume_epochs=1, attack_epochs=1, train_size=400, eval_size=200)
    base.update(kw)
    return IncrementalConfig(**base)


@pytest.fixture(scope="module")
def task():
    return load_task("digits-lt5", seed=0, train_size=400)


def _structure(d):
    if isinstance(d, dict):
        return {k: _structure(v) for k, v in d.items() if k != "seconds"}
    if isinstance(d, list):
        return [_structure(v) for v in d]
    return type(d).__name__


def test_two_steps_and_resume_give_the_same_result(tmp_path, task):
    cfg = _config(noise_seed=11)  # research opt-in: reproducible hand-over noise, so a resume is exact
    full = run_with_attack(cfg, tmp_path / "full", task=task, log=lambda s: None)
    assert [s["p"] for s in full["steps"]] == [10, 20]
    assert full["finished"] and not full["reached_target"]
    assert full["noise"] == "reproducible" and full["noise_seed"] == 11
    for s in full["steps"]:
        assert 0.0 <= s["nn_prime_p"]["test_acc_clean"] <= 1.0
        assert s["clean_records"] + s["obfuscated_records"] == 400
        assert "attack_acc" in s["privacy"] and s["privacy"]["primary_only_floor"] > 0.1
    assert (tmp_path / "full" / "accuracy_vs_p.png").stat().st_size > 1000
    assert (tmp_path / "full" / "model.safetensors").exists()

    # interrupted after one p, then resumed
    part = run_with_attack(cfg, tmp_path / "part", task=task, log=lambda s: None, stop_after=1)
    assert not part["finished"] and [s["p"] for s in part["steps"]] == [10]
    assert not (tmp_path / "part" / "incremental.json").exists()
    state = json.loads((tmp_path / "part" / "state.json").read_text())
    assert [s["p"] for s in state["steps"]] == [10]
    lines: list[str] = []
    resumed = run_with_attack(cfg, tmp_path / "part", task=task, log=lines.append)
    assert any("resuming after p = 10" in line for line in lines)
    assert _structure(resumed) == _structure(full)
    # each p is seeded on its own, so the resumed run reproduces the uninterrupted one
    for a, b in zip(resumed["steps"], full["steps"]):
        assert a["nn_prime_p"] == pytest.approx(b["nn_prime_p"])
        assert a["nn_p"] == pytest.approx(b["nn_p"])
    # a finished run is not retrained
    again = run_with_attack(cfg, tmp_path / "part", task=task, log=lambda s: None)
    assert again == json.loads((tmp_path / "part" / "incremental.json").read_text())


def _hand_overs(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record what each NN'-p engine receives: (records, screened flags = the obfuscated ones)."""
    import veil.training.incremental as inc

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = inc.fit

    def spy(defense, model, data, config, **kw):
        if kw.get("name", "").startswith("NN'"):
            seen.append((data.x.clone(), data.screened.clone()))
        return original(defense, model, data, config, **kw)

    monkeypatch.setattr(inc, "fit", spy)
    return seen


def test_engine_holding_the_config_cannot_regenerate_the_hand_over_noise(tmp_path, task, monkeypatch):
    """The engine that trains NN'-p may hold config.json and the code. It replays the run on records it
    knows (all zeros: gaussian's noise does not depend on them), takes what it is handed there as
    sigma * eps, and subtracts it from the real hand-over. With OS-entropy noise that recovers nothing."""
    import dataclasses

    sigma = 0.5
    cfg = _config(max_p=10, attack_epochs=0, knob=sigma)
    seen = _hand_overs(monkeypatch)
    result = run_incremental(cfg, tmp_path / "real", task=task, log=lambda s: None)
    assert result["noise"] == "os-entropy" and "noise_seed" not in result
    zeros = dataclasses.replace(task, train=dataclasses.replace(task.train, x=torch.zeros_like(task.train.x)))
    run_incremental(cfg, tmp_path / "replay", task=zeros, log=lambda s: None)
    run_incremental(cfg, tmp_path / "again", task=task, log=lambda s: None)
    (real, flags), (replay, _), (again, _) = seen
    obf = flags.bool()
    assert int(obf.sum()) == 360  # the (100 - p)% obfuscated records, after the p% clean ones
    clean_rest = task.train.x[torch.sort(torch.as_tensor(_rest_index(cfg, task))).values]
    assert (real[obf] - clean_rest).std().item() == pytest.approx(sigma, rel=0.1)
    assert (replay[obf]).std().item() == pytest.approx(sigma, rel=0.1)
    err = (real[obf] - replay[obf] - clean_rest).abs().mean().item()
    assert err > 0.3, err  # ~ sigma * 2/sqrt(pi) = 0.56; a regenerated stream gives ~0
    assert not torch.equal(real[obf], again[obf])  # the same config twice: two different hand-overs


def _rest_index(cfg: IncrementalConfig, task) -> np.ndarray:
    order = np.random.default_rng(cfg.seed).permutation(len(task.train))
    return order[max(1, int(round(len(task.train) * cfg.start / 100))) :]


def test_stops_once_the_target_is_reached(tmp_path, task):
    result = run_incremental(_config(target=0.0, max_p=30), tmp_path / "r", task=task, log=lambda s: None)
    assert result["reached_target"] and [s["p"] for s in result["steps"]] == [10]


def test_different_config_in_the_same_folder_is_refused(tmp_path, task):
    run_incremental(_config(max_p=10), tmp_path / "r", task=task, log=lambda s: None)
    with pytest.raises(ValueError, match="different config"):
        run_incremental(_config(max_p=10, screen_ratio=0.5), tmp_path / "r", task=task, log=lambda s: None)


def test_screen_hides_the_asked_share():
    x = torch.ones(64, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    for mode in ("rect", "pixel"):
        hidden = 1 - screen(x, 0.25, mode=mode, generator=g).mean().item()
        assert hidden == pytest.approx(0.25, abs=0.03), mode
    assert torch.equal(screen(x, 0.0), x)
    # fresh masks every call
    assert not torch.equal(screen(x, 0.25, generator=g), screen(x, 0.25, generator=g))


def test_screening_touches_only_flagged_records():
    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    model[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    x = torch.ones(8, 1, 4, 4) + torch.arange(8.0).view(8, 1, 1, 1)
    y = torch.zeros(8, dtype=torch.long)
    flags = torch.tensor([True] * 4 + [False] * 4)
    fit(None, model, Messages(x, y, flags), TrainConfig(epochs=1, batch_size=8), screening=Screening(0.5), log=lambda s: None)
    batch = seen[0]
    zeros = (batch == 0).sum(1)
    # flattened rows: the first four records (values 1..4) are screened, the last four never
    values = batch.max(1).values
    for v, z in zip(values.tolist(), zeros.tolist()):
        assert (z > 0) == (v <= 4.0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(start=0), "start must be a percentage"),
        (dict(start=120), "start must be a percentage"),
        (dict(max_p=-5), "max_p must be a percentage"),
        (dict(step=0), "step must be a percentage"),
        (dict(target=1.5), r"target accuracy must lie in \[0, 1\]"),
        (dict(screen_ratio=1.0), "screen_ratio"),
        (dict(screen_mode="blob"), "screen_mode"),
        (dict(defense="nope"), "unknown defense"),
        (dict(noise_seed=-1), "noise_seed must be a non-negative integer"),
    ],
)
def test_bad_settings_raise_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _config(**kw)


def test_resume_obfuscated_keeps_every_clean_record_from_the_resuming_engine(tmp_path, task, monkeypatch):
    import veil.training.incremental as inc

    seen: list[torch.Tensor] = []
    original = inc.fit

    def spy(defense, model, data, config, **kw):
        if kw.get("name", "").startswith("NN'"):
            seen.append(data.x.clone())
        return original(defense, model, data, config, **kw)

    monkeypatch.setattr(inc, "fit", spy)
    cfg = _config(max_p=10, attack_epochs=0, resume_clean=False)
    run_incremental(cfg, tmp_path / "r", task=task, log=lambda s: None)
    clean = task.train.x.flatten(1)
    (engine,) = seen
    assert len(engine) == len(task.train)
    assert int((torch.cdist(engine.flatten(1), clean).min(1).values < 1e-4).sum()) == 0
    # and the default (the seed's step 4) does show the p% records in the clear
    seen.clear()
    run_incremental(_config(max_p=10, attack_epochs=0), tmp_path / "d", task=task, log=lambda s: None)
    assert int((torch.cdist(seen[0].flatten(1), clean).min(1).values < 1e-4).sum()) == 40


def test_obfuscated_records_carry_what_the_clean_few_cannot(tmp_path):
    """The point of the hand-over, measured on digits-lt5 at p = 2% (22 clean records): NN'-p, resumed
    on the clean records plus the 98% obfuscated ones (gaussian, sigma 0.3), beats NN-p continued on the
    clean records alone for as many optimiser steps (so the gain is not just more training).
    Measured with OS-entropy noise, seeds 0/1/2: NN'-p 0.894/0.892/0.872 against 0.792/0.714/0.683
    (NN-p itself 0.50-0.52)."""
    full = load_task("digits-lt5", seed=0)
    cfg = IncrementalConfig(task="digits-lt5", defense="gaussian", knob=0.3, start=2, max_p=2, target=1.0, resume_epochs=10, attack_epochs=0, noise_seed=0)
    step = run_incremental(cfg, tmp_path / "r", task=full, log=lambda s: None)["steps"][0]
    assert step["clean_records"] == 22
    # the control: NN-p from the run folder, trained on the same 22 clean records for NN'-p's number of steps
    order = np.random.default_rng(cfg.seed).permutation(len(full.train))
    clean = full.train.subset(np.sort(order[:22]))
    nn_p = create_model(cfg.model, full.input_shape, full.num_primary)
    nn_p.load_state_dict(load_weights(tmp_path / "r" / "steps" / "p002_000" / "nn_p.safetensors"))
    assert model_accuracy(nn_p, full.test.x, full.test.y) == pytest.approx(step["nn_p"]["test_acc_clean"])
    steps = cfg.resume_epochs * -(-len(full.train) // cfg.batch_size)
    fit(None, nn_p, Messages(clean.x, clean.y), cfg.train_config(steps, seed=cfg.seed + 3), log=lambda s: None)
    control = model_accuracy(nn_p, full.test.x, full.test.y)
    nn_prime = step["nn_prime_p"]["test_acc_clean"]
    assert nn_prime > control + 0.05, (nn_prime, control)
    assert nn_prime > step["nn_p"]["test_acc_clean"] + 0.2


def test_sizes_that_would_run_without_bound_are_refused():
    import pytest

    from veil.federated.task import FederatedConfig
    from veil.training.incremental import IncrementalConfig

    with pytest.raises(ValueError, match="increments"):
        IncrementalConfig(step=1e-9)
    for bad in (dict(server_lr=float("nan")), dict(proximal_mu=float("inf"))):
        with pytest.raises(ValueError, match="server_lr"):
            FederatedConfig(**bad)
