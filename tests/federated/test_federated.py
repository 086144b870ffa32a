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


def _watch_engine_inputs(monkeypatch) -> list[torch.Tensor]:
    """Record every tensor handed to a client's local engine, in call order (all clients of round 1 first)."""
    handed: list[torch.Tensor] = []
    original = client_app.local_train

    def spy(model, x, y, cfg, **kw):
        handed.append(x.detach().clone())
        return original(model, x, y, cfg, **kw)

    monkeypatch.setattr(client_app, "local_train", spy)
    return handed


def _server_redraws(x_obf: torch.Tensor, seed: int, batch_size: int = 512) -> torch.Tensor:
    """gaussian's eps as the server would redraw it from ``seed``: ``obfuscate`` encodes batch by batch,
    each ``x + sigma * randn_like(x)`` from the global generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.cat([torch.randn_like(x_obf[i : i + batch_size]) for i in range(0, len(x_obf), batch_size)])


def test_server_cannot_regenerate_or_reuse_client_noise(tmp_path, monkeypatch):
    """The server holds config.json, the obfuscator (gaussian: nothing to learn but sigma), every round
    number and partition id. It redraws eps from every seed it could know (each formula clients ever used:
    seed + 1000*round + pid for training, seed + 5000 + 1000*round + pid (+1) for evaluation, the local
    engine's seed + 7*round + pid, the obfuscator's seed + 7919*(pid + 1), seed + pid, seed) and
    subtracts sigma * eps. Client noise must come from none of them, and no two rounds or clients may
    share a stream."""
    sigma = 0.5
    config = _config(rounds=2, local_epochs=1, knob=sigma)
    handed = _watch_engine_inputs(monkeypatch)
    run_federated(config, tmp_path / "run", **QUIET)
    clean = [client_data(config, k)[0].x for k in range(config.clients)]
    assert len(handed) == config.rounds * config.clients
    s = config.seed
    noise = {}
    for i, x_obf in enumerate(handed):
        # the strategy samples nodes in any order: the client is the one whose records these are
        pid = min(range(config.clients), key=lambda k: (x_obf - clean[k]).abs().mean().item() if x_obf.shape == clean[k].shape else float("inf"))
        rnd = i // config.clients + 1
        x = clean[pid]
        assert x_obf.shape == x.shape and (x_obf - x).std().item() == pytest.approx(sigma, rel=0.1)
        noise[rnd, pid] = (x_obf - x) / sigma
        seeds = {s, s + pid, s + 7919 * (pid + 1)}
        for r in range(0, config.rounds + 7):
            seeds |= {s + 1000 * r + pid, s + 5000 + 1000 * r + pid, s + 5001 + 1000 * r + pid, s + 7 * r + pid}
        # E|sigma (eps - eps')| = sigma * 2/sqrt(pi) ~ 0.56 for an independent redraw; ~0 for the right seed
        best = min((x_obf - sigma * _server_redraws(x_obf, seed) - x).abs().mean().item() for seed in seeds)
        assert best > 0.3, (rnd, pid, best)
    assert len(noise) == config.rounds * config.clients
    # no stream shared between two rounds of one client, nor between two clients of one round
    first = noise[1, 0].flatten()[:2000]
    for key, eps in noise.items():
        if key != (1, 0):
            e = eps.flatten()[:2000]
            assert abs(torch.corrcoef(torch.stack([first, e]))[0, 1].item()) < 0.1, key
            # a reused (or shifted) stream repeats nearly all 100 values; independent float32 draws can
            # share one by chance (about 2000 x 100 comparisons), so allow a few
            assert int(torch.isin(first[:100], e).sum()) <= 3, key


def test_clients_refuse_a_noise_setting_from_the_server():
    from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict

    from veil.federated.simulation import InProcessGrid

    config = _config(rounds=1)
    grid = InProcessGrid(client_app.app, 1)
    content = RecordDict({"arrays": ArrayRecord(create_model("cnn", (1, 8, 8), 2).state_dict()),
                          "config": ConfigRecord({"veil-config": config.to_json(), "server-round": 1, "noise-seed": 1234})})
    msg = grid.create_message(content, MessageType.TRAIN, 1000, "g")
    with pytest.raises(ValueError, match="refusing the server's noise setting"):
        client_app.train(msg, grid.contexts[1000])
    with pytest.raises(ValueError, match="unknown federated config keys"):
        FederatedConfig.from_dict({**config.to_dict(), "noise_seed": 1})


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
    # the rounds finished before the interruption are kept, not recomputed (client noise is fresh OS
    # entropy, so a recomputed round would differ)
    assert [r["acc_clean"] for r in resumed["rounds"][:2]] == [r["acc_clean"] for r in saved]
    assert resumed["rounds"][0]["acc_clean"] == pytest.approx(full["rounds"][0]["acc_clean"])  # same round-0 model
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


def test_the_global_obfuscator_is_the_average_of_what_the_clients_sent(tmp_path, monkeypatch):
    """Federated obfuscator training: every client sends its obfuscator beside its model, and the saved
    global obfuscator is their FedAvg (the mean weighted by the clients' record counts), computed here
    from the replies the clients built."""
    from veil.defenses.saving import load_obfuscator

    sent: list[tuple[dict, int]] = []
    original = client_app.pack

    def spy(model, defense):
        state = original(model, defense)
        if defense is not None:
            sent.append(({k: v.detach().clone() for k, v in state.items() if k.startswith("obfuscator.")}, 0))
        return state

    monkeypatch.setattr(client_app, "pack", spy)
    config = _config(rounds=1, defense="scnl-private", obfuscator_epochs=1, local_epochs=1, clients=2, train_size=200, eval_size=100)
    run_federated(config, tmp_path / "fed", **QUIET)
    sizes = [len(client_data(config, k)[0]) for k in range(config.clients)]
    assert len(sent) == config.clients and len(set(sizes)) == 1  # IID: equal weights
    glob = load_obfuscator(tmp_path / "fed" / "obfuscator.safetensors").state_dict()
    float_keys = [k for k, v in sent[0][0].items() if v.is_floating_point()]
    assert float_keys and any(not torch.equal(sent[0][0][k], sent[1][0][k]) for k in float_keys)  # the clients differ
    for k in float_keys:
        mean = torch.stack([s[k] for s, _ in sent]).mean(0)
        assert torch.allclose(glob[k[len("obfuscator."):]], mean, atol=1e-6), k


def test_every_round_attacks_what_the_engines_received(tmp_path):
    config = _config(rounds=2, clients=2, defense="scnl-private", obfuscator_epochs=1, local_epochs=1, attack_epochs=1, attack_size=100, attack_clients=2, train_size=200, eval_size=100)
    result = run_federated(config, tmp_path / "fed", **QUIET)
    assert "attack" not in result["rounds"][0]  # round 0: the engines have received nothing yet
    for r in result["rounds"][1:]:
        a = r["attack"]
        assert len(a["clients"]) == 2 and a["attack_acc"] == max(c["attack_acc"] for c in a["clients"])
        assert 0.15 < a["primary_only_floor"] < 0.3
        for c in a["clients"]:
            assert set(c["attackers"]) == {"linear", "mlp", "cnn", "cnn-bn", "server"}
            assert c["records"]["disjoint_from_clients"] and c["records"]["train"] == 100
    last = result["rounds"][-1]["attack"]["clients"][0]["averaging"]
    assert last["k"] == 2  # the engine holds one draw per round of every record
