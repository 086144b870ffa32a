"""Wire formats of ``POST /v1/predict``: raw float32 with the shape in a header, ``.npy``, or JSON for small batches.

Binary (``Content-Type: application/octet-stream``): the body is the batch of messages as little-endian
float32, C order, and ``X-Veil-Shape: B,d1,d2,...`` gives its shape (B records of the per-record message
shape); ``X-Veil-Dtype: float32`` may name the type (the only one accepted). ``.npy``
(``Content-Type: application/x-npy``): the body is what ``numpy.save`` writes for a little-endian float32,
C-order array of shape (B, *message_shape); its header is parsed (no pickle) and checked before the data
is read. JSON (``Content-Type: application/json``): ``{"messages": [[...], ...]}``, a nested list of shape
(B, *message_shape). Nothing is ever unpickled; every value is checked (shape, size, finite) and the
sizes are checked before anything is allocated.
"""

from __future__ import annotations

import io
import json
import math
import tokenize

import numpy as np
from numpy.lib import format as npy_format

BINARY = "application/octet-stream"
NPY = "application/x-npy"
JSON = "application/json"
SHAPE_HEADER = "X-Veil-Shape"
DTYPE_HEADER = "X-Veil-Dtype"
#: Names a binary body's dtype may be given by (little-endian float32 is the only one accepted).
FLOAT32_NAMES = ("float32", "<f4", "f4", "fp32")
_MAX_NPY_HEADER = 4096


class PayloadError(ValueError):
    """A request body that does not hold a valid batch of messages (answered with ``status``)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def encode_binary(messages: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """(B, *shape) -> body and headers of a binary request."""
    a = np.ascontiguousarray(messages, dtype="<f4")
    return a.tobytes(), {"Content-Type": BINARY, SHAPE_HEADER: ",".join(str(s) for s in a.shape)}


def encode_npy(messages: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """(B, *shape) -> body and headers of an ``.npy`` request."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(messages, dtype="<f4"), allow_pickle=False)
    return buf.getvalue(), {"Content-Type": NPY}


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


def check_dtype(name: str | None) -> None:
    """Refuse a declared dtype other than little-endian float32 (``None``: not declared, float32)."""
    if name is not None and name.strip().lower() not in FLOAT32_NAMES:
        raise PayloadError(f"messages must be little-endian float32, got dtype {name[:32]!r}")


def float32_array(data: bytes | memoryview, shape: tuple[int, ...], *, message_shape: tuple[int, ...], max_batch: int, what: str = SHAPE_HEADER) -> np.ndarray:
    """Raw little-endian float32 ``data`` -> a writable (B, *message_shape) array, after checking the
    shape (against the served shape and the batch limit) and the byte count; nothing is allocated first."""
    want = 4 * math.prod(shape)
    if want != len(data):
        raise PayloadError(f"{what} {tuple(shape)} needs {want} bytes of float32, the body has {len(data)}")
    _check_shape(tuple(shape), message_shape, max_batch)
    return np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)


def _npy_array(body: bytes, *, message_shape: tuple[int, ...], max_batch: int) -> np.ndarray:
    """An ``.npy`` body -> (B, *message_shape) float32: its header is parsed and checked first."""
    f = io.BytesIO(body)
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(f, max_header_size=_MAX_NPY_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(f, max_header_size=_MAX_NPY_HEADER)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, EOFError, OSError, SyntaxError, tokenize.TokenError) as err:  # numpy parses the header as a literal
        raise PayloadError(f"body is not a readable .npy array ({err})") from None
    if dtype.hasobject or dtype.str != "<f4":
        raise PayloadError(f"an .npy body must hold little-endian float32, got dtype {dtype.str}")
    if fortran:
        raise PayloadError("an .npy body must be in C order (numpy.save of a C-contiguous array)")
    return float32_array(memoryview(body)[f.tell() :], tuple(shape), message_shape=message_shape, max_batch=max_batch, what=".npy shape")


def decode_body(body: bytes, content_type: str | None, shape_header: str | None, *, message_shape: tuple[int, ...], max_batch: int, max_json_batch: int, dtype_header: str | None = None) -> np.ndarray:
    """A request body -> (B, *message_shape) float32, or :class:`PayloadError` naming the problem.

    Checks: the media type (415 otherwise), the declared dtype and shape against the body's size and the
    served message shape, 1 <= B <= the batch limit (``max_json_batch`` for JSON), finite values.
    """
    media = _media_type(content_type)
    if media == BINARY:
        shape = _parse_shape(shape_header)
        check_dtype(dtype_header)
        a = float32_array(body, shape, message_shape=message_shape, max_batch=max_batch)
    elif media == NPY:
        a = _npy_array(body, message_shape=message_shape, max_batch=max_batch)
        if shape_header is not None and _parse_shape(shape_header) != a.shape:
            raise PayloadError(f"{SHAPE_HEADER} {shape_header[:64]!r} disagrees with the .npy shape {a.shape}")
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
        raise PayloadError(f"unsupported Content-Type {media or '(none)'!r}; send {BINARY} (with {SHAPE_HEADER}), {NPY} or {JSON}", status=415)
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
