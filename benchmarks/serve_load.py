"""Load on ``veil serve``: throughput and latency over loopback against the same model in-process, and faults.

1. Starts ``veil serve`` (``python -m veil.serving``) as a separate process, once with dynamic batching and
   once without, and drives it from another process (this script's ``drive`` subcommand: asyncio + httpx,
   C concurrent clients with keep-alive, one record per request) at 1, 8 and 32 clients, each level bounded
   by ``--requests`` and ``--seconds``; it stops by itself. Reports throughput and p50/p99 latency.
2. In the same run, on the same machine: the in-process single-record latency and batched throughput of the
   same server side (``load_server_side(RUN).predict``), so that the goals are ratios measured together:
   served throughput at 32 clients >= 50% of in-process batched throughput (batch 32, the most the
   batcher can collect from 32 clients); p99 at 1 client <= 5x the in-process single-record latency.
3. Faults: malformed and oversized bodies, no and wrong token (each must be refused with its status), and
   the server SIGKILLed and restarted on its port mid-load while a ``veil.client.Client`` with retries
   sends requests: every request must end answered or with a clear error, none silently dropped.

A command, not a test (timings are never asserted in tests)::

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py                  # trains a small digits-lt5 scnl run
    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --run runs/scnl  # or serve your own run

Writes ``benchmarks/results/serve_load/serve_load.{json,md}`` atomically. The server, the load process
and the in-process measurement share this machine's cores: compare ratios from one run, not absolute times.
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

OUT = Path(__file__).resolve().parent / "results" / "serve_load"


# ----------------------------------------------------------------------------------------- the load process
async def _drive(url: str, token: str, messages: np.ndarray, concurrency: int, requests: int, seconds: float, records: int = 1) -> dict:
    import httpx

    from veil.serving.payload import encode_binary

    bodies = [encode_binary(np.resize(messages[i : i + records], (records, *messages.shape[1:]))) for i in range(len(messages))]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    issued = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, limits=limits, timeout=30) as client:

        async def worker() -> None:
            nonlocal issued
            while issued < requests and time.perf_counter() < deadline:
                body, headers = bodies[issued % len(bodies)]
                issued += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(f"{url}/v1/predict", content=body, headers=headers)
                    key = str(r.status_code)
                except httpx.HTTPError as err:
                    key = type(err).__name__
                latencies.append(time.perf_counter() - t0)
                statuses[key] = statuses.get(key, 0) + 1

        await client.get(f"{url}/health")  # connect once before the clock starts
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    ok = statuses.get("200", 0)
    lat = sorted(latencies)
    return {
        "concurrency": concurrency,
        "records_per_request": records,
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


def drive_main(args: argparse.Namespace) -> None:
    messages = np.load(args.messages, allow_pickle=False)
    token = Path(args.token_file).read_text().strip()
    try:
        import uvloop  # the client side, as the server, on uvloop where installed

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    print(json.dumps(run(_drive(args.url, token, messages, args.concurrency, args.requests, args.seconds, args.records))))


# ----------------------------------------------------------------------------------------- the harness
class Server:
    """``python -m veil.serving RUN`` as a separate process."""

    def __init__(self, run: Path, token_file: Path, work: Path, *args: str, port: int = 0) -> None:
        self.ready = work / f"ready-{secrets.token_hex(4)}.json"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = [sys.executable, "-m", "veil.serving", str(run), "--port", str(port), "--token-file", str(token_file), "--ready-file", str(self.ready), *args]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"veil serve did not start ({' '.join(cmd)})")
            time.sleep(0.05)
        self.url = json.loads(self.ready.read_text())["url"]
        self.port = int(self.url.rsplit(":", 1)[1])

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def drive(server: Server, token_file: Path, messages: Path, concurrency: int, requests: int, seconds: float, records: int = 1) -> dict:
    """One level of load from a separate process; adds the server's CPU time per request (robust to a
    shared machine, unlike wall-clock throughput)."""
    cmd = [sys.executable, __file__, "drive", "--url", server.url, "--token-file", str(token_file), "--messages", str(messages), "--concurrency", str(concurrency), "--requests", str(requests), "--seconds", str(seconds), "--records", str(records)]
    cpu0 = server.cpu_seconds()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"load process failed: {out.stderr[-2000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    d = sub.add_parser("drive", help="(internal) the load process")
    d.add_argument("--url", required=True)
    d.add_argument("--token-file", required=True)
    d.add_argument("--messages", required=True)
    d.add_argument("--concurrency", type=int, required=True)
    d.add_argument("--requests", type=int, required=True)
    d.add_argument("--seconds", type=float, required=True)
    d.add_argument("--records", type=int, default=1)
    p.add_argument("--run", type=Path, default=None, help="A finished run folder (default: train digits-lt5 scnl, 3 epochs, into a temporary folder).")
    p.add_argument("--levels", default="1,8,32", help="Concurrent clients, comma-separated.")
    p.add_argument("--requests", type=int, default=600, help="Most requests per level.")
    p.add_argument("--seconds", type=float, default=8.0, help="Most seconds per level.")
    p.add_argument("--reps", type=int, default=300, help="In-process single-record repetitions.")
    p.add_argument("--batch-records", type=int, default=32, help="Records per request of the extra multi-record level (8 clients, batching server).")
    p.add_argument("--restart-requests", type=int, default=200, help="Requests sent across the kill and restart.")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if args.cmd == "drive":
        return drive_main(args)

    import torch

    from veil.io import write_bytes, write_json
    from veil.training import TrainConfig, load_run, obfuscate, train_run

    levels = [int(c) for c in args.levels.split(",")]
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
        served: dict[str, list[dict]] = {}
        for batching in (True, False):
            name = "batching" if batching else "no batching"
            server = Server(run, token_file, work, "--batching" if batching else "--no-batching")
            try:
                served[name] = []
                for c in levels:
                    row = drive(server, token_file, work / "messages.npy", c, args.requests, args.seconds)
                    served[name].append(row)
                    print(f"{name} c={c}: {row}", file=sys.stderr)
                if batching and args.batch_records > 1:
                    row = drive(server, token_file, work / "messages.npy", 8, args.requests, args.seconds, args.batch_records)
                    served[name].append(row)
                    print(f"{name} c=8, {args.batch_records} records per request: {row}", file=sys.stderr)
            finally:
                server.stop()
        fault = faults(run, token_file, work, messages, args.restart_requests)
        print(f"faults: {fault}", file=sys.stderr)

    top = max(levels)
    single = {name: [r for r in rows if r["records_per_request"] == 1] for name, rows in served.items()}
    best = {name: next(r for r in rows if r["concurrency"] == top) for name, rows in single.items()}
    one = next(r for r in single["batching"] if r["concurrency"] == min(levels))
    multi = [r for r in served["batching"] if r["records_per_request"] > 1]
    goals = {
        "zero_errors_under_load": all(r["errors"] == 0 for rows in served.values() for r in rows),
        f"throughput_{top}_clients_over_in_process_batch32": round(best["batching"]["throughput_rps"] / local["batch32_records_per_s"], 3),
        f"p99_{min(levels)}_client_over_in_process_single_record": round(one["p99_ms"] / local["single_record_ms"], 2),
        f"throughput_{top}_clients_batching_over_no_batching": round(best["batching"]["throughput_rps"] / best["no batching"]["throughput_rps"], 3),
        **({f"records_per_s_{multi[0]['records_per_request']}_per_request_over_in_process_batch32": round(multi[0]["records_per_s"] / local["batch32_records_per_s"], 3)} if multi else {}),
        "faults_refused_as_expected": all(v["expected"] == v["got"] for v in fault["refusals"].values()),
        "restart_nothing_dropped": fault["restart"]["dropped"] == 0,
    }
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "torch_threads": torch.get_num_threads(), "note": "shared machine: server, load process and in-process measurement compete for the same cores"},
        "run": str(args.run) if args.run else "digits-lt5 scnl lambda 0.3, 3 epochs, cnn server model (trained by this script)",
        "message_shape": list(messages.shape[1:]),
        "settings": {"levels": levels, "requests_per_level": args.requests, "seconds_per_level": args.seconds, "records_per_request": 1},
        "in_process": local,
        "served": served,
        "faults": fault,
        "goals": goals,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "serve_load.json", result)
    write_bytes(args.out / "serve_load.md", markdown(result).encode())
    print(markdown(result))


def markdown(r: dict) -> str:
    local, goals = r["in_process"], r["goals"]
    lines = [
        "# veil serve under load",
        "",
        f"Run: {r['run']}; message shape {r['message_shape']}; one record per request; {r['settings']['requests_per_level']} requests or {r['settings']['seconds_per_level']} s per level.",
        f"Machine: {r['machine']['cpus']} CPUs, shared (load average at the end {', '.join(f'{x:.1f}' for x in r['machine']['load_avg_at_end'])}); server, load process and in-process measurement compete for the same cores.",
        "",
        "| server | clients | records/request | requests | errors | throughput (req/s) | records/s | p50 (ms) | p99 (ms) | server CPU (ms/request) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in r["served"].items():
        for row in rows:
            lines.append(f"| {name} | {row['concurrency']} | {row['records_per_request']} | {row['requests']} | {row['errors']} | {row['throughput_rps']} | {row['records_per_s']} | {row['p50_ms']} | {row['p99_ms']} | {row['server_cpu_ms_per_request']} |")
    lines += [
        "",
        f"In-process, same model, same machine, same run: single record {local['single_record_ms']} ms; batched {local['batch32_records_per_s']} records/s at batch 32, {local['batch256_records_per_s']} at batch 256.",
        "",
        "| goal | measured |",
        "|---|---|",
    ]
    lines += [f"| {k.replace('_', ' ')} | {v} |" for k, v in goals.items()]
    rs = r["faults"]["restart"]
    lines += ["", "Faults:", "", "| case | expected | got |", "|---|---|---|"]
    lines += [f"| {k} | {v['expected']} | {v['got']} |" for k, v in r["faults"]["refusals"].items()]
    lines += ["", f"Kill -9 and restart mid-load: {rs['requests']} requests, {rs['answered']} answered, {rs['clear_errors']} clear errors, {rs['dropped']} dropped; killed after {rs['killed_after']}, server down {rs['server_down_s']} s, {rs['tries']} tries in all.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
