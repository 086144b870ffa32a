"""``veil serve RUN --ray --replicas N``: the same server side as N Ray Serve replicas behind Ray's proxy.

Each replica loads the run's server side (:func:`veil.serving.split.load_server_side`) and answers
``POST /v1/predict`` (the same payloads, token check and one-line refusals as the single-process service)
, ``POST /v2/models/{name}/infer`` and ``GET /health``. Batching is Ray Serve's own ``@serve.batch``: the
requests a replica holds are run as one forward pass, up to ``max_batch_size`` requests, waiting at most
``batch_wait_timeout_s`` for company. Ray starts on this machine (``ray.init``) unless ``address`` names a
running cluster.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from veil.io import write_json


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def deployment(run: str, tokens: tuple[bytes, ...], config: Any, replicas: int):
    """The bound Ray Serve application: ``replicas`` copies of the server side of ``run``."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    from veil.serving import v2
    from veil.serving.auth import authorize
    from veil.serving.payload import DTYPE_HEADER, SHAPE_HEADER, PayloadError, decode_body

    max_batch = max(1, min(config.max_concurrency, config.max_pass_records))
    wait_s = config.batch_delay_ms / 1000 if config.batching else 0.0

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=config.max_concurrency)
    class VeilReplica:
        def __init__(self) -> None:
            import torch

            from veil.serving.split import load_server_side

            torch.set_num_threads(1)
            self.server = load_server_side(run)

        @serve.batch(max_batch_size=max_batch if config.batching else 1, batch_wait_timeout_s=wait_s)
        async def predict(self, batches: list[np.ndarray]) -> list[np.ndarray]:
            """One forward pass for the requests Ray collected; each gets its own rows."""
            import torch

            out = self.server.predict(torch.from_numpy(np.concatenate(batches))).numpy()
            return list(np.split(out, np.cumsum([len(b) for b in batches])[:-1]))

        async def __call__(self, request: Request) -> Response:
            path, v2_path = request.url.path.rstrip("/"), request.url.path.startswith("/v2/")
            key = "error" if v2_path else "detail"
            if request.method == "GET" and path == "/health":
                return JSONResponse({"status": "ok", "defense": self.server.defense, "message_shape": list(self.server.message_shape), "replica_pid": os.getpid(), "batching": config.batching})
            infer = f"/v2/models/{config.model_name}/infer"
            if request.method != "POST" or path not in ("/v1/predict", infer):
                return JSONResponse({key: f"no such endpoint: {request.method} {path[:64]}"}, status_code=404)
            status = authorize(request.headers.get("authorization"), tokens)
            if status != 200:
                detail = "missing bearer token (send 'Authorization: Bearer <token>')" if status == 401 else "token not accepted"
                return JSONResponse({key: detail}, status_code=status, headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
                return JSONResponse({key: f"body of {declared} bytes exceeds the limit of {config.max_body_bytes}"}, status_code=413)
            body = await request.body()
            if len(body) > config.max_body_bytes:
                return JSONResponse({key: f"body exceeds the limit of {config.max_body_bytes} bytes"}, status_code=413)
            h, shape = request.headers, self.server.message_shape
            try:
                if v2_path:
                    req = v2.parse_infer(body, h.get(v2.HEADER_LENGTH), message_shape=shape, max_batch=config.max_request_records, max_json_batch=config.max_json_records)
                    a = req.messages
                else:
                    a = decode_body(body, h.get("content-type"), h.get(SHAPE_HEADER), message_shape=shape, max_batch=config.max_request_records, max_json_batch=config.max_json_records, dtype_header=h.get(DTYPE_HEADER))
            except PayloadError as err:
                return JSONResponse({key: str(err)}, status_code=400 if v2_path and err.status == 422 else err.status)
            out = await self.predict(a)
            if v2_path:
                content, headers = v2.infer_response(config.model_name, req, out)
                return Response(content, headers=headers)
            return JSONResponse({"predictions": out.tolist()}, headers={"X-Veil-Replica": str(os.getpid())})

    return VeilReplica.bind()


def serve_ray(run: str | Path, tokens: tuple[bytes, ...], *, host: str, port: int, config: Any, replicas: int, ready_file: str | Path | None = None, address: str | None = None) -> None:
    """Deploy ``replicas`` replicas of the server side of ``run`` on Ray Serve at ``host:port`` and
    block until SIGINT/SIGTERM; ``port=0`` takes a free port; ``ready_file`` gets ``{"url", "pid"}``
    once every replica is up."""
    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    from veil.serving.split import load_server_side

    load_server_side(run)  # a bad run folder fails here, in one line, before Ray starts
    import ray
    from ray import serve

    port = port or _free_port(host)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(str(run), tokens, config, replicas), name="veil", route_prefix="/")
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        print(f"veil serve: {replicas} Ray Serve replicas at {url} (batching {'on' if config.batching else 'off'})", file=sys.stderr, flush=True)
        if ready_file is not None:
            write_json(ready_file, {"url": url, "pid": os.getpid()})
        while not stop.wait(0.5):
            pass
    finally:
        if address is not None:  # a cluster that outlives this command: take the application down
            serve.delete("veil")
        # the local instance ray.init started ends with its processes, replicas included; serve.shutdown
        # would wait for a controller that a Ctrl-C sent to the whole process group may have stopped
        ray.shutdown()
