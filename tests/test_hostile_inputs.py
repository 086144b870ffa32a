"""The hostile-input battery (issue #10): every command and every file reader, given what a careless or
hostile user would give it, answers with exit code 2 and one line naming the problem, never a traceback,
and changes no file (the whole folder the command runs in is hashed before and after).

Each case is a command line with ``{t}`` (the case's folder, also the working directory) and ``{run}`` (a
copy of a finished run) filled in, an optional ``setup`` that plants the bad input, and a word the error
line must contain (the option or file it names). Hypothesis adds random bytes as data files and random
JSON as run files.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import typer.main
from click.testing import CliRunner

from veil.cli import app

runner = CliRunner()
CLI = typer.main.get_command(app)  # built once: typer rebuilds it on every invoke (0.15 s a case)
# a case that wrongly passed would do only this much work
TINY = ["-e", "1", "--train-size", "40"]
EVAL = ["--attack-epochs", "1", "--attackers", "linear", "--views", "1", "--averaging-k", "0", "--recon-epochs", "0", "--mi-dims", "0", "--attack-test-size", "20"]
FED = ["--train-size", "40", "--eval-size", "20", "--obfuscator-epochs", "1"]
INC = ["--train-size", "40", "--eval-size", "20", "--clean-epochs", "1", "--obfuscator-epochs", "1", "--resume-epochs", "1", "--attack-epochs", "0"]


# ------------------------------------------------------------------------------------------ bad files
def _save_npz(path: Path, **arrays) -> None:
    np.savez(path, **arrays)


def _good(n: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.random((n, 8, 8)).astype(np.float32), "y": np.arange(n) % 2, "z": np.arange(n) % 4}


def _npz(**change) -> Callable[[Path], None]:
    def make(t: Path) -> None:
        _save_npz(t / "d.npz", **{k: v for k, v in {**_good(), **change}.items() if v is not None})

    return make


def _raw(data: bytes, name: str = "d.npz") -> Callable[[Path], None]:
    return lambda t: (t / name).write_bytes(data)


def _truncated_npz(t: Path) -> None:
    _npz()(t)
    data = (t / "d.npz").read_bytes()
    (t / "d.npz").write_bytes(data[: len(data) // 2])


def _npy_as_npz(t: Path) -> None:
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 4)))
    (t / "d.npz").write_bytes(buf.getvalue())


def _huge_member(t: Path) -> None:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
    with zipfile.ZipFile(t / "d.npz", "w") as zf:
        zf.writestr("x.npy", buf.getvalue())
        for k in ("y", "z"):
            b = io.BytesIO()
            np.save(b, np.zeros(3, np.int64))
            zf.writestr(f"{k}.npy", b.getvalue())


def _pickle_posing_as_npz(t: Path) -> None:
    import pickle

    (t / "d.npz").write_bytes(pickle.dumps({"x": os.system}))


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(">u1").tobytes()


def _idx(images: bytes | None = None, labels: bytes | None = None, *, gz: bool = False, test_labels: bytes | None = None) -> Callable[[Path], None]:
    def make(t: Path) -> None:
        d = t / "idx"
        d.mkdir()
        rng = np.random.default_rng(0)
        for prefix, n in (("train", 30), ("t10k", 10)):
            img = images if images is not None else _idx_bytes(rng.integers(0, 255, (n, 6, 6)))
            lab = labels if labels is not None else _idx_bytes(np.arange(n) % 4)
            if prefix == "t10k" and test_labels is not None:
                lab = test_labels
            suffix = ".gz" if gz else ""
            (d / f"{prefix}-images-idx3-ubyte{suffix}").write_bytes(img)
            (d / f"{prefix}-labels-idx1-ubyte{suffix}").write_bytes(lab)

    return make


def _gz_truncated(t: Path) -> None:
    good = gzip.compress(_idx_bytes(np.zeros((30, 6, 6))))
    _idx(images=good[: len(good) // 2], labels=gzip.compress(_idx_bytes(np.arange(30) % 4)), gz=True)(t)


# ------------------------------------------------------------------------------- bad run folder files
def _write(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def make(t: Path) -> None:
        p = t / rel
        p.write_bytes(data if isinstance(data, bytes) else data.encode())

    return make


def _edit_json(rel: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def make(t: Path) -> None:
        p = t / rel
        d = json.loads(p.read_text())
        d = change(d) or d
        p.write_text(json.dumps(d))

    return make


def _set(**kv) -> Callable[[dict], dict]:
    return lambda d: {**d, **kv}


def _drop(key: str) -> Callable[[dict], dict]:
    return lambda d: {k: v for k, v in d.items() if k != key}


def _obf_meta(**change) -> Callable[[Path], None]:
    """Rewrite the run's obfuscator with changed metadata (None removes a key)."""

    def make(t: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        p = t / "run" / "obfuscator.safetensors"
        with safe_open(str(p), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: v for k, v in {**meta, **change}.items() if v is not None}
        save_file(tensors, str(p), metadata=meta)

    return make


def _obf_tensors(change: Callable[[dict], dict]) -> Callable[[Path], None]:
    def make(t: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        p = t / "run" / "obfuscator.safetensors"
        with safe_open(str(p), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        save_file(change(tensors), str(p), metadata=meta)

    return make


def _truncate(rel: str) -> Callable[[Path], None]:
    def make(t: Path) -> None:
        p = t / rel
        p.write_bytes(p.read_bytes()[:100])

    return make


def _both(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(t: Path) -> None:
        for s in steps:
            s(t)

    return make


def _file(rel: str) -> Callable[[Path], None]:
    return _write(rel, "not a folder")


def _readonly(rel: str) -> Callable[[Path], None]:
    def make(t: Path) -> None:
        (t / rel).mkdir(exist_ok=True)
        (t / rel).chmod(0o500)

    return make


def _privacy(rel: str, content: str) -> Callable[[Path], None]:
    def make(t: Path) -> None:
        p = t / rel / "privacy.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)

    return make


def _write_bytes_privacy(rel: str, data: bytes) -> Callable[[Path], None]:
    def make(t: Path) -> None:
        p = t / rel / "privacy.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    return make


GOOD_PRIVACY = {"run": "r", "task": "digits-lt5", "defense": "gaussian", "knob": "sigma", "knob_value": 0.5, "primary_acc": 0.9, "attack_acc": 0.3,
                "majority_floor": 0.1, "primary_only_floor": 0.2, "mi": None, "reconstruction": None}
LONG = "n" * 300

# (id, argv, word the error line must contain, setup)
CASES: list[tuple[str, list[str], str, Callable[[Path], None] | None]] = [
    # ---- usage errors: one line too, naming the option
    ("list: unknown option", ["list", "--bogus"], "--bogus", None),
    ("no such command", ["nope"], "nope", None),
    ("train: epochs 0", ["train", *TINY, "-e", "0", "-o", "{t}/r"], "--epochs", None),
    ("train: no --out", ["train"], "--out", None),
    ("train: epochs not a number", ["train", *TINY, "-e", "many", "-o", "{t}/r"], "--epochs", None),
    ("train: batch 0", ["train", *TINY, "--batch-size", "0", "-o", "{t}/r"], "--batch-size", None),
    # ---- train: names and numbers
    ("train: unknown task", ["train", *TINY, "-t", "foo", "-o", "{t}/r"], "unknown task", None),
    ("train: unknown defense", ["train", *TINY, "-d", "foo", "-o", "{t}/r"], "unknown defense", None),
    ("train: knob for none", ["train", *TINY, "-d", "none", "-l", "1", "-o", "{t}/r"], "knob", None),
    ("train: knob NaN", ["train", *TINY, "-d", "gaussian", "-l", "nan", "-o", "{t}/r"], "knob", None),
    ("train: lr NaN", ["train", *TINY, "--lr", "nan", "-o", "{t}/r"], "lr", None),
    ("train: lr negative", ["train", *TINY, "--lr", "-1", "-o", "{t}/r"], "lr", None),
    ("train: lr inf", ["train", *TINY, "--lr", "inf", "-o", "{t}/r"], "lr", None),
    ("train: unknown schedule", ["train", *TINY, "--lr-schedule", "step", "-o", "{t}/r"], "lr_schedule", None),
    ("train: unknown model", ["train", *TINY, "--model", "vgg", "-o", "{t}/r"], "model", None),
    ("train: budget NaN", ["train", *TINY, "--client-budget", "nan", "-o", "{t}/r"], "client_budget", None),
    ("train: budget 0", ["train", *TINY, "--client-budget", "0", "-o", "{t}/r"], "client_budget", None),
    ("train: budget 2", ["train", *TINY, "--client-budget", "2", "-o", "{t}/r"], "client_budget", None),
    ("train: seed -1", ["train", *TINY, "--seed", "-1", "-o", "{t}/r"], "seed", None),
    ("train: seed 2^40", ["train", *TINY, "--seed", str(2**40), "-o", "{t}/r"], "seed", None),
    ("train: svd 1 epoch in all", ["train", *TINY, "-d", "svd", "-e", "1", "-o", "{t}/r"], "--epochs", None),
    ("train: option without =", ["train", *TINY, "-d", "gaussian", "--option", "sigma", "-o", "{t}/r"], "KEY=VALUE", None),
    ("train: option empty key", ["train", *TINY, "--option", "=1", "-o", "{t}/r"], "KEY", None),
    ("train: option twice", ["train", *TINY, "--option", "init_gain=1", "--option", "init_gain=2", "-o", "{t}/r"], "init_gain", None),
    ("train: option NaN", ["train", *TINY, "--option", "selector_weight=NaN", "-o", "{t}/r"], "selector_weight", None),
    ("train: option Infinity", ["train", *TINY, "--option", "selector_weight=Infinity", "-o", "{t}/r"], "selector_weight", None),
    ("train: option string for number", ["train", *TINY, "--option", 'hard_fraction="abc"', "-o", "{t}/r"], "hard_fraction", None),
    ("train: option 1.5 channels", ["train", *TINY, "-d", "scnl-adaptive", "--option", "out_channels=1.5", "-o", "{t}/r"], "out_channels", None),
    ("train: option unknown", ["train", *TINY, "--option", "no_such=1", "-o", "{t}/r"], "no_such", None),
    ("train: option huge selector", ["train", *TINY, "--option", "selector_width=10000000", "-o", "{t}/r"], "selector_width", None),
    ("train: option huge num_tensors", ["train", *TINY, "-d", "shredder", "--option", "num_tensors=100000000", "-o", "{t}/r"], "num_tensors", None),
    ("train: option kernel_size 2 on additive", ["train", *TINY, "--option", "kernel_size=2", "-o", "{t}/r"], "kernel_size", None),
    ("train: option kernel_size 0", ["train", *TINY, "-d", "scnl-adaptive", "--option", "kernel_size=0", "-o", "{t}/r"], "kernel_size", None),
    ("train: option selector_width on soft selection", ["train", *TINY, "-d", "scnl-joint", "--option", "selector_width=16", "-o", "{t}/r"], "selector_width", None),
    ("train: option list for number", ["train", *TINY, "--option", "lambda_=[1,2]", "-o", "{t}/r"], "lambda_", None),
    ("train: option bool for number", ["train", *TINY, "--option", "lambda_=true", "-o", "{t}/r"], "lambda_", None),
    ("train: option huge number", ["train", *TINY, "--option", "lambda_=1e400", "-o", "{t}/r"], "lambda_", None),
    # ---- train: output folders
    ("train: -o empty", ["train", *TINY, "-o", ""], "--out", None),
    ("train: -o .", ["train", *TINY, "-o", "."], "--out", None),
    ("train: -o a file", ["train", *TINY, "-o", "{t}/f"], "is a file", _file("f")),
    ("train: -o under a file", ["train", *TINY, "-o", "{t}/f/sub"], "is a file", _file("f")),
    ("train: -o 300 characters", ["train", *TINY, "-o", "{t}/" + LONG], "--out", None),
    ("train: -o read-only", ["train", *TINY, "-o", "{t}/ro/r"], "--out", _readonly("ro")),
    ("train: -o another run", ["train", "-d", "scnl", *TINY, "-o", "{run}"], "different config", None),
    ("train: bad option leaves no config", ["train", "-d", "gaussian", "--option", "bogus=1", *TINY, "-o", "{t}/new"], "bogus", None),
    ("train: checkpoint garbage", ["train", "-d", "scnl", "-e", "1", "--train-size", "60", "-o", "{run}"], "checkpoint.safetensors",
     _both(lambda t: (t / "run" / "metrics.json").unlink(), _write("run/checkpoint.safetensors", b"garbage"))),
    ("train: checkpoint of an older format", ["train", "-d", "scnl", "-e", "1", "--train-size", "60", "-o", "{run}"], "progress.json",
     _both(lambda t: (t / "run" / "metrics.json").unlink(), _write("run/progress.json", '{"epoch": 99}'))),
    ("train: budget out of reach", ["train", *TINY, "-d", "scnl", "--client-budget", "0.00001", "-o", "{t}/r"], "budget", None),
    ("train: npz without a path", ["train", *TINY, "-t", "npz:", "-o", "{t}/r"], "npz:PATH", None),
    ("train: idx without a folder", ["train", *TINY, "-t", "idx:", "-o", "{t}/r"], "idx:DIR", None),
    ("train: knob 1e308", ["train", *TINY, "-d", "gaussian", "-l", "1e308", "-o", "{t}/r"], "knob", None),
    ("train: lr 1e30", ["train", *TINY, "-d", "none", "--lr", "1e30", "-o", "{t}/r"], "lr", None),
    ("train: train size 0", ["train", *TINY, "--train-size", "0", "-o", "{t}/r"], "--train-size", None),
    # ---- train: the user's data files (npz)
    ("npz: missing file", ["train", "-t", "npz:{t}/none.npz", *TINY, "-o", "{t}/r"], "none.npz", None),
    ("npz: text file", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _raw(b"x,y,z\n1,2,3\n")),
    ("npz: empty file", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _raw(b"")),
    ("npz: a folder", ["train", "-t", "npz:{t}", *TINY, "-o", "{t}/r"], "{t}", None),
    ("npz: pickle", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _pickle_posing_as_npz),
    ("npz: npy renamed", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _npy_as_npz),
    ("npz: truncated", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _truncated_npz),
    ("npz: huge declared shape", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _huge_member),
    ("npz: missing z", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _npz(z=None)),
    ("npz: complex x", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _npz(x=_good()["x"] + 1j)),
    ("npz: object x", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _npz(x=np.array([None] * 20, dtype=object))),
    ("npz: string x", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _npz(x=np.array(["a"] * 20))),
    ("npz: float labels", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _npz(y=np.arange(20) * 0.5)),
    ("npz: negative labels", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _npz(z=np.arange(20) - 3)),
    ("npz: uint64 max label", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _npz(y=np.full(20, 2**64 - 1, np.uint64))),
    ("npz: label 1e9", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _npz(z=np.full(20, 10**9))),
    ("npz: one class in y", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _npz(y=np.zeros(20, np.int64))),
    ("npz: zero records", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _npz(x=np.zeros((0, 8, 8), np.float32), y=np.zeros(0, np.int64), z=np.zeros(0, np.int64))),
    ("npz: five records", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _npz(x=_good()["x"][:5], y=np.arange(5) % 2, z=np.arange(5) % 2)),
    ("npz: NaN in x", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _npz(x=np.full((20, 8, 8), np.nan, np.float32))),
    ("npz: inf in x", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _npz(x=np.full((20, 8, 8), np.inf, np.float32))),
    ("npz: labels misaligned", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _npz(y=np.zeros(19, np.int64))),
    ("npz: 2-d labels", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _npz(z=np.zeros((20, 2), np.int64))),
    ("npz: 5-d x", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _npz(x=np.zeros((20, 1, 1, 8, 8), np.float32))),
    ("npz: 1-d x", ["train", "-t", "npz:{t}/d.npz", *TINY, "-o", "{t}/r"], "d.npz", _npz(x=np.zeros(20, np.float32))),
    ("npz: (N,D) with the cnn", ["train", "-t", "npz:{t}/d.npz", "--model", "cnn", "-d", "none", *TINY, "-o", "{t}/r"], "--model mlp", _npz(x=np.zeros((20, 100), np.float32))),
    ("npz: (N,1,1) with the cnn", ["train", "-t", "npz:{t}/d.npz", "--model", "cnn", "-d", "none", *TINY, "-o", "{t}/r"], "--model mlp", _npz(x=np.zeros((20, 1, 1), np.float32))),
    # ---- train: IDX folders
    ("idx: missing folder", ["train", "-t", "idx:{t}/none", *TINY, "-o", "{t}/r"], "none", None),
    ("idx: missing file", ["train", "-t", "idx:{t}", *TINY, "-o", "{t}/r"], "idx", None),
    ("idx: short header", ["train", "-t", "idx:{t}/idx", *TINY, "-o", "{t}/r"], "idx3-ubyte", _idx(images=bytes([0, 0, 8, 3, 0, 0]))),
    ("idx: three bytes", ["train", "-t", "idx:{t}/idx", *TINY, "-o", "{t}/r"], "idx3-ubyte", _idx(images=b"\0\0\x08")),
    ("idx: misaligned size", ["train", "-t", "idx:{t}/idx", *TINY, "-o", "{t}/r"], "idx3-ubyte", _idx(images=_idx_bytes(np.zeros((30, 6, 6)))[:-3])),
    ("idx: bad magic", ["train", "-t", "idx:{t}/idx", *TINY, "-o", "{t}/r"], "idx3-ubyte", _idx(images=b"hello world, not idx")),
    ("idx: float labels", ["train", "-t", "idx:{t}/idx", *TINY, "-o", "{t}/r"], "idx1-ubyte", _idx(labels=bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 30) + np.full(30, 1.5, ">f4").tobytes())),
    ("idx: negative labels", ["train", "-t", "idx:{t}/idx", *TINY, "-o", "{t}/r"], "idx1-ubyte", _idx(labels=bytes([0, 0, 0x09, 1]) + struct.pack(">I", 30) + np.full(30, -1, ">i1").tobytes())),
    ("idx: single class", ["train", "-t", "idx:{t}/idx", *TINY, "-o", "{t}/r"], "idx", _idx(labels=_idx_bytes(np.zeros(30)), test_labels=_idx_bytes(np.zeros(10)))),
    ("idx: test labels unseen in training", ["train", "-t", "idx:{t}/idx", *TINY, "-o", "{t}/r"], "t10k-labels", _idx(test_labels=_idx_bytes(np.full(10, 9)))),
    ("idx: huge header", ["train", "-t", "idx:{t}/idx", *TINY, "-o", "{t}/r"], "idx3-ubyte", _idx(images=bytes([0, 0, 8, 3]) + struct.pack(">3I", 100000, 100000, 1000))),
    ("idx: one record", ["train", "-t", "idx:{t}/idx", *TINY, "-o", "{t}/r"], "idx", _idx(images=_idx_bytes(np.zeros((1, 6, 6))), labels=_idx_bytes(np.zeros(1)))),
    ("idx: gz not gzip", ["train", "-t", "idx:{t}/idx", *TINY, "-o", "{t}/r"], "idx3-ubyte.gz", _idx(images=b"plain", labels=b"plain", gz=True)),
    ("idx: truncated gz", ["train", "-t", "idx:{t}/idx", *TINY, "-o", "{t}/r"], "idx3-ubyte.gz", _gz_truncated),
    # ---- export
    ("export: no run", ["export", "{t}/none", "-o", "{t}/m.npz"], "none", None),
    ("export: unfinished run", ["export", "{run}", "-o", "{t}/m.npz"], "metrics.json", lambda t: (t / "run" / "metrics.json").unlink()),
    ("export: onto model.safetensors", ["export", "{run}", "-o", "{run}/model.safetensors"], "run folder", None),
    ("export: onto config.json, forced", ["export", "{run}", "--force", "-o", "{run}/config.json"], "run folder", None),
    ("export: onto obfuscator", ["export", "{run}", "-o", "{run}/obfuscator.safetensors"], "run folder", None),
    ("export: existing file", ["export", "{run}", "-o", "{t}/f"], "--force", _file("f")),
    ("export: labels file exists", ["export", "{run}", "--with-labels", "-o", "{t}/m.npz"], "--force", _file("m.labels.npz")),
    ("export: -o a folder", ["export", "{run}", "-o", "{t}"], "folder", None),
    ("export: -o under a file", ["export", "{run}", "-o", "{t}/f/m.npz"], "is a file", _file("f")),
    ("export: -o 300 characters", ["export", "{run}", "-o", "{t}/" + LONG + ".npz"], "255", None),
    ("export: -o empty", ["export", "{run}", "-o", ""], "--out", None),
    ("export: -o read-only folder", ["export", "{run}", "-o", "{t}/ro/m.npz"], "--out", _readonly("ro")),
    ("export: --force onto a read-only file", ["export", "{run}", "--force", "-o", "{t}/ro.npz"], "read-only", lambda t: ((t / "ro.npz").write_bytes(b"mine"), (t / "ro.npz").chmod(0o444))),
    ("export: metrics a list", ["export", "{run}", "-o", "{t}/m.npz"], "metrics.json", _write("run/metrics.json", "[]")),
    ("export: -o where the file system refuses", ["export", "{run}", "-o", "/proc/veil-m.npz"], "/proc", None),
    ("export: a federated run folder", ["export", "{t}/fed", "-o", "{t}/m.npz"], "federated", _both(lambda t: (t / "fed").mkdir(), _write("fed/config.json", json.dumps({"clients": 3, "rounds": 2})), _write("fed/federated.json", "{}"))),
    ("export: -o into another run", ["export", "{run}", "-o", "{t}/other/model.safetensors"], "run folder", lambda t: shutil.copytree(t / "run", t / "other")),
    ("export: -o through ..", ["export", "{run}", "-o", "{run}/../run/obfuscator.safetensors"], "run folder", None),
    ("export: bad split", ["export", "{run}", "--split", "dev", "-o", "{t}/m.npz"], "split", None),
    ("export: bad mode", ["export", "{run}", "--mode", "both", "-o", "{t}/m.npz"], "mode", None),
    ("export: negative noise seed", ["export", "{run}", "--reproducible-noise", "-1", "-o", "{t}/m.npz"], "--reproducible-noise", None),
    ("export: config not JSON", ["export", "{run}", "-o", "{t}/m.npz"], "config.json", _write("run/config.json", "{oops")),
    ("export: config a list", ["export", "{run}", "-o", "{t}/m.npz"], "config.json", _write("run/config.json", "[1, 2]")),
    ("export: config unknown key", ["export", "{run}", "-o", "{t}/m.npz"], "config.json", _edit_json("run/config.json", _set(bogus=1))),
    ("export: config epochs a string", ["export", "{run}", "-o", "{t}/m.npz"], "config.json", _edit_json("run/config.json", _set(epochs="ten"))),
    ("export: config seed edited", ["export", "{run}", "-o", "{t}/m.npz"], "config.json", _edit_json("run/config.json", _set(seed=5))),
    ("export: config task edited", ["export", "{run}", "-o", "{t}/m.npz"], "config.json", _edit_json("run/config.json", _set(task="npz:/nonexistent.npz"))),
    ("export: config model edited", ["export", "{run}", "-o", "{t}/m.npz"], "model", _edit_json("run/config.json", _set(model="resnet"))),
    ("export: metrics not JSON", ["export", "{run}", "-o", "{t}/m.npz"], "metrics.json", _write("run/metrics.json", "nope")),
    ("export: model truncated", ["export", "{run}", "-o", "{t}/m.npz"], "model.safetensors", _truncate("run/model.safetensors")),
    ("export: model missing", ["export", "{run}", "-o", "{t}/m.npz"], "model.safetensors", lambda t: (t / "run" / "model.safetensors").unlink()),
    ("export: model a pickle", ["export", "{run}", "-o", "{t}/m.npz"], "model.safetensors", _write("run/model.safetensors", b"\x80\x04K\x01.")),
    ("export: obfuscator missing", ["export", "{run}", "-o", "{t}/m.npz"], "obfuscator.safetensors", lambda t: (t / "run" / "obfuscator.safetensors").unlink()),
    ("export: obfuscator truncated", ["export", "{run}", "-o", "{t}/m.npz"], "obfuscator.safetensors", _truncate("run/obfuscator.safetensors")),
    ("export: obfuscator names os:system", ["export", "{run}", "-o", "{t}/m.npz"], "obfuscator.safetensors", _obf_meta(veil_defense="os:system")),
    ("export: obfuscator no name", ["export", "{run}", "-o", "{t}/m.npz"], "obfuscator.safetensors", _obf_meta(veil_defense=None)),
    ("export: obfuscator shape not JSON", ["export", "{run}", "-o", "{t}/m.npz"], "obfuscator.safetensors", _obf_meta(input_shape="[1, 8")),
    ("export: obfuscator shape a string", ["export", "{run}", "-o", "{t}/m.npz"], "obfuscator.safetensors", _obf_meta(input_shape='"abc"')),
    ("export: obfuscator other shape", ["export", "{run}", "-o", "{t}/m.npz"], "obfuscator.safetensors", _obf_meta(input_shape="[1, 9, 9]")),
    ("export: obfuscator classes a word", ["export", "{run}", "-o", "{t}/m.npz"], "obfuscator.safetensors", _obf_meta(num_classes="two")),
    ("export: obfuscator classes huge", ["export", "{run}", "-o", "{t}/m.npz"], "obfuscator.safetensors", _obf_meta(num_classes="100000000")),
    ("export: obfuscator config a list", ["export", "{run}", "-o", "{t}/m.npz"], "obfuscator.safetensors", _obf_meta(config="[1]")),
    ("export: obfuscator config missing", ["export", "{run}", "-o", "{t}/m.npz"], "obfuscator.safetensors", _obf_meta(config=None)),
    ("export: obfuscator config bad option", ["export", "{run}", "-o", "{t}/m.npz"], "obfuscator.safetensors", _obf_meta(config='{"sigma": "loud"}')),
    ("export: obfuscator tensor reshaped", ["export", "{run}", "-o", "{t}/m.npz"], "obfuscator.safetensors", _obf_tensors(lambda d: {k: v.reshape(-1)[:1].clone() if v.numel() else v for k, v in d.items()})),
    ("export: obfuscator extra tensor", ["export", "{run}", "-o", "{t}/m.npz"], "obfuscator.safetensors", _obf_tensors(lambda d: {**d, "extra": torch.zeros(1)})),
    ("export: obfuscator NaN weights", ["export", "{run}", "-o", "{t}/m.npz"], "obfuscator.safetensors", _obf_tensors(lambda d: {k: v * float("nan") if v.is_floating_point() else v for k, v in d.items()})),
    # ---- evaluate
    ("evaluate: no run", ["evaluate", "{t}/none", *EVAL], "none", None),
    ("evaluate: unknown attacker", ["evaluate", "{run}", *EVAL, "--attackers", "gpt"], "gpt", None),
    ("evaluate: no attackers", ["evaluate", "{run}", *EVAL, "--attackers", ","], "--attackers", None),
    ("evaluate: unknown exposure", ["evaluate", "{run}", *EVAL, "--exposures", "sideways"], "sideways", None),
    ("evaluate: views 1e6", ["evaluate", "{run}", *EVAL, "--views", "1000000"], "views", None),
    ("evaluate: attack width 1e5", ["evaluate", "{run}", *EVAL, "--attack-width", "100000"], "width", None),
    ("evaluate: recon width 1e5", ["evaluate", "{run}", *EVAL, "--recon-epochs", "1", "--recon-width", "100000"], "width", None),
    ("evaluate: averaging 1e6", ["evaluate", "{run}", *EVAL, "--averaging-k", "1000000"], "averaging_k", None),
    ("evaluate: attack epochs 1e9", ["evaluate", "{run}", *EVAL, "--attack-epochs", "1000000000"], "epochs", None),
    ("evaluate: mi samples 4", ["evaluate", "{run}", *EVAL, "--mi-samples", "4"], "--mi-samples", None),
    ("evaluate: mi dims 1e6", ["evaluate", "{run}", *EVAL, "--mi-dims", "1000000"], "dims", None),
    ("evaluate: attack train size 1", ["evaluate", "{run}", *EVAL, "--attack-train-size", "1"], "--attack-train-size", None),
    ("evaluate: bad device", ["evaluate", "{run}", *EVAL, "--attack-device", "tpu"], "tpu", None),
    ("evaluate: cuda without a GPU", ["evaluate", "{run}", *EVAL, "--attack-device", "cuda"], "cuda", None),
    ("evaluate: seed -1", ["evaluate", "{run}", *EVAL, "--eval-seed", "-1"], "seed", None),
    ("evaluate: read-only run", ["evaluate", "{run}", *EVAL, ], "run", lambda t: (t / "run").chmod(0o500)),
    ("evaluate: privacy.json a folder", ["evaluate", "{run}", *EVAL, ], "privacy.json", lambda t: (t / "run" / "privacy.json").mkdir()),
    ("evaluate: obfuscator other shape", ["evaluate", "{run}", *EVAL], "obfuscator.safetensors", _obf_meta(input_shape="[1, 9, 9]")),
    ("evaluate: config not JSON", ["evaluate", "{run}", *EVAL], "config.json", _write("run/config.json", "{oops")),
    ("evaluate: config seed edited", ["evaluate", "{run}", *EVAL], "config.json", _edit_json("run/config.json", _set(seed=5))),
    # ---- sweep
    ("sweep: knob not a number", ["sweep", *TINY, *EVAL, "-d", "gaussian", "--lambdas", "a,b", "-o", "{t}/s"], "a", None),
    ("sweep: knob NaN", ["sweep", *TINY, *EVAL, "-d", "gaussian", "--lambdas", "nan", "-o", "{t}/s"], "nan", None),
    ("sweep: knobs 0,-0", ["sweep", *TINY, *EVAL, "-d", "gaussian", "--lambdas", "0,-0", "-o", "{t}/s"], "twice", None),
    ("sweep: knob list empty", ["sweep", *TINY, *EVAL, "-d", "gaussian", "--lambdas", ",", "-o", "{t}/s"], "knob", None),
    ("sweep: bad option", ["sweep", *TINY, *EVAL, "-d", "gaussian", "--option", "bogus=1", "-o", "{t}/s"], "bogus", None),
    ("sweep: bad task", ["sweep", *TINY, *EVAL, "-t", "foo", "-d", "gaussian", "-o", "{t}/s"], "unknown task", None),
    ("sweep: bad defense", ["sweep", *TINY, *EVAL, "-d", "foo", "-o", "{t}/s"], "unknown defense", None),
    ("sweep: bad model", ["sweep", *TINY, *EVAL, "-d", "gaussian", "--model", "vgg", "-o", "{t}/s"], "model", None),
    ("sweep: lr NaN", ["sweep", *TINY, *EVAL, "-d", "gaussian", "--lr", "nan", "-o", "{t}/s"], "lr", None),
    ("sweep: unknown attacker", ["sweep", *TINY, *EVAL, "-d", "gaussian", "--attackers", "gpt", "-o", "{t}/s"], "gpt", None),
    ("sweep: -o a file", ["sweep", *TINY, *EVAL, "-d", "gaussian", "-o", "{t}/f"], "is a file", _file("f")),
    ("sweep: -o empty", ["sweep", *TINY, *EVAL, "-d", "gaussian", "-o", ""], "--out", None),
    ("sweep: bad npz", ["sweep", *TINY, *EVAL, "-t", "npz:{t}/d.npz", "-d", "gaussian", "-o", "{t}/s"], "d.npz", _raw(b"garbage")),
    # ---- report
    ("report: missing folder", ["report", "{t}/none", "-o", "{t}/rep"], "none", None),
    ("report: no privacy.json", ["report", "{t}/empty", "-o", "{t}/rep"], "privacy.json", lambda t: (t / "empty").mkdir()),
    ("report: privacy not JSON", ["report", "{t}/s", "-o", "{t}/rep"], "privacy.json", _privacy("s/a", "{oops")),
    ("report: privacy a list", ["report", "{t}/s", "-o", "{t}/rep"], "privacy.json", _privacy("s/a", "[1, 2]")),
    ("report: privacy missing task", ["report", "{t}/s", "-o", "{t}/rep"], "privacy.json", _privacy("s/a", json.dumps({k: v for k, v in GOOD_PRIVACY.items() if k != "task"}))),
    ("report: privacy accuracy a word", ["report", "{t}/s", "-o", "{t}/rep"], "privacy.json", _privacy("s/a", json.dumps({**GOOD_PRIVACY, "primary_acc": "high"}))),
    ("report: privacy knob a word", ["report", "{t}/s", "-o", "{t}/rep"], "privacy.json", _privacy("s/a", json.dumps({**GOOD_PRIVACY, "knob_value": "loud"}))),
    ("report: privacy mi a list", ["report", "{t}/s", "-o", "{t}/rep"], "privacy.json", _privacy("s/a", json.dumps({**GOOD_PRIVACY, "mi": [1]}))),
    ("report: privacy accuracy NaN", ["report", "{t}/s", "-o", "{t}/rep"], "privacy.json", _privacy("s/a", json.dumps({**GOOD_PRIVACY, "attack_acc": float("nan")}))),
    ("report: privacy accuracy 7", ["report", "{t}/s", "-o", "{t}/rep"], "privacy.json", _privacy("s/a", json.dumps({**GOOD_PRIVACY, "primary_acc": 7}))),
    ("report: privacy binary", ["report", "{t}/s", "-o", "{t}/rep"], "privacy.json", _write_bytes_privacy("s/a", b"\xff\xfe{")),
    ("report: -o a file", ["report", "{t}/s", "-o", "{t}/f"], "is a file", _both(_privacy("s/a", json.dumps(GOOD_PRIVACY)), _file("f"))),
    ("report: -o under a file", ["report", "{t}/s", "-o", "{t}/f/rep"], "is a file", _both(_privacy("s/a", json.dumps(GOOD_PRIVACY)), _file("f"))),
    ("report: -o empty", ["report", "{t}/s", "-o", ""], "--out", _privacy("s/a", json.dumps(GOOD_PRIVACY))),
    ("report: -o read-only", ["report", "{t}/s", "-o", "{t}/ro/rep"], "--out", _both(_privacy("s/a", json.dumps(GOOD_PRIVACY)), _readonly("ro"))),
    # ---- federated
    ("federated: clients 0", ["federated", *FED, "--clients", "0", "-o", "{t}/f"], "clients", None),
    ("federated: clients 1000", ["federated", *FED, "--clients", "1000", "--train-size", "40", "-o", "{t}/f"], "clients", None),
    ("federated: rounds 0", ["federated", *FED, "--rounds", "0", "-o", "{t}/f"], "rounds", None),
    ("federated: rounds 1e9", ["federated", *FED, "--rounds", "1000000000", "-o", "{t}/f"], "rounds", None),
    ("federated: bad partition", ["federated", *FED, "--partition", "zipf", "-o", "{t}/f"], "partition", None),
    ("federated: alpha NaN", ["federated", *FED, "--partition", "noniid", "--alpha", "nan", "-o", "{t}/f"], "alpha", None),
    ("federated: alpha 0", ["federated", *FED, "--partition", "noniid", "--alpha", "0", "-o", "{t}/f"], "alpha", None),
    ("federated: bad strategy", ["federated", *FED, "--strategy", "fedsgd", "-o", "{t}/f"], "strategy", None),
    ("federated: server lr NaN", ["federated", *FED, "--strategy", "fedadam", "--server-lr", "nan", "-o", "{t}/f"], "server_lr", None),
    ("federated: mu negative", ["federated", *FED, "--strategy", "fedprox", "--proximal-mu", "-1", "-o", "{t}/f"], "proximal_mu", None),
    ("federated: trusted fraction 0", ["federated", *FED, "--trusted-fraction", "0", "-o", "{t}/f"], "trusted_fraction", None),
    ("federated: trusted fraction 2", ["federated", *FED, "--trusted-fraction", "2", "-o", "{t}/f"], "trusted_fraction", None),
    ("federated: screen ratio 1", ["federated", *FED, "--screen-ratio", "1", "-o", "{t}/f"], "screen_ratio", None),
    ("federated: lr NaN", ["federated", *FED, "--lr", "nan", "-o", "{t}/f"], "lr", None),
    ("federated: seed -1", ["federated", *FED, "--seed", "-1", "-o", "{t}/f"], "seed", None),
    ("federated: bad backend", ["federated", *FED, "--backend", "mpi", "-o", "{t}/f"], "backend", None),
    ("federated: bad defense", ["federated", *FED, "-d", "foo", "-o", "{t}/f"], "unknown defense", None),
    ("federated: bad option", ["federated", *FED, "-d", "gaussian", "--option", "bogus=1", "-o", "{t}/f"], "bogus", None),
    ("federated: obfuscator missing", ["federated", *FED, "--obfuscator", "{t}/none.safetensors", "-o", "{t}/f"], "none.safetensors", None),
    ("federated: obfuscator garbage", ["federated", *FED, "--obfuscator", "{t}/o.safetensors", "-o", "{t}/f"], "o.safetensors", _write("o.safetensors", b"garbage")),
    ("federated: obfuscator other shape", ["federated", *FED, "--obfuscator", "{run}/obfuscator.safetensors", "-o", "{t}/f"], "obfuscator.safetensors", _obf_meta(input_shape="[1, 9, 9]")),
    ("federated: bad npz", ["federated", *FED, "-t", "npz:{t}/d.npz", "-o", "{t}/f"], "d.npz", _raw(b"garbage")),
    ("federated: -o a file", ["federated", *FED, "--rounds", "1", "--train-size", "40", "-o", "{t}/f"], "is a file", _file("f")),
    ("federated: -o empty", ["federated", *FED, "--rounds", "1", "--train-size", "40", "-o", ""], "--out", None),
    ("federated: -o another run", ["federated", *FED, "--rounds", "1", "--train-size", "40", "-o", "{run}"], "different config", None),
    # ---- incremental
    ("incremental: step 1e-9", ["incremental", *INC, "--step", "1e-9", "-o", "{t}/i"], "step", None),
    ("incremental: step 0", ["incremental", *INC, "--step", "0", "-o", "{t}/i"], "step", None),
    ("incremental: step NaN", ["incremental", *INC, "--step", "nan", "-o", "{t}/i"], "step", None),
    ("incremental: start 0", ["incremental", *INC, "--start", "0", "-o", "{t}/i"], "start", None),
    ("incremental: start 200", ["incremental", *INC, "--start", "200", "-o", "{t}/i"], "start", None),
    ("incremental: max below start", ["incremental", *INC, "--start", "50", "--max-p", "10", "-o", "{t}/i"], "max_p", None),
    ("incremental: target 2", ["incremental", *INC, "--target", "2", "-o", "{t}/i"], "target", None),
    ("incremental: target NaN", ["incremental", *INC, "--target", "nan", "-o", "{t}/i"], "target", None),
    ("incremental: screen ratio 1", ["incremental", *INC, "--screen-ratio", "1", "-o", "{t}/i"], "screen_ratio", None),
    ("incremental: screen mode", ["incremental", *INC, "--screen-mode", "blur", "-o", "{t}/i"], "screen_mode", None),
    ("incremental: seed -1", ["incremental", *INC, "--seed", "-1", "-o", "{t}/i"], "seed", None),
    ("incremental: lr NaN", ["incremental", *INC, "--lr", "nan", "-o", "{t}/i"], "lr", None),
    ("incremental: bad defense", ["incremental", *INC, "-d", "foo", "-o", "{t}/i"], "unknown defense", None),
    ("incremental: bad option", ["incremental", *INC, "-d", "gaussian", "--option", "bogus=1", "-o", "{t}/i"], "bogus", None),
    ("incremental: bad npz", ["incremental", *INC, "-t", "npz:{t}/d.npz", "-o", "{t}/i"], "d.npz", _raw(b"garbage")),
    ("incremental: -o a file", ["incremental", *INC, "--train-size", "40", "-o", "{t}/f"], "is a file", _file("f")),
    ("incremental: -o empty", ["incremental", *INC, "--train-size", "40", "-o", ""], "--out", None),
    ("incremental: -o another run", ["incremental", *INC, "--train-size", "40", "-o", "{run}"], "different config", None),
    # ---- demo
    ("demo: --out a file", ["demo", "--epochs", "1", "--attack-epochs", "1", "--out", "{t}/f"], "is a file", _file("f")),
    ("demo: --out under a file", ["demo", "--epochs", "1", "--attack-epochs", "1", "--out", "{t}/f/d"], "is a file", _file("f")),
    ("demo: --out empty", ["demo", "--epochs", "1", "--attack-epochs", "1", "--out", ""], "--out", None),
    ("demo: --out read-only", ["demo", "--epochs", "1", "--attack-epochs", "1", "--out", "{t}/ro/d"], "--out", _readonly("ro")),
    ("demo: epochs 0", ["demo", "--epochs", "0"], "--epochs", None),
]


# ------------------------------------------------------------------------------------------- harness
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One small finished run (scnl on digits-lt5, 1 epoch, 60 records), copied into every case."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    r = runner.invoke(CLI, ["train", "-t", "digits-lt5", "-d", "scnl", "-e", "1", "--train-size", "60", "-o", str(run)])
    assert r.exit_code == 0, r.output
    return run


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its content hash and mode (folders as 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        st_ = p.lstat()
        if p.is_dir():
            out[rel] = "dir"  # the read-only cases change folder modes and put them back
        else:
            out[rel] = f"{hashlib.sha256(p.read_bytes()).hexdigest()} {oct(st_.st_mode)}"
    return out


def assert_one_line_error(argv: list[str], root: Path, word: str = "") -> str:
    """Run ``veil argv`` in ``root``; check exit 2, one line naming ``word``, no traceback, nothing changed."""
    before = snapshot(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        r = runner.invoke(CLI, argv)
    finally:
        os.chdir(cwd)
        for p in root.rglob("*"):  # undo the read-only cases so the comparison (and cleanup) can read
            if p.is_dir() and not os.access(p, os.W_OK):
                p.chmod(0o700)
        if not os.access(root, os.W_OK):
            root.chmod(0o700)
    output = r.output
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        output += "".join(traceback.format_exception(r.exception))
    assert "Traceback" not in output, output
    assert "allow_pickle" not in output, output  # NumPy's advice to unpickle is wrong and unsafe here
    assert r.exit_code == 2, f"exit {r.exit_code}: {output}"
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert word.lower() in lines[0].lower(), f"{word!r} not named in: {lines[0]}"
    after = snapshot(root)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"changed: {changed}"
    return lines[0]


def _fill(s: str, t: Path) -> str:
    return s.replace("{run}", str(t / "run")).replace("{t}", str(t))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(case, finished_run, tmp_path):
    _, argv, word, setup = case
    if any("ro/" in a for a in argv) or case[0] == "evaluate: read-only run":
        if os.geteuid() == 0:
            pytest.skip("running as root: a read-only folder is writable")
    shutil.copytree(finished_run, tmp_path / "run")
    if setup is not None:
        setup(tmp_path)
    assert_one_line_error([_fill(a, tmp_path) for a in argv], tmp_path, _fill(word, tmp_path))


def test_the_battery_covers_every_command():
    commands = set(CLI.commands)  # type: ignore[attr-defined]
    covered = {argv[0] for _, argv, _, _ in CASES}
    others = {"serve", "query", "export-client"}  # added by the serving work, battered by its own tests
    assert commands - others <= covered, sorted(commands - others - covered)


# ---------------------------------------------------------------------------------- property-based
_settings = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_settings
@given(data=st.binary(max_size=400))
def test_random_bytes_as_npz_or_idx(data, tmp_path_factory):
    """Random bytes as a data file (npz, IDX, gzipped IDX): one line or a valid file, never a traceback."""
    t = tmp_path_factory.mktemp("bytes")
    (t / "d.npz").write_bytes(data)
    _idx(images=data, labels=data)(t)
    (t / "gz").mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (t / "gz" / name).write_bytes(data)
    for task in (f"npz:{t}/d.npz", f"idx:{t}/idx", f"idx:{t}/gz"):
        assert_one_line_error(["train", "-t", task, *TINY, "-o", str(t / "r")], t)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=8)


@_settings
@given(field=st.sampled_from(["task", "defense", "knob", "epochs", "model", "seed", "train_size", "defense_options", "lr", "batch_size"]), value=_json)
def test_random_values_in_config_json(field, value, finished_run, tmp_path_factory):
    """Any value in any field of a run's config.json: export says which file is wrong (or, for a value
    equal to the one saved, works)."""
    t = tmp_path_factory.mktemp("cfg")
    shutil.copytree(finished_run, t / "run")
    cfg = json.loads((t / "run" / "config.json").read_text())
    if cfg.get(field) == value:
        return
    _edit_json("run/config.json", _set(**{field: value}))(t)
    assert_one_line_error(["export", str(t / "run"), "-o", str(t / "m.npz")], t, "config.json")


@_settings
@given(key=st.sampled_from(["veil_defense", "input_shape", "num_classes", "config"]), value=_json)
def test_random_obfuscator_metadata(key, value, finished_run, tmp_path_factory):
    """Any JSON (as text) in any metadata field of the obfuscator: export names the obfuscator file, unless
    the metadata rebuilds the very obfuscator that was saved."""
    from veil.defenses.saving import load_obfuscator

    t = tmp_path_factory.mktemp("meta")
    shutil.copytree(finished_run, t / "run")
    original = load_obfuscator(t / "run" / "obfuscator.safetensors")
    _obf_meta(**{key: json.dumps(value)})(t)
    try:
        same = load_obfuscator(t / "run" / "obfuscator.safetensors")
    except ValueError:
        same = None
    if same is not None:  # e.g. config {}: the defaults, which are what was saved
        assert (same.name, same.config(), same.input_shape) == (original.name, original.config(), original.input_shape)
        return
    assert_one_line_error(["export", str(t / "run"), "-o", str(t / "m.npz")], t, "obfuscator.safetensors")


@_settings
@given(doc=_json)
def test_random_privacy_json_in_report(doc, tmp_path_factory):
    """Any JSON as a privacy.json: report names the file, or (if it happens to be a valid result) works."""
    t = tmp_path_factory.mktemp("priv")
    _privacy("s/a", json.dumps(doc))(t)
    assert_one_line_error(["report", str(t / "s"), "-o", str(t / "rep")], t, "privacy.json")


# ----------------------------------------------------------------------------------- the fixed items
def _invoke(argv: list[str]):
    return runner.invoke(CLI, argv)


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    """An interrupted export left a hidden ``.m.npz.PID.XXXX.tmp``; the next write of that file removes
    it, and leaves alone the temporary of a writer that still runs."""
    import subprocess
    import sys

    from veil.io import write_bytes

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = tmp_path / f".m.npz.{int(dead.stdout)}.k3j2.tmp"
    live = tmp_path / f".m.npz.{os.getppid()}.a1b2.tmp"
    for p in (stale, live):
        p.write_bytes(b"half an export")
    write_bytes(tmp_path / "m.npz", b"data")
    assert not stale.exists() and live.exists() and (tmp_path / "m.npz").read_bytes() == b"data"


def _digits_npz(path: Path, seed: int = 0) -> None:
    from veil.data.readers import load_digits_arrays

    x, d = load_digits_arrays()
    keep = np.random.default_rng(seed).permutation(len(x))[:300]
    np.savez(path, x=x[keep, 0], y=(d[keep] < 5).astype(np.int64), z=d[keep])


def test_data_replaced_after_training_is_refused_at_resume_rerun_export_and_evaluate(tmp_path):
    from veil.training import TrainConfig, train_run

    data = tmp_path / "d.npz"
    _digits_npz(data)
    cfg = TrainConfig(task=f"npz:{data}", defense="gaussian", epochs=2, train_size=60)

    def interrupt(line: str) -> None:
        if "epoch 2/" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, tmp_path / "cut", log=interrupt)
    train_run(cfg, tmp_path / "run", log=lambda s: None)
    _digits_npz(data, seed=1)  # the same shapes and classes, other records
    with pytest.raises(ValueError, match="data changed"):
        train_run(cfg, tmp_path / "cut", log=lambda s: None)  # resume
    argv = ["train", "-t", f"npz:{data}", "-d", "gaussian", "-e", "2", "--train-size", "60", "-o", str(tmp_path / "run")]
    assert_one_line_error(argv, tmp_path, "data changed")  # "already finished" before
    assert_one_line_error(["export", str(tmp_path / "run"), "-o", str(tmp_path / "m.npz")], tmp_path, "d.npz")
    assert_one_line_error(["evaluate", str(tmp_path / "run"), *EVAL], tmp_path, "d.npz")
    sweep = ["sweep", "-t", f"npz:{data}", "-d", "gaussian", "--lambdas", "0.5", "-e", "2", "--train-size", "60", *EVAL, "-o", str(tmp_path / "s")]
    assert _invoke(sweep).exit_code == 0
    _digits_npz(data, seed=2)
    assert_one_line_error(sweep, tmp_path, "data changed")  # not "already evaluated, skipped"


def test_evaluate_measures_primary_accuracy_and_drops_a_stale_reconstruction(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "primary_acc": 0.123}))  # not what the weights give
    (run / "reconstruction.png").write_bytes(b"a grid from an earlier evaluation")
    r = _invoke(["evaluate", str(run), *EVAL])
    assert r.exit_code == 0, r.output
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["primary_acc_at_training"] == 0.123
    assert abs(privacy["primary_acc"] - metrics["primary_acc"]) < 0.1  # measured again on the weights
    assert privacy["reconstruction"] is None and not (run / "reconstruction.png").exists()
    r = _invoke(["report", str(run), "-o", str(tmp_path / "rep")])  # a real privacy.json passes the report's checks
    assert r.exit_code == 0, r.output


def test_vector_records_train_with_the_mlp_and_epochs_are_in_all(tmp_path):
    """An (N, D) npz trains with --model mlp (the cnn refuses it naming --model mlp, above); a two-stage
    defense trains exactly --epochs epochs in all (fewer than its stages is refused, above)."""
    from veil.data.readers import load_digits_arrays

    x, d = load_digits_arrays()
    np.savez(tmp_path / "v.npz", x=x[:200].reshape(200, 64), y=(d[:200] < 5).astype(np.int64), z=d[:200])
    r = _invoke(["train", "-t", f"npz:{tmp_path / 'v.npz'}", "-d", "none", "--model", "mlp", "-e", "1", "-o", str(tmp_path / "v")])
    assert r.exit_code == 0, r.output
    r = _invoke(["train", "-d", "svd", "-e", "2", "--train-size", "60", "--model", "mlp", "-o", str(tmp_path / "svd")])
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "svd" / "metrics.json").read_text())["history"]) == 2


