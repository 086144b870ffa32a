import gzip
import struct

import numpy as np
import pytest
import torch

from veil.data import DatasetMissingError, list_tasks, load_task
from veil.data import readers


def test_digits_task_splits_and_labels():
    t = load_task("digits-lt5")
    assert t.input_shape == (1, 8, 8)
    assert len(t.train) + len(t.val) + len(t.test) == 1797
    for s in (t.train, t.val, t.test):
        assert s.x.dtype == torch.float32 and 0 <= float(s.x.min()) and float(s.x.max()) <= 1
        assert torch.equal(s.y, (s.z < 5).long())
    assert t.num_primary == 2 and t.num_secondary == 10


def test_floors_are_what_the_primary_label_allows():
    t = load_task("digits-lt5")
    # knowing only digit<5 leaves one of five digits: about 20%, clearly above the 10% majority floor
    assert 0.15 < t.primary_only_floor() < 0.3
    assert 0.05 < t.majority_floor() < 0.15


def test_train_size_subsets_reproducibly():
    a = load_task("digits-lt5", train_size=100)
    b = load_task("digits-lt5", train_size=100)
    assert len(a.train) == 100 and torch.equal(a.train.x, b.train.x)


def test_records_not_kept_are_held_out_disjoint_from_train():
    full, t = load_task("digits-lt5"), load_task("digits-lt5", train_size=100)
    assert len(full.held_out) == 0
    assert len(t.train) + len(t.held_out) == len(full.train)
    rows = lambda s: {r.numpy().tobytes() for r in s.x.reshape(len(s), -1)}  # noqa: E731
    kept, held = rows(t.train), rows(t.held_out)
    assert not kept & held and kept | held == rows(full.train)


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="digits-lt5"):
        load_task("cifar")
    assert "mnist-lt5" in list_tasks()


def test_npz_task(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((60, 6, 6)).astype(np.float32)
    z = np.repeat(np.arange(3), 20)
    np.savez(tmp_path / "d.npz", x=x, y=(z > 0).astype(np.int64), z=z)
    t = load_task(f"npz:{tmp_path / 'd.npz'}")
    assert t.input_shape == (1, 6, 6) and t.num_secondary == 3
    assert len(t.train) + len(t.val) + len(t.test) == 60


@pytest.mark.parametrize(
    "arrays,match",
    [({"x": np.zeros((5, 4, 4)), "y": np.zeros(5, int)}, "missing arrays"),
     ({"x": np.zeros((5, 4, 4)), "y": np.zeros(4, int), "z": np.zeros(5, int)}, "y must be"),
     ({"x": np.full((5, 4, 4), np.nan), "y": np.zeros(5, int), "z": np.zeros(5, int)}, "finite")],
)
def test_bad_npz_is_named(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        readers.load_npz(tmp_path / "bad.npz")


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(DatasetMissingError):
        load_task(f"npz:{tmp_path / 'nothing.npz'}")
    with pytest.raises(DatasetMissingError):
        load_task(f"idx:{tmp_path / 'nowhere'}")


def _write_idx(path, arr):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[arr.dtype.type], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_idx_folder_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 5, 5), dtype=np.uint8))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 4).astype(np.uint8))
    t = load_task(f"idx:{tmp_path}")
    assert t.input_shape == (1, 5, 5) and len(t.test) == 20 and t.num_secondary == 4
    assert torch.equal(t.test.y, (t.test.z < 2).long())


def test_corrupt_idx_is_named(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="IDX"):
        readers.read_idx(tmp_path / "bad")


def test_mnist_unpickler_refuses_code(tmp_path):
    import io
    import os
    import pickle

    payload = pickle.dumps(os.system)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        readers._NumpyOnlyUnpickler(io.BytesIO(payload)).load()


def test_digits_overlay_draws_the_tag_over_the_object_inside_its_mask():
    from veil.data import load_task

    over, beside = load_task("digits-overlay", seed=0), load_task("digits-tag", seed=0)
    assert over.input_shape == beside.input_shape == (1, 40, 40)
    assert len(over.train) == len(beside.train) and torch.equal(over.train.y, beside.train.y) and torch.equal(over.train.z, beside.train.z)
    x, m = over.train.x, over.train.mask.bool()
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.all(m.flatten(1).sum(1) == 14 * 14)
    # the tag's box lies on the object: much of the box is inked (object or tag), where beside the object
    # the box would be mostly blank
    inside_object = [(x[i, 0][m[i, 0]] > 0.1).float().mean() for i in range(50)]
    assert float(torch.stack(inside_object).mean()) > 0.3
    assert torch.equal(load_task("digits-overlay", seed=0).train.x, x)  # deterministic from the seed
