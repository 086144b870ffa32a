"""The split-inference service: a FastAPI app answering ``POST /v1/predict`` and the Open Inference
Protocol (KServe v2), served by uvicorn.

Endpoints: ``POST /v1/predict`` (bearer token; a batch of messages in, primary predictions out),
``GET /health`` (open: the defense served and the message shape), ``GET /metrics`` (bearer token;
Prometheus text: requests by status, latency, refusals by reason, records per forward pass, requests in
flight), ``GET /docs`` and ``/openapi.json`` (FastAPI's own). Open Inference Protocol v2
(:mod:`veil.serving.v2`): ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}``,
``/v2/models/{name}/ready`` (open) and ``POST /v2/models/{name}/infer`` (bearer token; JSON or the
binary-tensor extension).

Refusals, each one line (``{"detail": ...}`` on /v1, ``{"error": ...}`` on /v2): 401 no/not-Bearer
token, 403 wrong token, 404 an unknown v2 model, 408 a body that does not arrive within
``body_timeout_s``, 413 a body over ``max_body_bytes``, 415 an unknown content type, 422 (400 on v2, as
Triton answers) a bad shape, dtype, size or value, 503 more than ``max_concurrency`` requests at once
(``Retry-After``; nothing queues without bound) or a forward pass slower than ``compute_timeout_s``.
Requests are checked before they join a batch, so a bad one is refused alone and never fails the pass
its batch-mates share.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import gc
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel

from veil.io import write_json
from veil.serving import v2
from veil.serving.auth import authorize
from veil.serving.batching import DynamicBatcher
from veil.serving.payload import BINARY, DTYPE_HEADER, JSON, NPY, SHAPE_HEADER, PayloadError, decode_body
from veil.serving.split import ServerSide


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Limits and batching of the service (the defaults are the recommended settings).

    Attributes:
        batching: Dynamic batching: requests in flight together share one forward pass.
        batch_delay_ms: Longest a request waits for others still on their way (only while other requests
            are in flight). 0 (the default, the fastest measured: benchmarks/results/serve_load/): a pass
            takes every request that has reached the queue after one turn of the event loop, no timer.
        max_pass_records: Most records one shared forward pass collects.
        max_request_records: Most messages in one binary request.
        max_json_records: Most messages in one JSON request (JSON is for small batches).
        max_body_bytes: Largest request body (413 beyond).
        max_concurrency: Most inference requests held at once; more are answered 503 at once.
        max_connections: Most open connections (uvicorn answers 503 beyond).
        header_timeout_s: Longest a client may take to send a request's headers; the connection is
            closed beyond (slow clients, slowloris).
        body_timeout_s: Longest a client may take to send its body (408 beyond): slow clients.
        keep_alive_s: An idle kept-alive connection is closed after this long.
        compute_timeout_s: Longest a request waits for its forward pass (503 beyond).
        model_name: The model's name on the v2 protocol (``/v2/models/{model_name}``).
        forward_thread: Run every forward pass in a worker thread, so that the event loop keeps answering
            (health, refusals, reading bodies) during a long pass: for heavy models. Off (the default), a
            pass runs on the event loop when its requests are all the server holds (a lone request: no
            thread hop, which cost ~2 ms of latency per pass on a loaded 2-core machine, ten times the
            forward pass of a small model), and in the worker thread while other requests are in flight
            (with batching), so that they reach the queue during the pass and form the next one.
    """

    batching: bool = True
    batch_delay_ms: float = 0.0
    max_pass_records: int = 256
    max_request_records: int = 1024
    max_json_records: int = 64
    max_body_bytes: int = 8 * 2**20
    max_concurrency: int = 64
    max_connections: int = 512
    header_timeout_s: float = 5.0
    body_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    compute_timeout_s: float = 30.0
    model_name: str = "veil"
    forward_thread: bool = False

    def __post_init__(self) -> None:
        for key in ("max_pass_records", "max_request_records", "max_json_records", "max_body_bytes", "max_concurrency", "max_connections"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        for key in ("batch_delay_ms", "header_timeout_s", "body_timeout_s", "keep_alive_s", "compute_timeout_s"):
            value = float(getattr(self, key))
            if not (0 <= value < float("inf")) or (key != "batch_delay_ms" and value == 0):
                raise ValueError(f"{key} must be a finite number {'>= 0' if key == 'batch_delay_ms' else '> 0'}, got {value!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.model_name):
            raise ValueError(f"model_name must be 1 to 64 letters, digits, '_', '.' or '-', got {self.model_name!r}")


class Prediction(BaseModel):
    """The answer: one primary-class prediction per message, in request order."""

    predictions: list[int]


class Problem(BaseModel):
    """A refusal: one line naming the problem."""

    detail: str


async def _within(awaitable: Awaitable[Any], seconds: float) -> Any:
    """``await awaitable``, or ``TimeoutError`` after ``seconds``: ``asyncio.timeout`` where there is one
    (Python 3.11+; ``wait_for`` there wraps the awaitable in a task of its own, extra loop turns per request)."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class _Refused(Exception):
    def __init__(self, status: int, detail: str, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.reason, self.headers = status, detail, reason, headers or {}


_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": f"A batch of messages (B, *message_shape): raw little-endian float32 with header {SHAPE_HEADER}: B,d1,... (and optionally {DTYPE_HEADER}: float32), an .npy file's bytes, or JSON for small batches.",
        "content": {
            BINARY: {"schema": {"type": "string", "format": "binary"}},
            NPY: {"schema": {"type": "string", "format": "binary"}},
            JSON: {"schema": {"type": "object", "properties": {"messages": {"type": "array", "items": {}}}, "required": ["messages"]}},
        },
    },
    "parameters": [
        {"name": SHAPE_HEADER, "in": "header", "required": False, "schema": {"type": "string"}, "description": "Shape of a binary body, e.g. 32,1,8,8"},
        {"name": DTYPE_HEADER, "in": "header", "required": False, "schema": {"type": "string"}, "description": "dtype of a binary body: float32 (the only one accepted)"},
    ],
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
    errors = Counter("veil_request_errors", "Inference requests refused or failed, by reason.", ["reason"], registry=registry)
    held = Gauge("veil_requests_in_flight", "Inference requests held right now.", registry=registry)
    passes = Histogram("veil_batch_records", "Records per forward pass.", registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
    # the children every request touches, looked up once (labels() takes a lock and a dict lookup per call)
    answered: dict[tuple[str, int], Any] = {}
    timed = {endpoint: latency.labels(endpoint) for endpoint in ("predict", "v2_infer")}
    state = {"in_flight": 0}
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="veil-forward") if config.forward_thread or config.batching else None

    async def in_thread(messages: torch.Tensor) -> torch.Tensor:
        return await asyncio.get_running_loop().run_in_executor(executor, server.predict, messages)  # one pass at a time

    async def on_loop(messages: torch.Tensor) -> torch.Tensor:
        return server.predict(messages)

    forward = in_thread if config.forward_thread else on_loop
    batcher: DynamicBatcher | None = None
    if config.batching:
        batcher = DynamicBatcher(forward, max_records=config.max_pass_records, max_delay_s=config.batch_delay_ms / 1000, busy=lambda: state["in_flight"], offload=in_thread)
        batcher.on_batch = lambda records, _: passes.observe(records)
    else:
        lock = asyncio.Lock()  # without batching too, one pass at a time

    async def compute(messages: torch.Tensor) -> torch.Tensor:
        """(B, *message_shape) -> (B,) predictions, in a shared pass or alone."""
        try:
            if batcher is not None:
                return await _within(batcher.submit(messages), config.compute_timeout_s)

            async def alone() -> torch.Tensor:
                async with lock:
                    out = await forward(messages)
                passes.observe(len(messages))
                return out

            return await _within(alone(), config.compute_timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            raise _Refused(503, f"no answer within {config.compute_timeout_s:g} s; retry later", "compute_timeout", {"Retry-After": "1"}) from None

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
            return await _within(read(), config.body_timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            raise _Refused(408, f"the request body did not arrive within {config.body_timeout_s:g} s", "slow_client") from None

    async def handle(endpoint: str, request: Request, answer: Callable[[bytes], Awaitable[Response]], refuse: Callable[[_Refused], Response]) -> Response:
        """Everything an inference request goes through: token, concurrency cap, body, ``answer``; every
        refusal counted and answered in one line by ``refuse``, never a traceback."""
        t0 = time.perf_counter()
        status, counted = 200, False
        try:
            check_auth(request)
            if state["in_flight"] >= config.max_concurrency:
                raise _Refused(503, f"busy: {config.max_concurrency} requests in flight; retry later", "busy", {"Retry-After": "1"})
            state["in_flight"] += 1
            held.inc()
            counted = True
            return await answer(await read_body(request))
        except _Refused as r:
            status = r.status
            errors.labels(r.reason).inc()
            return refuse(r)
        except Exception as err:  # one line, never a traceback to the client
            status = 500
            errors.labels("internal").inc()
            print(f"veil serve: internal error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            return refuse(_Refused(500, "internal error", "internal"))
        finally:
            if counted:
                state["in_flight"] -= 1
                held.dec()
            if (endpoint, status) not in answered:
                answered[endpoint, status] = requests.labels(endpoint, str(status))
            answered[endpoint, status].inc()
            (timed.get(endpoint) or latency.labels(endpoint)).observe(time.perf_counter() - t0)

    def invalid(err: PayloadError, status: int | None = None) -> _Refused:
        return _Refused(status or err.status, str(err), "bad_media_type" if err.status == 415 else "invalid")

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
            "model_name": config.model_name,
        }

    @app.get("/metrics", responses={401: _REFUSALS[401], 403: _REFUSALS[403]})
    async def metrics(request: Request) -> Response:
        """Prometheus text: requests by status, latency, refusals by reason, records per pass (bearer token)."""
        try:
            check_auth(request)
        except _Refused as r:
            return JSONResponse({"detail": r.detail}, status_code=r.status, headers=r.headers)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def v1_refusal(r: _Refused) -> JSONResponse:
        return JSONResponse({"detail": r.detail}, status_code=r.status, headers=r.headers)

    @app.post("/v1/predict", response_model=Prediction, responses=_REFUSALS, openapi_extra=_REQUEST_BODY)
    async def predict(request: Request) -> Response:
        """The primary prediction for each message of the batch (B, *message_shape)."""

        async def answer(body: bytes) -> Response:
            h = request.headers
            try:
                a = decode_body(body, h.get("content-type"), h.get(SHAPE_HEADER), message_shape=server.message_shape, max_batch=config.max_request_records, max_json_batch=config.max_json_records, dtype_header=h.get(DTYPE_HEADER))
            except PayloadError as err:
                raise invalid(err) from None
            out = await compute(torch.from_numpy(a))
            return JSONResponse({"predictions": out.tolist()})

        return await handle("predict", request, answer, v1_refusal)

    # ------------------------------------------------------------------ Open Inference Protocol v2
    def v2_refusal(r: _Refused) -> JSONResponse:
        return JSONResponse({"error": r.detail}, status_code=r.status, headers=r.headers)

    def unknown_model(name: str) -> JSONResponse:
        return JSONResponse({"error": f"unknown model {name[:64]!r}; this server serves {config.model_name!r}"}, status_code=404)

    @app.get("/v2")
    async def v2_server() -> dict[str, Any]:
        """Open Inference Protocol: server metadata."""
        from veil import __version__

        return {"name": "veil", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def v2_live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def v2_ready() -> dict[str, bool]:
        return {"ready": True}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def v2_model(name: str, version: str = "1") -> Response:
        """The model's one input (``messages``, FP32, [-1, *message_shape]) and output (``predictions``, INT64)."""
        if name != config.model_name or version != "1":
            return unknown_model(f"{name}/{version}" if version != "1" else name)
        return JSONResponse(v2.model_metadata(config.model_name, server.message_shape))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def v2_model_ready(name: str, version: str = "1") -> Response:
        if name != config.model_name or version != "1":
            return unknown_model(name)
        return JSONResponse({"name": name, "ready": True})

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer(name: str, request: Request, version: str = "1") -> Response:
        """Open Inference Protocol infer (bearer token): JSON, or the binary-tensor extension."""
        if name != config.model_name or version != "1":
            return unknown_model(name)

        async def answer(body: bytes) -> Response:
            try:
                req = v2.parse_infer(body, request.headers.get(v2.HEADER_LENGTH), message_shape=server.message_shape, max_batch=config.max_request_records, max_json_batch=config.max_json_records)
            except PayloadError as err:
                raise invalid(err, 400) from None
            out = await compute(torch.from_numpy(req.messages))
            content, headers = v2.infer_response(config.model_name, req, out.numpy())
            return Response(content, headers=headers)

        return await handle("v2_infer", request, answer, v2_refusal)

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
    app = create_app(server, tokens, config)
    banner = f"{server.defense} at {{url}} (message shape {list(server.message_shape)}, batching {'on' if config.batching else 'off'}); docs at {{url}}/docs"
    run_app(app, host=host, port=port, config=config, ready_file=ready_file, banner=banner)


def run_app(app: Any, *, host: str, port: int, config: ServeConfig, ready_file: str | Path | None = None, banner: str = "at {url}") -> None:
    """Serve the ASGI ``app`` on uvicorn with the connection limits of ``config`` (header timeout,
    keep-alive, connection cap) until SIGINT/SIGTERM; the service and the benchmark's empty endpoint share it."""
    import uvicorn

    from veil.serving.protocol import header_timeout_protocol

    sock = _bind(host, port)
    port = sock.getsockname()[1]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    uv = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            http=header_timeout_protocol(config.header_timeout_s),
            timeout_keep_alive=config.keep_alive_s,
            limit_concurrency=config.max_connections,  # connections (503 beyond); requests are capped in the app
            timeout_graceful_shutdown=5,
        )
    )

    async def main() -> None:
        task = asyncio.create_task(uv.serve(sockets=[sock]))
        while not uv.started and not task.done():
            await asyncio.sleep(0.01)
        if uv.started:
            # what is loaded (torch, the model, the app: ~300k objects) is never garbage: a full collection
            # walking it stopped every request for ~0.25 s under load, the whole p99
            gc.collect()
            gc.freeze()
            print(f"veil serve: {banner.format(url=url)}", file=sys.stderr, flush=True)
            if ready_file is not None:
                write_json(ready_file, {"url": url, "pid": os.getpid()})
        await task

    # uvicorn's own loop choice (uvloop where installed): on the stock asyncio loop a keep-alive
    # request took ~45 ms here against ~2 ms with uvloop
    with asyncio.Runner(loop_factory=uv.config.get_loop_factory()) as runner:
        runner.run(main())
