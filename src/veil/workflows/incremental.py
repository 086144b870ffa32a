"""An incremental run (:mod:`veil.training.incremental`) with the privacy of each hand-over measured by
the retrained attackers of :mod:`veil.evaluation.attack`."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import numpy as np

from veil.data.tasks import Split, Task
from veil.defenses import Defense
from veil.evaluation.attack import AttackConfig, attack_exposure
from veil.training.incremental import IncrementalConfig, run_incremental


def attack_config(config: IncrementalConfig, handed_over: int, *, device: str = "cpu") -> AttackConfig:
    """The attackers of one step: every architecture, four fresh obfuscations of the training records,
    early stopping; no averaging attack, since each record is handed over once."""
    n = handed_over if config.attack_size is None else min(handed_over, config.attack_size)
    return AttackConfig(
        epochs=config.attack_epochs, patience=max(2, min(6, config.attack_epochs // 3)), train_size=n, averaging_k=0,
        val_size=max(100, min(1000, n // 2)),  # early stopping only: the test split scores
        exposures=("training",), seed=config.seed + 4, device=device,
    )


def attack_handover(defense: Defense, handed_over: Split, val: Split, test: Split, task: Task, config: IncrementalConfig, *, device: str = "cpu") -> dict[str, Any]:
    """Privacy of a step's hand-over at the training exposure (y beside the message, as the engine has it).

    The attackers train on SL-p's messages of the handed-over records (``task.held_out`` of a view whose
    ``train`` is empty of them: records SL-p never trained on), early-stop on obfuscated validation records
    and are scored on obfuscated test records.
    """
    cfg = attack_config(config, len(handed_over), device=device)
    view = Task(task.name, task.train.subset(np.arange(0)), val, test, task.num_primary, task.num_secondary, held_out=handed_over)
    res = attack_exposure(defense, view, "training", cfg, server_model=config.model, log=lambda s: None)
    return {
        "attack_acc": res["attack_acc"],
        "attacker": res["best"],
        "attack_acc_max_over_attackers": res["attack_acc_max_over_attackers"],
        "attackers": {name: round(r["test_acc"], 4) for name, r in res["attackers"].items()},
        "attack_records": {"train": res["train_records"], "val": res["val_records"], "test": res["test_records"]},
        "attack_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()},
    }


def run(
    config: IncrementalConfig, out: str | Path, *, task: Task | None = None, attack_device: str = "cpu", log: Callable[[str], None] | None = None, stop_after: int | None = None
) -> dict[str, Any]:
    """:func:`veil.training.incremental.run_incremental` with :func:`attack_handover` on every step
    (its attackers train on ``attack_device``: cpu, cuda or auto)."""
    attack = functools.partial(attack_handover, device=attack_device)
    return run_incremental(config, out, task=task, attack=attack, log=log, stop_after=stop_after)
