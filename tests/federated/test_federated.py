"""Federated training on Flower (in-process grid): accuracy improves, the local engine never sees a
clean record, splits, resume, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import veil.federated.client_app as client_app
import veil.federated.server_app as server_app
from veil.defenses import list_defenses
from veil.federated.simulation import run_federated
from veil.federated.task import FederatedConfig, client_data, load_federated_task, partition_indices
from veil.io import load_weights
from veil.models import create_model

torch.set_num_threads(1)
QUIET = dict(log=lambda s: None)


def _config(**kw) -> FederatedConfig:
    base = dict(task="digits-lt5", clients=3, rounds=2, defense="gaussian", local_epochs=2, seed=0, train_size=600)
    base.update(kw)
    return FederatedConfig(**base)


def test_three_clients_two_rounds_improve_over_round_zero(tmp_path):
    result = run_federated(_config(), tmp_path / "run", **QUIET)
    accs = [r["acc_training_exposure"] for r in result["rounds"]]
    assert [r["round"] for r in result["rounds"]] == [0, 1, 2]
    assert max(accs[1:]) > accs[0] + 0.1, accs
    assert result["backend"] == "inprocess"
    assert (tmp_path / "run" / "accuracy_per_round.png").stat().st_size > 1000
    # the saved global model loads and gives the last round's clean accuracy
    task = load_federated_task(_config())
    model = create_model("cnn", task.input_shape, task.num_primary)
    model.load_state_dict(load_weights(tmp_path / "run" / "model.safetensors"))
    model.eval()
    with torch.no_grad():
        acc = float((model(task.test.x).argmax(1) == task.test.y).float().mean())
    assert acc == pytest.approx(result["rounds"][-1]["acc_clean"], abs=1e-6)
    assert not (tmp_path / "run" / "rounds.json").exists()


def _watch_first_layer(monkeypatch, config: FederatedConfig) -> list[torch.Tensor]:
    """Record every input of the first layer of the model the client's engine trains."""
    seen: list[torch.Tensor] = []
    original = client_app.local_train

    def spy(model, x, y, cfg, **kw):
        first = next(m for m in model.modules() if not list(m.children()))
        first.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
        return original(model, x, y, cfg, **kw)

    monkeypatch.setattr(client_app, "local_train", spy)
    return seen


def _clean_records_seen(seen: list[torch.Tensor], config: FederatedConfig) -> int:
    clean = torch.cat([client_data(config, k)[0].x for k in range(config.clients)]).flatten(1)
    hits = 0
    for batch in seen:
        d = torch.cdist(batch.flatten(1), clean)  # (B, N) distance of each engine input to each clean record
        hits += int((d.min(1).values < 1e-4).sum())
    return hits


@pytest.mark.parametrize("defense", ["gaussian"] + (["scnl"] if "scnl" in list_defenses() else []))
def test_client_engine_receives_only_obfuscated_records(tmp_path, monkeypatch, defense):
    config = _config(rounds=1, local_epochs=1, defense=defense, obfuscator_epochs=1)
    seen = _watch_first_layer(monkeypatch, config)
    run_federated(config, tmp_path / "obf", **QUIET)
    assert sum(len(b) for b in seen) == len(load_federated_task(config).train)  # every record, once
    assert _clean_records_seen(seen, config) == 0


def test_the_clean_record_check_fires_without_obfuscation(tmp_path, monkeypatch):
    config = _config(rounds=1, local_epochs=1, defense="none")
    seen = _watch_first_layer(monkeypatch, config)
    run_federated(config, tmp_path / "clean", **QUIET)
    assert _clean_records_seen(seen, config) == len(load_federated_task(config).train)


def test_interrupted_run_resumes_at_the_last_round(tmp_path, monkeypatch):
    config = _config(rounds=3, local_epochs=1)
    full = run_federated(config, tmp_path / "full", **QUIET)

    original = server_app.evaluate_on_clients

    def crash_at_round_2(grid, arrays, cfg, server_round):
        if server_round == 2:
            raise KeyboardInterrupt
        return original(grid, arrays, cfg, server_round)

    monkeypatch.setattr(server_app, "evaluate_on_clients", crash_at_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_federated(config, tmp_path / "part", **QUIET)
    saved = json.loads((tmp_path / "part" / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in saved] == [0, 1]
    monkeypatch.setattr(server_app, "evaluate_on_clients", original)
    lines: list[str] = []
    resumed = run_federated(config, tmp_path / "part", log=lines.append)
    assert any("resuming after round 1" in line for line in lines)
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2, 3]
    assert resumed["rounds"][1]["acc_clean"] == pytest.approx(full["rounds"][1]["acc_clean"])
    assert set(resumed["rounds"][-1]) == set(full["rounds"][-1])


def test_fedprox_and_noniid_run(tmp_path):
    result = run_federated(_config(rounds=1, strategy="fedprox", partition="noniid", alpha=0.3, local_epochs=1), tmp_path / "r", **QUIET)
    assert len(result["rounds"]) == 2 and all(0 <= r["acc_clean"] <= 1 for r in result["rounds"])


def test_iid_and_noniid_partitions():
    labels = np.repeat(np.arange(10), 50)
    iid = partition_indices(labels, 4, "iid", seed=0)
    assert sorted(np.concatenate(iid).tolist()) == list(range(500))
    assert max(map(len, iid)) - min(map(len, iid)) <= 1
    skew = partition_indices(labels, 4, "noniid", alpha=0.1, seed=0)
    assert sorted(np.concatenate(skew).tolist()) == list(range(500))

    def spread(parts):  # mean over clients of the largest class share
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    assert spread(skew) > spread(iid) + 0.2


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rounds=0), "rounds must be >= 1"),
        (dict(clients=0), "clients must be >= 1"),
        (dict(partition="zipf"), "partition must be one of"),
        (dict(strategy="fedsgd"), "strategy must be one of"),
        (dict(alpha=0.0), "alpha must be a positive"),
        (dict(trusted_fraction=0.0), "trusted_fraction"),
        (dict(defense="nope"), "unknown defense"),
    ],
)
def test_bad_settings_raise_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _config(**kw)


def test_more_clients_than_records_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"more clients \(5000\) than training records"):
        run_federated(_config(clients=5000), tmp_path / "r", **QUIET)
    with pytest.raises(ValueError, match="backend must be one of"):
        run_federated(_config(), tmp_path / "r", backend="mpi", **QUIET)
