"""Composite records built from the offline datasets: an object with a sensitive "tag" pasted beside it.

``fashion-tag`` (issue: a secret independent of the task) puts a FashionMNIST item (28x28) on a larger canvas
and pastes a downscaled MNIST digit (the tag) at a random position next to it. The primary label is the
garment class, the secondary label the tag's digit, which says nothing about the garment: content must reach
the engine for the task, and the tag must not. Each record carries the tag's region mask (the pixels of the
tag's box), which region hard selection uses in training.

``fashion-overlay`` draws the tag *over* the object instead (:func:`overlay_tags`): at a random position
inside the object's bounding box, printed bright with a dark outline so that it reads on any cloth. There, blanking the tag's box removes garment pixels too.

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


def _canvas(objects: np.ndarray, tags: np.ndarray, seed: int) -> tuple[np.random.Generator, np.ndarray, np.ndarray, np.ndarray]:
    """Check the shapes; the seeded generator, empty records (N, 1, CANVAS, CANVAS) float32 and masks
    (N, 1, CANVAS, CANVAS) uint8, and each object's top-left corner on the canvas (N, 2), drawn first."""
    if objects.shape[1:] != (OBJECT, OBJECT) or tags.shape[1:] != (TAG, TAG) or len(objects) != len(tags):
        raise ValueError(f"objects must be (N, {OBJECT}, {OBJECT}) and tags (N, {TAG}, {TAG}), got {objects.shape} and {tags.shape}")
    rng = np.random.default_rng(seed)
    n = len(objects)
    x = np.zeros((n, 1, CANVAS, CANVAS), np.float32)
    mask = np.zeros((n, 1, CANVAS, CANVAS), np.uint8)
    obj_pos = rng.integers(0, CANVAS - OBJECT + 1, size=(n, 2))
    return rng, x, mask, obj_pos


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
    rng, x, mask, obj_pos = _canvas(objects, tags, seed)
    n = len(objects)
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


def _grow(images: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, H, W): each pixel the max over its 3x3 neighbourhood (a one-pixel dilation)."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    h, w = images.shape[1:]
    return np.max([padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=0)


def overlay_tags(objects: np.ndarray, tags: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Compose records with the tag drawn over the object: each object at a random offset, each tag at a
    random position inside the object's bounding box (centred on it along a side shorter than the tag).

    The tag is printed like a sticker: its ink ``t`` drawn bright over the cloth ``g``, which is darkened
    under the strokes and a one-pixel outline around them (``halo``, the ink grown by a 3x3 max filter):
    ``(1 - halo) g + t``, so the digit is legible on bright and dark cloth alike.

    Args:
        objects: (N, OBJECT, OBJECT) float in [0, 1].
        tags: (N, TAG, TAG) float in [0, 1], one tag per object.
        seed: Decides every position.

    Returns:
        x (N, 1, CANVAS, CANVAS) float32 in [0, 1] and the tag masks (N, 1, CANVAS, CANVAS) uint8: 1 on the
        tag's box.
    """
    rng, x, mask, obj_pos = _canvas(objects, tags, seed)
    n = len(objects)
    u = rng.random((n, 2))  # where inside the object's box, as a fraction of the room there
    halo = _grow(tags)
    for i in range(n):
        r, c = obj_pos[i]
        x[i, 0, r : r + OBJECT, c : c + OBJECT] = objects[i]
        r0, r1, c0, c1 = _bbox(objects[i])
        corner = []
        for lo, hi, frac in ((r0 + r, r1 + r, u[i, 0]), (c0 + c, c1 + c, u[i, 1])):
            room = hi - lo - TAG
            start = lo + int(frac * (room + 1)) if room >= 0 else (lo + hi - TAG) // 2
            corner.append(int(np.clip(start, 0, CANVAS - TAG)))
        tr, tc = corner
        under = x[i, 0, tr : tr + TAG, tc : tc + TAG]
        x[i, 0, tr : tr + TAG, tc : tc + TAG] = (1 - halo[i]) * under + tags[i]
        mask[i, 0, tr : tr + TAG, tc : tc + TAG] = 1
    return x, mask
