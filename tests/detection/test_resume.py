"""An interrupted detection run resumes after its last finished epoch (``checkpoint.safetensors``).

The interruption is a callback that raises at epoch k + 1's log line (the shared epoch loop writes the
checkpoint after an epoch's line, so it still holds epoch k), as a kill between two epochs would leave
the folder; no option exists for it.
"""

import json
import re

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from veil.cli import app
from veil.detection.train import DetectionConfig, train_detection
from veil.io import load_weights, save_weights
from veil.training.run import CHECKPOINT


class Interrupted(Exception):
    pass


#: An epoch's progress line, as the shared epoch loop writes it: "[none] stage joint (1/1) epoch 2/4: loss ..."
EPOCH_LINE = re.compile(r"\[[^]]+\] stage \S+ \(\d+/\d+\) epoch \d+/\d+: loss ")


def epoch_lines(lines: list[str]) -> list[str]:
    """The epoch lines of a log, up to their loss (what names the epoch)."""
    return [s.split(":")[0] for s in lines if EPOCH_LINE.match(s)]


def stop_after(epochs: int, lines: list[str]):
    """A ``log`` that records its lines and raises, unrecorded, at the line of the epoch after ``epochs``
    epochs, before that epoch's checkpoint is written."""

    def log(line: str) -> None:
        if EPOCH_LINE.match(line) and len(epoch_lines(lines)) == epochs:
            raise Interrupted(line)
        lines.append(line)

    return log


def config(defense: str, epochs: int = 4, **kw) -> DetectionConfig:
    return DetectionConfig(task="digits-scenes", defense=defense, epochs=epochs, batch_size=16, width=4, scale=0.1, **kw)


def interrupted(cfg: DetectionConfig, out, task, epoch: int) -> list[str]:
    lines: list[str] = []
    with pytest.raises(Interrupted):
        train_detection(cfg, out, task=task, log=stop_after(epoch, lines))
    assert (out / CHECKPOINT).is_file() and not (out / "metrics.json").exists()
    return lines


def weights(run) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in load_weights(run / "model.safetensors").items()}
    if (run / "obfuscator.safetensors").exists():
        out.update({f"defense.{k}": v for k, v in load_weights(run / "obfuscator.safetensors").items()})
    return out


@pytest.mark.parametrize("defense, epochs, stop, where", [
    ("none", 4, 2, "stage 1, epoch 3"),  # mid-stage: Adam's moments, the schedule's position, the data order
    ("local", 3, 1, "stage 1, epoch 2"),  # the on-device detector: no defense in the checkpoint
    ("sample-and-hold", 2, 1, "stage 2, epoch 1"),  # two stages: resumed at the second one's start (a fresh optimizer)
])
def test_resume_is_exact_without_training_noise(small_task, tmp_path, defense, epochs, stop, where):
    cfg = config(defense, epochs)
    whole_lines: list[str] = []
    whole = train_detection(cfg, tmp_path / "whole", task=small_task, log=whole_lines.append)
    lines = interrupted(cfg, tmp_path / "run", small_task, stop)
    resumed_lines: list[str] = []
    resumed = train_detection(cfg, tmp_path / "run", task=small_task, log=resumed_lines.append)
    assert f"resuming at {where}" in resumed_lines[0]
    assert len(epoch_lines(lines)) == stop and len(epoch_lines(whole_lines)) == epochs
    assert epoch_lines(lines + resumed_lines) == epoch_lines(whole_lines)  # each epoch once
    assert [(r["stage"], r["epoch"]) for r in resumed["history"]] == [(r["stage"], r["epoch"]) for r in whole["history"]]
    for a, b in zip(resumed["history"], whole["history"]):  # bit for bit: the same operations on the same state
        assert a["loss"] == b["loss"]
    got, want = weights(tmp_path / "run"), weights(tmp_path / "whole")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert resumed["inference"] == pytest.approx(whole["inference"])
    assert not (tmp_path / "run" / CHECKPOINT).exists(), "the finished run removes its checkpoint"


