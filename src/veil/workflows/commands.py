"""CLI command ``veil incremental`` (a thin layer over :mod:`veil.workflows.incremental`; defaults come
from :class:`~veil.training.incremental.IncrementalConfig`, written once there)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from veil.cli_common import config_option, fail as _fail, parse_options as _options
from veil.training.incremental import IncrementalConfig

TASK_HELP = "Task: digits-lt5 (built in), mnist-lt5, fashion-lt5, npz:PATH or idx:DIR."
C = IncrementalConfig


def incremental_cmd(
    task: str = config_option(C, "task", "--task", "-t", help=TASK_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: config.json, state.json, incremental.json, accuracy_vs_p.png, weights. Rerun to resume."),
    start: float = config_option(C, "start", help="First p: percent of training records in the clear, in (0, 100]."),
    step: float = config_option(C, "step", help="Increment of p, in percent."),
    max_p: float = config_option(C, "max_p", help="Last p tried, in percent."),
    target: float = config_option(C, "target", help="Stop once NN'-p reaches this accuracy on the clean validation split, in [0, 1]."),
    defense: Optional[str] = typer.Option(None, "--defense", "-d", help="Obfuscator SL-p (default: scnl-private, veil's most private working defense)."),
    lam: Optional[float] = config_option(C, "knob", "--lambda", "-l", help="Value of the defense's privacy knob (its default if omitted)."),
    screen_ratio: float = config_option(C, "screen_ratio", help="Share of each obfuscated record hidden at every iteration (screening), in [0, 1)."),
    screen_mode: str = config_option(C, "screen_mode", help="Screening mask: rect (one rectangle) or pixel (independent pixels)."),
    clean_epochs: int = config_option(C, "clean_epochs", min=1, help="Epochs of NN-p on the p% clean records."),
    obfuscator_epochs: int = config_option(C, "obfuscator_epochs", min=1, help="Epochs training SL-p with NN-p."),
    resume_epochs: int = config_option(C, "resume_epochs", min=1, help="Epochs of NN'-p on clean + obfuscated records."),
    resume_clean: bool = config_option(C, "resume_clean", "--resume-clean/--resume-obfuscated", help="Feed the p% records to NN'-p's training in the clear (the seed's step 4) or obfuscated by SL-p too (the engine then sees no clean record)."),
    attack_epochs: int = config_option(C, "attack_epochs", min=0, help="Most epochs of each attacker on the handed-over records (every architecture, y beside the message; 0: no attack)."),
    attack_size: Optional[int] = config_option(C, "attack_size", min=10, help="Most handed-over records each attacker trains on (default: all)."),
    model: str = config_option(C, "model", help="Server task model: cnn, resnet (ResNet-20-like, batch norm) or mlp."),
    batch_size: int = config_option(C, "batch_size", min=1, help="Records per batch."),
    lr: float = config_option(C, "lr", help="Adam learning rate."),
    seed: int = config_option(C, "seed", help="Seed for splits, initialisation and training (never for the obfuscation noise of the hand-over)."),
    train_size: Optional[int] = config_option(C, "train_size", min=1, help="Use only this many training records."),
    eval_size: Optional[int] = config_option(C, "eval_size", min=1, help="Evaluate on at most this many validation/test records."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="Extra defense option KEY=VALUE (JSON value), repeatable."),
    reproducible_noise: Optional[int] = config_option(C, "noise_seed", "--reproducible-noise", min=0, metavar="SEED", help="Research only: draw the hand-over's obfuscation noise from SEED so the run repeats exactly (recorded in config.json and incremental.json); anyone holding SEED can remove the noise. Default: OS entropy."),
) -> None:
    """Incremental training with obfuscated data: grow p% clean records until NN'-p reaches the target."""
    from veil.workflows.incremental import run

    try:
        kw = dict(defense=defense) if defense is not None else {}
        config = IncrementalConfig(
            task=task, knob=lam, defense_options=_options(option), model=model, start=start, step=step, max_p=max_p, target=target,
            screen_ratio=screen_ratio, screen_mode=screen_mode, resume_clean=resume_clean, clean_epochs=clean_epochs, obfuscator_epochs=obfuscator_epochs,
            resume_epochs=resume_epochs, attack_epochs=attack_epochs, attack_size=attack_size, batch_size=batch_size, lr=lr, seed=seed,
            train_size=train_size, eval_size=eval_size, noise_seed=reproducible_noise, **kw,
        )
        result = run(config, out)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        _fail(err)
    rows = [{"p": s["p"], "NN-p": round(s["nn_p"]["test_acc_clean"], 4), "NN'-p": round(s["nn_prime_p"]["test_acc_clean"], 4), "attack": s["privacy"].get("attack_acc"), "floor": round(s["privacy"]["primary_only_floor"], 4)} for s in result["steps"]]
    Console().print_json(json.dumps({"reached_target": result["reached_target"], "final_p": result["final_p"], "steps": rows}))
