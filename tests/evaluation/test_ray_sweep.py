"""``veil sweep --ray``: each knob value a Ray task on a local Ray instance with 2 workers, writing the
in-process sweep's folders; a rerun skips finished runs and finishes an interrupted one. Ray is started
once for the module and stopped by the fixture (``ray.shutdown`` ends the processes ``ray.init`` started).
Set VEIL_SKIP_RAY=1 to skip."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from veil.cli import app
from veil.evaluation.attack import AttackConfig
from veil.evaluation.ray_sweep import ray_sweep
from veil.evaluation.sweep import PRIVACY_FILE, EvalConfig, run_dir

pytestmark = [pytest.mark.processes, pytest.mark.skipif(os.environ.get("VEIL_SKIP_RAY") == "1", reason="VEIL_SKIP_RAY=1")]

TRAIN = {"epochs": 1, "train_size": 200}
EVAL = EvalConfig(attack=AttackConfig(attackers=("linear",), epochs=1, patience=1, views=1, averaging_k=0), reconstruction=None, mi=None)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()
    assert not ray.is_initialized()


def test_knobs_run_as_ray_tasks_into_the_sweep_folders_and_resume(tmp_path, local_ray):
    out = tmp_path / "sweep"
    first = ray_sweep("digits-lt5", "gaussian", [0.0, 1.0], out, train=TRAIN, evaluation=EVAL, log=lambda s: None)
    assert [r["knob_value"] for r in first] == [0.0, 1.0]
    folders = [run_dir(out, "gaussian", k) for k in (0.0, 1.0)]
    for folder, result in zip(folders, first):
        assert {p.name for p in folder.iterdir()} == {"config.json", "metrics.json", "obfuscator.safetensors", "model.safetensors", PRIVACY_FILE}
        assert json.loads((folder / PRIVACY_FILE).read_text())["attack_acc"] == result["attack_acc"]
    # the second run was trained but not evaluated when the sweep stopped
    (folders[1] / PRIVACY_FILE).unlink()
    stamps = [(f / PRIVACY_FILE).stat().st_mtime_ns if (f / PRIVACY_FILE).exists() else None for f in folders] + [(folders[1] / "metrics.json").stat().st_mtime_ns]

    again = ray_sweep("digits-lt5", "gaussian", [0.0, 1.0], out, train=TRAIN, evaluation=EVAL, log=lambda s: None)
    assert again[0] == json.loads(json.dumps(first[0]))  # skipped: read back from its file, not redone
    assert (folders[0] / PRIVACY_FILE).stat().st_mtime_ns == stamps[0]
    assert (folders[1] / "metrics.json").stat().st_mtime_ns == stamps[2]  # trained run kept; only evaluated
    assert (folders[1] / PRIVACY_FILE).exists() and again[1]["primary_acc"] == first[1]["primary_acc"]


def test_sweep_command_takes_ray(tmp_path, local_ray):
    out = tmp_path / "sweep"
    args = ["sweep", "-t", "digits-lt5", "-d", "none", "--lambdas", "0,1", "-o", out, "--epochs", "1", "--train-size", "200",
            "--attack-epochs", "1", "--patience", "1", "--attackers", "linear", "--views", "1", "--averaging-k", "0",
            "--recon-epochs", "1", "--mi-samples", "100", "--mi-dims", "2", "--ray", "local"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert [p.name for p in (out / "none").iterdir()] == ["knob=default"]  # a method without a knob: one run, one task
    assert (run_dir(out, "none", None) / PRIVACY_FILE).exists()
