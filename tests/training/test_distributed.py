"""``veil train`` under ``torchrun --nproc-per-node 2`` (gloo on loopback) against one process.

Oracle: one process training on whole batches (:func:`veil.training.train_run`). With the noise-free
``none`` defense the two differ only in float summation order (two share-weighted gradient sums instead of
one), and Adam, dividing by the gradient's running RMS, lets that rounding grow about tenfold per epoch
(measured relative loss differences over 6 epochs: 5e-9, 6e-7, 9e-6, 1e-4, 4e-4, 3e-4; weights 6e-3 apart
at the end). So: the first epoch's loss agrees to 1e-6 (relative; without the gradient all-reduce it is off
by 2e-3, later ones by 8-57%), every epoch's to 2e-3, every weight to 2e-2, and validation and test
accuracy to one record. The last batch (25 records) is split 13/12, so the share weighting is exercised.
The 2-process run is killed (one worker, SIGKILL) after its first checkpoint and resumed, so the comparison covers resume.
Every process started is stopped, also on failure. About 30-80 s on 2 cores (two torchrun launches).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from veil.io import load_weights, read_json
from veil.training import TrainConfig, train_run

pytestmark = pytest.mark.processes

CFG = TrainConfig(task="digits-lt5", defense="none", epochs=6, batch_size=64, seed=3, train_size=601)  # last batch 25: shares 13 and 12
TORCHRUN = Path(sys.executable).parent / "torchrun"


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc), children first."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


class Jobs:
    """torchrun jobs; torchrun starts each worker in a session of its own, so stopping a job means
    stopping torchrun's descendants too."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.pids: set[int] = set()

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "wb") as f:
            proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.procs.append(proc)
        return proc

    def watch(self, proc: subprocess.Popen) -> list[int]:
        kids = descendants(proc.pid)
        self.pids.update(kids)
        return kids

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.watch(proc)
                with_group = [proc.pid, *self.pids]
                for pid in with_group:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait(timeout=30)
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def jobs():
    j = Jobs()
    yield j
    j.stop_all()
    time.sleep(0.2)
    alive = [p for p in j.pids if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]]
    assert not alive, f"processes left running: {alive}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(out: Path) -> list[str]:
    return [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "veil.cli", "train",
            "-t", CFG.task, "-d", CFG.defense, "-e", str(CFG.epochs), "--batch-size", str(CFG.batch_size), "--seed", str(CFG.seed),
            "--train-size", str(CFG.train_size), "-o", str(out)]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_two_processes_killed_and_resumed_match_one_process(tmp_path, jobs):
    one = train_run(CFG, tmp_path / "one", log=lambda s: None)

    out = tmp_path / "two"
    job = jobs.start(torchrun_train(out), tmp_path / "first.log")
    deadline = time.time() + 180
    while not (out / "checkpoint.safetensors").exists():
        assert job.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint written"
        jobs.watch(job)
        time.sleep(0.02)
    workers = [p for p in jobs.watch(job) if b"veil.cli" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)  # one worker dies: torchrun stops the other and fails
    assert job.wait(timeout=120) != 0
    assert not (out / "metrics.json").exists(), "the run ended before the kill; give it more epochs"

    job = jobs.start(torchrun_train(out), tmp_path / "resume.log")
    assert job.wait(timeout=180) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    log = (tmp_path / "resume.log").read_text()
    assert "resuming at stage 1, epoch" in log
    two = read_json(out / "metrics.json")
    assert two["processes"] == 2 and log.count('"processes": 2') == 1  # rank 0 printed the metrics, the other rank nothing

    assert len(two["history"]) == len(one["history"]) == CFG.epochs
    assert two["history"][0]["loss"] == pytest.approx(one["history"][0]["loss"], rel=1e-6)
    for a, b in zip(one["history"], two["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)
        assert abs(b["val_acc"] - a["val_acc"]) <= 1.5 / 360
    assert abs(two["primary_acc"] - one["primary_acc"]) <= 1.5 / 360
    w1, w2 = load_weights(tmp_path / "one" / "model.safetensors"), load_weights(out / "model.safetensors")
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 2e-2
