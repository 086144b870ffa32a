"""The one epoch loop: every workflow that trains (classification, the compute engine, incremental, a
federated client, DDP, detection) runs its epochs through :func:`run_epochs`.

A workflow hands it one stage at a time: where the stage starts and how long it runs (:class:`StagePlan`),
the optimizer over what trains, each epoch's batches and a callable giving one batch's loss. The loop owns
what is the same for all of them: the learning rate of every step (:func:`lr_factor`), the backward pass
and the optimizer step, stopping on a loss that is not finite, one record and one log line per epoch,
early stopping with the best epoch's weights kept (:class:`EarlyStopping`), and the end-of-epoch hook
where checkpoints are written. What differs stays with the workflow: the batches, the loss, what setup a
stage needs and what a checkpoint holds. This module imports nothing of veil's, so any package may build
on it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import torch

#: Learning-rate schedules :func:`lr_factor` knows.
LR_SCHEDULES = ("constant", "cosine")

#: ``step(batch)``: (loss, records in the batch, records predicted correctly or None where the task has no
#: accuracy).
Step = Callable[[Any], tuple[torch.Tensor, int, int | None]]


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the learning rate at ``step`` of ``total`` steps (0-based) under ``schedule``."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))
    return 1.0


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One stage's epochs as :func:`run_epochs` runs them.

    Attributes:
        run: Label of the log lines and errors (a defense's name, ``engine``).
        stage: The stage's name (in every record and log line).
        index: The stage's position among the run's ``stages`` (0-based).
        stages: How many stages the run has.
        epochs: The stage's epochs in all; the schedule spans them whatever ``first`` is.
        lr: The learning rate the schedule scales.
        schedule: One of :data:`LR_SCHEDULES`; computed from the step index, so a resumed stage follows
            the same schedule.
        first: The epoch to start at (0-based; > 0 where a run resumes mid-stage).
    """

    run: str
    stage: str
    index: int
    stages: int
    epochs: int
    lr: float
    schedule: str = "constant"
    first: int = 0


class EarlyStopping:
    """Keeps the best epoch's weights by the record field ``metric`` (higher is better; ``what`` names it in
    the log) and says when ``patience`` epochs brought none better.

    ``past``: the stage's records already run (a resume), whose ``metric`` it replays; ``best_state``: the
    weights of the best of them (None: no weights kept yet, so the best so far is the current one, which
    holds where the best epoch is the last one run). ``save()`` returns the current weights, ``load(state)``
    puts them back.
    """

    def __init__(self, patience: int, past: list[dict[str, Any]], best_state: dict[str, torch.Tensor] | None, *, metric: str, what: str,
                 save: Callable[[], dict[str, torch.Tensor]], load: Callable[[dict[str, torch.Tensor]], None]) -> None:
        self.patience, self.metric, self.what, self.state, self.save, self.load = int(patience), metric, what, best_state, save, load
        self.best, self.best_epoch, self.epochs = -math.inf, 0, 0
        for rec in past:
            self.epochs += 1
            if rec.get(metric, -math.inf) > self.best:
                self.best, self.best_epoch = rec[metric], self.epochs

    def done(self) -> bool:
        return self.epochs > 0 and self.epochs - self.best_epoch >= self.patience

    def update(self, value: float) -> bool:
        """Record one epoch's ``metric``; True (and its weights kept) if it is the best so far."""
        self.epochs += 1
        if value > self.best:
            self.best, self.best_epoch, self.state = value, self.epochs, self.save()
            return True
        return False

    def restore(self) -> None:
        if self.state is not None:
            self.load(self.state)


def train_epoch(plan: StagePlan, epoch: int, opt: torch.optim.Optimizer, batches: Any, step: Step) -> dict[str, float]:
    """One epoch's optimizer steps over ``batches`` (sized: the schedule counts steps by it); the mean
    loss per record and, where ``step`` counts correct predictions, the training accuracy."""
    total, seen, correct = 0.0, 0, 0
    steps = len(batches)
    for i, batch in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = plan.lr * lr_factor(plan.schedule, epoch * steps + i, plan.epochs * steps)
        loss, n, hits = step(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} in stage {plan.stage!r} of {plan.run}, epoch {epoch + 1}; lower --lr or the knob")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * n
        seen += n
        correct = None if hits is None or correct is None else correct + hits
    return {"loss": total / max(1, seen)} | ({} if correct is None else {"train_acc": correct / max(1, seen)})


