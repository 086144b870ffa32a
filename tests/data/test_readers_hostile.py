"""Hostile and broken data files: every reader answers with one ValueError naming the file (and the CLI with
one line, exit code 2), never a traceback, a huge allocation or silently changed data."""

from __future__ import annotations

import gzip
import io
import struct
import zipfile

import numpy as np
import pytest
from typer.testing import CliRunner

from veil.cli import app
from veil.data import readers


def _good(n: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.random((n, 8, 8)).astype(np.float32), "y": np.arange(n) % 2, "z": np.arange(n) % 4}


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _huge_member(path):
    """An npz whose x header declares 10^12 float32 values (the data is not there)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (1_000_000, 1_000_000)})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", buf.getvalue())
        for k in ("y", "z"):
            b = io.BytesIO()
            np.save(b, np.zeros(3, dtype=np.int64))
            zf.writestr(f"{k}.npy", b.getvalue())
    return path


def _truncated(path):
    _npz(path, **_good())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _npy_renamed(path):
    np.save(path.with_suffix(".npy"), np.zeros((4, 4)))
    path.with_suffix(".npy").rename(path)
    return path


NPZ_CASES = {
    "text file": (lambda p: (p.write_text("x,y,z\n1,2,3\n"), p)[1], "not an .npz file"),
    "npy renamed": (_npy_renamed, "not an .npz file"),
    "truncated zip": (_truncated, "npz"),
    "huge declared shape": (_huge_member, "declares shape"),
    "missing z": (lambda p: _npz(p, x=_good()["x"], y=_good()["y"]), "missing arrays ['z']"),
    "complex x": (lambda p: _npz(p, **{**_good(), "x": _good()["x"] + 1j}), "dtype complex"),
    "object array": (lambda p: _npz(p, **{**_good(), "x": np.array([None] * 20, dtype=object)}), "dtype object"),
    "float labels": (lambda p: _npz(p, **{**_good(), "y": np.arange(20) * 0.5}), "labels must be integers"),
    "negative labels": (lambda p: _npz(p, **{**_good(), "z": np.arange(20) - 3}), "must be >= 0"),
    "uint64 max label": (lambda p: _npz(p, **{**_good(), "y": np.full(20, 2**64 - 1, dtype=np.uint64)}), "too large"),
    "label 1e9": (lambda p: _npz(p, **{**_good(), "z": np.full(20, 10**9)}), "too large"),
    "zero records": (lambda p: _npz(p, x=np.zeros((0, 8, 8), np.float32), y=np.zeros(0, np.int64), z=np.zeros(0, np.int64)), "no records"),
    "NaN in x": (lambda p: _npz(p, **{**_good(), "x": np.full((20, 8, 8), np.nan, np.float32)}), "finite"),
    "labels misaligned": (lambda p: _npz(p, **{**_good(), "y": np.zeros(19, np.int64)}), "shape (20,)"),
}


@pytest.mark.parametrize("case", sorted(NPZ_CASES))
def test_bad_npz_gives_one_named_error(tmp_path, case):
    make, expected = NPZ_CASES[case]
    path = make(tmp_path / "data.npz")
    with pytest.raises(ValueError) as err:
        readers.load_npz(path)
    assert str(path) in str(err.value) and expected in str(err.value)
    assert "allow_pickle" not in str(err.value)  # NumPy's advice to unpickle is wrong and unsafe here


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(">u1").tobytes()


def _write_idx_dir(d, *, images=None, labels=None):
    d.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        (d / f"{prefix}-images-idx3-ubyte").write_bytes(images if images is not None else _idx_bytes(rng.integers(0, 255, (n, 6, 6))))
        (d / f"{prefix}-labels-idx1-ubyte").write_bytes(labels if labels is not None else _idx_bytes(np.arange(n) % 4))
    return d


IDX_CASES = {
    "short header": (lambda d: _write_idx_dir(d, images=bytes([0, 0, 8, 3, 0, 0])), "ends inside the header"),
    "misaligned size": (lambda d: _write_idx_dir(d, images=_idx_bytes(np.zeros((4, 6, 6)))[:-3]), "bytes"),
    "bad magic": (lambda d: _write_idx_dir(d, images=b"hello world, not idx"), "bad magic"),
    "float labels": (lambda d: _write_idx_dir(d, labels=bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 30) + np.full(30, 1.5, ">f4").tobytes()), "labels must be integers"),
    "huge header": (lambda d: _write_idx_dir(d, images=bytes([0, 0, 8, 3]) + struct.pack(">3I", 100000, 100000, 1000)), "more than veil reads"),
    "one record": (lambda d: _write_idx_dir(d, images=_idx_bytes(np.zeros((1, 6, 6))), labels=_idx_bytes(np.zeros(1))), "at least 12"),
}


@pytest.mark.parametrize("case", sorted(IDX_CASES))
def test_bad_idx_gives_one_named_error(tmp_path, case):
    make, expected = IDX_CASES[case]
    d = make(tmp_path / "idx")
    with pytest.raises(ValueError) as err:
        readers.load_idx_dir(d)
    assert str(d) in str(err.value) and expected in str(err.value)


def test_gz_that_is_not_gzip_and_truncated_gzip(tmp_path):
    bad = tmp_path / "a-idx1-ubyte.gz"
    bad.write_bytes(b"plain bytes, no gzip")
    with pytest.raises(ValueError, match="cannot read"):
        readers.read_idx(bad)
    good = gzip.compress(_idx_bytes(np.arange(100) % 7))
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        readers.read_idx(bad)


def test_good_files_still_read(tmp_path):
    x, y, z = readers.load_npz(_npz(tmp_path / "ok.npz", **_good()))
    assert x.shape == (20, 1, 8, 8) and y.dtype == np.int64 and int(z.max()) == 3
    a = readers.load_idx_dir(_write_idx_dir(tmp_path / "idx"))
    assert a["train"][0].shape == (30, 1, 6, 6) and 0 <= a["train"][0].min() and a["train"][0].max() <= 1


@pytest.mark.parametrize("case", ["text file", "complex x", "uint64 max label"])
def test_cli_answers_bad_data_with_one_line(tmp_path, case):
    path = NPZ_CASES[case][0](tmp_path / "data.npz")
    r = CliRunner().invoke(app, ["train", "-t", f"npz:{path}", "-d", "none", "-e", "1", "-o", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
