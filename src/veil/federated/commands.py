"""CLI commands ``veil incremental`` and ``veil federated`` (thin layers over the library)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

TASK_HELP = "Task: digits-lt5 (built in), mnist-lt5, fashion-lt5, npz:PATH or idx:DIR."


from veil.cli_common import fail as _fail, parse_options as _options  # noqa: E402


def _defense(name: Optional[str]) -> str:
    from veil.training.incremental import default_defense

    return name or default_defense()


def incremental_cmd(
    task: str = typer.Option("digits-lt5", "--task", "-t", help=TASK_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: config.json, state.json, incremental.json, accuracy_vs_p.png, weights. Rerun to resume."),
    start: float = typer.Option(5.0, "--start", help="First p: percent of training records in the clear, in (0, 100]."),
    step: float = typer.Option(5.0, "--step", help="Increment of p, in percent."),
    max_p: float = typer.Option(100.0, "--max-p", help="Last p tried, in percent."),
    target: float = typer.Option(0.95, "--target", help="Stop once NN'-p reaches this accuracy on the clean validation split, in [0, 1]."),
    defense: Optional[str] = typer.Option(None, "--defense", "-d", help="Obfuscator SL-p (default: scnl when registered, else gaussian)."),
    lam: Optional[float] = typer.Option(None, "--lambda", "-l", help="Value of the defense's privacy knob (its default if omitted)."),
    screen_ratio: float = typer.Option(0.25, "--screen-ratio", help="Share of each obfuscated record hidden at every iteration (screening), in [0, 1)."),
    screen_mode: str = typer.Option("rect", "--screen-mode", help="Screening mask: rect (one rectangle) or pixel (independent pixels)."),
    clean_epochs: int = typer.Option(5, "--clean-epochs", min=1, help="Epochs of NN-p on the p% clean records."),
    obfuscator_epochs: int = typer.Option(4, "--obfuscator-epochs", min=1, help="Epochs training SL-p with NN-p."),
    resume_epochs: int = typer.Option(3, "--resume-epochs", min=1, help="Epochs of NN'-p on clean + obfuscated records."),
    resume_clean: bool = typer.Option(True, "--resume-clean/--resume-obfuscated", help="Feed the p% records to NN'-p's training in the clear (the seed's step 4) or obfuscated by SL-p too (the engine then sees no clean record)."),
    attack_epochs: int = typer.Option(5, "--attack-epochs", min=0, help="Epochs of the secondary-attribute attacker (0: no attack)."),
    model: str = typer.Option("cnn", "--model", help="Server task model: cnn (default), resnet (ResNet-20-like, batch norm) or mlp."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Records per batch."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    seed: int = typer.Option(0, "--seed", help="Seed for splits, initialisation and training (never for the obfuscation noise of the hand-over)."),
    train_size: Optional[int] = typer.Option(None, "--train-size", min=1, help="Use only this many training records."),
    eval_size: Optional[int] = typer.Option(None, "--eval-size", min=1, help="Evaluate on at most this many validation/test records."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="Extra defense option KEY=VALUE (JSON value), repeatable."),
    reproducible_noise: Optional[int] = typer.Option(None, "--reproducible-noise", min=0, metavar="SEED", help="Research only: draw the hand-over's obfuscation noise from SEED so the run repeats exactly (recorded in config.json and incremental.json); anyone holding SEED can remove the noise. Default: OS entropy."),
) -> None:
    """Incremental training with obfuscated data: grow p% clean records until NN'-p reaches the target."""
    from veil.training.incremental import IncrementalConfig, run_incremental

    try:
        config = IncrementalConfig(
            task=task, defense=_defense(defense), knob=lam, defense_options=_options(option), model=model, start=start, step=step, max_p=max_p,
            target=target, screen_ratio=screen_ratio, screen_mode=screen_mode, resume_clean=resume_clean, clean_epochs=clean_epochs, obfuscator_epochs=obfuscator_epochs,
            resume_epochs=resume_epochs, attack_epochs=attack_epochs, batch_size=batch_size, lr=lr, seed=seed, train_size=train_size, eval_size=eval_size, noise_seed=reproducible_noise,
        )
        result = run_incremental(config, out)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        _fail(err)
    rows = [{"p": s["p"], "NN-p": round(s["nn_p"]["test_acc_clean"], 4), "NN'-p": round(s["nn_prime_p"]["test_acc_clean"], 4), "attack": s["privacy"].get("attack_acc"), "floor": round(s["privacy"]["primary_only_floor"], 4)} for s in result["steps"]]
    Console().print_json(json.dumps({"reached_target": result["reached_target"], "final_p": result["final_p"], "steps": rows}))


