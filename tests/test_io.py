import pytest
import torch

from veil.io import atomic_path, load_weights, read_json, save_weights, write_json


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_json_round_trip(tmp_path):
    write_json(tmp_path / "a.json", {"x": (1, 2), "y": 0.5})
    assert read_json(tmp_path / "a.json") == {"x": [1, 2], "y": 0.5}


def test_corrupt_files_give_clear_errors(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        load_weights(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_weights(tmp_path / "missing.safetensors")
    (tmp_path / "c.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_json(tmp_path / "c.json")


def test_weights_round_trip(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_weights(tmp_path / "w.safetensors", t)
    back = load_weights(tmp_path / "w.safetensors")
    assert all(torch.equal(t[k], back[k]) for k in t)
