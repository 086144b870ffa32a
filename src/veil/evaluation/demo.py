"""What ``veil demo`` runs: cost and privacy of a few defenses side by side, in about a minute.

For each defense: train it with the server model on ``digits-lt5`` (:func:`veil.training.train_run`),
then retrain attackers on what leaves the client to read the secret label z (the digit) and score them
on unseen test records (:func:`veil.evaluation.attack.attribute_attack`, inference exposure). The
result sets primary accuracy beside the attack and the primary-only floor (what y alone tells about z),
and ``demo.png`` shows records next to the messages each defense sends.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from veil.data.tasks import load_task
from veil.evaluation.attack import AttackConfig, attribute_attack
from veil.io import write_json
from veil.training.loop import TrainConfig
from veil.training.run import check_output_folder, load_run, train_run

DEMO_TASK = "digits-lt5"


def demo_attack_config(epochs: int) -> AttackConfig:
    """A quick attack for the demo: linear, MLP and CNN attackers, inference exposure only."""
    return AttackConfig(attackers=("linear", "mlp", "cnn"), epochs=epochs, patience=4, views=2, averaging_k=0, exposures=("inference",))


def run_demo(
    out: str | Path,
    *,
    epochs: int = 8,
    attack_epochs: int = 15,
    defenses: Sequence[str] = ("none", "local", "scnl"),
    num_images: int = 8,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train each of ``defenses`` on digits-lt5, attack it, write ``out/demo.json`` and ``out/demo.png``.

    Returns ``{"task", "primary_only_floor", "majority_floor", "rows": {defense: {"primary_acc",
    "attack_acc", "best_attacker", "client_flops_share"}}, "figure"}``. Runs are kept in ``out/<defense>``
    (rerunning reuses them).
    """
    if not defenses:
        raise ValueError("defenses must name at least one defense")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images!r}")
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(out)
    check_output_folder(out)
    task = load_task(DEMO_TASK)
    rows: dict[str, dict[str, Any]] = {}
    messages: dict[str, torch.Tensor] = {}
    shown = task.test.x[:num_images]
    for name in defenses:
        log(f"[demo] training with defense {name!r}")
        metrics = train_run(TrainConfig(task=DEMO_TASK, defense=name, epochs=epochs, batch_size=32), out / name, task=task, log=log)
        _, _, defense, _ = load_run(out / name, task=task)
        log(f"[demo] retraining attackers on what {name!r} sends")
        attack = attribute_attack(defense, task, demo_attack_config(attack_epochs), log=log)["inference"]
        rows[name] = {
            "primary_acc": float(metrics["primary_acc"]),
            "attack_acc": float(attack["attack_acc"]),
            "best_attacker": attack["best"],
            "client_flops_share": metrics.get("client_flops_share"),
        }
        with torch.no_grad():
            messages[name] = defense.encode(shown).detach()  # eval mode: the inference path
    figure = out / "demo.png"
    titles = [f"z={int(z)} y={int(y)}" for z, y in zip(task.test.z[:num_images], task.test.y[:num_images])]
    save_demo_figure(figure, shown, messages, titles)
    result = {
        "task": DEMO_TASK,
        "primary_only_floor": task.primary_only_floor(),
        "majority_floor": task.majority_floor(),
        "rows": rows,
        "figure": str(figure),
        "epochs": epochs,
        "attack": demo_attack_config(attack_epochs).to_dict(),
    }
    write_json(out / "demo.json", result)
    return result


def _as_image(m: torch.Tensor) -> np.ndarray:
    """One message as a 2-D array to draw: channel mean of a (C, H, W) map, a row for a vector."""
    m = m.float()
    if m.dim() == 3:
        return m.mean(0).numpy()
    return m.reshape(1, -1).numpy()


def save_demo_figure(
    path: Path, records: torch.Tensor, messages: dict[str, torch.Tensor], titles: Sequence[str] | None = None
) -> None:
    """PNG grid: first row the records (B, C, H, W) (``titles`` above them), then one row per defense
    with what it sends (B, *message_shape)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("record", records), *messages.items()]
    n = len(records)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 1.2, 1.2 * len(rows)), squeeze=False)
    for r, (label, batch) in enumerate(rows):
        images = [_as_image(batch[i]) for i in range(n)]
        # one grey scale per row, so that a constant message (local's decision) shows its level
        lo, hi = min(float(a.min()) for a in images), max(float(a.max()) for a in images)
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        for i in range(n):
            ax = axes[r][i]
            ax.imshow(images[i], cmap="gray", vmin=lo, vmax=hi)
            if r == 0 and titles is not None:
                ax.set_title(titles[i], fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label if r == 0 else f"{label}\nsends", rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("records (top) and what leaves the client, per defense", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
