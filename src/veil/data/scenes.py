"""Composite records built from the offline datasets: an object with a sensitive "tag" pasted beside it.

``fashion-tag`` (issue: a secret independent of the task) puts a FashionMNIST item (28x28) on a larger canvas
and pastes a downscaled MNIST digit (the tag) at a random position next to it. The primary label is the
garment class, the secondary label the tag's digit, which says nothing about the garment: content must reach
the engine for the task, and the tag must not. Each record carries the tag's region mask (the pixels of the
tag's box), which region hard selection uses in training.

Everything is deterministic from the seed.
"""

from __future__ import annotations

import numpy as np

#: Canvas side, object side, tag side (pixels).
CANVAS, OBJECT, TAG = 40, 28, 14
#: Tag placements tried per record before the least-overlapping one is taken.
TRIES = 16


def downscale(images: np.ndarray, factor: int) -> np.ndarray:
    """(N, H, W) -> (N, H/factor, W/factor) by block averaging."""
    n, h, w = images.shape
    return images.reshape(n, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


def _bbox(img: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(img > 0.1)
    if len(rows) == 0:
        return 0, 0, 0, 0
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def paste_tags(objects: np.ndarray, tags: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Compose records: each object at a random offset, each tag where it overlaps the object least.

    Args:
        objects: (N, OBJECT, OBJECT) float in [0, 1].
        tags: (N, TAG, TAG) float in [0, 1], one tag per object.
        seed: Decides every position.

    Returns:
        x (N, 1, CANVAS, CANVAS) float32 (pixel-wise max of object and tag) and the tag masks
        (N, 1, CANVAS, CANVAS) uint8: 1 on the tag's box.
    """
    if objects.shape[1:] != (OBJECT, OBJECT) or tags.shape[1:] != (TAG, TAG) or len(objects) != len(tags):
        raise ValueError(f"objects must be (N, {OBJECT}, {OBJECT}) and tags (N, {TAG}, {TAG}), got {objects.shape} and {tags.shape}")
    rng = np.random.default_rng(seed)
    n = len(objects)
    x = np.zeros((n, 1, CANVAS, CANVAS), np.float32)
    mask = np.zeros((n, 1, CANVAS, CANVAS), np.uint8)
    obj_pos = rng.integers(0, CANVAS - OBJECT + 1, size=(n, 2))
    tag_pos = rng.integers(0, CANVAS - TAG + 1, size=(n, TRIES, 2))
    for i in range(n):
        r, c = obj_pos[i]
        x[i, 0, r : r + OBJECT, c : c + OBJECT] = objects[i]
        r0, r1, c0, c1 = _bbox(objects[i])
        r0, r1, c0, c1 = r0 + r, r1 + r, c0 + c, c1 + c
        # overlap (in pixels) of each candidate tag box with the object's bounding box
        tr, tc = tag_pos[i, :, 0], tag_pos[i, :, 1]
        overlap = np.clip(np.minimum(tr + TAG, r1) - np.maximum(tr, r0), 0, None) * np.clip(np.minimum(tc + TAG, c1) - np.maximum(tc, c0), 0, None)
        tr, tc = tag_pos[i, int(np.argmin(overlap))]
        x[i, 0, tr : tr + TAG, tc : tc + TAG] = np.maximum(x[i, 0, tr : tr + TAG, tc : tc + TAG], tags[i])
        mask[i, 0, tr : tr + TAG, tc : tc + TAG] = 1
    return x, mask
