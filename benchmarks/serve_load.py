"""Load and faults on ``veil serve``: the HTTP floor, batching on and off, JSON and binary, slow clients,
kill and restart, all in one run on one machine, beside the same model in process.

1. Servers, each a separate process: the *floor* (an empty endpoint on the same stack: FastAPI on the
   same uvicorn settings, ``POST /v1/predict`` reads the body and answers a constant), ``veil serve`` with
   dynamic batching and without (``python -m veil.serving``), and optionally ``--ray --replicas 2``.
2. Load from another process (this script's ``drive`` subcommand, an own asyncio client: aiohttp where
   installed, else httpx; C concurrent closed-loop clients with keep-alive), at 1/8/32/128 clients, 1 and
   32 records per request, binary (raw float32 + ``X-Veil-Shape``) and JSON; each level bounded by
   ``--requests`` and ``--seconds``. Throughput, records/s, p50/p99 latency, errors (any non-200 or
   transport error), and the server's CPU time per request.
3. In the same run: the in-process single-record latency and batched throughput of the same server side
   (``load_server_side(RUN).predict``), so the goals are ratios measured together.
4. Slow clients (``slow`` subcommand): S sockets send a request's headers one byte every I seconds against
   a server with ``--header-timeout T``; meanwhile a normal client sends requests one after another;
   reported: its latencies, and how many slow sockets the server closed and when.
5. Faults: malformed and oversized bodies, no and wrong token, and the server SIGKILLed and restarted on
   its port mid-load while a ``veil.client.Client`` with retries sends requests (none may be dropped).

A command, not a test (timings are never asserted in tests)::

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py                  # trains a small digits-lt5 scnl run
    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --run runs/scnl  # or serve your own run

Writes ``benchmarks/results/serve_load/README.md`` (tables), ``serve_load.json`` and ``serve_load.csv`` atomically. The servers, the load
process and the in-process measurement share this machine's cores (and, here, other people's work):
compare ratios from one run, not absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request  # at module level: the empty endpoint's annotations resolve here
from fastapi.responses import JSONResponse

OUT = Path(__file__).resolve().parent / "results" / "serve_load"


# ----------------------------------------------------------------------------------------- the load process
def _bodies(messages: np.ndarray, records: int, payload: str) -> list[tuple[bytes, dict[str, str]]]:
    from veil.serving.payload import encode_binary, encode_json

    encode = encode_binary if payload == "binary" else encode_json
    n = min(len(messages), 64)
    return [encode(np.resize(messages[i : i + records], (records, *messages.shape[1:]))) for i in range(n)]


async def _drive(url: str, token: str, messages: np.ndarray, concurrency: int, requests: int, seconds: float, records: int, payload: str) -> dict:
    bodies = _bodies(messages, records, payload)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    issued = 0
    auth = {"Authorization": f"Bearer {token}"}
    try:
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), headers=auth, timeout=aiohttp.ClientTimeout(total=30))

        async def post(body: bytes, headers: dict[str, str]) -> str:
            async with session.post(f"{url}/v1/predict", data=body, headers=headers) as r:
                await r.read()
                return str(r.status)

        client_name = "aiohttp"
    except ImportError:
        import httpx

        session = httpx.AsyncClient(headers=auth, limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency), timeout=30)

        async def post(body: bytes, headers: dict[str, str]) -> str:
            return str((await session.post(f"{url}/v1/predict", content=body, headers=headers)).status_code)

        client_name = "httpx"
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            body, headers = bodies[issued % len(bodies)]
            issued += 1
            t0 = time.perf_counter()
            try:
                key = await post(body, headers)
            except Exception as err:  # a transport error is counted, never hidden
                key = type(err).__name__
            latencies.append(time.perf_counter() - t0)
            statuses[key] = statuses.get(key, 0) + 1

    try:
        await asyncio.gather(*(post(*bodies[0]) for _ in range(concurrency)))  # open the connections before the clock starts
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    finally:
        await (session.close() if client_name == "aiohttp" else session.aclose())
    ok = statuses.get("200", 0)
    lat = sorted(latencies)
    return {
        "concurrency": concurrency,
        "records_per_request": records,
        "payload": payload,
        "client": client_name,
        "requests": len(latencies),
        "ok": ok,
        "errors": len(latencies) - ok,
        "statuses": statuses,
        "seconds": round(elapsed, 3),
        "throughput_rps": round(ok / elapsed, 1),
        "records_per_s": round(ok * records / elapsed, 1),
        "p50_ms": round(1000 * lat[len(lat) // 2], 3),
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
    }


async def _slow(url: str, token: str, messages: np.ndarray, sockets: int, interval: float, normal: int, wait: float) -> dict:
    """``sockets`` connections send a request's headers one byte every ``interval`` s; meanwhile ``normal``
    requests go one after another on a fresh connection each; then wait up to ``wait`` s for the server to
    close the slow sockets."""
    import httpx

    from veil.serving.payload import encode_binary

    host, port = url.removeprefix("http://").rsplit(":", 1)
    head = f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\nX-Veil-Shape: 1,1,8,8\r\nContent-Length: 256\r\n\r\n".encode()
    closed_after: list[float] = []
    opened: list[bool] = []

    async def slow_one() -> None:
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            return
        opened.append(True)
        t0 = time.monotonic()

        async def drip() -> None:
            for byte in head:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(interval)

        dripping = asyncio.ensure_future(drip())
        eof = asyncio.ensure_future(reader.read(1))  # b"" (or an error) once the server closes
        done, _ = await asyncio.wait({dripping, eof}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        if eof in done or (dripping in done and dripping.exception() is not None):
            closed_after.append(time.monotonic() - t0)
        for t in (dripping, eof):
            t.cancel()
        writer.close()

    slow = [asyncio.ensure_future(slow_one()) for _ in range(sockets)]
    await asyncio.sleep(min(1.0, interval))  # every slow socket has connected and started
    body, headers = encode_binary(messages[:1])
    latencies, statuses = [], {}
    for _ in range(normal):
        t0 = time.perf_counter()
        try:
            async with httpx.AsyncClient(timeout=10) as client:  # a new connection each time: a newcomer
                r = await client.post(f"{url}/v1/predict", content=body, headers={**headers, "Authorization": f"Bearer {token}"})
            key = str(r.status_code)
        except httpx.HTTPError as err:
            key = type(err).__name__
        latencies.append(time.perf_counter() - t0)
        statuses[key] = statuses.get(key, 0) + 1
        await asyncio.sleep(0.1)
    await asyncio.gather(*slow)
    return {
        "slow_sockets": sockets,
        "slow_opened": len(opened),
        "byte_interval_s": interval,
        "normal_requests": normal,
        "normal_statuses": statuses,
        "normal_p50_ms": round(1000 * statistics.median(latencies), 2),
        "normal_max_ms": round(1000 * max(latencies), 2),
        "slow_closed_by_server": len(closed_after),
        "closed_after_s_median": round(statistics.median(closed_after), 2) if closed_after else None,
        "closed_after_s_max": round(max(closed_after), 2) if closed_after else None,
    }


def _event_loop_run():
    try:
        import uvloop  # the client side, as the server, on uvloop where installed

        return uvloop.run
    except ImportError:
        return asyncio.run


def drive_main(args: argparse.Namespace) -> None:
    messages = np.load(args.messages, allow_pickle=False)
    token = Path(args.token_file).read_text().strip()
    if args.cmd == "slow":
        out = _event_loop_run()(_slow(args.url, token, messages, args.sockets, args.interval, args.normal, args.wait))
    else:
        out = _event_loop_run()(_drive(args.url, token, messages, args.concurrency, args.requests, args.seconds, args.records, args.payload))
    print(json.dumps(out))


def floor_main(args: argparse.Namespace) -> None:
    """The empty endpoint: the same FastAPI + uvicorn stack and settings as ``veil serve``; the body is
    read, nothing is checked or computed, a constant is answered."""
    from veil.serving.app import ServeConfig, run_app

    app = FastAPI()

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"predictions": [0]})

    run_app(app, host="127.0.0.1", port=0, config=ServeConfig(), ready_file=args.ready_file, banner="empty endpoint at {url}")


# ----------------------------------------------------------------------------------------- the harness
class Server:
    """A server process: ``python -m veil.serving RUN *args``, or this script's empty endpoint."""

    def __init__(self, run: Path | None, token_file: Path, work: Path, *args: str, port: int = 0, timeout: float = 120) -> None:
        self.ready = work / f"ready-{secrets.token_hex(4)}.json"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        if run is None:
            cmd = [sys.executable, __file__, "floor", "--ready-file", str(self.ready)]
        else:
            cmd = [sys.executable, "-m", "veil.serving", str(run), "--port", str(port), "--token-file", str(token_file), "--ready-file", str(self.ready), *args]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start ({' '.join(cmd)})")
            time.sleep(0.05)
        self.url = json.loads(self.ready.read_text())["url"]
        self.port = int(self.url.rsplit(":", 1)[1])

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server process has used so far (Linux /proc; not its children)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _load_process(sub: str, server: Server, token_file: Path, messages: Path, extra: list[str], timeout: float) -> dict:
    cmd = [sys.executable, __file__, sub, "--url", server.url, "--token-file", str(token_file), "--messages", str(messages), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"load process failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def drive(server: Server, token_file: Path, messages: Path, concurrency: int, requests: int, seconds: float, records: int, payload: str) -> dict:
    """One level of load from a separate process; adds the server's CPU time per request."""
    cpu0 = server.cpu_seconds()
    row = _load_process("drive", server, token_file, messages, ["--concurrency", str(concurrency), "--requests", str(requests), "--seconds", str(seconds), "--records", str(records), "--payload", payload], seconds + 120)
    row["server_cpu_ms_per_request"] = round(1000 * (server.cpu_seconds() - cpu0) / max(1, row["requests"]), 3)
    return row


def in_process(run: Path, messages: np.ndarray, reps: int) -> dict:
    """Single-record latency and batched throughput of the server side, in this process."""
    import torch

    from veil.serving.split import load_server_side

    server = load_server_side(run)
    m = torch.from_numpy(messages)
    for i in range(20):
        server.predict(m[i : i + 1])
    single = []
    for i in range(reps):
        t0 = time.perf_counter()
        server.predict(m[i % len(m) : i % len(m) + 1])
        single.append(time.perf_counter() - t0)
    out = {"single_record_ms": round(1000 * statistics.median(single), 4)}
    for batch in (32, 256):
        b = m[:batch] if len(m) >= batch else m.repeat(batch // len(m) + 1, *[1] * (m.dim() - 1))[:batch]
        times = []
        for _ in range(max(5, reps // 20)):
            t0 = time.perf_counter()
            server.predict(b)
            times.append(time.perf_counter() - t0)
        out[f"batch{batch}_records_per_s"] = round(batch / statistics.median(times), 1)
    return out


def faults(run: Path, token_file: Path, work: Path, messages: np.ndarray, restart_requests: int) -> dict:
    import httpx

    from veil.client import Client, ServiceError
    from veil.serving.payload import encode_binary, encode_json

    token = token_file.read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    server = Server(run, token_file, work)
    body, headers = encode_binary(messages[:4])
    cases = {
        "malformed: wrong shape": (body, {**headers, **auth, "X-Veil-Shape": f"4,{messages[0].size}"}, 422),
        "malformed: size != shape": (body[:-4], {**headers, **auth}, 422),
        "malformed: NaN": (encode_binary(np.full_like(messages[:2], np.nan))[0], {**encode_binary(messages[:2])[1], **auth}, 422),
        "malformed: not JSON": (b"{messages", {"Content-Type": "application/json", **auth}, 422),
        "malformed: JSON of strings": (json.dumps({"messages": [["a"]]}).encode(), {"Content-Type": "application/json", **auth}, 422),
        "oversized: 9 MiB body": (b"\0" * (9 * 2**20), {**headers, **auth}, 413),
        "no token": (body, headers, 401),
        "wrong token": (body, {**headers, "Authorization": "Bearer " + "w" * 32}, 403),
        "good request": (*encode_json(messages[:2]), 200),
    }
    refusals = {}
    for what, (b, h, want) in cases.items():
        h = h if what != "good request" else {**h, **auth}
        r = httpx.post(f"{server.url}/v1/predict", content=b, headers=h, timeout=30)
        refusals[what] = {"expected": want, "got": r.status_code, "detail": r.json().get("detail") if r.status_code != 200 else None}

    # the restart: a client with retries sends one record at a time; the server is killed and restarted
    outcomes: list[str] = []
    errors: list[str] = []
    client = Client(run, server.url, token, retries=10, backoff=0.1, timeout=10)

    def load() -> None:
        for i in range(restart_requests):
            try:
                client.send(messages[i % len(messages)][None])
                outcomes.append("answered")
            except ServiceError as err:
                outcomes.append("error")
                errors.append(str(err))
            time.sleep(0.005)

    worker = threading.Thread(target=load)
    worker.start()
    while len(outcomes) < restart_requests // 4:
        time.sleep(0.005)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    killed_at = len(outcomes)
    t_kill = time.monotonic()
    restarted = Server(run, token_file, work, port=server.port)
    down_s = time.monotonic() - t_kill
    worker.join()
    restarted.stop()
    client.close()
    answered, failed = outcomes.count("answered"), outcomes.count("error")
    return {
        "refusals": refusals,
        "restart": {
            "requests": restart_requests,
            "answered": answered,
            "clear_errors": failed,
            "dropped": restart_requests - answered - failed,
            "killed_after": killed_at,
            "server_down_s": round(down_s, 2),
            "tries": client.attempts,
            "error_messages": errors[:3],
        },
    }


#: the load's 128 clients fit under the request cap (the default 64 would answer half of them 503: busy)
CAP = ("--max-concurrency", "256")
#: (server, its options, the (payload, records per request) grid driven at every level)
MATRIX: list[tuple[str, tuple[str, ...], list[tuple[str, int]]]] = [
    ("floor", (), [("binary", 1), ("binary", 32)]),
    ("batching", ("--batching", *CAP), [("binary", 1), ("json", 1), ("binary", 32), ("json", 32)]),
    ("no batching", ("--no-batching", *CAP), [("binary", 1), ("binary", 32)]),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    for name in ("drive", "slow"):
        d = sub.add_parser(name, help="(internal) a load process")
        d.add_argument("--url", required=True)
        d.add_argument("--token-file", required=True)
        d.add_argument("--messages", required=True)
        d.add_argument("--concurrency", type=int, default=1)
        d.add_argument("--requests", type=int, default=100)
        d.add_argument("--seconds", type=float, default=5)
        d.add_argument("--records", type=int, default=1)
        d.add_argument("--payload", choices=("binary", "json"), default="binary")
        d.add_argument("--sockets", type=int, default=200)
        d.add_argument("--interval", type=float, default=2.0)
        d.add_argument("--normal", type=int, default=20)
        d.add_argument("--wait", type=float, default=20.0)
    f = sub.add_parser("floor", help="(internal) the empty endpoint")
    f.add_argument("--ready-file", required=True)
    p.add_argument("--run", type=Path, default=None, help="A finished run folder (default: train digits-lt5 scnl, 3 epochs, into a temporary folder).")
    p.add_argument("--levels", default="1,8,32,128", help="Concurrent clients, comma-separated.")
    p.add_argument("--requests", type=int, default=3000, help="Most requests per level.")
    p.add_argument("--seconds", type=float, default=3.0, help="Most seconds per level.")
    p.add_argument("--reps", type=int, default=300, help="In-process single-record repetitions.")
    p.add_argument("--delays", default="1,2,5", help="Extra --batch-delay-ms values measured at the top two levels (binary, 1 record), beside the default.")
    p.add_argument("--slow-sockets", type=int, default=200, help="Slow clients in the slow-client case.")
    p.add_argument("--slow-interval", type=float, default=2.0, help="Seconds between the slow clients' bytes.")
    p.add_argument("--ray", action="store_true", help="Also measure --ray --replicas 2 (Ray Serve; adds ~1 minute).")
    p.add_argument("--restart-requests", type=int, default=200, help="Requests sent across the kill and restart.")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if args.cmd in ("drive", "slow"):
        return drive_main(args)
    if args.cmd == "floor":
        return floor_main(args)

    import torch

    from veil.io import write_bytes, write_csv, write_json
    from veil.serving.app import ServeConfig
    from veil.training import TrainConfig, load_run, obfuscate, train_run

    t_start = time.monotonic()
    levels = [int(c) for c in args.levels.split(",")]
    delays = [float(d) for d in args.delays.split(",") if d.strip()]
    default_delay = ServeConfig().batch_delay_ms
    matrix = list(MATRIX)
    if args.ray:
        matrix.append(("ray serve, 2 replicas", ("--ray", "--replicas", "2", *CAP), [("binary", 1), ("binary", 32)]))
    with tempfile.TemporaryDirectory(prefix="veil-serve-load-") as tmp:
        work = Path(tmp)
        run = args.run
        if run is None:
            run = work / "run"
            train_run(TrainConfig(task="digits-lt5", defense="scnl", knob=0.3, epochs=3), run, log=lambda s: None)
        _, task, defense, _ = load_run(run)
        messages = obfuscate(defense, task.test.x).numpy().astype(np.float32)
        np.save(work / "messages.npy", messages)
        token_file = work / "token"
        token_file.write_text(secrets.token_urlsafe(32) + "\n")
        token_file.chmod(0o600)

        local = in_process(run, messages, args.reps)
        print(f"in-process: {local}", file=sys.stderr)
        rows: list[dict] = []
        for name, options, grid in matrix:
            server = Server(None if name == "floor" else run, token_file, work, *options, timeout=300)
            try:
                for payload, records in grid:
                    for c in levels:
                        row = {"server": name, **drive(server, token_file, work / "messages.npy", c, args.requests, args.seconds, records, payload)}
                        if name.startswith("ray"):
                            row["server_cpu_ms_per_request"] = None  # the replicas are Ray's processes, not this one's
                        rows.append(row)
                        print(f"{name} c={c} {payload} x{records}: {row}", file=sys.stderr)
            finally:
                server.stop()
        for delay in delays:
            server = Server(run, token_file, work, "--batching", "--batch-delay-ms", str(delay), *CAP)
            try:
                for c in levels[-2:]:
                    row = {"server": f"batching, delay {delay:g} ms", **drive(server, token_file, work / "messages.npy", c, args.requests, args.seconds, 1, "binary")}
                    rows.append(row)
                    print(f"delay {delay} c={c}: {row}", file=sys.stderr)
            finally:
                server.stop()
        server = Server(run, token_file, work)
        try:
            slow = _load_process("slow", server, token_file, work / "messages.npy", ["--sockets", str(args.slow_sockets), "--interval", str(args.slow_interval), "--normal", "20", "--wait", str(4 * ServeConfig().header_timeout_s)], 300)
            slow["header_timeout_s"] = ServeConfig().header_timeout_s
        finally:
            server.stop()
        print(f"slow clients: {slow}", file=sys.stderr)
        fault = faults(run, token_file, work, messages, args.restart_requests)
        print(f"faults: {fault}", file=sys.stderr)

    def find(server: str, c: int, payload: str = "binary", records: int = 1) -> dict:
        return next(r for r in rows if r["server"] == server and r["concurrency"] == c and r["payload"] == payload and r["records_per_request"] == records)

    c32 = 32 if 32 in levels else max(levels)
    batch, alone, floor = find("batching", c32), find("no batching", c32), find("floor", c32)
    multi = max((r for r in rows if r["server"] == "batching" and r["payload"] == "binary" and r["records_per_request"] == 32), key=lambda r: r["records_per_s"])
    goals = {
        f"{c32} clients x 1 record: veil serve req/s over the empty endpoint's (goal >= 0.7)": round(batch["throughput_rps"] / floor["throughput_rps"], 3),
        f"{c32} clients x 1 record: batching over no batching (goal >= 1.5)": round(batch["throughput_rps"] / alone["throughput_rps"], 3),
        f"{c32} clients x 1 record, batching: p99 over p50 (goal <= 5)": round(batch["p99_ms"] / batch["p50_ms"], 2),
        f"32-record binary requests, best level ({multi['concurrency']} clients): records/s over in-process batch 32 (goal >= 0.8)": round(multi["records_per_s"] / local["batch32_records_per_s"], 3),
        f"{args.slow_sockets} slow clients: slowest normal request in ms (goal < 1000)": slow["normal_max_ms"],
        f"{args.slow_sockets} slow clients: slow sockets closed by the server (goal: all)": f"{slow['slow_closed_by_server']} of {slow['slow_opened']}",
        "errors at every level, veil serve (goal 0)": sum(r["errors"] for r in rows if r["server"] != "floor"),
        "faults refused as expected": all(v["expected"] == v["got"] for v in fault["refusals"].values()),
        "restart: requests dropped (goal 0)": fault["restart"]["dropped"],
    }
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "torch_threads": torch.get_num_threads(), "note": "2 shared cores: the servers, the load process, the in-process measurement and other users' jobs compete for them"},
        "run": str(args.run) if args.run else "digits-lt5 scnl lambda 0.3, 3 epochs, cnn server model (trained by this script)",
        "message_shape": list(messages.shape[1:]),
        "settings": {"levels": levels, "requests_per_level": args.requests, "seconds_per_level": args.seconds, "default_batch_delay_ms": default_delay, "extra_delays_ms": delays, "client": rows[0]["client"]},
        "in_process": local,
        "served": rows,
        "slow_clients": slow,
        "faults": fault,
        "goals": goals,
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "serve_load.json", result)
    columns = ["server", "payload", "records_per_request", "concurrency", "requests", "errors", "throughput_rps", "records_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_request"]
    write_csv(args.out / "serve_load.csv", [{k: r[k] for k in columns} for r in rows])
    write_bytes(args.out / "README.md", markdown(result).encode())
    print(markdown(result))


def markdown(r: dict) -> str:
    local, s = r["in_process"], r["slow_clients"]
    lines = [
        "# veil serve under load",
        "",
        "Written by `OMP_NUM_THREADS=1 python benchmarks/serve_load.py` (all of it one run, "
        f"{r['wall_s']:.0f} s). Run: {r['run']}; message shape {r['message_shape']}; each level {r['settings']['requests_per_level']} requests or "
        f"{r['settings']['seconds_per_level']} s; closed-loop {r['settings']['client']} clients with keep-alive in a separate process; default batch delay {r['settings']['default_batch_delay_ms']:g} ms.",
        f"Machine: {r['machine']['cpus']} CPUs, shared with other users' jobs (load average at the end {', '.join(f'{x:.1f}' for x in r['machine']['load_avg_at_end'])}); "
        "the servers, the load process and the in-process measurement compete for the same cores, so compare ratios within this run, not absolute figures.",
        "The floor is an empty endpoint on the same stack (FastAPI on uvicorn with veil serve's settings: it reads the body and answers a constant).",
        "",
        f"In-process, same model, same run: single record {local['single_record_ms']} ms; batched {local['batch32_records_per_s']} records/s at batch 32, {local['batch256_records_per_s']} at batch 256.",
        "",
        "## Goals",
        "",
        "| goal | measured |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in r["goals"].items()]
    lines += [
        "",
        "## Load",
        "",
        "| server | payload | records/request | clients | requests | errors | req/s | records/s | p50 (ms) | p99 (ms) | server CPU (ms/request) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["served"]:
        lines.append(f"| {row['server']} | {row['payload']} | {row['records_per_request']} | {row['concurrency']} | {row['requests']} | {row['errors']} | {row['throughput_rps']} | {row['records_per_s']} | {row['p50_ms']} | {row['p99_ms']} | {row['server_cpu_ms_per_request'] if row['server_cpu_ms_per_request'] is not None else 'n/a'} |")
    rs = r["faults"]["restart"]
    lines += [
        "",
        "## Slow clients",
        "",
        f"{s['slow_sockets']} sockets ({s['slow_opened']} connected) each sent a request's headers one byte every {s['byte_interval_s']:g} s against the default header timeout of {s['header_timeout_s']:g} s; "
        f"meanwhile a newcomer sent {s['normal_requests']} requests one after another on fresh connections: statuses {s['normal_statuses']}, p50 {s['normal_p50_ms']} ms, slowest {s['normal_max_ms']} ms. "
        f"The server closed {s['slow_closed_by_server']} of the slow sockets, after {s['closed_after_s_median']} s (median) / {s['closed_after_s_max']} s (last).",
        "",
        "## Faults",
        "",
        "| case | expected | got |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['expected']} | {v['got']} |" for k, v in r["faults"]["refusals"].items()]
    lines += ["", f"Kill -9 and restart mid-load: {rs['requests']} requests, {rs['answered']} answered, {rs['clear_errors']} clear errors, {rs['dropped']} dropped; killed after {rs['killed_after']}, server down {rs['server_down_s']} s, {rs['tries']} tries in all.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
