"""The Open Inference Protocol (KServe v2, as Triton speaks it) for ``veil serve``: message formats only.

One model, one input and one output:

- input ``messages``, datatype ``FP32``, shape ``[-1, *message_shape]``;
- output ``predictions``, datatype ``INT64``, shape ``[-1]`` (the primary class of each message).

An infer request is JSON ``{"id"?, "inputs": [{"name", "shape", "datatype", "data"?}], "outputs"?,
"parameters"?}``. With the binary-tensor extension the body is that JSON followed by the raw tensor bytes:
the header ``Inference-Header-Content-Length`` gives the JSON's length, and the input's
``parameters.binary_data_size`` its byte count (little-endian, row-major). The answer's ``predictions``
come as binary too when the request asks for it (``outputs[].parameters.binary_data`` or
``parameters.binary_data_output``, what tritonclient sends by default), else as a JSON ``data`` list.
Errors are ``{"error": "..."}``. The same checks as ``/v1`` run before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from veil.serving.payload import PayloadError, _check_nesting, _check_shape, _no_constants, float32_array

HEADER_LENGTH = "Inference-Header-Content-Length"
INPUT = "messages"
OUTPUT = "predictions"
MAX_HEADER_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class InferRequest:
    """A parsed infer request: the messages (B, *message_shape) float32, the request id, and whether the
    predictions go back as binary."""

    messages: np.ndarray
    id: str | None
    binary_output: bool


def model_metadata(name: str, message_shape: tuple[int, ...]) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the one input and output."""
    return {
        "name": name,
        "versions": ["1"],
        "platform": "veil",
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, *message_shape]}],
        "outputs": [{"name": OUTPUT, "datatype": "INT64", "shape": [-1]}],
    }


def _header(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    if header_length is None:
        n = len(body)
    elif not header_length.strip().isdigit() or int(header_length) > len(body):
        raise PayloadError(f"{HEADER_LENGTH} must be the JSON header's length (<= the body's {len(body)} bytes), got {header_length[:32]!r}")
    else:
        n = int(header_length)
    if n > MAX_HEADER_BYTES:
        raise PayloadError(f"the JSON header of an infer request must be at most {MAX_HEADER_BYTES} bytes, got {n}")
    try:
        doc = json.loads(bytes(body[:n]), parse_constant=_no_constants)
    except PayloadError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise PayloadError(f"infer request is not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise PayloadError('an infer request must be a JSON object {"inputs": [...]}')
    return doc, memoryview(body)[n:]


def _binary_output(doc: dict) -> bool:
    params = doc.get("parameters") if isinstance(doc.get("parameters"), dict) else {}
    wanted = False
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise PayloadError('"outputs" must be a list of objects')
        for o in outputs:
            if o.get("name") != OUTPUT:
                raise PayloadError(f"unknown output {str(o.get('name'))[:64]!r}; this model has one output, {OUTPUT!r}")
            p = o.get("parameters") if isinstance(o.get("parameters"), dict) else {}
            wanted |= bool(p.get("binary_data", False))
    return wanted or bool(params.get("binary_data_output", False))


def parse_infer(body: bytes, header_length: str | None, *, message_shape: tuple[int, ...], max_batch: int, max_json_batch: int) -> InferRequest:
    """An infer request body -> :class:`InferRequest`, or :class:`PayloadError` naming the problem."""
    doc, rest = _header(body, header_length)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise PayloadError(f"an infer request must carry exactly one input, {INPUT!r}")
    spec = inputs[0]
    if spec.get("name") != INPUT:
        raise PayloadError(f"unknown input {str(spec.get('name'))[:64]!r}; this model's input is {INPUT!r}")
    if spec.get("datatype") != "FP32":
        raise PayloadError(f"input {INPUT!r} must have datatype FP32, got {str(spec.get('datatype'))[:16]!r}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not shape or len(shape) > 8 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise PayloadError(f"input {INPUT!r} needs a shape of 1 to 8 non-negative integers, got {str(shape)[:64]}")
    shape_t = tuple(shape)
    params = spec.get("parameters") if isinstance(spec.get("parameters"), dict) else {}
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size != len(rest):
            raise PayloadError(f"binary_data_size {str(size)[:32]} does not match the {len(rest)} bytes after the JSON header")
        a = float32_array(rest, shape_t, message_shape=message_shape, max_batch=max_batch, what="input shape")
    else:
        if len(rest):
            raise PayloadError(f"{len(rest)} bytes follow the JSON header but no input declares binary_data_size")
        _check_shape(shape_t, message_shape, max_json_batch)
        data = spec.get("data")
        if not isinstance(data, list):
            raise PayloadError(f"input {INPUT!r} needs 'data' (a list of numbers) or binary data")
        _check_nesting(data, len(shape_t))
        try:
            flat = np.asarray(data, dtype=np.float32).reshape(-1)
        except (ValueError, TypeError) as err:
            raise PayloadError(f"data must be a rectangular list of numbers ({err})") from None
        if flat.size != math.prod(shape_t):
            raise PayloadError(f"input shape {shape_t} needs {math.prod(shape_t)} values, 'data' has {flat.size}")
        a = flat.reshape(shape_t)
    if not np.isfinite(a).all():
        raise PayloadError("messages contain NaN or infinite values")
    rid = doc.get("id")
    return InferRequest(a, None if rid is None else str(rid)[:256], _binary_output(doc))


def infer_response(model: str, request: InferRequest, predictions: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """The body and headers of the answer: (B,) int64 ``predictions`` as binary or as JSON data."""
    p = np.ascontiguousarray(predictions, dtype="<i8")
    out: dict[str, Any] = {"name": OUTPUT, "datatype": "INT64", "shape": [len(p)]}
    doc: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": [out]}
    if request.id is not None:
        doc["id"] = request.id
    if not request.binary_output:
        out["data"] = p.tolist()
        return json.dumps(doc).encode(), {"Content-Type": "application/json"}
    out["parameters"] = {"binary_data_size": p.nbytes}
    head = json.dumps(doc).encode()
    return head + p.tobytes(), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
