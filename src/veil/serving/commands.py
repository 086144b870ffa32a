"""``veil serve``, ``veil query`` and ``veil export-client``: thin commands over :mod:`veil.serving` and
:mod:`veil.serving.client` (registered in :mod:`veil.cli`)."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console

from veil.cli_common import fail

TOKEN_FILE_HELP = "File holding the bearer token(s), one a line (never put tokens on the command line)."


def serve_cmd(
    run: Path = typer.Argument(..., help="A finished run folder: only model.safetensors and the server's share of the defense are loaded."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default; put TLS in front for anything else)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on (0: any free port; see --ready-file)."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help=f"{TOKEN_FILE_HELP} Default: the comma-separated VEIL_SERVE_TOKENS environment variable."),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="Dynamic batching: requests in flight together are queued and run as one forward pass (each caller gets its own rows; a bad request is refused alone before it joins a batch)."),
    batch_delay_ms: float = typer.Option(0.0, "--batch-delay-ms", help="Most milliseconds a request waits for others still on their way (only while others are in flight; a lone request runs at once). 0: a pass takes whatever has queued after one event-loop turn (fastest measured; 2 and 5 ms were slower)."),
    max_pass_records: int = typer.Option(256, "--max-pass-records", help="Most records in one shared forward pass (the batch size cap)."),
    max_request_records: int = typer.Option(1024, "--max-request-records", help="Most messages in one binary request (422 beyond)."),
    max_json_records: int = typer.Option(64, "--max-json-records", help="Most messages in one JSON request (422 beyond)."),
    max_body_bytes: int = typer.Option(8 * 2**20, "--max-body-bytes", help="Largest request body in bytes (413 beyond)."),
    max_concurrency: int = typer.Option(64, "--max-concurrency", help="Most inference requests held at once; more are answered 503 with Retry-After."),
    max_connections: int = typer.Option(512, "--max-connections", help="Most open connections; more are answered 503."),
    header_timeout: float = typer.Option(5.0, "--header-timeout", help="Seconds a client may take to send a request's headers; the connection is closed beyond (slow clients)."),
    body_timeout: float = typer.Option(10.0, "--body-timeout", help="Seconds a client may take to send its body (408 beyond)."),
    keep_alive: float = typer.Option(5.0, "--keep-alive", help="Seconds an idle kept-alive connection stays open."),
    compute_timeout: float = typer.Option(30.0, "--compute-timeout", help="Seconds a request may wait for its forward pass (503 beyond)."),
    model_name: str = typer.Option("veil", "--model-name", help="The model's name on the Open Inference Protocol: /v2/models/NAME/infer."),
    forward_thread: bool = typer.Option(False, "--forward-thread", help="Run every forward pass in a worker thread so the server keeps answering during long passes (heavy models); default: a lone request on the event loop (no thread hop), a pass while others are in flight in the worker thread (they queue meanwhile)."),
    ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve (@serve.batch batching, /v1/predict, /v2/models/NAME/infer and /health) instead of one uvicorn process."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="With --ray: replicas of the server side, each a Ray actor."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --ray: a running Ray cluster (default: start Ray on this machine)."),
    ready_file: Optional[Path] = typer.Option(None, "--ready-file", help="Write {url, pid} as JSON here once the server accepts connections."),
) -> None:
    """Serve a run's model over HTTP: obfuscated messages in, primary predictions out.

    Endpoints: POST /v1/predict (bearer token) takes a batch (B, *message_shape) as raw little-endian float32 (Content-Type application/octet-stream, X-Veil-Shape: B,d1,..., optional X-Veil-Dtype: float32), as .npy bytes (application/x-npy) or as JSON {"messages": [...]} (small batches). Open Inference Protocol v2 (Triton/KServe clients): GET /v2/health/live, /v2/health/ready, /v2/models/NAME, /v2/models/NAME/ready; POST /v2/models/NAME/infer (bearer token; JSON or binary tensors). Also GET /health, /metrics (Prometheus, bearer token), /docs.

    Payloads are checked (shape, dtype, size, finite values) before anything is allocated; a bad request gets a one-line 4xx, alone, before it joins a batch. Batching: requests in flight together share one forward pass (--batch-delay-ms, --max-pass-records). Limits and slow clients: --max-body-bytes, --max-concurrency, --max-connections, --header-timeout (closes connections whose headers dribble in), --body-timeout (408), --keep-alive. --ray --replicas N: the same on Ray Serve with @serve.batch. Details: docs/serving.md.
    """
    from veil.serving.app import ServeConfig, serve
    from veil.serving.auth import load_tokens
    from veil.serving.split import load_server_side

    try:
        tokens = load_tokens(token_file)
        config = ServeConfig(
            batching=batching, batch_delay_ms=batch_delay_ms, max_pass_records=max_pass_records, max_request_records=max_request_records, max_json_records=max_json_records,
            max_body_bytes=max_body_bytes, max_concurrency=max_concurrency, max_connections=max_connections, header_timeout_s=header_timeout, body_timeout_s=body_timeout,
            keep_alive_s=keep_alive, compute_timeout_s=compute_timeout, model_name=model_name, forward_thread=forward_thread,
        )
        if ray:
            from veil.serving.ray_serve import serve_ray

            serve_ray(run, tokens, host=host, port=port, config=config, replicas=replicas, ready_file=ready_file, address=ray_address)
            return
        if replicas != 1 or ray_address is not None:
            raise ValueError("--replicas and --ray-address need --ray")
        server = load_server_side(run)
        serve(server, tokens, host=host, port=port, config=config, ready_file=ready_file)
    except (ValueError, FileNotFoundError) as err:
        fail(err)


def read_records(path: Path, input_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """Records ``x`` (N, *input_shape) float32 and, if present, labels ``y`` (N,) from an ``.npz``.

    ``x`` may also be (N, H, W) for one channel or (N, D) flat. Headers are checked before any array is
    read (no objects, no complex numbers, declared sizes); nothing is unpickled.
    """
    from veil.data.readers import MAX_VALUES, _npz_member_header

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz file (a zip archive of arrays, as numpy.savez writes)")
    try:
        with zipfile.ZipFile(path) as zf:
            members = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
            if "x" not in members:
                raise ValueError(f"{path}: no array 'x' (found {sorted(members)})")
            for key in [k for k in ("x", "y") if k in members]:
                shape, dtype = _npz_member_header(zf, key, path)
                if dtype.hasobject or dtype.kind not in "biuf":
                    raise ValueError(f"{path}: array {key!r} has dtype {dtype}; expected real numbers")
                if math.prod(shape) > MAX_VALUES:
                    raise ValueError(f"{path}: array {key!r} declares shape {shape}, more than veil reads ({MAX_VALUES} values)")
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], (f["y"] if "y" in members else None)
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npz file ({err})") from err
    n = len(x) if x.ndim else 0
    if x.ndim == len(input_shape) and input_shape[0] == 1 and x.shape[1:] == input_shape[1:]:
        x = x[:, None]
    elif x.ndim == 2 and x.shape[1] == math.prod(input_shape):
        x = x.reshape(n, *input_shape)
    if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != input_shape or n == 0:
        raise ValueError(f"{path}: x must hold records of shape {input_shape} (or flat), got {x.shape}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: x contains NaN or infinite values")
    if y is not None and (y.shape != (n,) or y.dtype.kind not in "iu"):
        raise ValueError(f"{path}: y must be integer labels of shape ({n},), got {y.dtype} {y.shape}")
    return x, y


def query_cmd(
    run: Path = typer.Argument(..., help="A run folder (or its obfuscator.safetensors): only the obfuscator is read."),
    url: str = typer.Option(..., "--url", help="The service, e.g. http://127.0.0.1:8000."),
    input: Path = typer.Option(..., "--input", help=".npz with records x (N, C, H, W / N, H, W / N, D); an optional y is used only to score the answers here, never sent."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the predictions here (.json or .npz); default: print them."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help=f"{TOKEN_FILE_HELP} Default: the VEIL_TOKEN environment variable."),
    json_body: bool = typer.Option(False, "--json", help="Send JSON instead of raw float32 (small batches only)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Messages per request."),
    retries: int = typer.Option(5, "--retries", min=0, help="Further tries (with exponential backoff) after a connection failure or a 503."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds for one try."),
) -> None:
    """Obfuscate records locally (OS-entropy noise) and query a 'veil serve' service with the messages alone."""
    from veil.serving.client import Client, ServiceError, load_client_obfuscator
    from veil.io import save_npz, write_json
    from veil.serving.auth import CLIENT_TOKEN_ENV, load_tokens

    try:
        token = load_tokens(token_file, env=CLIENT_TOKEN_ENV)[0].decode()
        defense = load_client_obfuscator(run)
        x, y = read_records(input, defense.input_shape)
        with Client(defense, url, token, binary=not json_body, batch_size=batch_size, retries=retries, timeout=timeout) as client:
            predictions = client.predict(x)
    except (ValueError, FileNotFoundError, ServiceError) as err:
        fail(err)
    summary: dict = {"records": len(predictions), "url": url, "noise": "os-entropy"}
    if y is not None:
        summary["accuracy_on_local_labels"] = round(float((predictions == y).mean()), 4)
    if out is not None:
        if out.suffix == ".npz":
            save_npz(out, predictions=predictions)
        else:
            write_json(out, {"predictions": predictions.tolist()})
        summary["out"] = str(out)
    else:
        summary["predictions"] = predictions.tolist()
    Console().print_json(json.dumps(summary))


def export_client_cmd(
    run: Path = typer.Argument(..., help="A finished run folder (or its obfuscator.safetensors)."),
    onnx: Path = typer.Option(..., "--onnx", help="Where to write the obfuscator as ONNX (inputs x and, for noisy defenses, noise; output message)."),
    force: bool = typer.Option(False, "--force", help="Replace the file if it exists."),
) -> None:
    """Write the client's obfuscator as ONNX for onnxruntime; the noise is an input drawn from the OS at run time."""
    from veil.serving.client import load_client_obfuscator
    from veil.serving.onnx_client import export_client

    try:
        if onnx.exists() and not force:
            raise ValueError(f"--onnx {onnx} exists; pass --force to replace it")
        if onnx.is_dir():
            raise ValueError(f"--onnx {onnx} is a folder; name the .onnx file to write")
        info = export_client(load_client_obfuscator(run), onnx)
    except (ValueError, FileNotFoundError) as err:
        fail(err)
    Console().print_json(json.dumps({**info, "out": str(onnx)}))