def run_epochs(
    plan: StagePlan,
    opt: torch.optim.Optimizer,
    batches: Callable[[int], Any],
    step: Step,
    *,
    log: Callable[[str], None],
    validate: Callable[[], dict[str, float]] | None = None,
    stopper: EarlyStopping | None = None,
    on_epoch_end: Callable[[int, int, torch.optim.Optimizer, dict], None] | None = None,
) -> list[dict[str, Any]]:
    """Train epochs ``plan.first`` to ``plan.epochs`` of one stage.

    Args:
        plan: Which stage, which epochs, what learning rate.
        opt: The optimizer over what trains in this stage (with its state restored where a run resumes
            mid-stage); the loop sets its learning rate before every step.
        batches: ``batches(epoch)``: that epoch's batches (sized), each handed to ``step``.
        step: ``step(batch)``: the batch's loss, its record count and its correct predictions (or None).
        log: Where the progress lines go (one per epoch).
        validate: Called after every epoch's training; the scores it returns join the record.
        stopper: Early stopping on ``stopper.metric`` (a score ``validate`` returns); at the end the best
            epoch's weights are put back.
        on_epoch_end: Called as ``(plan.index, next epoch, opt, record)`` after every epoch's log line:
            checkpoints are written there. At an epoch that stops the stage early, next epoch is
            ``plan.epochs``, so a resume finds the stage complete and does not train it again.

    Returns:
        One record per epoch run: stage, epoch (1-based within the stage), loss (mean per record),
        train_acc (where ``step`` counts), the scores of ``validate``, seconds; with ``stopper`` also
        ``best`` (a new best: the caller may keep these weights) and, at the last epoch run, ``stopped``.
    """
    history: list[dict[str, Any]] = []
    first = plan.first
    if stopper is not None and stopper.done():
        log(f"[{plan.run}] stage {plan.stage}: no better {stopper.what} in {stopper.patience} epoch(s); stopped (resumed after the decision)")
        first = plan.epochs
    for epoch in range(first, plan.epochs):
        t0 = time.time()
        rec: dict[str, Any] = {"stage": plan.stage, "epoch": epoch + 1, **train_epoch(plan, epoch, opt, batches(epoch), step)}
        rec.update(validate() if validate is not None else {})
        rec["seconds"] = round(time.time() - t0, 2)
        if stopper is not None:
            rec["best"] = stopper.update(rec[stopper.metric])
            if stopper.done() or epoch + 1 == plan.epochs:
                rec["stopped"] = epoch + 1 < plan.epochs
        history.append(rec)
        log(_progress(plan, rec))
        if on_epoch_end is not None:
            on_epoch_end(plan.index, plan.epochs if rec.get("stopped") else epoch + 1, opt, rec)
        if rec.get("stopped"):
            log(f"[{plan.run}] stage {plan.stage}: no better {stopper.what} in {stopper.patience} epoch(s); stopped after epoch {epoch + 1} of {plan.epochs}")
            break
    if stopper is not None:
        stopper.restore()
        log(f"[{plan.run}] kept the weights of epoch {stopper.best_epoch} ({stopper.what} {stopper.best:.4f})")
    return history


def _progress(plan: StagePlan, rec: dict[str, Any]) -> str:
    """The log line of one epoch's record."""
    scores = "".join(f"  {label} {rec[key]:.4f}" for key, label in (("train_acc", "train acc"), ("val_acc", "val acc")) if key in rec)
    return (f"[{plan.run}] stage {plan.stage} ({plan.index + 1}/{plan.stages}) epoch {rec['epoch']}/{plan.epochs}: loss {rec['loss']:.4f}"
            + scores + ("  (best)" if rec.get("best") else "") + f"  ({rec['seconds']}s)")
