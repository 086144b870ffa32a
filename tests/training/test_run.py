import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from veil.training import TrainConfig, export_run, load_run, train_run
from veil.training.epochs import lr_factor

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


def _npz(path):
    with np.load(path, allow_pickle=False) as f:  # the files hold no object arrays
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    train_run(CFG, out, log=quiet)
    return out


def test_export_holds_exactly_the_message(run, tmp_path):
    info = export_run(run, tmp_path / "obf.npz", split="test", mode="inference")
    msg = _npz(tmp_path / "obf.npz")
    assert set(msg) == {"x", "shape", "metadata"}  # inference exposure: the message and nothing else
    _, task, _, _ = load_run(run)
    x = msg["x"]
    assert x.dtype == np.float32 and x.shape == (len(task.test), 64) and info["records"] == len(task.test)
    assert msg["shape"].tolist() == [1, 8, 8]
    meta = json.loads(str(msg["metadata"]))
    assert meta == {"records": len(task.test), "message_shape": [1, 8, 8], "mode": "inference", "split": "test", "noise": "os-entropy"}
    clean = task.test.x.reshape(len(task.test), -1).numpy()
    assert 0.15 < (x - clean).std() < 0.25  # the noise really is sigma = 0.2, and records stay in order
    assert not (tmp_path / "obf.labels.npz").exists()
    # training exposure: the engine trains on y, so y travels with the message; z never does
    export_run(run, tmp_path / "train.npz", split="train", mode="training")
    msg = _npz(tmp_path / "train.npz")
    assert set(msg) == {"x", "y", "shape", "metadata"}
    assert np.array_equal(msg["y"], task.train.y.numpy())
    with pytest.raises(ValueError, match="mode"):
        export_run(run, tmp_path / "o.npz", mode="sideways")


def test_with_labels_writes_the_labels_to_a_separate_file(run, tmp_path):
    info = export_run(run, tmp_path / "obf.npz", mode="inference", with_labels=True)
    assert set(_npz(tmp_path / "obf.npz")) == {"x", "shape", "metadata"}  # the message file is unchanged
    labels = _npz(tmp_path / "obf.labels.npz")
    assert info["labels"] == str(tmp_path / "obf.labels.npz")
    _, task, _, _ = load_run(run)
    assert np.array_equal(labels["y"], task.test.y.numpy()) and np.array_equal(labels["z"], task.test.z.numpy())
    assert np.array_equal(labels["index"], np.arange(len(task.test)))
    assert json.loads(str(labels["metadata"]))["labels_of"] == "obf.npz"


def test_export_noise_is_fresh_unless_research_seed_is_asked(run, tmp_path):
    export_run(run, tmp_path / "a.npz")
    export_run(run, tmp_path / "b.npz")
    assert not np.array_equal(_npz(tmp_path / "a.npz")["x"], _npz(tmp_path / "b.npz")["x"])
    # an adversary holding config.json redraws with the run's seed: that is not the export's noise
    config, task, defense, _ = load_run(run)
    torch.manual_seed(config.seed)
    replay = defense.encode(task.test.x).reshape(len(task.test), -1).numpy()
    assert not np.allclose(_npz(tmp_path / "a.npz")["x"], replay, atol=1e-3)
    # research opt-in: repeatable, recorded in the metadata
    info = export_run(run, tmp_path / "r1.npz", noise_seed=5)
    export_run(run, tmp_path / "r2.npz", noise_seed=5)
    export_run(run, tmp_path / "r3.npz", noise_seed=6)
    r1, r2, r3 = (_npz(tmp_path / f"r{i}.npz") for i in (1, 2, 3))
    assert np.array_equal(r1["x"], r2["x"]) and not np.array_equal(r1["x"], r3["x"])
    assert json.loads(str(r1["metadata"]))["noise"] == "reproducible" and json.loads(str(r1["metadata"]))["noise_seed"] == 5
    assert info["noise"] == "reproducible"
    with pytest.raises(ValueError, match="noise_seed must be a non-negative integer"):
        export_run(run, tmp_path / "bad.npz", noise_seed=-1)


def test_export_command_line(run, tmp_path):
    from typer.testing import CliRunner

    from veil.cli import app

    res = CliRunner().invoke(app, ["export", str(run), "-o", str(tmp_path / "m.npz"), "--mode", "training", "--with-labels", "--reproducible-noise", "3"])
    assert res.exit_code == 0, res.output
    assert set(_npz(tmp_path / "m.npz")) == {"x", "y", "shape", "metadata"}
    assert set(_npz(tmp_path / "m.labels.npz")) == {"y", "z", "index", "metadata"}
    assert json.loads(str(_npz(tmp_path / "m.npz")["metadata"]))["noise_seed"] == 3
    helptext = CliRunner().invoke(app, ["export", "--help"]).output
    assert "--with-labels" in helptext and "--reproducible-noise" in helptext


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


