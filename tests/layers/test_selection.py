"""Selection layers: hard (one-hot), soft (values in [0, 1]), adaptive (rows sum to 1), broadcasting."""

from __future__ import annotations

import pytest
import torch

from veil.layers import AdaptiveSelection, SoftSelection, expand_selection, hard_selection


def test_hard_selection_is_one_hot():
    pi = hard_selection(torch.tensor([2, 0, 1]), 3)
    assert torch.equal(pi, torch.eye(3)[[2, 0, 1]])
    with pytest.raises(ValueError, match="labels must lie"):
        hard_selection(torch.tensor([3]), 3)
    with pytest.raises(ValueError, match="int64"):
        hard_selection(torch.tensor([0.0]), 3)


def test_soft_selection_stays_in_unit_interval_and_trains():
    torch.manual_seed(0)
    sel = SoftSelection(4, (1, 5, 5))
    assert torch.allclose(sel(), torch.full((1, 4, 1, 5, 5), 0.25))
    opt = torch.optim.SGD(sel.parameters(), lr=100.0)
    for sign in (1, -1):  # push hard both ways: sigmoid keeps every value in [0, 1]
        opt.zero_grad()
        (sign * sel().sum()).backward()
        opt.step()
        pi = sel()
        assert pi.min() >= 0 and pi.max() <= 1
    assert not torch.allclose(sel(), torch.full_like(sel(), 0.25)), "soft selection did not train"
    with pytest.raises(ValueError, match="init"):
        SoftSelection(2, (), init=1.5)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 16, 16), (20,)])
def test_adaptive_selection_gives_a_distribution_per_record(shape):
    torch.manual_seed(0)
    sel = AdaptiveSelection(3, shape)
    pi = sel(torch.rand(5, *shape))
    assert pi.shape == (5, 3)
    assert (pi >= 0).all() and torch.allclose(pi.sum(1), torch.ones(5))
    pi.sum().backward()


def test_adaptive_selection_learns_an_easy_rule():
    torch.manual_seed(0)
    x = torch.rand(256, 1, 8, 8)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()
    sel = AdaptiveSelection(2, (1, 8, 8))
    opt = torch.optim.Adam(sel.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(sel.logits(x), y).backward()
        opt.step()
    assert (sel.logits(x).argmax(1) == y).float().mean() > 0.9


def test_expand_selection_broadcasting_and_errors():
    assert expand_selection(torch.ones(2, 3), 3, 3).shape == (2, 3, 1, 1, 1)
    assert expand_selection(torch.ones(1, 3, 1, 4, 4), 3, 3).shape == (1, 3, 1, 4, 4)
    with pytest.raises(ValueError, match="shape"):
        expand_selection(torch.ones(2, 4), 3, 3)
    with pytest.raises(ValueError, match="dimensions"):
        expand_selection(torch.ones(2, 3, 4), 3, 3)


def test_best_box_finds_the_highest_scoring_square():
    from veil.layers.selection import best_box

    score = torch.full((3, 1, 10, 12), -1.0)
    score[0, 0, 2:6, 5:9] = 2.0  # a 4x4 block
    score[1, 0, 6:10, 0:4] = 2.0  # in a corner
    score[2, 0, 0, 0] = 5.0  # a single hot pixel among cold ones: a box containing it wins
    box = best_box(score, 4)
    assert box.shape == score.shape and set(box.unique().tolist()) <= {0.0, 1.0}
    assert box.flatten(1).sum(1).tolist() == [16.0, 16.0, 16.0]
    assert torch.equal(box[0, 0, 2:6, 5:9], torch.ones(4, 4)) and torch.equal(box[1, 0, 6:10, 0:4], torch.ones(4, 4))
    assert float(box[2, 0, 0, 0]) == 1.0
    for bad in (0, 11, 2.5):
        with pytest.raises(ValueError, match="box side"):
            best_box(score, bad)
    with pytest.raises(ValueError, match="score"):
        best_box(score[:, 0], 4)
