import json

import numpy as np
from typer.testing import CliRunner

from veil.cli import app

runner = CliRunner()


def test_help_explains_every_command():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("train", "export", "demo", "list"):
        assert cmd in r.output


def test_train_then_export(tmp_path):
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--task", "digits-lt5", "--defense", "gaussian", "--lambda", "0.1", "--epochs", "2", "--out", str(run)])
    assert r.exit_code == 0, r.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.5 < metrics["primary_acc"] <= 1.0
    r = runner.invoke(app, ["export", str(run), "--split", "val", "--mode", "training", "--out", str(tmp_path / "v.npz")])
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "v.npz") as f:  # the message: no z (labels go to a separate file, --with-labels)
        assert f["x"].shape[1] == 64 and len(f["y"]) == len(f["x"]) and "z" not in f.files


def test_bad_names_give_one_clear_error(tmp_path):
    r = runner.invoke(app, ["train", "--task", "nope", "--defense", "gaussian", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "unknown task 'nope'" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["train", "--defense", "nope", "--out", str(tmp_path / "r2")])
    assert r.exit_code == 2 and "unknown defense 'nope'" in r.output
    r = runner.invoke(app, ["train", "--defense", "none", "--lambda", "1", "--out", str(tmp_path / "r3")])
    assert r.exit_code == 2 and "no knob" in r.output
    r = runner.invoke(app, ["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x.npz")])
    assert r.exit_code == 2 and "not a run folder" in r.output


def test_bad_option_syntax(tmp_path):
    r = runner.invoke(app, ["train", "--defense", "gaussian", "--option", "sigma", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "KEY=VALUE" in r.output


def test_demo_shows_primary_accuracy_beside_the_attack_and_writes_the_figure(tmp_path):
    out = tmp_path / "demo"
    r = runner.invoke(app, ["demo", "--epochs", "4", "--attack-epochs", "6", "--out", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads((out / "demo.json").read_text())
    rows, floor = result["rows"], result["primary_only_floor"]
    assert list(rows) == ["none", "local", "scnl"] and 0.1 < floor < 0.3
    for name, row in rows.items():
        assert name in r.output and f"{row['primary_acc']:.3f}" in r.output and f"{row['attack_acc']:.3f}" in r.output
        assert row["primary_acc"] > 0.8
    # the clean record gives the digit away; the on-device decision tells only what y tells
    assert rows["none"]["attack_acc"] > floor + 0.4
    assert rows["local"]["attack_acc"] < floor + 0.1
    assert rows["none"]["client_flops_share"] == 0 and 0.01 < rows["local"]["client_flops_share"] < 0.06
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