def test_noisy_defense_resumes_at_the_right_epoch(small_task, tmp_path):
    cfg = config("scnl-detect", 3)
    lines = interrupted(cfg, tmp_path / "run", small_task, 1)
    resumed_lines: list[str] = []
    metrics = train_detection(cfg, tmp_path / "run", task=small_task, log=resumed_lines.append)
    assert "resuming at stage 1, epoch 2" in resumed_lines[0]
    assert epoch_lines(resumed_lines) == ["[scnl-detect] stage joint (1/1) epoch 2/3", "[scnl-detect] stage joint (1/1) epoch 3/3"]
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3]
    assert f"{metrics['history'][0]['loss']:.4f}" in lines[0], "the first epoch's record is the interrupted run's"
    assert (tmp_path / "run" / "obfuscator.safetensors").is_file() and not (tmp_path / "run" / CHECKPOINT).exists()
    # finished: not retrained, and a different config is refused
    again: list[str] = []
    assert train_detection(cfg, tmp_path / "run", task=small_task, log=again.append) == metrics
    assert not epoch_lines(again)
    with pytest.raises(ValueError, match="different config"):
        train_detection(config("scnl-detect", 4), tmp_path / "run", task=small_task, log=lambda s: None)


def tamper(path, **progress) -> None:
    """Rewrite checkpoint ``path`` with fields of its progress record replaced."""
    tensors = load_weights(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta["progress"] = json.dumps({**json.loads(meta["progress"]), **progress})
    save_weights(path, tensors, metadata=meta)


def test_a_checkpoint_of_the_earlier_format_resumes_exactly(small_task, tmp_path):
    """Before detection trained in the shared epoch loop its checkpoint also held the LambdaLR schedule's
    step (and Adam's groups its ``initial_lr``); the step index now gives the schedule, so such a file
    resumes as it is, to the same weights."""
    cfg = config("none", 4)
    whole = train_detection(cfg, tmp_path / "whole", task=small_task, log=lambda s: None)
    interrupted(cfg, tmp_path / "run", small_task, 2)
    ckpt = tmp_path / "run" / CHECKPOINT
    tamper(ckpt, sched_step=2 * 4)  # 2 epochs of 4 batches (60 scenes, 16 a batch)
    tensors = load_weights(ckpt)
    with safe_open(str(ckpt), framework="pt") as f:
        meta = dict(f.metadata())
    meta["param_groups"] = json.dumps([{**g, "initial_lr": cfg.lr} for g in json.loads(meta["param_groups"])])
    save_weights(ckpt, tensors, metadata=meta)
    resumed = train_detection(cfg, tmp_path / "run", task=small_task, log=lambda s: None)
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in whole["history"]]
    got, want = weights(tmp_path / "run"), weights(tmp_path / "whole")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_damaged_or_foreign_checkpoint_is_refused(small_task, tmp_path):
    cfg = config("none", 3)
    run = tmp_path / "run"
    interrupted(cfg, run, small_task, 1)
    ckpt = run / CHECKPOINT
    good = ckpt.read_bytes()

    def refused(match: str) -> str:
        with pytest.raises(ValueError, match=match) as err:
            train_detection(cfg, run, task=small_task, log=lambda s: None)
        assert str(ckpt) in str(err.value) and len(str(err.value).splitlines()) == 1
        assert not (run / "metrics.json").exists()
        return str(err.value)

    ckpt.write_bytes(good[: len(good) // 2])  # a truncated file
    refused("corrupt or not a safetensors file")
    ckpt.write_bytes(good)
    tamper(ckpt, epoch=7)  # further than the config's 3 epochs
    refused("cannot have reached")
    ckpt.write_bytes(good)
    tamper(ckpt, gen="not base64!")
    refused("progress record is damaged")
    # a checkpoint of another config (another seed) in this folder
    other = tmp_path / "other"
    interrupted(config("none", 3, seed=1), other, small_task, 1)
    ckpt.write_bytes((other / CHECKPOINT).read_bytes())
    refused("another config")
    ckpt.write_bytes(good)  # the intact checkpoint still resumes
    assert len(train_detection(cfg, run, task=small_task, log=lambda s: None)["history"]) == 3


def test_cli_refuses_a_damaged_checkpoint_in_one_line(tmp_path, monkeypatch):
    """Through ``veil train``: exit code 2, one line naming the file."""
    import veil.detection.train as dt

    run = tmp_path / "run"
    args = ["train", "--task", "digits-scenes", "--model", "detector", "--defense", "none", "-e", "1", "--batch-size", "8", "--train-size", "8", "-o", str(run)]

    def stop(*a, **kw):
        raise Interrupted("after the last epoch, before the evaluation")

    with monkeypatch.context() as m:
        m.setattr(dt, "evaluate_map", stop)
        res = CliRunner().invoke(app, args)
    assert isinstance(res.exception, Interrupted), res.output
    ckpt = run / CHECKPOINT
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[:100])
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and str(ckpt) in " ".join(res.output.split()) and len(res.output.strip().splitlines()) == 1, res.output
    ckpt.write_bytes(good)
    tamper(ckpt, epoch=5)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "cannot have reached" in res.output and len(res.output.strip().splitlines()) == 1, res.output
