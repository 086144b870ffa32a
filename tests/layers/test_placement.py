"""Placements (seed 000 §5) are compositions: each equals the hand-written composition, passes the
selection through, and merges by concat or add."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from veil.layers import MergeAfter, MergeBefore, OnInput, SCNLConv2d, SoftSelection, merge


def setup():
    torch.manual_seed(0)
    x, y = torch.rand(4, 1, 6, 6), torch.tensor([0, 1, 1, 0])
    return x, y


def same_noise(fn_a, fn_b):
    torch.manual_seed(5)
    a = fn_a()
    torch.manual_seed(5)
    return a, fn_b()


def test_on_input_embodiment_1():
    x, y = setup()
    pre = nn.Conv2d(1, 2, 3, padding=1)
    scnl = SCNLConv2d(2, 2, 3, 2, selector=SoftSelection(2, ()))
    m = OnInput(scnl, pre)
    a, b = same_noise(lambda: m(x, y), lambda: scnl(pre(x), y))
    torch.testing.assert_close(a, b)
    assert m(x).shape == (4, 2, 6, 6)  # inference path through the selector


@pytest.mark.parametrize("how,channels", [("concat", 3), ("add", 2)])
def test_merge_before_embodiment_2(how, channels):
    x, y = setup()
    n1, pre = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 1 if how == "concat" else 2, 1)
    scnl = SCNLConv2d(channels, 4, 3, 2)
    m = MergeBefore(n1, scnl, pre, how=how)
    a, b = same_noise(lambda: m(x, y), lambda: scnl(merge(n1(x), pre(x), how), y))
    torch.testing.assert_close(a, b)
    assert a.shape == (4, 4, 6, 6)


@pytest.mark.parametrize("how,shape", [("concat", (4, 5, 6, 6)), ("add", (4, 2, 6, 6))])
def test_merge_after_embodiment_3(how, shape):
    x, y = setup()
    n1 = nn.Conv2d(1, 2 if how == "add" else 3, 3, padding=1)
    scnl = SCNLConv2d(1, 2, 3, 2)
    m = MergeAfter(n1, scnl, how=how)
    a, b = same_noise(lambda: m(x, y), lambda: merge(n1(x), scnl(x, y), how))
    torch.testing.assert_close(a, b)
    assert a.shape == shape
    a.sum().backward()
    assert scnl.weight.grad.abs().sum() > 0 and n1.weight.grad.abs().sum() > 0


def test_bad_merge_is_named():
    with pytest.raises(ValueError, match="valid: concat, add"):
        merge(torch.ones(1, 2), torch.ones(1, 2), "mul")
    with pytest.raises(ValueError, match="equal shapes"):
        merge(torch.ones(1, 2), torch.ones(1, 3), "add")
    with pytest.raises(ValueError, match="merge"):
        MergeBefore(nn.Identity(), SCNLConv2d(1, 1, 3, 2), how="stack")
