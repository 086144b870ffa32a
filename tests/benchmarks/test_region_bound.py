"""benchmarks/region_bound.py: the fills touch the sensitive region only, and a tiny run on digits-tag writes
one primary accuracy per fill."""

from __future__ import annotations

import json

import pytest
import torch

from veil.data.tasks import Split

from .conftest import load_script


@pytest.fixture(scope="module")
def bound():
    return load_script("region_bound")


def test_fills_change_the_region_and_nothing_else(bound):
    x = torch.rand(4, 1, 6, 6) + 0.5
    mask = torch.zeros(4, 1, 6, 6, dtype=torch.uint8)
    mask[:, :, 1:3, 2:5] = 1
    split = Split(x, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), mask)
    g = torch.Generator().manual_seed(0)
    assert bound.fill(split, "clean", g) is split
    for how in ("zero", "noise"):
        out = bound.fill(split, how, g).x
        assert torch.equal(out[mask == 0], x[mask == 0])
        assert not torch.equal(out[mask == 1], x[mask == 1])
    assert torch.equal(bound.fill(split, "zero", g).x[mask == 1], torch.zeros(int(mask.sum())))
    with pytest.raises(ValueError, match="fill"):
        bound.fill(split, "blur", g)
    with pytest.raises(ValueError, match="region masks"):
        bound.fill(Split(x, split.y, split.z, None), "zero", g)


def test_tiny_run_writes_one_accuracy_per_fill(bound, tmp_path):
    assert bound.main(["--task", "digits-tag", "--train-size", "200", "--epochs", "1", "--model", "cnn", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bound.json").read_text())
    assert set(result["primary_acc"]) == {"clean", "zero", "noise"}
    assert all(0.0 <= v <= 1.0 for v in result["primary_acc"].values())
