"""Detection trains in the one epoch loop (``veil.training.epochs.run_epochs``), stage by stage, and that
loop's guards apply to it; resuming through it is in test_resume.py."""

import pytest

import veil.training.epochs as epochs
from veil.detection.train import DetectionConfig, build, fit, train_detection
from veil.noise import seed_everything


def config(defense: str, epochs: int, **kw) -> DetectionConfig:
    return DetectionConfig(task="digits-scenes", defense=defense, epochs=epochs, batch_size=16, width=4, scale=0.1, **kw)


def test_every_stage_runs_in_the_shared_epoch_loop(small_task, monkeypatch):
    calls = []
    shared = epochs.run_epochs

    def spy(plan, *args, **kw):
        history = shared(plan, *args, **kw)
        calls.append((plan, len(history)))
        return history

    monkeypatch.setattr(epochs, "run_epochs", spy)
    cfg = config("sample-and-hold", 3)  # two stages: pretrain, sanitize
    seed_everything(cfg.seed)
    defense, model, _ = build(cfg, small_task)
    history = fit(defense, model, small_task, cfg, lambda s: None)
    assert [(p.stage, p.epochs, p.first, p.schedule, n) for p, n in calls] == [("pretrain", 2, 0, "cosine", 2), ("sanitize", 1, 0, "cosine", 1)]
    assert [(r["stage"], r["epoch"]) for r in history] == [("pretrain", 1), ("pretrain", 2), ("sanitize", 1)]


def test_a_diverging_run_stops_on_the_shared_loops_guard_and_leaves_nothing(small_task, tmp_path):
    lines: list[str] = []
    with pytest.raises(FloatingPointError, match=r"loss became nan in stage 'joint' of none, epoch 1; lower --lr"):
        train_detection(config("none", 2, lr=1e30), tmp_path / "run", task=small_task, log=lines.append)
    assert not (tmp_path / "run").exists() and lines == []  # no epoch finished: no checkpoint, no line, no folder
