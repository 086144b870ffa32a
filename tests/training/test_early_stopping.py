"""Early stopping (``TrainConfig.patience``): the last stage stops after ``patience`` epochs without a better
validation accuracy, the best epoch's weights are the ones kept, and an interrupted run resumes to the same
result."""

from __future__ import annotations

import pytest

from veil.training import TrainConfig, load_run, train_run
from veil.training.loop import accuracy

# a learning rate high enough that the validation accuracy goes up and down within a few epochs
CFG = TrainConfig(task="digits-lt5", defense="none", epochs=8, batch_size=64, lr=0.02, patience=2, train_size=500)


def quiet(_):
    pass


def val_curve(metrics):
    return [r["val_acc"] for r in metrics["history"]]


def test_stops_after_patience_epochs_without_improvement_and_keeps_the_best(tmp_path):
    m = train_run(CFG, tmp_path / "run", log=quiet)
    curve = val_curve(m)
    best = max(range(len(curve)), key=lambda i: (curve[i], -i))  # the first epoch reaching the best
    assert m["best_epoch"] == best + 1 and m["best_val_acc"] == curve[best]
    # it ran until `patience` epochs had passed without a better one, or to the cap
    assert len(curve) == min(CFG.epochs, best + 1 + CFG.patience)
    assert m["stopped_early"] == (len(curve) < CFG.epochs)
    assert all(v <= curve[best] for v in curve)
    # the saved weights are the best epoch's: their validation accuracy is the best one recorded
    _, task, defense, model = load_run(tmp_path / "run", task=None)
    assert accuracy(defense, model, task.val) == pytest.approx(curve[best], abs=1e-9)  # no noise: the same records give the same accuracy
    assert not (tmp_path / "run" / "best.safetensors").exists()


def test_an_interrupted_run_with_early_stopping_resumes_to_the_same_result(tmp_path):
    full = train_run(CFG, tmp_path / "full", log=quiet)
    assert len(full["history"]) >= 3

    def interrupt(line):
        if "epoch 3/" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(CFG, tmp_path / "cut", log=interrupt)
    assert (tmp_path / "cut" / "checkpoint.safetensors").exists()
    resumed = train_run(CFG, tmp_path / "cut", log=quiet)
    assert val_curve(resumed) == val_curve(full)
    assert resumed["best_epoch"] == full["best_epoch"] and resumed["primary_acc"] == full["primary_acc"]


def test_patience_is_checked():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="patience"):
            TrainConfig(patience=bad)
