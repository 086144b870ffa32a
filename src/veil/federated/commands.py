"""CLI command ``veil federated`` (a thin layer over the library; defaults come from
:class:`~veil.federated.task.FederatedConfig`, written once there)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from veil.cli_common import config_option, fail as _fail, parse_options as _options
from veil.federated.task import FederatedConfig

TASK_HELP = "Task: digits-lt5 (built in), mnist-lt5, fashion-lt5, npz:PATH or idx:DIR."
F = FederatedConfig


def federated_cmd(
    task: str = config_option(F, "task", "--task", "-t", help=TASK_HELP),
    clients: int = config_option(F, "clients", "--clients", "-k", help="Number of clients (each holds one partition of the training split)."),
    rounds: int = config_option(F, "rounds", "--rounds", "-r", help="Federated rounds (>= 1)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: config.json, federated.json, accuracy_per_round.png, model.safetensors (+ obfuscator.safetensors)."),
    partition: str = config_option(F, "partition", help="iid, or noniid (label skew, Dirichlet over the secondary classes)."),
    alpha: float = config_option(F, "alpha", help="Dirichlet concentration for --partition noniid (smaller: more skewed)."),
    defense: Optional[str] = typer.Option(None, "--defense", "-d", help="Client obfuscator (default: scnl-private, veil's most private working defense; 'none': no obfuscation)."),
    lam: Optional[float] = config_option(F, "knob", "--lambda", "-l", help="Value of the defense's privacy knob (its default if omitted)."),
    obfuscator: Optional[Path] = typer.Option(None, "--obfuscator", help="Shared pre-trained obfuscator (RUN/obfuscator.safetensors from 'veil train') used by every client instead of --defense."),
    obfuscator_training: str = config_option(F, "obfuscator_training", help="federated: the obfuscator trains every round on each client's trusted fraction, jointly with the global model, and is aggregated like the model; local: each client trains its own once."),
    trusted_fraction: float = config_option(F, "trusted_fraction", help="Share of each client's records its data owner trains the obfuscator on, in (0, 1]."),
    obfuscator_epochs: int = config_option(F, "obfuscator_epochs", min=1, help="Epochs of the obfuscator's training (per round with --obfuscator-training federated)."),
    local_epochs: int = config_option(F, "local_epochs", min=1, help="Local epochs per round on the obfuscated records."),
    screen_ratio: float = config_option(F, "screen_ratio", help="Screening of obfuscated records at every local iteration, in [0, 1)."),
    screen_mode: str = config_option(F, "screen_mode", help="Screening mask: rect (one rectangle) or pixel (independent pixels)."),
    strategy: str = config_option(F, "strategy", help="Flower strategy: fedavg, fedprox, fedadam, fedyogi, fedadagrad, fedmedian."),
    proximal_mu: float = config_option(F, "proximal_mu", help="FedProx's proximal weight mu."),
    server_lr: float = config_option(F, "server_lr", help="Server learning rate (eta) of fedadam/fedyogi/fedadagrad."),
    backend: str = typer.Option("inprocess", "--backend", help="inprocess (ClientApp called in this process) or simulation (Flower's Ray simulation engine)."),
    model: str = config_option(F, "model", help="Server task model: cnn, resnet (ResNet-20-like, batch norm) or mlp."),
    batch_size: int = config_option(F, "batch_size", min=1, help="Records per batch."),
    lr: float = config_option(F, "lr", help="Client Adam learning rate."),
    seed: int = config_option(F, "seed", help="Seed for splits, initialisation and training (clients never seed their obfuscation noise from it: OS entropy)."),
    train_size: Optional[int] = config_option(F, "train_size", min=1, help="Use only this many training records in all."),
    eval_size: Optional[int] = config_option(F, "eval_size", min=1, help="Use only this many test records (split among the clients)."),
    attack_epochs: int = config_option(F, "attack_epochs", min=0, help="After every round, attack what the clients' engines received (training exposure, y beside the message) with at most this many epochs per attacker; 0: no attack."),
    attack_clients: int = config_option(F, "attack_clients", min=1, help="Clients whose obfuscator is attacked every round."),
    attack_size: Optional[int] = config_option(F, "attack_size", min=10, help="Held-out records each attacker trains on (default: as many as the clients hold)."),
    attack_device: str = config_option(F, "attack_device", help="Where the attackers train: cpu, cuda or auto."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="Extra defense option KEY=VALUE (JSON value), repeatable."),
) -> None:
    """Federated training on Flower; every client obfuscates its own records before its engine trains."""
    from veil.federated.simulation import run_federated

    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    try:
        kw = dict(defense=defense) if defense is not None else {}
        config = FederatedConfig(
            task=task, clients=clients, rounds=rounds, partition=partition, alpha=alpha, knob=lam, defense_options=_options(option),
            obfuscator=None if obfuscator is None else str(obfuscator), obfuscator_training=obfuscator_training, trusted_fraction=trusted_fraction,
            obfuscator_epochs=obfuscator_epochs, local_epochs=local_epochs, screen_ratio=screen_ratio, screen_mode=screen_mode, strategy=strategy,
            proximal_mu=proximal_mu, server_lr=server_lr, model=model, batch_size=batch_size, lr=lr, seed=seed, train_size=train_size, eval_size=eval_size,
            attack_epochs=attack_epochs, attack_clients=attack_clients, attack_size=attack_size, attack_device=attack_device, **kw,
        )
        result = run_federated(config, out, backend=backend)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        _fail(err)
    Console().print_json(json.dumps({"backend": result["backend"], "seconds": result["seconds"], "rounds": [{k: v for k, v in r.items() if k != "attack"} for r in result["rounds"]]}))
