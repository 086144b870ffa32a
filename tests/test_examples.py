"""Every script in examples/ runs, at tiny size, and prints what it promises (each in its own Python, as
a user runs it; this checkout's src/ first on the path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: script -> (tiny arguments, lines its output must contain). A new example without an entry fails below.
EXAMPLES = {
    "own_model.py": (["--epochs", "2", "--train-size", "200", "--attackers", "linear"], ["primary accuracy", "gap to floor", "client.safetensors"]),
    "remote_inference.py": (["--epochs", "1", "--records", "20"], ["20 predictions"]),
    "federated_mod.py": (["--epochs", "1", "--clients", "2", "--attackers", "linear"], ["from 2 clients", "gap to floor"]),
    "detection.py": (["--epochs", "1", "--scale", "0.1", "--attack-epochs", "1"], ['"map_50"', '"attack_inference"']),
}


def test_every_example_is_run_here():
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.processes) if s == "remote_inference.py" else s for s in sorted(EXAMPLES)])
def test_example_runs(script: str, tmp_path: Path) -> None:
    args, expected = EXAMPLES[script]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for line in expected:
        assert line in done.stdout, f"{script}: {line!r} not in its output:\n{done.stdout[-2000:]}"
