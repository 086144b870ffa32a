import dataclasses
import json

import numpy as np
import pytest
import torch

from veil.training import TrainConfig, export_run, load_run, train_run
from veil.training.loop import lr_factor

CFG = TrainConfig(task="digits-lt5", defense="gaussian", knob=0.2, epochs=3, batch_size=64)


def quiet(_):
    pass


def test_train_writes_run_folder_and_learns(tmp_path):
    m = train_run(CFG, tmp_path / "run", log=quiet)
    for name in ("config.json", "metrics.json", "obfuscator.safetensors", "model.safetensors"):
        assert (tmp_path / "run" / name).is_file()
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == CFG.to_dict()
    assert m["primary_acc"] > 0.8  # digit<5 on 8x8 digits with mild noise
    _, task, defense, model = load_run(tmp_path / "run")
    assert defense.name == "gaussian" and defense.sigma == 0.2


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    full = train_run(CFG, tmp_path / "full", log=quiet)

    def interrupt(line):
        if "epoch 3/" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(CFG, tmp_path / "cut", log=interrupt)
    assert (tmp_path / "cut" / "checkpoint.safetensors").exists()
    assert not (tmp_path / "cut" / "metrics.json").exists()
    lines = []
    resumed = train_run(CFG, tmp_path / "cut", log=lines.append)
    assert any("resuming" in s for s in lines)
    assert sum(s.startswith("[gaussian]") for s in lines) == 1  # only the epoch that was lost is retrained
    assert resumed["primary_acc"] == full["primary_acc"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]


def test_different_config_in_same_folder_is_refused(tmp_path):
    train_run(CFG, tmp_path / "run", log=quiet)
    other = TrainConfig(task="digits-lt5", defense="gaussian", knob=0.9, epochs=3)
    with pytest.raises(ValueError, match="different config"):
        train_run(other, tmp_path / "run", log=quiet)


def test_export_matches_what_the_client_sends(tmp_path):
    train_run(CFG, tmp_path / "run", log=quiet)
    info = export_run(tmp_path / "run", tmp_path / "obf.npz", split="test", mode="inference")
    with np.load(tmp_path / "obf.npz", allow_pickle=False) as f:
        x, y, z, index = f["x"], f["y"], f["z"], f["index"]
    _, task, _, _ = load_run(tmp_path / "run")
    assert x.dtype == np.float32 and x.shape == (len(task.test), 64) and info["records"] == len(task.test)
    assert np.array_equal(y, task.test.y.numpy()) and np.array_equal(z, task.test.z.numpy())
    assert np.array_equal(index, np.arange(len(task.test)))
    clean = task.test.x.reshape(len(task.test), -1).numpy()
    resid = x - clean
    assert 0.15 < resid.std() < 0.25  # the noise really is sigma = 0.2, and records stay in order
    with pytest.raises(ValueError, match="mode"):
        export_run(tmp_path / "run", tmp_path / "o.npz", mode="sideways")


def test_export_noise_is_not_the_training_seed(tmp_path):
    train_run(CFG, tmp_path / "run", log=quiet)
    export_run(tmp_path / "run", tmp_path / "a.npz")
    export_run(tmp_path / "run", tmp_path / "b.npz")
    a, b = np.load(tmp_path / "a.npz")["x"], np.load(tmp_path / "b.npz")["x"]
    assert not np.array_equal(a, b)


def test_unfinished_or_corrupt_runs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_run(tmp_path)
    train_run(CFG, tmp_path / "run", log=quiet)
    (tmp_path / "run" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_run(tmp_path / "run")


def test_config_validation():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear-warmup")


def test_cosine_schedule_decays_and_resumes_to_the_same_result(tmp_path):
    assert lr_factor("cosine", 0, 100) == 1.0 and lr_factor("constant", 99, 100) == 1.0
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5) and lr_factor("cosine", 100, 100) == pytest.approx(0.0)
    cfg = dataclasses.replace(CFG, lr_schedule="cosine")
    full = train_run(cfg, tmp_path / "full", log=quiet)
    constant = train_run(CFG, tmp_path / "constant", log=quiet)
    assert full["history"][-1]["loss"] != constant["history"][-1]["loss"]  # the schedule reached the optimiser

    def interrupt(line):
        if "epoch 2/" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, tmp_path / "cut", log=interrupt)
    resumed = train_run(cfg, tmp_path / "cut", log=quiet)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]


def test_run_saved_before_a_config_field_existed_is_still_recognised(tmp_path):
    train_run(CFG, tmp_path / "run", log=quiet)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    del saved["lr_schedule"]  # as written by an older veil
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    lines = []
    train_run(CFG, tmp_path / "run", log=lines.append)
    assert any("already finished" in s for s in lines)