def test_a_resumed_federated_run_repeats_the_uninterrupted_one_and_keeps_every_rounds_history(tmp_path, monkeypatch):
    """Without obfuscation noise (defense none) a federated run is deterministic: resumed after round 1,
    rounds 2-3 equal the uninterrupted run's (the clients seed a round by its number in the whole run,
    not by the resumed server's own count), and round 1 keeps its training metrics."""
    from veil.federated import server_app
    from veil.federated.simulation import run_federated
    from veil.federated.task import FederatedConfig

    config = FederatedConfig(task="digits-lt5", clients=2, rounds=3, defense="none", local_epochs=1, seed=0, train_size=200, eval_size=60)
    full = run_federated(config, tmp_path / "full", log=lambda s: None)
    original = server_app.evaluate_on_clients

    def crash_at_round_2(grid, arrays, cfg, server_round):
        if server_round == 2:
            raise KeyboardInterrupt
        return original(grid, arrays, cfg, server_round)

    monkeypatch.setattr(server_app, "evaluate_on_clients", crash_at_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_federated(config, tmp_path / "part", log=lambda s: None)
    monkeypatch.setattr(server_app, "evaluate_on_clients", original)
    resumed = run_federated(config, tmp_path / "part", log=lambda s: None)

    def strip(rounds):
        return [{k: v for k, v in r.items() if k != "elapsed_seconds"} for r in rounds]

    assert strip(resumed["rounds"]) == strip(full["rounds"])
    assert all("train_loss" in r for r in resumed["rounds"][1:])


# ------------------------------------------------------------------------- every number option, generated
_EVAL_ON = [*EVAL, "--recon-epochs", "1", "--mi-dims", "2", "--mi-samples", "50"]  # every stage on, so its options count
_BASE = {
    "train": ["train", *TINY, "-o", "{t}/r"],
    "sweep": ["sweep", "-d", "gaussian", *TINY, *_EVAL_ON, "-o", "{t}/s"],
    "federated": ["federated", *FED, "--rounds", "1", "-o", "{t}/f"],
    "incremental": ["incremental", *INC, "-o", "{t}/i"],
    "evaluate": ["evaluate", "{run}", *_EVAL_ON],
    "export": ["export", "{run}", "-o", "{t}/m.npz"],
}


#: Int options whose every value past 2^63 is wrong (a count of work, a seed); the others (a record count
#: such as --train-size, a patience) read a huge value as "all" or "never", which is fine.
_BOUNDED_INTS = ("epochs", "rounds", "clients", "seed", "noise", "views", "width", "dims", "samples", "averaging", "--mi-k")


def _number_options() -> list[tuple[str, str, str]]:
    """(command, option, value) for every float option of every command, with NaN and infinities, and
    every bounded int option with a value past 2^63 (read from the commands themselves, so new options
    are in)."""
    import click

    out = []
    for name in _BASE:
        for p in CLI.commands[name].params:  # type: ignore[attr-defined]
            if not isinstance(p, click.Option) or not p.opts[0].startswith("--"):
                continue
            if isinstance(p.type, click.types.FloatParamType):
                out += [(name, p.opts[0], v) for v in ("nan", "inf", "-inf")]
            elif isinstance(p.type, click.types.IntParamType) and any(w in p.opts[0] for w in _BOUNDED_INTS):
                out.append((name, p.opts[0], str(2**64)))
    return out


@pytest.mark.parametrize("command,option,value", _number_options(), ids=lambda v: str(v))
def test_every_number_option_refuses_nan_infinity_and_overflow(command, option, value, finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run")
    argv = [_fill(a, tmp_path) for a in _BASE[command]] + [option, value]
    assert_one_line_error(argv, tmp_path)