def test_finished_run_without_its_weights_is_trained_again(tmp_path):
    """Results kept without their weights (a clone of a repository that does not commit them) are retrained,
    not reported finished and then unloadable."""
    first = train_run(CFG, tmp_path / "run", log=quiet)
    (tmp_path / "run" / "obfuscator.safetensors").unlink()
    lines = []
    again = train_run(CFG, tmp_path / "run", log=lines.append)
    assert any("without its weights (obfuscator.safetensors)" in s for s in lines)
    assert not any("already finished" in s for s in lines)
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in first["history"]]  # same seed: trained again
    load_run(tmp_path / "run")  # the weights are back
    lines.clear()
    train_run(CFG, tmp_path / "run", log=lines.append)
    assert any("already finished" in s for s in lines)


def test_checkpoint_is_one_file_and_a_kill_between_epochs_loses_nothing(tmp_path):
    """The whole resume state (weights, optimizer, progress, random state) is one atomically written file:
    there is no moment at which the weights are of one epoch and the progress of another."""
    full = train_run(CFG, tmp_path / "full", log=quiet)
    seen = []

    def interrupt(line):
        if "epoch 2/" in line:
            seen.append(sorted(p.name for p in (tmp_path / "cut").iterdir() if not p.name.startswith(".")))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(CFG, tmp_path / "cut", log=interrupt)
    assert seen == [["checkpoint.safetensors", "config.json"]]
    resumed = train_run(CFG, tmp_path / "cut", log=quiet)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert not (tmp_path / "cut" / "checkpoint.safetensors").exists()


def test_a_checkpoint_that_does_not_fit_the_run_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    def interrupt(line):
        if "epoch 2/" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(CFG, tmp_path / "cut", log=interrupt)
    ckpt = tmp_path / "cut" / "checkpoint.safetensors"
    with safe_open(str(ckpt), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    progress = json.loads(meta["progress"])
    save_file(tensors, str(ckpt), metadata={**meta, "progress": json.dumps({**progress, "epoch": 99})})
    with pytest.raises(ValueError, match="cannot have reached"):
        train_run(CFG, tmp_path / "cut", log=quiet)
    save_file(tensors, str(ckpt), metadata={k: v for k, v in meta.items() if k != "param_groups"})
    with pytest.raises(ValueError, match="damaged"):
        train_run(CFG, tmp_path / "cut", log=quiet)


def test_bad_command_writes_nothing_and_bad_output_folders_are_named(tmp_path):
    bad = TrainConfig(task="digits-lt5", defense="gaussian", epochs=1, defense_options={"no_such_option": 1})
    with pytest.raises(ValueError):
        train_run(bad, tmp_path / "r", log=quiet)
    assert not (tmp_path / "r" / "config.json").exists()
    train_run(dataclasses.replace(bad, defense_options={}), tmp_path / "r", log=quiet)  # the corrected command runs
    (tmp_path / "file").write_text("x")
    for out, words in ((Path(""), "current directory"), (tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "is a file")):
        with pytest.raises(ValueError, match=words):
            train_run(CFG, out, log=quiet)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores the mode bits
            pytest.skip("running as root: a read-only folder is writable")
        with pytest.raises(ValueError, match="not writable|cannot create"):
            train_run(CFG, ro / "run", log=quiet)
    finally:
        ro.chmod(0o700)


def test_sample_and_hold_resumed_in_its_sanitize_stage_keeps_its_calibration(tmp_path):
    # measured with setup called again on resume: windows [1, 3] -> [1, 4], primary 0.831 -> 0.753
    cfg = TrainConfig(task="digits-lt5", defense="sample-and-hold", knob=0.25, epochs=8, batch_size=64)
    full = train_run(cfg, tmp_path / "full", log=quiet)

    def interrupt(line):
        if "stage sanitize" in line and "epoch 3/" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, tmp_path / "cut", log=interrupt)
    resumed = train_run(cfg, tmp_path / "cut", log=quiet)
    assert load_run(tmp_path / "cut")[2].windows.tolist() == load_run(tmp_path / "full")[2].windows.tolist()
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert resumed["primary_acc"] == full["primary_acc"]


def test_export_never_replaces_a_run_file_and_asks_before_replacing_anything(run, tmp_path):
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for name in ("model.safetensors", "config.json", "obfuscator.safetensors", "metrics.json"):
        for force in (False, True):
            with pytest.raises(ValueError, match="file of the run folder|exists"):
                export_run(run, run / name, force=force)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    out = tmp_path / "m.npz"
    export_run(run, out)
    with pytest.raises(ValueError, match="pass --force"):
        export_run(run, out)
    export_run(run, out, force=True)
    with pytest.raises(ValueError, match="is a folder"):
        export_run(run, tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        export_run(run, tmp_path / "afile" / "m.npz")
    with pytest.raises(ValueError, match="longer than 255"):
        export_run(run, tmp_path / ("n" * 300 + ".npz"))
