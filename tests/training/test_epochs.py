"""The one epoch loop (``veil.training.epochs``), driven by a tiny fake loss: a line fitted to 12 points,
no defense, no data set. Early stopping, resuming and the schedule are checked against what a whole,
uninterrupted run does and against the cosine written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from veil.training.epochs import EarlyStopping, StagePlan, run_epochs

X = torch.linspace(-1, 1, 12).reshape(12, 1)
Y = 3 * X + 1


def plan(epochs: int = 6, first: int = 0, schedule: str = "cosine") -> StagePlan:
    return StagePlan("fake", "joint", 0, 1, epochs, lr=0.1, schedule=schedule, first=first)


def batches(epoch: int) -> list[torch.Tensor]:
    """Three batches of four points in an order fixed by the epoch (nothing else to restore on a resume)."""
    return list(torch.randperm(12, generator=torch.Generator().manual_seed(epoch)).split(4))


class Fake:
    """A line, its optimizer and the fake loss's ``step``, which also notes the learning rate of every step."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(1, 1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.lrs: list[float] = []

    def step(self, idx: torch.Tensor) -> tuple[torch.Tensor, int, None]:
        self.lrs.append(self.opt.param_groups[0]["lr"])
        return ((self.model(X[idx]) - Y[idx]) ** 2).mean(), len(idx), None

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def stopper(self, patience: int, past: list[dict] | None = None, best: dict | None = None) -> EarlyStopping:
        return EarlyStopping(patience, past or [], best, metric="score", what="score", save=self.weights, load=self.model.load_state_dict)

    def run(self, p: StagePlan, **kw) -> list[dict]:
        return run_epochs(p, self.opt, batches, self.step, log=lambda s: None, **kw)


def scores(*values: float):
    """A ``validate`` that hands out ``values`` one epoch at a time."""
    it = iter(values)
    return lambda: {"score": next(it)}


def test_the_schedule_is_the_cosine_over_the_stages_steps_and_a_resume_follows_it():
    whole = Fake()
    history = whole.run(plan(epochs=2))
    # 2 epochs of 3 steps: step k of 6 at 0.1 * (1 + cos(pi k / 6)) / 2, written out
    assert whole.lrs == pytest.approx([0.1 * (1 + math.cos(math.pi * k / 6)) / 2 for k in range(6)], rel=1e-12)
    assert [r["epoch"] for r in history] == [1, 2] and history[-1]["loss"] < history[0]["loss"]
    resumed = Fake()
    resumed.run(plan(epochs=2, first=1))
    assert resumed.lrs == whole.lrs[3:]
    constant = Fake()
    constant.run(plan(epochs=2, schedule="constant"))
    assert constant.lrs == [0.1] * 6


class Killed(Exception):
    pass


def killed_after(fake: Fake, epochs: int, saved: dict, stopper: EarlyStopping | None = None):
    """An ``on_epoch_end`` that keeps what a checkpoint keeps (records, weights, optimizer state, the best
    epoch's weights) and kills the run after ``epochs`` epochs."""

    def checkpoint(si: int, next_epoch: int, opt: torch.optim.Optimizer, rec: dict) -> None:
        saved.setdefault("records", []).append(rec)
        saved.update(epoch=next_epoch, weights=fake.weights(), opt=opt.state_dict(), best=stopper.state if stopper else None)
        if next_epoch == epochs:
            raise Killed

    return checkpoint


def restarted(saved: dict) -> Fake:
    """A fresh process given the checkpoint's weights and optimizer state (its own initial weights are overwritten)."""
    fake = Fake()
    fake.model.load_state_dict(saved["weights"])
    fake.opt.load_state_dict(saved["opt"])
    return fake


def test_an_interrupted_stage_resumes_to_the_same_weights_and_losses():
    whole = Fake()
    want = whole.run(plan())
    cut, saved = Fake(), {}
    with pytest.raises(Killed):
        cut.run(plan(), on_epoch_end=killed_after(cut, 3, saved))
    resumed = restarted(saved)
    got = resumed.run(plan(first=saved["epoch"]))
    assert [r["epoch"] for r in got] == [4, 5, 6]
    assert [r["loss"] for r in saved["records"] + got] == [r["loss"] for r in want]
    assert all(torch.equal(resumed.weights()[k], v) for k, v in whole.weights().items())


