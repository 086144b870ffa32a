import numpy as np
import pytest
import torch

from veil.data.readers import load_digits_arrays
from veil.detection.scenes import make_scenes, region_map


@pytest.fixture(scope="module")
def digits():
    x, d = load_digits_arrays()
    return x[:, 0], d


def test_scenes_are_deterministic_from_the_seed(digits):
    a, b, c = (make_scenes(*digits, 20, seed=s) for s in (3, 3, 4))
    assert torch.equal(a.images, b.images) and torch.equal(a.boxes, b.boxes) and torch.equal(a.secondary, b.secondary)
    assert not torch.equal(a.images, c.images)


def test_drawn_digits_lie_inside_their_boxes(digits):
    s = make_scenes(*digits, 40, seed=0)
    inside = region_map(s, 0, len(s)) > 0
    assert s.images.gt(0).any()
    assert torch.all(s.images[~inside] == 0), "ink outside every box"
    assert 1 <= torch.bincount(s.scene, minlength=len(s)).min() and torch.bincount(s.scene).max() <= 5
    assert torch.all(s.boxes[:, :2] >= 0) and torch.all(s.boxes[:, 2:] <= 64) and torch.all(s.boxes[:, 2:] > s.boxes[:, :2])


def test_boxes_are_tight(digits):
    s = make_scenes(*digits, 30, max_objects=1, seed=1)  # one object: its box alone holds its ink
    for j in range(len(s.boxes)):
        x0, y0, x1, y1 = (int(v) for v in s.boxes[j])
        img = s.images[int(s.scene[j]), 0]
        rows, cols = torch.nonzero(img > 0, as_tuple=True)
        assert (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1) == (y0, y1, x0, x1)


def test_primary_classes(digits):
    s = make_scenes(*digits, 30, seed=2)
    side = torch.maximum(s.boxes[:, 2] - s.boxes[:, 0], s.boxes[:, 3] - s.boxes[:, 1])
    assert side[s.labels == 1].min() > side[s.labels == 0].max(), "large objects must be larger than small ones"
    lt5 = make_scenes(*digits, 10, primary="lt5", seed=2)
    assert torch.equal(lt5.labels, (lt5.secondary < 5).long())


def test_region_map_marks_each_objects_class(digits):
    s = make_scenes(*digits, 10, seed=5)
    regions = region_map(s, 0, len(s))
    small = s.boxes[:, 2] - s.boxes[:, 0]
    j = int(torch.argmin(small))  # the smallest object is on top of any overlap
    x0, y0, x1, y1 = (int(v) for v in s.boxes[j])
    assert torch.all(regions[int(s.scene[j]), 0, y0:y1, x0:x1] == int(s.labels[j]) + 1)


def test_bad_input_is_named(digits):
    with pytest.raises(ValueError, match="primary"):
        make_scenes(*digits, 2, primary="colour")
    with pytest.raises(ValueError, match="size"):
        make_scenes(*digits, 2, size=8)
    with pytest.raises(ValueError, match="digits"):
        make_scenes(np.zeros((3, 8)), np.zeros(3), 2)


def test_subset_keeps_objects_with_their_scene(small_task):
    s = small_task.test
    sub = s.subset([3, 1])
    assert torch.equal(sub.images[0], s.images[3])
    assert torch.equal(sub.boxes[sub.scene == 1], s.boxes[s.scene == 1])
