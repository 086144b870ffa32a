"""Safe, atomic file I/O: JSON, CSV, safetensors weights, and the client-side obfuscator bundle."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # name the file asked for, not the temporary
        raise OSError(err.errno, f"cannot write {path}: {err.strerror}") from err
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result file gets the mode open() would give
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _remove_stale_temps(path: Path) -> None:
    """Delete temporaries of ``path`` that a killed writer left (``.NAME.PID.XXXX.tmp`` whose process no
    longer runs on this machine); a live writer's temporary is left alone."""
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Add ``record`` as one JSON line to ``path``; the file is rewritten atomically, so an interrupted
    benchmark never leaves half a line."""
    path = Path(path)
    before = path.read_bytes() if path.exists() else b""
    write_bytes(path, before + (json.dumps(record, default=_json_default) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write a list of dicts as CSV (columns from the union of keys, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(path, buf.getvalue().encode())


def save_weights(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a flat dict of tensors as safetensors, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_bytes(path, st_save(tensors, metadata=metadata))


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a clear error if it is missing or corrupt (never unpickles)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as err:
        raise ValueError(f"{path}: corrupt or not a safetensors file ({err})") from err


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write arrays to ``.npz`` atomically (no object arrays, so it loads with ``allow_pickle=False``)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes(path, buf.getvalue())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
