"""The client: what reaches the server is the message alone (captured on the wire), ``veil query``, and
retries across a server killed and restarted mid-load."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from veil.client import Client, ServiceError
from veil.serving.commands import query_cmd
from veil.training import load_run

from .conftest import TOKEN


class CapturingProxy:
    """A loopback TCP proxy in front of the server that records every byte the client sends."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.sent = bytearray()
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    with self.lock:
                        self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def requests(self) -> list[tuple[str, dict[str, str], bytes]]:
        """The captured HTTP requests: (request line, headers lower-cased, body)."""
        out, data = [], bytes(self.sent)
        while data:
            head, _, rest = data.partition(b"\r\n\r\n")
            line, *fields = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, v in (f.split(":", 1) for f in fields)}
            n = int(headers.get("content-length", 0))
            out.append((line, headers, rest[:n]))
            data = rest[n:]
        return out

    def close(self) -> None:
        self.listener.close()


#: Every header the client may send; anything else could carry what must stay on the client.
ALLOWED_HEADERS = {"host", "accept", "accept-encoding", "connection", "user-agent", "authorization", "content-type", "content-length", "x-veil-shape"}


def _check_only_messages(proxy: CapturingProxy, records: np.ndarray) -> list[np.ndarray]:
    """Every captured request is a predict call carrying exactly a batch of messages: returns them."""
    messages = []
    for line, headers, body in proxy.requests():
        assert line == "POST /v1/predict HTTP/1.1"  # nothing in a query string
        assert set(headers) <= ALLOWED_HEADERS, set(headers) - ALLOWED_HEADERS
        shape = tuple(int(s) for s in headers["x-veil-shape"].split(","))
        assert len(body) == 4 * int(np.prod(shape))  # the body is the message batch and nothing else
        messages.append(np.frombuffer(body, "<f4").reshape(shape))
    wire = bytes(proxy.sent)
    for r in records.astype(np.float32):
        assert r.tobytes() not in wire  # no record travels in clear
    return messages


def test_only_the_noisy_message_reaches_the_server(runs, scnl_service):
    _, task, defense, _ = load_run(runs["scnl"])
    x = task.test.x[:40].numpy()
    proxy = CapturingProxy(scnl_service.port)
    try:
        with Client(runs["scnl"], proxy.url, TOKEN, batch_size=16) as client:
            first = client.predict(x)
            second = client.predict(x)
        assert len(first) == len(second) == 40
        messages = _check_only_messages(proxy, x)
    finally:
        proxy.close()
    assert [len(m) for m in messages] == [16, 16, 8] * 2
    sent_first, sent_second = np.concatenate(messages[:3]), np.concatenate(messages[3:])
    # fresh OS-entropy noise on every call: the same records never give the same message twice
    assert np.abs(sent_first - sent_second).min() > 0
    # what was sent is the obfuscation, far from the record
    assert np.abs(sent_first - x).mean() > 0.3


def test_query_sends_messages_not_records_or_labels(runs, scnl_service, token_file, tmp_path):
    """``veil query`` on an .npz with x, y and z: y scores the answers locally; neither y nor z is sent
    (the bodies hold exactly the messages), and the predictions are written."""
    _, task, _, _ = load_run(runs["scnl"])
    n = 50
    x, y, z = task.test.x[:n].numpy()[:, 0], task.test.y[:n].numpy(), task.test.z[:n].numpy()  # (N, 8, 8)
    np.savez(tmp_path / "records.npz", x=x, y=y, z=z)
    app = typer.Typer()
    app.command()(query_cmd)
    proxy = CapturingProxy(scnl_service.port)
    try:
        r = CliRunner().invoke(app, [str(runs["scnl"]), "--url", proxy.url, "--input", str(tmp_path / "records.npz"), "--token-file", str(token_file), "--out", str(tmp_path / "p.json"), "--batch-size", "32"])
        assert r.exit_code == 0, r.output
        messages = _check_only_messages(proxy, x)
    finally:
        proxy.close()
    assert sum(len(m) for m in messages) == n and len(messages) == 2
    predictions = json.loads((tmp_path / "p.json").read_text())["predictions"]
    summary = json.loads(r.output)
    assert len(predictions) == n and summary["accuracy_on_local_labels"] == pytest.approx(float(np.mean(np.asarray(predictions) == y)), abs=1e-4)

    # errors: one line, exit 2
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.full((2, 8, 8), np.nan, np.float32))
    r = CliRunner().invoke(app, [str(runs["scnl"]), "--url", scnl_service.url, "--input", str(bad), "--token-file", str(token_file)])
    assert r.exit_code == 2 and "NaN" in r.output and "Traceback" not in r.output
    wrong = tmp_path / "wrong-token"
    wrong.write_text("w" * 32 + "\n")
    r = CliRunner().invoke(app, [str(runs["scnl"]), "--url", scnl_service.url, "--input", str(tmp_path / "records.npz"), "--token-file", str(wrong)])
    assert r.exit_code == 2 and "HTTP 403" in r.output


def test_restart_mid_load_every_request_ends_answered(runs, services, start_service):
    """The server is killed (SIGKILL) mid-load and restarted on its port: the client retries with backoff
    and every request ends with its predictions; none is dropped."""
    _, task, _, _ = load_run(runs["svd"])
    service = services["svd"]  # same port and url after the restart: later tests may still use it
    x = task.test.x[:60]
    outcomes: list[tuple[str, object]] = []
    client = Client(runs["svd"], service.url, TOKEN, retries=10, backoff=0.1, timeout=5)

    def load() -> None:
        for i in range(len(x)):
            try:
                outcomes.append(("answered", client.predict(x[i : i + 1])))
            except ServiceError as err:
                outcomes.append(("error", str(err)))
            time.sleep(0.02)

    worker = threading.Thread(target=load)
    worker.start()
    while len(outcomes) < 5:
        time.sleep(0.005)
    service.kill()
    at_kill = len(outcomes)
    time.sleep(0.3)
    start_service(runs["svd"], port=service.port)
    worker.join(90)
    client.close()
    assert not worker.is_alive() and len(outcomes) == len(x)
    assert at_kill < len(x)  # the kill came mid-load
    assert [kind for kind, _ in outcomes] == ["answered"] * len(x), [o for o in outcomes if o[0] != "answered"]
    assert all(p.shape == (1,) and 0 <= int(p[0]) < 2 for _, p in outcomes)
    assert client.attempts > len(x)  # some requests were sent again


def test_no_server_gives_a_clear_error_after_the_retries(runs):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    with Client(runs["scnl"], f"http://127.0.0.1:{port}", TOKEN, retries=2, backoff=0.01) as client:
        with pytest.raises(ServiceError, match=r"no answer after 3 tries \(last: ConnectError"):
            client.predict(np.zeros((1, 1, 8, 8), np.float32))
        assert client.attempts == 3
