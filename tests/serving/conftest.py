"""Shared fixtures: small trained runs (digits-lt5, trained once per session) and real ``veil serve``
processes on free loopback ports, stopped after use."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from veil.training import TrainConfig, train_run

TOKEN = "test-token-" + secrets.token_hex(12)


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Finished runs of scnl, svd and none on digits-lt5 (a few epochs, MLP server model)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, knob, epochs in [("scnl", 0.3, 3), ("svd", None, 2), ("none", None, 1)]:
        out[name] = root / name
        train_run(TrainConfig(task="digits-lt5", defense=name, knob=knob, epochs=epochs, model="mlp"), out[name], log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# tokens of the test service\n{TOKEN}\n")
    return path


class Service:
    """A ``veil serve`` process: ``url`` once it accepts connections; ``stop()`` ends it."""

    def __init__(self, run: Path, token_file: Path, workdir: Path, *args: str, port: int = 0) -> None:
        self.ready = workdir / f"ready-{secrets.token_hex(4)}.json"
        self.log = workdir / f"{self.ready.stem}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        # python -m veil.serving is 'veil serve' without importing every other command (starts faster)
        cmd = [sys.executable, "-m", "veil.serving", str(run), "--port", str(port), "--token-file", str(token_file), "--ready-file", str(self.ready), *args]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=self.log.open("wb"))
        self.url = ""

    def wait(self, timeout: float = 60) -> Service:
        """Block until the server accepts connections (or fail with its log)."""
        if self.url:
            return self
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"veil serve did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.url = json.loads(self.ready.read_text())["url"]
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def kill(self) -> None:
        """SIGKILL: the server dies mid-work, as in a crash."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="session")
def start_service(tmp_path_factory: pytest.TempPathFactory, token_file: Path):
    """Start ``veil serve RUN *args``; every service started is stopped at the end of the session."""
    started: list[Service] = []
    workdir = tmp_path_factory.mktemp("services")

    def start(run: Path, *args: str, port: int = 0, wait: bool = True) -> Service:
        service = Service(run, token_file, workdir, *args, port=port)
        started.append(service)
        return service.wait() if wait else service

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="session")
def services(runs, start_service) -> dict[str, Service]:
    """Started together (their start-up, mostly imports, overlaps): ``scnl`` with small limits, so that
    every refusal is cheap to provoke; ``svd`` (the restart test kills it and starts another on its port)."""
    strict = ("--max-body-bytes", "200000", "--max-request-records", "512", "--max-json-records", "16", "--max-concurrency", "2", "--body-timeout", "1")
    pending = {"scnl": start_service(runs["scnl"], *strict, wait=False), "svd": start_service(runs["svd"], wait=False)}
    return {name: service.wait() for name, service in pending.items()}


@pytest.fixture(scope="session")
def scnl_service(services) -> Service:
    return services["scnl"]


@pytest.fixture(scope="session")
def patient_service(runs, start_service) -> Service:
    """``scnl`` with a long batch delay (requests sent together surely share a pass) and a 1 s header
    timeout (slow clients are cut quickly)."""
    return start_service(runs["scnl"], "--batch-delay-ms", "300", "--header-timeout", "1")
