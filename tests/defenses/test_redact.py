"""Redaction: the located (or, for the oracle, the true) region is replaced and nothing else changes."""

from __future__ import annotations

import pytest
import torch

from veil.data import load_task
from veil.defenses import create_defense
from veil.defenses.redact import grow_region, inpaint, redact
from veil.training.loop import OnDevice


def box_mask(n, top=2, left=3, side=3, hw=(8, 8)):
    m = torch.zeros(n, 1, *hw)
    m[:, :, top : top + side, left : left + side] = 1
    return m


def test_the_oracle_blanks_exactly_the_true_region_and_nothing_with_an_empty_mask():
    d = create_defense("redact-oracle", input_shape=(1, 8, 8), num_classes=2)
    x = torch.rand(4, 1, 8, 8) + 0.1  # no zero pixels of its own
    m = box_mask(4)
    out = d.encode(x, mask=m)
    assert torch.equal(out[m.bool()], torch.zeros(int(m.sum())))
    assert torch.equal(out[~m.bool()], x[~m.bool()])
    assert torch.equal(d.encode(x, mask=torch.zeros_like(m)), x)
    with pytest.raises(ValueError, match="true region mask"):
        d.encode(x)
    grown = create_defense("redact-oracle", input_shape=(1, 8, 8), num_classes=2, grow=1).encode(x, mask=m)
    assert int((grown == 0).sum()) == 5 * 5 * 4  # a 3x3 box grown by one pixel on every side


def test_fills_touch_only_the_region():
    x, m = torch.rand(2, 1, 8, 8), box_mask(2)
    for fill in ("zero", "noise", "blur", "inpaint"):
        out = redact(x, m, fill)
        assert torch.equal(out[~m.bool()], x[~m.bool()]), fill
        assert not torch.equal(out[m.bool()], x[m.bool()]), fill
    with pytest.raises(ValueError, match="fill"):
        redact(x, m, "paint")
    assert torch.equal(grow_region(m, 0), m)


def test_inpaint_fills_from_the_open_pixels_around_and_never_from_the_closed_ones():
    m = box_mask(2)
    # a constant record is filled with that constant, even deep inside a closed region
    flat = torch.full((2, 1, 8, 8), 0.7)
    assert torch.allclose(redact(flat, m, "inpaint"), flat)
    # what is drawn inside the closed region (strokes over the content) does not reach the message
    x = torch.rand(2, 1, 8, 8)
    drawn = x.clone()
    drawn[m.bool()] = 5.0
    assert torch.equal(redact(x, m, "inpaint"), redact(drawn, m, "inpaint"))
    # a closed pixel takes the mean of its open 3x3 neighbours where it has some
    ramp = torch.arange(64.0).view(1, 1, 8, 8)
    one = torch.zeros(1, 1, 8, 8)
    one[0, 0, 4, 4] = 1
    assert float(redact(ramp, one, "inpaint")[0, 0, 4, 4]) == pytest.approx(float(ramp[0, 0, 3:6, 3:6].sum() - 36) / 8)
    # a pixel farther from any open pixel than the largest window takes its record's open mean; an all-closed
    # record becomes 0
    big = torch.ones(1, 1, 80, 80)
    big[0, 0, 0, 0] = 0
    field = torch.rand(1, 1, 80, 80)
    assert float(inpaint(field, big)[0, 0, 79, 79]) == pytest.approx(float(field[0, 0, 0, 0]))
    assert torch.equal(inpaint(field, torch.ones_like(field)), torch.zeros_like(field))


def test_redact_blanks_what_its_locator_finds_and_the_locator_learns_the_masks():
    torch.manual_seed(0)
    task = load_task("digits-tag", seed=0)
    d = create_defense("redact", input_shape=task.input_shape, num_classes=task.num_primary, locator_width=8, locator_epochs=15)
    d.setup(None, OnDevice(task.train.loader(64, shuffle=True, seed=1, with_mask=True), torch.device("cpu")))
    d.eval()
    x, mask = task.test.x[:200], task.test.mask[:200].float()
    _, region = d.located(x)
    out = d.encode(x)
    # exactly the located region is replaced (zeros), the rest is the record
    assert torch.equal(out[region.bool()], torch.zeros(int(region.sum())))
    assert torch.equal(out[~region.bool()], x[~region.bool()])
    # and after its setup the locator covers most of the true tag
    assert float((region * mask).sum() / mask.sum()) > 0.7
    boxed = create_defense("redact", input_shape=task.input_shape, num_classes=task.num_primary, box=6)
    _, region = boxed.located(x[:5])
    assert torch.equal(region.sum((1, 2, 3)), torch.full((5,), 36.0))  # one whole 6x6 box per record
