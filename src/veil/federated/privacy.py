"""What each client's compute engine saw in a round, attacked: the secondary attribute (the digit) read
from the round's messages by :mod:`veil.evaluation.attack`'s retrained attackers at the training exposure
(hard selection, y beside the message, as the engine has it).

The obfuscator attacked is the one the client used that round: from its reply (``federated`` obfuscator
training), else rebuilt the way the client builds it (the attacker holds everything but the noise).
The attackers train on held-out records no client holds (``task.held_out``), early-stop on obfuscated
validation records and are scored on obfuscated test records. Every round re-obfuscates every record
with fresh noise, so after R rounds the engine holds R draws of each record: the last round adds the
averaging attack over k = R draws.
"""

from __future__ import annotations

from typing import Any

import torch

from veil.defenses import Defense
from veil.evaluation.attack import AttackConfig, attack_exposure
from veil.federated.task import FederatedConfig, aggregates_obfuscator, client_data, client_obfuscator, global_obfuscator, load_federated_task, test_split


def engine_obfuscators(config: FederatedConfig, replies: list[tuple[int, dict[str, torch.Tensor]]]) -> list[tuple[str, Defense]]:
    """(label, obfuscator) of the first ``config.attack_clients`` clients of a round.

    Args:
        replies: (node id, global-state layout of the client's reply) of every client of the round.
    """
    if aggregates_obfuscator(config):
        ordered = sorted(replies, key=lambda r: r[0])[: config.attack_clients]
        return [(f"node {nid}", global_obfuscator(config, state)) for nid, state in ordered]
    return [(f"partition {k}", client_obfuscator(config, k, client_data(config, k)[0])) for k in range(config.attack_clients)]


def attack_round(config: FederatedConfig, replies: list[tuple[int, dict[str, torch.Tensor]]], server_round: int) -> dict[str, Any]:
    """The attack on what the clients' engines received in round ``server_round`` (see the module docstring).

    Returns ``attack_acc`` (the highest over the clients attacked), ``primary_only_floor``,
    ``majority_floor``, per client its best attacker and every attacker's test accuracy, and (last round)
    the averaging attack.
    """
    task = load_federated_task(config)
    task = type(task)(task.name, task.train, task.val, test_split(config, task), task.num_primary, task.num_secondary, held_out=task.held_out)
    last = server_round == config.rounds and server_round > 1
    cfg = AttackConfig(
        epochs=config.attack_epochs, patience=max(2, min(6, config.attack_epochs // 3)), train_size=config.attack_size,
        val_size=None if config.attack_size is None else max(100, config.attack_size // 2),  # early stopping only: the test split scores
        averaging_k=server_round if last else 0, exposures=("training",), seed=config.seed + 101 * server_round, device=config.attack_device,
    )
    clients = []
    for label, defense in engine_obfuscators(config, replies):
        res = attack_exposure(defense, task, "training", cfg, server_model=config.model, log=lambda s: None)
        clients.append({
            "client": label, "attack_acc": res["attack_acc"], "attacker": res["best"], "under_trained": res["under_trained"],
            "attackers": {n: round(r["test_acc"], 4) for n, r in res["attackers"].items()},
            "averaging": None if res["averaging"] is None else {"k": res["averaging"]["k"], "test_acc": res["averaging"]["test_acc"]},
            "records": {"train": res["train_records"], "val": res["val_records"], "test": res["test_records"], "disjoint_from_clients": res["records"]["disjoint_from_defense_training"]},
        })
    return {
        "attack_acc": max(c["attack_acc"] for c in clients),
        "primary_only_floor": task.primary_only_floor(),
        "majority_floor": task.majority_floor(),
        "clients": clients,
        "attack_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()},
    }
