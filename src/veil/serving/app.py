"""The split-inference service: a FastAPI app answering ``POST /v1/predict``, served by uvicorn.

Endpoints: ``POST /v1/predict`` (bearer token; a batch of messages in, primary predictions out),
``GET /health`` (open: the defense served and the message shape), ``GET /metrics`` (bearer token;
Prometheus text: requests by status, latency, refusals by reason, records per forward pass, requests in
flight), ``GET /docs`` and ``/openapi.json`` (FastAPI's own).

Refusals, each one JSON line ``{"detail": ...}``: 401 no/not-Bearer token, 403 wrong token, 408 a body that
does not arrive within ``body_timeout_s``, 413 a body over ``max_body_bytes``, 415 an unknown content type,
422 a bad shape, dtype, size or value, 503 more than ``max_concurrency`` requests at once (``Retry-After``;
nothing queues without bound) or a forward pass slower than ``compute_timeout_s``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel

from veil.io import write_json
from veil.serving.auth import authorize
from veil.serving.batching import DynamicBatcher
from veil.serving.payload import BINARY, JSON, SHAPE_HEADER, PayloadError, decode_body
from veil.serving.split import ServerSide


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Limits and batching of the service (the defaults are the recommended settings).

    Attributes:
        batching: Dynamic batching: requests arriving within ``batch_delay_ms`` share one forward pass.
        batch_delay_ms: Longest a request waits for others (only while other requests are in flight).
        max_pass_records: Most records one shared forward pass collects.
        max_request_records: Most messages in one binary request.
        max_json_records: Most messages in one JSON request (JSON is for small batches).
        max_body_bytes: Largest request body (413 beyond).
        max_concurrency: Most predict requests held at once; more are answered 503 at once.
        body_timeout_s: Longest a client may take to send its body (408 beyond): slow clients.
        compute_timeout_s: Longest a request waits for its forward pass (503 beyond).
        forward_thread: Run forward passes in a worker thread, so that the event loop keeps answering
            (health, refusals, reading bodies) during a long pass: for heavy models. Off (the default),
            passes run on the event loop: the thread hop cost ~2 ms of latency per pass on a loaded 2-core
            machine, ten times the forward pass of a small model; a pass then delays the loop by its
            duration, bounded by ``max_pass_records``, and ``compute_timeout_s`` cannot cut one short.
    """

    batching: bool = True
    batch_delay_ms: float = 2.0
    max_pass_records: int = 256
    max_request_records: int = 1024
    max_json_records: int = 64
    max_body_bytes: int = 8 * 2**20
    max_concurrency: int = 64
    body_timeout_s: float = 10.0
    compute_timeout_s: float = 30.0
    forward_thread: bool = False

    def __post_init__(self) -> None:
        for key in ("max_pass_records", "max_request_records", "max_json_records", "max_body_bytes", "max_concurrency"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        for key in ("batch_delay_ms", "body_timeout_s", "compute_timeout_s"):
            value = float(getattr(self, key))
            if not (0 <= value < float("inf")) or (key != "batch_delay_ms" and value == 0):
                raise ValueError(f"{key} must be a finite number {'>= 0' if key == 'batch_delay_ms' else '> 0'}, got {value!r}")


class Prediction(BaseModel):
    """The answer: one primary-class prediction per message, in request order."""

    predictions: list[int]


class Problem(BaseModel):
    """A refusal: one line naming the problem."""

    detail: str


class _Refused(Exception):
    def __init__(self, status: int, detail: str, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.reason, self.headers = status, detail, reason, headers or {}


_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": f"A batch of messages (B, *message_shape): raw little-endian float32 with header {SHAPE_HEADER}: B,d1,..., or JSON for small batches.",
        "content": {
            BINARY: {"schema": {"type": "string", "format": "binary"}},
            JSON: {"schema": {"type": "object", "properties": {"messages": {"type": "array", "items": {}}}, "required": ["messages"]}},
        },
    },
    "parameters": [{"name": SHAPE_HEADER, "in": "header", "required": False, "schema": {"type": "string"}, "description": "Shape of a binary body, e.g. 32,1,8,8"}],
}
_REFUSALS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": what}
    for code, what in [(401, "no bearer token"), (403, "wrong token"), (408, "body too slow"), (413, "body too large"), (415, "unknown content type"), (422, "bad messages"), (503, "busy, retry later")]
}


