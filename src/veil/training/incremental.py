"""Incremental training with obfuscated data (seed 000 §4, 001 §2.3) and its screening regulariser (§4.1).

For p = start, start + step, ... (percent of the training split available in the clear):

1. **NN-p**: the server model trained on the p% clean records (warm-started from NN-(p - step)).
2. **SL-p**: the obfuscator trained with (a copy of) NN-p on the same p% clean records, through the
   defense's own stages (:func:`veil.training.loop.fit`). This is the small trusted step.
3. The other (100 - p)% are obfuscated once by SL-p with hard selection (their labels are known):
   the *training* point of exposure. Only these obfuscated records (and their primary labels) reach the
   compute engine. Their noise comes from the operating system's entropy, never from ``config.json``
   (which the engine may hold); ``noise_seed`` is a research opt-in for exactly repeatable runs.
4. **NN'-p**: NN-p resumed on clean p% + obfuscated (100 - p)%; every batch, each obfuscated record has
   a random part screened (hidden, set to 0) so the network cannot lean on SL-p's bias (§4.1).
5. If NN'-p's validation accuracy misses the target, p grows by ``step`` and the loop repeats.

NN-p and NN'-p train in the one loop on what their engine is handed (:func:`veil.training.loop.fit` on
:class:`~veil.training.loop.Messages`, screening as its option); SL-p in the same loop on clean records.
The privacy of each hand-over is measured by the ``attack`` given to :func:`run_incremental`
(:mod:`veil.workflows.incremental` passes the retrained attackers; this module imports no evaluation code).

A run folder holds ``config.json``, ``state.json`` (written atomically after each finished p; a rerun
resumes after the last one), ``steps/pNNN/*.safetensors``, and at the end ``incremental.json``,
``accuracy_vs_p.png``, ``model.safetensors`` (last NN'-p) and ``obfuscator.safetensors`` (last SL-p).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from veil.data.tasks import Split, Task, load_task
from veil.defenses import Defense, create_defense, defense_class, list_defenses, with_knob
from veil.defenses.saving import load_obfuscator, save_obfuscator
from veil.io import atomic_path, load_weights, read_json, save_weights, write_json
from veil.models import create_model
from veil.noise import OS_ENTROPY, REPRODUCIBLE, check_seed, seed_everything
from veil.training.loop import MAX_EPOCHS, Messages, TrainConfig, config_from_dict, fit, model_accuracy
from veil.training.run import check_output_folder, obfuscate, open_run_folder
from veil.training.screening import SCREEN_MODES, Screening

#: What the hand-over's privacy is measured with: ``attack(defense, handed_over, val, test, task, config)``
#: returns the attack record of one step (the orchestration in :mod:`veil.workflows.incremental` supplies it).
Attack = Callable[[Defense, Split, Split, Split, Task, "IncrementalConfig"], dict[str, Any]]


def default_defense() -> str:
    """veil's most private working defense, ``scnl-private`` (lambda 10: attack at the primary-only floor on
    mnist-lt5 with the primary accuracy kept, README "Headline comparison"); ``gaussian`` where the SCNL
    family is not registered."""
    return "scnl-private" if "scnl-private" in list_defenses() else "gaussian"


# ----------------------------------------------------------------------------------------- config
#: Most increments of p one run may take (each trains three models).
MAX_INCREMENTS = 100


@dataclasses.dataclass(frozen=True)
class IncrementalConfig:
    """Everything that decides an incremental run (saved as ``RUN/config.json``).

    Attributes:
        task: Task name. defense: Obfuscator (``veil list``). knob: Its privacy knob (None: default).
        defense_options: Other keyword arguments of the defense. model: Server model (cnn, mlp).
        start, step, max_p: Percent of training records in the clear: first, increment, last.
        target: Validation accuracy of NN'-p (clean validation records) that stops the growth, in [0, 1].
        screen_ratio: Share of each obfuscated record hidden at every iteration, in [0, 1).
        screen_mode: ``rect`` (one rectangle) or ``pixel`` (independent pixels).
        resume_clean: True (the seed's step 4): the p% records enter NN'-p's training in the clear, so
            the engine resuming NN-p must be as trusted as the data owner. False: they are obfuscated
            by SL-p too (and screened), so the engine training NN'-p receives no clean record.
        clean_epochs: Epochs of NN-p on the p% clean records. obfuscator_epochs: Epochs of SL-p (shared
            among the defense's stages). resume_epochs: Epochs of NN'-p on clean + obfuscated records.
        attack_epochs: Most epochs of each secondary-attribute attacker (0: no attack). The attack is
            :mod:`veil.evaluation.attack`'s at the training exposure (y beside the message): every
            attacker architecture, fresh obfuscations each epoch, trained on SL-p's messages of the
            handed-over records, early-stopped on obfuscated validation records, scored on obfuscated
            test records (:mod:`veil.workflows.incremental`).
        attack_size: Most handed-over records the attackers train on (None: all of them).
        batch_size, lr, seed: Training settings. train_size: Keep only this many training records.
        eval_size: Evaluate on at most this many validation/test records (None: all).
        noise_seed: Research opt-in: draw the obfuscation noise of the hand-over from this seed, so the
            run repeats exactly (and anyone holding ``config.json`` can redraw and remove the noise).
            None (default): fresh noise from the operating system's entropy for every hand-over.
    """

    task: str = "digits-lt5"
    defense: str = dataclasses.field(default_factory=default_defense)
    knob: float | None = None
    defense_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: str = "cnn"
    start: float = 5.0
    step: float = 5.0
    max_p: float = 100.0
    target: float = 0.95
    screen_ratio: float = 0.25
    screen_mode: str = "rect"
    resume_clean: bool = True
    clean_epochs: int = 5
    obfuscator_epochs: int = 4
    resume_epochs: int = 3
    attack_epochs: int = 15
    attack_size: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    train_size: int | None = None
    eval_size: int | None = None
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        check_seed(self.seed)
        for name in ("start", "step", "max_p"):
            v = getattr(self, name)
            if not (0 < v <= 100):
                raise ValueError(f"{name} must be a percentage in (0, 100], got {v!r}")
        if self.start > self.max_p:
            raise ValueError(f"start ({self.start}) must not exceed max_p ({self.max_p})")
        if (self.max_p - self.start) / self.step > MAX_INCREMENTS:
            raise ValueError(
                f"step {self.step} takes {(self.max_p - self.start) / self.step:.0f} increments from {self.start}% to {self.max_p}%; "
                f"at most {MAX_INCREMENTS} (step >= {(self.max_p - self.start) / MAX_INCREMENTS:g})"
            )
        if not 0.0 <= self.target <= 1.0:
            raise ValueError(f"target accuracy must lie in [0, 1], got {self.target!r}")
        if not 0.0 <= self.screen_ratio < 1.0:
            raise ValueError(f"screen_ratio must lie in [0, 1), got {self.screen_ratio!r}")
        if self.screen_mode not in SCREEN_MODES:
            raise ValueError(f"screen_mode must be one of {SCREEN_MODES}, got {self.screen_mode!r}")
        for name in ("clean_epochs", "obfuscator_epochs", "resume_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("clean_epochs", "obfuscator_epochs", "resume_epochs", "attack_epochs"):
            if getattr(self, name) > MAX_EPOCHS:
                raise ValueError(f"{name} must be <= {MAX_EPOCHS}, got {getattr(self, name)!r}")
        if self.attack_epochs < 0:
            raise ValueError(f"attack_epochs must be >= 0, got {self.attack_epochs!r}")
        if self.attack_size is not None and self.attack_size < 10:
            raise ValueError(f"attack_size must be >= 10 or None, got {self.attack_size!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.eval_size is not None and self.eval_size < 1:
            raise ValueError(f"eval_size must be >= 1, got {self.eval_size!r}")
        if self.noise_seed is not None and (isinstance(self.noise_seed, bool) or not isinstance(self.noise_seed, int) or not 0 <= self.noise_seed < 2**63):
            raise ValueError(f"noise_seed must be a non-negative integer or None, got {self.noise_seed!r}")
        defense_class(self.defense)  # unknown name -> ValueError listing the valid ones

    def noise_generator(self, p: float) -> torch.Generator | None:
        """The hand-over's noise source at step ``p``: None (OS entropy) unless ``noise_seed`` is set,
        then a generator seeded from (noise_seed, p), so a resumed run redraws the same noise."""
        if self.noise_seed is None:
            return None
        return torch.Generator().manual_seed(self.noise_seed * 1_000_003 + int(round(p * 1000)))

    def noise_source(self) -> dict[str, Any]:
        """What the result files record about the noise."""
        return {"noise": OS_ENTROPY} if self.noise_seed is None else {"noise": REPRODUCIBLE, "noise_seed": self.noise_seed}

    def percents(self) -> list[float]:
        """The p values tried, in order (the last one is ``max_p`` even off the step grid)."""
        out, p = [], self.start
        while p < self.max_p - 1e-9:
            out.append(round(p, 6))
            p += self.step
        return out + [self.max_p]

    def train_config(self, epochs: int, *, seed: int) -> TrainConfig:
        """The :class:`~veil.training.loop.TrainConfig` of one of the step's trainings."""
        return TrainConfig(task=self.task, defense=self.defense, epochs=epochs, batch_size=self.batch_size, lr=self.lr, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IncrementalConfig":
        return config_from_dict(cls, d)


# ----------------------------------------------------------------------------------------- the run
def _head(split: Split, n: int | None) -> Split:
    return split if n is None or n >= len(split) else split.subset(np.arange(n))


def _build_defense(config: IncrementalConfig, task: Task) -> Defense:
    options = with_knob(config.defense, config.knob, config.defense_options)
    return create_defense(config.defense, input_shape=task.input_shape, num_classes=task.num_primary, **options)


def _trains_anything(defense: Defense) -> bool:
    return any(p.requires_grad for p in defense.parameters())


def run_incremental(
    config: IncrementalConfig,
    out: str | Path,
    *,
    task: Task | None = None,
    attack: Attack | None = None,
    log: Callable[[str], None] | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) incremental training into run folder ``out``.

    Args:
        attack: Measures the privacy of each step's hand-over (None: not measured; ``veil incremental``
            and :func:`veil.workflows.incremental.run` pass the retrained attackers of
            :mod:`veil.evaluation.attack`).
        stop_after: Stop after this many newly finished p steps (for tests of the resume path).

    Returns:
        The result (also in ``out/incremental.json`` once the run is finished).
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(out)
    check_output_folder(out)
    # the task, model and defense are built (and so validated) before the first write: a bad command
    # leaves no config.json behind to block the corrected one
    task = task or load_task(config.task, seed=config.seed, train_size=config.train_size)
    val, test = _head(task.val, config.eval_size), _head(task.test, config.eval_size)
    n_train = len(task.train)
    order = np.random.default_rng(config.seed).permutation(n_train)  # p% clean = a growing prefix
    floor = task.primary_only_floor()

    seed_everything(config.seed)
    nn_p = create_model(config.model, task.input_shape, task.num_primary)
    defense = _build_defense(config, task)
    finished = open_run_folder(out, config, "incremental.json", what="incremental run", log=log)
    if finished is not None:
        return finished
    state = read_json(out / "state.json") if (out / "state.json").exists() else {"steps": [], "done": False}
    steps: list[dict[str, Any]] = state["steps"]
    if steps:
        last = out / "steps" / _tag(steps[-1]["p"])
        nn_p.load_state_dict(load_weights(last / "nn_p.safetensors"))
        defense = load_obfuscator(last / "obfuscator.safetensors")
        log(f"{out}: resuming after p = {steps[-1]['p']}% ({len(steps)} step(s) finished)")

    finished_now = 0
    for p in config.percents():
        if state["done"] or any(s["p"] == p for s in steps):
            continue
        if stop_after is not None and finished_now >= stop_after:
            log(f"{out}: stopping after {finished_now} step(s) as asked; rerun to resume")
            return {"config": config.to_dict(), "steps": steps, "finished": False}
        t0 = time.time()
        seed_everything(config.seed + int(round(p * 1000)))
        n_clean = max(1, int(round(n_train * p / 100)))
        clean, rest = task.train.subset(np.sort(order[:n_clean])), task.train.subset(np.sort(order[n_clean:]))
        log(f"== p = {p}%: {len(clean)} clean records, {len(rest)} to obfuscate")

        # 1. NN-p on the clean p% (warm start: NN-(p - step))
        fit(None, nn_p, Messages(clean.x, clean.y), config.train_config(config.clean_epochs, seed=config.seed + 1), log=log, name=f"NN-{p:g}")
        # 2. SL-p trained with a copy of NN-p on the same clean records (the trusted step)
        if _trains_anything(defense):
            helper = copy.deepcopy(nn_p)
            sub = Task(task.name, clean, _head(val, 512), _head(val, 512), task.num_primary, task.num_secondary)
            fit(defense, helper, sub, config.train_config(config.obfuscator_epochs, seed=config.seed + 2), log=log)
        defense.eval()
        # 3. obfuscate the rest with SL-p, hard selection by the known label (training exposure); the
        # noise is private (OS entropy): the engine may hold config.json, so nothing in it seeds the noise
        gen = config.noise_generator(p)
        obf = obfuscate(defense, rest.x, rest.y, generator=gen)
        # 4. NN'-p: NN-p resumed on clean + obfuscated, screening the obfuscated records
        nn_prime = copy.deepcopy(nn_p)
        shown = clean.x if config.resume_clean else obfuscate(defense, clean.x, clean.y, generator=gen)
        x_all = torch.cat([shown, obf]) if len(rest) else shown
        y_all = torch.cat([clean.y, rest.y])
        flags = torch.cat([torch.full((len(clean),), not config.resume_clean), torch.ones(len(rest), dtype=torch.bool)])
        fit(None, nn_prime, Messages(x_all, y_all, flags), config.train_config(config.resume_epochs, seed=config.seed + 3),
            screening=Screening(config.screen_ratio, config.screen_mode), log=log, name=f"NN'-{p:g}")

        test_obf = obfuscate(defense, test.x, test.y, generator=gen)
        rec: dict[str, Any] = {
            "p": p,
            "clean_records": len(clean),
            "obfuscated_records": len(rest),
            "nn_p": {"test_acc_clean": model_accuracy(nn_p, test.x, test.y), "val_acc_clean": model_accuracy(nn_p, val.x, val.y)},
            "nn_prime_p": {
                "test_acc_clean": model_accuracy(nn_prime, test.x, test.y),
                "test_acc_training_exposure": model_accuracy(nn_prime, test_obf, test.y),
                "val_acc_clean": model_accuracy(nn_prime, val.x, val.y),
            },
            "privacy": {"exposure": "training", "primary_only_floor": floor, "majority_floor": task.majority_floor(), "chance": 1.0 / task.num_secondary},
        }
        if attack is not None and config.attack_epochs and len(rest) >= 10:
            rec["privacy"].update(attack(defense, rest, val, test, task, config))
        rec["seconds"] = round(time.time() - t0, 2)
        log(f"== p = {p}%: NN-p {rec['nn_p']['test_acc_clean']:.4f}, NN'-p {rec['nn_prime_p']['test_acc_clean']:.4f} (clean test), "
            f"attack {rec['privacy'].get('attack_acc', float('nan')):.4f} vs floor {floor:.4f}  ({rec['seconds']}s)")

        folder = out / "steps" / _tag(p)
        save_weights(folder / "nn_p.safetensors", nn_p.state_dict())
        save_weights(folder / "nn_prime_p.safetensors", nn_prime.state_dict())
        save_obfuscator(folder / "obfuscator.safetensors", defense)
        steps.append(rec)
        state = {"steps": steps, "done": rec["nn_prime_p"]["val_acc_clean"] >= config.target}
        write_json(out / "state.json", state)  # last: a step counts only once its weights are on disk
        finished_now += 1

    return _finish(config, out, steps, state["done"], log)


def _tag(p: float) -> str:
    return f"p{p:07.3f}".replace(".", "_")


def _finish(config: IncrementalConfig, out: Path, steps: list[dict[str, Any]], reached: bool, log: Callable[[str], None]) -> dict[str, Any]:
    last = out / "steps" / _tag(steps[-1]["p"])
    for name, dst in (("nn_prime_p.safetensors", "model.safetensors"), ("obfuscator.safetensors", "obfuscator.safetensors")):
        with atomic_path(out / dst) as tmp:
            tmp.write_bytes((last / name).read_bytes())
    result = {
        "config": config.to_dict(),
        "exposure": "NN-p: clean test records; NN'-p: clean test records and test records obfuscated by SL-p with hard selection (training exposure); privacy: veil.evaluation attackers (every architecture, y beside the message) trained on SL-p obfuscations of the (100-p)% handed-over records (training exposure), scored on obfuscated test records",
        "target_metric": "NN'-p accuracy on the clean validation split",
        **config.noise_source(),
        "reached_target": bool(reached),
        "final_p": steps[-1]["p"],
        "steps": steps,
        "finished": True,
    }
    plot_incremental(steps, out / "accuracy_vs_p.png", target=config.target)
    write_json(out / "incremental.json", result)
    log(f"{out}: finished at p = {steps[-1]['p']}% (target {'reached' if reached else 'not reached'})")
    return result


def plot_incremental(steps: list[dict[str, Any]], path: str | Path, *, target: float | None = None, baselines: dict[str, float] | None = None) -> None:
    """Accuracy against p (NN-p, NN'-p) and attack accuracy against its floor, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = [s["p"] for s in steps]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ps, [s["nn_p"]["test_acc_clean"] for s in steps], "o-", label="NN-p (p% clean only)")
    ax[0].plot(ps, [s["nn_prime_p"]["test_acc_clean"] for s in steps], "s-", label="NN'-p (+ obfuscated), clean test")
    ax[0].plot(ps, [s["nn_prime_p"]["test_acc_training_exposure"] for s in steps], "^--", label="NN'-p, obfuscated test")
    for name, v in (baselines or {}).items():
        ax[0].axhline(v, ls=":", color="gray")
        ax[0].annotate(name, (ps[0], v), fontsize=8, va="bottom")
    if target is not None:
        ax[0].axhline(target, ls="--", color="red", lw=0.8, label="target")
    ax[0].set(xlabel="p (% of training records in the clear)", ylabel="primary test accuracy", title="accuracy against p")
    ax[0].legend(fontsize=8)
    if any("attack_acc" in s["privacy"] for s in steps):
        ax[1].plot(ps, [s["privacy"].get("attack_acc", float("nan")) for s in steps], "o-", label="attack on obfuscated records")
    ax[1].plot(ps, [s["privacy"]["primary_only_floor"] for s in steps], "k--", label="primary-only floor")
    ax[1].set(xlabel="p", ylabel="secondary (digit) accuracy", title="privacy of the obfuscated part", ylim=(0, 1))
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
