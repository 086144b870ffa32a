"""Wire formats of ``POST /v1/predict``: raw float32 with the shape in a header, or JSON for small batches.

Binary (``Content-Type: application/octet-stream``): the body is the batch of messages as little-endian
float32, C order, and ``X-Veil-Shape: B,d1,d2,...`` gives its shape (B records of the per-record message
shape). JSON (``Content-Type: application/json``): ``{"messages": [[...], ...]}``, a nested list of shape
(B, *message_shape). Nothing is ever unpickled; every value is checked (shape, size, finite).
"""

from __future__ import annotations

import json
import math

import numpy as np

BINARY = "application/octet-stream"
JSON = "application/json"
SHAPE_HEADER = "X-Veil-Shape"


class PayloadError(ValueError):
    """A request body that does not hold a valid batch of messages (answered with ``status``)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def encode_binary(messages: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """(B, *shape) -> body and headers of a binary request."""
    a = np.ascontiguousarray(messages, dtype="<f4")
    return a.tobytes(), {"Content-Type": BINARY, SHAPE_HEADER: ",".join(str(s) for s in a.shape)}


def encode_json(messages: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """(B, *shape) -> body and headers of a JSON request."""
    a = np.asarray(messages, dtype=np.float32)
    return json.dumps({"messages": a.tolist()}).encode(), {"Content-Type": JSON}


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _parse_shape(value: str | None) -> tuple[int, ...]:
    if not value:
        raise PayloadError(f"a binary body needs the header {SHAPE_HEADER}: B,d1,... (its shape)")
    try:
        shape = tuple(int(p) for p in value.split(","))
    except ValueError:
        raise PayloadError(f"{SHAPE_HEADER} must be comma-separated integers, got {value[:64]!r}") from None
    if not shape or any(s < 0 for s in shape) or len(shape) > 8:
        raise PayloadError(f"{SHAPE_HEADER} must hold 1 to 8 non-negative sizes, got {value[:64]!r}")
    return shape


def _no_constants(name: str) -> float:
    raise PayloadError(f"JSON messages must be finite numbers, got {name}")


def decode_body(body: bytes, content_type: str | None, shape_header: str | None, *, message_shape: tuple[int, ...], max_batch: int, max_json_batch: int) -> np.ndarray:
    """A request body -> (B, *message_shape) float32, or :class:`PayloadError` naming the problem.

    Checks: the media type (415 otherwise), the declared shape against the body's size and the served
    message shape, 1 <= B <= the batch limit (``max_json_batch`` for JSON), finite values.
    """
    media = _media_type(content_type)
    if media == BINARY:
        shape = _parse_shape(shape_header)
        want = 4 * math.prod(shape)
        if want != len(body):
            raise PayloadError(f"{SHAPE_HEADER} {shape} needs {want} bytes of float32, the body has {len(body)}")
        _check_shape(shape, message_shape, max_batch)
        a = np.frombuffer(body, dtype="<f4").reshape(shape).astype(np.float32)
    elif media == JSON:
        try:
            doc = json.loads(body, parse_constant=_no_constants)
        except PayloadError:
            raise
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise PayloadError(f"body is not valid JSON ({err})") from None
        if not isinstance(doc, dict) or "messages" not in doc:
            raise PayloadError('JSON body must be an object {"messages": [[...], ...]}')
        if not isinstance(doc["messages"], list) or not 1 <= len(doc["messages"]) <= max_json_batch:
            raise PayloadError(f"a JSON request must carry a list of 1 to {max_json_batch} messages")
        _check_nesting(doc["messages"], len(message_shape) + 1)
        try:
            a = np.asarray(doc["messages"], dtype=np.float32)
        except (ValueError, TypeError) as err:
            raise PayloadError(f"messages must be a rectangular array of numbers ({err})") from None
        _check_shape(a.shape, message_shape, max_json_batch)
    else:
        raise PayloadError(f"unsupported Content-Type {media or '(none)'!r}; send {BINARY} (with {SHAPE_HEADER}) or {JSON}", status=415)
    if not np.isfinite(a).all():
        raise PayloadError("messages contain NaN or infinite values")
    return a


def _check_nesting(value: object, depth: int) -> None:
    """Refuse strings, booleans, objects and nulls before numpy converts them (``"1"`` or ``true`` would pass)."""
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, list):
            if d >= depth:
                raise PayloadError(f"messages nest deeper than (B, *message_shape) ({depth} levels)")
            stack.extend((item, d + 1) for item in v)
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PayloadError(f"messages must hold numbers only, got {type(v).__name__}")


def _check_shape(shape: tuple[int, ...], message_shape: tuple[int, ...], max_batch: int) -> None:
    if len(shape) != len(message_shape) + 1 or tuple(shape[1:]) != tuple(message_shape):
        raise PayloadError(f"messages must have shape (B, {', '.join(map(str, message_shape))}), got {tuple(shape)}")
    if not 1 <= shape[0] <= max_batch:
        raise PayloadError(f"a request must carry 1 to {max_batch} messages, got {shape[0]}")