def create_app(server: ServerSide, tokens: tuple[bytes, ...], config: ServeConfig = ServeConfig()) -> FastAPI:
    """The FastAPI app serving ``server`` to holders of ``tokens``."""
    if not tokens:
        raise ValueError("the service needs at least one bearer token")
    registry = CollectorRegistry()
    requests = Counter("veil_requests", "Requests answered, by endpoint and HTTP status.", ["endpoint", "status"], registry=registry)
    latency = Histogram("veil_request_seconds", "Time from request to answer, by endpoint.", ["endpoint"], registry=registry, buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10))
    errors = Counter("veil_request_errors", "Predict requests refused or failed, by reason.", ["reason"], registry=registry)
    held = Gauge("veil_requests_in_flight", "Predict requests held right now.", registry=registry)
    passes = Histogram("veil_batch_records", "Records per forward pass.", registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
    state = {"in_flight": 0}
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="veil-forward") if config.forward_thread else None

    async def forward(messages: torch.Tensor) -> torch.Tensor:
        if executor is None:
            return server.predict(messages)
        return await asyncio.get_running_loop().run_in_executor(executor, server.predict, messages)  # one pass at a time

    batcher: DynamicBatcher | None = None
    if config.batching:
        batcher = DynamicBatcher(forward, max_records=config.max_pass_records, max_delay_s=config.batch_delay_ms / 1000, busy=lambda: state["in_flight"])
        batcher.on_batch = lambda records, _: passes.observe(records)
    else:
        lock = asyncio.Lock()  # without batching too, one pass at a time

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        if batcher is not None:
            batcher.start()
        yield
        if batcher is not None:
            await batcher.stop()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="veil split-inference service",
        description=f"Runs the server side of a veil run ({server.defense}): model(decode(message)). Clients obfuscate locally; only messages arrive here.",
        lifespan=lifespan,
    )

    def check_auth(request: Request) -> None:
        status = authorize(request.headers.get("authorization"), tokens)
        if status == 401:
            raise _Refused(401, "missing bearer token (send 'Authorization: Bearer <token>')", "unauthenticated", {"WWW-Authenticate": "Bearer"})
        if status == 403:
            raise _Refused(403, "token not accepted", "forbidden")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise _Refused(413, f"body of {declared} bytes exceeds the limit of {config.max_body_bytes}", "too_large")

        async def read() -> bytes:
            chunks, total = [], 0
            async for chunk in request.stream():
                total += len(chunk)
                if total > config.max_body_bytes:
                    raise _Refused(413, f"body exceeds the limit of {config.max_body_bytes} bytes", "too_large")
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), config.body_timeout_s)
        except asyncio.TimeoutError:
            raise _Refused(408, f"the request body did not arrive within {config.body_timeout_s:g} s", "slow_client") from None

    def refusal(r: _Refused) -> JSONResponse:
        errors.labels(r.reason).inc()
        return JSONResponse({"detail": r.detail}, status_code=r.status, headers=r.headers)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, and what is served: the defense, the message shape, the request limits."""
        return {
            "status": "ok",
            "defense": server.defense,
            "message_shape": list(server.message_shape),
            "num_classes": server.num_classes,
            "max_request_records": config.max_request_records,
            "max_json_records": config.max_json_records,
            "batching": config.batching,
        }

    @app.get("/metrics", responses={401: _REFUSALS[401], 403: _REFUSALS[403]})
    async def metrics(request: Request) -> Response:
        """Prometheus text: requests by status, latency, refusals by reason, records per pass (bearer token)."""
        try:
            check_auth(request)
        except _Refused as r:
            return JSONResponse({"detail": r.detail}, status_code=r.status, headers=r.headers)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/predict", response_model=Prediction, responses=_REFUSALS, openapi_extra=_REQUEST_BODY)
    async def predict(request: Request) -> Response:
        """The primary prediction for each message of the batch (B, *message_shape)."""
        t0 = time.perf_counter()
        status, counted = 200, False
        try:
            check_auth(request)
            if state["in_flight"] >= config.max_concurrency:
                raise _Refused(503, f"busy: {config.max_concurrency} requests in flight; retry later", "busy", {"Retry-After": "1"})
            state["in_flight"] += 1
            held.inc()
            counted = True
            body = await read_body(request)
            try:
                a = decode_body(body, request.headers.get("content-type"), request.headers.get(SHAPE_HEADER), message_shape=server.message_shape, max_batch=config.max_request_records, max_json_batch=config.max_json_records)
            except PayloadError as err:
                raise _Refused(err.status, str(err), "bad_media_type" if err.status == 415 else "invalid") from None
            messages = torch.from_numpy(a)
            try:
                if batcher is not None:
                    out = await asyncio.wait_for(batcher.submit(messages), config.compute_timeout_s)
                else:
                    async def alone() -> torch.Tensor:
                        async with lock:
                            return await forward(messages)

                    out = await asyncio.wait_for(alone(), config.compute_timeout_s)
                    passes.observe(len(messages))
            except asyncio.TimeoutError:
                raise _Refused(503, f"no answer within {config.compute_timeout_s:g} s; retry later", "compute_timeout", {"Retry-After": "1"}) from None
            return JSONResponse({"predictions": out.tolist()})
        except _Refused as r:
            status = r.status
            return refusal(r)
        except Exception as err:  # one line, never a traceback to the client
            status = 500
            errors.labels("internal").inc()
            print(f"veil serve: internal error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            return JSONResponse({"detail": "internal error"}, status_code=500)
        finally:
            if counted:
                state["in_flight"] -= 1
                held.dec()
            requests.labels("predict", str(status)).inc()
            latency.labels("predict").observe(time.perf_counter() - t0)

    return app


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted server takes its port back at once
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({err.strerror or err})") from err
    sock.set_inheritable(True)
    return sock


def serve(server: ServerSide, tokens: tuple[bytes, ...], *, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig = ServeConfig(), ready_file: str | Path | None = None) -> None:
    """Run the service until SIGINT/SIGTERM. ``port=0`` takes a free port; ``ready_file`` receives
    ``{"url", "pid"}`` (written atomically) once the server accepts connections."""
    import uvicorn

    app = create_app(server, tokens, config)
    sock = _bind(host, port)
    port = sock.getsockname()[1]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    uv = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            timeout_keep_alive=5,
            limit_concurrency=4 * config.max_concurrency + 16,  # connections; requests are limited in the app
            timeout_graceful_shutdown=5,
        )
    )

    async def main() -> None:
        task = asyncio.create_task(uv.serve(sockets=[sock]))
        while not uv.started and not task.done():
            await asyncio.sleep(0.01)
        if uv.started:
            print(f"veil serve: {server.defense} at {url} (message shape {list(server.message_shape)}, batching {'on' if config.batching else 'off'}); docs at {url}/docs", file=sys.stderr, flush=True)
            if ready_file is not None:
                write_json(ready_file, {"url": url, "pid": os.getpid()})
        await task

    # uvicorn's own loop choice (uvloop where installed): on the stock asyncio loop a keep-alive
    # request took ~45 ms here against ~2 ms with uvloop
    with asyncio.Runner(loop_factory=uv.config.get_loop_factory()) as runner:
        runner.run(main())
