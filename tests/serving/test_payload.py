"""Wire formats: raw float32, .npy and JSON decode to the same array bit for bit; every malformed body is
refused with one line before anything is allocated."""

from __future__ import annotations

import io

import numpy as np
import pytest

from veil.serving.payload import NPY, PayloadError, decode_body, encode_binary, encode_json, encode_npy

SHAPE = (1, 8, 8)


def _decode(body, headers, **kw):
    return decode_body(body, headers.get("Content-Type"), headers.get("X-Veil-Shape"), message_shape=SHAPE, max_batch=64, max_json_batch=16, dtype_header=headers.get("X-Veil-Dtype"), **kw)


def test_binary_npy_and_json_agree_to_the_bit():
    a = np.random.default_rng(0).standard_normal((5, *SHAPE)).astype(np.float32)
    decoded = [_decode(*encode(a)) for encode in (encode_binary, encode_npy, encode_json)]
    for d in decoded:
        assert d.dtype == np.float32 and d.flags.writeable and d.tobytes() == a.tobytes()


def test_dtype_header_names_float32_only():
    body, headers = encode_binary(np.zeros((2, *SHAPE)))
    assert _decode(body, {**headers, "X-Veil-Dtype": "float32"}).shape == (2, *SHAPE)
    with pytest.raises(PayloadError, match="little-endian float32, got dtype 'float64'"):
        _decode(body, {**headers, "X-Veil-Dtype": "float64"})


def _npy(a, fortran=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(a) if fortran else a, allow_pickle=False)
    return buf.getvalue()


NPY_REFUSALS = [
    ("float64", _npy(np.zeros((2, *SHAPE))), "little-endian float32, got dtype <f8"),
    ("big-endian", _npy(np.zeros((2, *SHAPE), ">f4")), "got dtype >f4"),
    ("object", b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (2, 1, 8, 8), }" + b" " * 53 + b"\n", "got dtype |O"),
    ("fortran order", _npy(np.zeros((2, 1, 8, 8), np.float32), fortran=True), "C order"),
    ("wrong message shape", _npy(np.zeros((2, 1, 8, 7), np.float32)), "must have shape (B, 1, 8, 8)"),
    ("truncated data", _npy(np.zeros((2, *SHAPE), np.float32))[:-4], "needs 512 bytes"),
    ("a header cut short", _npy(np.zeros((2, *SHAPE), np.float32))[:40], "not a readable .npy"),
    ("not npy", b"hello world", "not a readable .npy"),
    ("NaN", _npy(np.full((1, *SHAPE), np.nan, np.float32)), "NaN or infinite"),
]


@pytest.mark.parametrize("what,body,words", NPY_REFUSALS, ids=[r[0] for r in NPY_REFUSALS])
def test_npy_refusals(what, body, words):
    with pytest.raises(PayloadError, match=None) as err:
        _decode(body, {"Content-Type": NPY})
    assert words in str(err.value) and "\n" not in str(err.value) and err.value.status == 422


def test_npy_batch_over_the_limit_is_refused_from_its_header():
    """A header declaring 10^6 records is refused by its shape, whatever the body's length."""
    head = _npy(np.zeros((1, *SHAPE), np.float32))
    body = head.replace(b"(1, 1, 8, 8)", b"(9999, 1, 8, 8)")[: len(head) + 3]
    with pytest.raises(PayloadError, match="needs 2559744 bytes|1 to 64 messages"):
        _decode(body, {"Content-Type": NPY})
