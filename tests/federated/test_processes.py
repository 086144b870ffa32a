"""veil's federated run as real Flower processes on loopback: a SuperLink, 3 SuperNodes and ``flwr run``.

One SuperNode is stopped after round 0's evaluation, while round 1 is under way; the run must finish its
2 rounds with the other two (``min-clients=2``) and record in ``participation.json`` who took part. Every
process the test started (each in its own process group, with whatever it spawned) is stopped, also when
the test fails. About 40-60 s on 2 idle cores (Flower starts a fresh ClientApp process per message).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from veil.io import read_json

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr beside this Python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Processes started in their own process groups; ``stop`` ends each group (TERM, then KILL)."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.procs = env, logs, {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
        proc = self.procs[name]
        for s in (sig, signal.SIGKILL):
            try:
                os.killpg(proc.pid, s)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # the group's other members (ClientApp / ServerApp children) may outlive the leader briefly
        deadline = time.time() + wait
        while group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        if group_alive(proc.pid):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_all(self) -> None:
        for proc in self.procs.values():  # all at once: each takes a few seconds to shut down
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for name in self.procs:
            self.stop(name, wait=10.0)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, which a container's init may never reap, do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> set[int]:
    """Live descendants of ``pid``, also those that left its process group (Flower's SuperExec does)."""
    found, todo = set(), [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = {int(k) for k in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += list(kids - found)
            found |= kids
    return found


@pytest.fixture
def processes(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs = Processes(env, tmp_path)
    yield procs
    spawned = set().union(*(descendants(p.pid) for p in procs.procs.values()))
    procs.stop_all()
    deadline = time.time() + 15  # detached children (SuperExec) exit once they see their parent gone
    while any(alive(pid) for pid in spawned) and time.time() < deadline:
        time.sleep(0.2)
    for pid in [pid for pid in spawned if alive(pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.2)
    assert not [name for name, p in procs.procs.items() if group_alive(p.pid)], "processes left running"
    assert not [pid for pid in spawned if alive(pid)], "processes left running"


def node_id(procs: Processes, name: str, deadline: float) -> str:
    while time.time() < deadline:
        m = re.search(r"SuperNode ID: (\d+)", procs.log(name))
        if m:
            return m.group(1)
        time.sleep(0.2)
    raise AssertionError(f"{name} never connected:\n{procs.log(name)[-2000:]}")


@pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None, reason="Flower's CLI is not installed")
def test_run_survives_a_supernode_stopped_mid_run(tmp_path, processes):
    port = free_port()
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(ROOT / "examples" / "federated" / "pyproject.toml", app / "pyproject.toml")
    (tmp_path / "flwr-home" / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    out = tmp_path / "run"
    deadline = time.time() + 420  # generous: a loaded 2-core machine took 175 s

    processes.start("superlink", str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port))
    for k in range(3):
        processes.start(f"supernode{k}", str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                        "--node-config", f"partition-id={k} num-partitions=3")
    ids = [node_id(processes, f"supernode{k}", deadline) for k in range(3)]
    run_config = f"out='{out}' clients=3 min-clients=2 rounds=2 defense='none' train-size=300 eval-size=60 local-epochs=1"
    submit = subprocess.run([str(BIN / "flwr"), "run", str(app), "local", "--run-config", run_config], env=processes.env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr

    # stop SuperNode 2 once round 0 is evaluated: round 1's training is then under way
    while not (out / "rounds.json").exists():
        assert time.time() < deadline, "round 0 was never evaluated:\n" + processes.log("superlink")[-3000:]
        time.sleep(0.2)
    processes.stop("supernode2")
    while not (out / "federated.json").exists():
        assert time.time() < deadline, "the run did not finish without SuperNode 2:\n" + processes.log("superlink")[-3000:]
        time.sleep(0.5)

    result = read_json(out / "federated.json")
    assert [r["round"] for r in result["rounds"]] == [0, 1, 2]
    exchanges = read_json(out / "participation.json")["exchanges"]
    assert sorted(exchanges[0]["replied"]) == sorted(ids)  # round 0's evaluation: all three
    last_train = [e for e in exchanges if e["type"] == "train"][-1]
    last_eval = exchanges[-1]
    assert (last_train["round"], last_eval["round"]) == (2, 2)
    for e in (last_train, last_eval):
        assert sorted(e["replied"]) == sorted(ids[:2]), e
    # the stopped node was either no longer sampled or is recorded as failed; never as a participant
    assert all(ids[2] not in e["replied"] for e in exchanges[1:] if e["type"] == "train")