def test_early_stopping_stops_after_patience_epochs_and_keeps_the_best_weights():
    fake, at_end, ends = Fake(), {}, []

    def note(si: int, next_epoch: int, opt: torch.optim.Optimizer, rec: dict) -> None:
        at_end[rec["epoch"]] = fake.weights()
        ends.append(next_epoch)

    history = fake.run(plan(epochs=8), validate=scores(0.1, 0.5, 0.4, 0.45, 0.9), stopper=fake.stopper(2), on_epoch_end=note)
    assert [r["score"] for r in history] == [0.1, 0.5, 0.4, 0.45]  # 2 epochs after the best (epoch 2), no more
    assert [r["best"] for r in history] == [True, True, False, False]
    assert [r.get("stopped") for r in history] == [None, None, None, True]
    assert ends == [1, 2, 3, 8], "the stopping epoch is checkpointed as the stage's end: a resume does not train on"
    assert all(torch.equal(fake.weights()[k], v) for k, v in at_end[2].items())
    assert not all(torch.equal(fake.weights()[k], v) for k, v in at_end[4].items())


def test_early_stopping_resumed_mid_way_or_after_its_decision_ends_where_the_whole_run_does():
    values = (0.1, 0.5, 0.4, 0.45, 0.3)
    whole = Fake()
    want = whole.run(plan(epochs=8), validate=scores(*values), stopper=whole.stopper(3))
    assert len(want) == 5 and want[-1]["stopped"]
    cut, saved = Fake(), {}
    stopper = cut.stopper(3)
    with pytest.raises(Killed):
        cut.run(plan(epochs=8), validate=scores(*values), stopper=stopper, on_epoch_end=killed_after(cut, 3, saved, stopper))
    resumed = restarted(saved)
    past = saved["records"]
    rest = resumed.run(plan(epochs=8, first=3), validate=scores(*values[3:]), stopper=resumed.stopper(3, past, saved["best"]))
    assert [(r["score"], r["best"], r.get("stopped")) for r in past + rest] == [(r["score"], r["best"], r.get("stopped")) for r in want]
    assert all(torch.equal(resumed.weights()[k], v) for k, v in whole.weights().items())
    # the records already hold the decision (patience epochs without a better score): nothing trains, the best comes back
    after = Fake()
    assert after.run(plan(epochs=8, first=5), stopper=after.stopper(3, want, saved["best"])) == []
    assert after.lrs == [] and all(torch.equal(after.weights()[k], v) for k, v in saved["best"].items())


def test_a_loss_that_is_not_finite_stops_the_run_naming_stage_and_epoch():
    fake = Fake()
    nan = torch.tensor(float("nan"), requires_grad=True)
    with pytest.raises(FloatingPointError, match=r"loss became nan in stage 'joint' of fake, epoch 1"):
        run_epochs(plan(), fake.opt, batches, lambda idx: (nan, len(idx), None), log=lambda s: None)


def test_records_count_accuracy_only_where_the_step_does_and_every_epoch_has_a_line():
    fake, lines = Fake(), []

    def counted(idx: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        loss, n, _ = fake.step(idx)
        return loss, n, 1  # one of every batch's four "correct"

    history = run_epochs(plan(epochs=2), fake.opt, batches, counted, log=lines.append, validate=lambda: {"val_acc": 0.5})
    assert [r["train_acc"] for r in history] == [0.25, 0.25] and "train_acc" not in Fake().run(plan(epochs=1))[0]
    assert [s.split(":")[0] for s in lines] == ["[fake] stage joint (1/1) epoch 1/2", "[fake] stage joint (1/1) epoch 2/2"]
    assert "train acc 0.2500  val acc 0.5000" in lines[0]