def federated_cmd(
    task: str = typer.Option("digits-lt5", "--task", "-t", help=TASK_HELP),
    clients: int = typer.Option(3, "--clients", "-k", help="Number of clients (each holds one partition of the training split)."),
    rounds: int = typer.Option(3, "--rounds", "-r", help="Federated rounds (>= 1)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: config.json, federated.json, accuracy_per_round.png, model.safetensors."),
    partition: str = typer.Option("iid", "--partition", help="iid, or noniid (label skew, Dirichlet over the secondary classes)."),
    alpha: float = typer.Option(0.5, "--alpha", help="Dirichlet concentration for --partition noniid (smaller: more skewed)."),
    defense: Optional[str] = typer.Option(None, "--defense", "-d", help="Client obfuscator, trained by each client on its trusted fraction (default: scnl when registered, else gaussian; 'none': no obfuscation)."),
    lam: Optional[float] = typer.Option(None, "--lambda", "-l", help="Value of the defense's privacy knob (its default if omitted)."),
    obfuscator: Optional[Path] = typer.Option(None, "--obfuscator", help="Shared pre-trained obfuscator (RUN/obfuscator.safetensors from 'veil train') used by every client instead of --defense."),
    trusted_fraction: float = typer.Option(0.1, "--trusted-fraction", help="Share of each client's records its data owner uses to train its own obfuscator, in (0, 1]."),
    obfuscator_epochs: int = typer.Option(2, "--obfuscator-epochs", min=1, help="Epochs each client trains its obfuscator."),
    local_epochs: int = typer.Option(1, "--local-epochs", min=1, help="Local epochs per round on the obfuscated records."),
    screen_ratio: float = typer.Option(0.0, "--screen-ratio", help="Screening of obfuscated records at every local iteration, in [0, 1)."),
    strategy: str = typer.Option("fedavg", "--strategy", help="Flower strategy: fedavg, fedprox, fedadam, fedyogi, fedadagrad, fedmedian."),
    proximal_mu: float = typer.Option(0.01, "--proximal-mu", help="FedProx's proximal weight mu."),
    server_lr: float = typer.Option(0.01, "--server-lr", help="Server learning rate (eta) of fedadam/fedyogi/fedadagrad."),
    backend: str = typer.Option("inprocess", "--backend", help="inprocess (ClientApp called in this process) or simulation (Flower's Ray simulation engine)."),
    model: str = typer.Option("cnn", "--model", help="Server task model: cnn (default), resnet (ResNet-20-like, batch norm) or mlp."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Records per batch."),
    lr: float = typer.Option(1e-3, "--lr", help="Client Adam learning rate."),
    seed: int = typer.Option(0, "--seed", help="Seed for splits, initialisation and training (clients never seed their obfuscation noise from it: OS entropy)."),
    train_size: Optional[int] = typer.Option(None, "--train-size", min=1, help="Use only this many training records in all."),
    eval_size: Optional[int] = typer.Option(None, "--eval-size", min=1, help="Use only this many test records (split among the clients)."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="Extra defense option KEY=VALUE (JSON value), repeatable."),
) -> None:
    """Federated training on Flower; every client obfuscates its own records before its engine trains."""
    from veil.federated.simulation import run_federated
    from veil.federated.task import FederatedConfig

    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    try:
        config = FederatedConfig(
            task=task, clients=clients, rounds=rounds, partition=partition, alpha=alpha, defense=_defense(defense), knob=lam, defense_options=_options(option),
            obfuscator=None if obfuscator is None else str(obfuscator), trusted_fraction=trusted_fraction, obfuscator_epochs=obfuscator_epochs,
            local_epochs=local_epochs, screen_ratio=screen_ratio, strategy=strategy, proximal_mu=proximal_mu, server_lr=server_lr, model=model,
            batch_size=batch_size, lr=lr, seed=seed, train_size=train_size, eval_size=eval_size,
        )
        result = run_federated(config, out, backend=backend)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        _fail(err)
    Console().print_json(json.dumps({"backend": result["backend"], "seconds": result["seconds"], "rounds": result["rounds"]}))
