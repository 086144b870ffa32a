"""``veil train``, ``veil evaluate`` and ``veil export`` for detection tasks (dispatched from :mod:`veil.cli`
when the task is a detection task or the run folder a detection run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def train_cmd(*, task: str, defense: str, knob: float | None, options: dict[str, Any], model: str, epochs: int, batch_size: int, lr: float,
              seed: int, train_size: int | None, client_budget: float | None, out: Path) -> dict[str, Any]:
    from veil.detection.train import DetectionConfig, train_detection

    config = DetectionConfig(task=task, defense=defense, knob=knob, defense_options=options, model=model, epochs=epochs, batch_size=batch_size,
                             lr=lr, seed=seed, train_size=train_size, client_budget=client_budget)
    return train_detection(config, out)


def evaluate_cmd(run: Path, *, attack_epochs: int, patience: int, attack_train_size: int | None, attack_width: int, attackers: str, views: int,
                 averaging_k: int, exposures: str, recon_epochs: int, eval_seed: int) -> dict[str, Any]:
    """The detection evaluation with ``veil evaluate``'s options; exposures other than inference and
    training (``training-time``) do not apply to detection runs and are skipped."""
    from veil.detection.attack import EXPOSURES, ObjectAttackConfig, evaluate_detection

    wanted = tuple(e.strip() for e in exposures.split(",") if e.strip())
    unknown = [e for e in wanted if e not in (*EXPOSURES, "training-time")]
    if unknown:
        raise ValueError(f"unknown exposure(s) {unknown}; valid: {', '.join(EXPOSURES)}")
    names = tuple(a.strip() for a in attackers.split(",") if a.strip())
    config = ObjectAttackConfig(attackers=names, epochs=attack_epochs, patience=patience, width=attack_width, views=views, averaging_k=averaging_k,
                                train_scenes=attack_train_size, exposures=tuple(e for e in wanted if e in EXPOSURES), recon_epochs=recon_epochs, seed=eval_seed)
    return evaluate_detection(run, config)["summary"]


def export_cmd(run: Path, out: Path, *, split: str, mode: str, force: bool) -> dict[str, Any]:
    from veil.detection.train import export_detection

    return export_detection(run, out, split=split, mode=mode, force=force)
