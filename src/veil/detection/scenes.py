"""Multi-object scenes: 1-5 digits at random positions and scales on one canvas (seed 000 §2.2).

Every object has a box (x0, y0, x1, y1) in pixels (x1, y1 exclusive: the box covers columns x0..x1-1),
a *primary* class (the detection task's category) and a *secondary* label (the secret the engine should
not learn: the digit itself). Primary classes:

* ``size`` (default): ``small`` or ``large``, the scale the object is drawn at (the seed's person/car:
  the task needs where the object is and how big, not which digit it is, so the secret is independent of
  the task: primary-only floor about 0.11);
* ``lt5``: digit < 5 (the secret refines the task: floor about 0.2).

The generator takes any digit source (``digits`` (N, h, w) in [0, 1] and their labels), so tests run on
scikit-learn's 8x8 digits (``digits-scenes``) and benchmarks on MNIST (``mnist-scenes``); both are
deterministic from the seed. Objects overlap little: a position is redrawn up to ``TRIES`` times until its
box overlaps every earlier box by at most ``MAX_OVERLAP`` of the smaller box's area; an object that finds
no place is left out (a scene keeps at least one).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.nn import functional as F

PRIMARY_MODES = ("size", "lt5")
SIZE_NAMES = ("small", "large")
#: Side of the digit's patch (pixels) for each size class, (low, high) inclusive, on a 64-pixel canvas;
#: scaled with the canvas.
SIZE_RANGES = ((12, 17), (24, 32))
TRIES = 30
MAX_OVERLAP = 0.1
#: Pixels below this value are cleared after resizing, so every drawn pixel lies inside its box.
INK = 1e-3


@dataclasses.dataclass
class Scenes:
    """A set of scenes and their objects, flat.

    Attributes:
        images: (N, C, H, W) float32 in [0, 1].
        boxes: (M, 4) float32 (x0, y0, x1, y1) in pixels, all objects of all scenes.
        labels: (M,) int64 primary class in [0, len(class_names)).
        secondary: (M,) int64 secondary label (the digit; -1 where unknown).
        scene: (M,) int64 index of the object's scene, non-decreasing.
        class_names: Names of the primary classes.
    """

    images: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    secondary: torch.Tensor
    scene: torch.Tensor
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        n, m = len(self.images), len(self.boxes)
        if self.images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if not (self.boxes.shape == (m, 4) and len(self.labels) == len(self.secondary) == len(self.scene) == m):
            raise ValueError(f"boxes (M, 4), labels, secondary and scene (M,) must agree, got {tuple(self.boxes.shape)}, {len(self.labels)}, {len(self.secondary)}, {len(self.scene)}")
        if m and (int(self.scene.min()) < 0 or int(self.scene.max()) >= n):
            raise ValueError(f"scene indices must lie in [0, {n - 1}]")
        if m and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
            raise ValueError(f"primary labels must lie in [0, {len(self.class_names) - 1}]")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: np.ndarray | torch.Tensor | list[int]) -> "Scenes":
        """The scenes ``index`` (in that order) with their objects, renumbered."""
        index = torch.as_tensor(np.asarray(index), dtype=torch.long).reshape(-1)
        new = torch.full((len(self.images),), -1, dtype=torch.long)
        new[index] = torch.arange(len(index))
        keep = new[self.scene] >= 0
        order = torch.argsort(new[self.scene[keep]], stable=True)
        pick = keep.nonzero(as_tuple=True)[0][order]
        return Scenes(self.images[index], self.boxes[pick], self.labels[pick], self.secondary[pick], new[self.scene[pick]], self.class_names)

    def targets(self, start: int, stop: int) -> list[dict[str, torch.Tensor]]:
        """Ground truth of scenes ``start..stop-1`` as torchmetrics wants it: ``[{boxes, labels}]``."""
        out = []
        for i in range(start, stop):
            sel = self.scene == i
            out.append({"boxes": self.boxes[sel], "labels": self.labels[sel]})
        return out

    def objects_in(self, start: int, stop: int) -> torch.Tensor:
        """Boolean (M,) selecting the objects of scenes ``start..stop-1``."""
        return (self.scene >= start) & (self.scene < stop)


def region_map(scenes: Scenes, start: int, stop: int) -> torch.Tensor:
    """Per-pixel hard selection of scenes ``start..stop-1``: (B, 1, H, W) int64, 0 on the background and
    ``c + 1`` on the box of every object of primary class c (seed 000 §2.2: pi_c = 1 on the pixels of the
    objects of class c). Where boxes overlap, the smaller object (drawn on top, usually) wins."""
    _, _, h, w = scenes.images.shape
    out = torch.zeros(stop - start, 1, h, w, dtype=torch.long)
    sel = scenes.objects_in(start, stop).nonzero(as_tuple=True)[0]
    area = (scenes.boxes[sel, 2] - scenes.boxes[sel, 0]) * (scenes.boxes[sel, 3] - scenes.boxes[sel, 1])
    for j in sel[torch.argsort(area, descending=True)].tolist():  # large first, so small ones stay on top
        x0, y0, x1, y1 = (int(round(float(v))) for v in scenes.boxes[j])
        out[int(scenes.scene[j]) - start, 0, max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)] = int(scenes.labels[j]) + 1
    return out


def make_scenes(
    digits: np.ndarray,
    digit_labels: np.ndarray,
    count: int,
    *,
    size: int = 64,
    max_objects: int = 5,
    primary: str = "size",
    seed: int = 0,
) -> Scenes:
    """Compose ``count`` scenes of ``size`` x ``size`` pixels from a digit source.

    Args:
        digits: (N, h, w) float in [0, 1] (28x28 MNIST, 8x8 scikit-learn digits, ...).
        digit_labels: (N,) int digit of each image.
        count: Scenes to compose.
        size: Canvas side (>= 32).
        max_objects: Most objects per scene (1..max_objects, uniform).
        primary: ``size`` (small/large) or ``lt5`` (digit < 5): the primary class.
        seed: Decides every choice (digit, size class, scale, position).
    """
    digits = np.asarray(digits, dtype=np.float32)
    digit_labels = np.asarray(digit_labels)
    if digits.ndim != 3 or len(digits) != len(digit_labels) or len(digits) == 0:
        raise ValueError(f"digits must be (N, h, w) with one label each, got {digits.shape} and {digit_labels.shape}")
    if primary not in PRIMARY_MODES:
        raise ValueError(f"unknown primary class mode {primary!r}; valid: {', '.join(PRIMARY_MODES)}")
    if not (isinstance(size, int) and 32 <= size <= 512):
        raise ValueError(f"size must be an integer in [32, 512], got {size!r}")
    if not (isinstance(max_objects, int) and 1 <= max_objects <= 20):
        raise ValueError(f"max_objects must be an integer in [1, 20], got {max_objects!r}")
    rng = np.random.default_rng(seed)
    ranges = [(max(4, lo * size // 64), max(5, hi * size // 64)) for lo, hi in SIZE_RANGES]
    images = np.zeros((count, 1, size, size), np.float32)
    boxes, labels, secondary, scene = [], [], [], []
    src = torch.from_numpy(digits)[:, None]
    for i in range(count):
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            k = int(rng.integers(len(digits)))
            cls = int(rng.integers(2))
            side = int(rng.integers(ranges[cls][0], ranges[cls][1] + 1))
            patch = F.interpolate(src[k : k + 1], size=(side, side), mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()
            patch = np.where(patch > INK, np.clip(patch, 0, 1), 0).astype(np.float32)
            rows, cols = np.nonzero(patch)
            if len(rows) == 0:
                continue
            r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            for _ in range(TRIES):
                top, left = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
                box = (left + c0, top + r0, left + c1, top + r1)
                if all(_overlap(box, b) <= MAX_OVERLAP for b in placed):
                    break
            else:
                continue
            placed.append(box)
            images[i, 0, top : top + side, left : left + side] = np.maximum(images[i, 0, top : top + side, left : left + side], patch)
            boxes.append(box)
            digit = int(digit_labels[k])
            labels.append(cls if primary == "size" else int(digit < 5))
            secondary.append(digit)
            scene.append(i)
    names = SIZE_NAMES if primary == "size" else ("digit>=5", "digit<5")
    return Scenes(
        torch.from_numpy(images), torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.long),
        torch.tensor(secondary, dtype=torch.long), torch.tensor(scene, dtype=torch.long), names,
    )


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Intersection area over the smaller box's area."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(1, small)
