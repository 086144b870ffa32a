"""Selection layers: how the C per-class kernel sets of an SCNL are combined (seed 000 §2.1.1, §2.2.1, §3.1.2).

A selection is a tensor ``pi`` of shape ``(B or 1, C)`` (one weight per record and class) or
``(B or 1, C, *S)`` (one weight per class and pixel/feature, ``S`` broadcastable against the tensor it
multiplies). Three kinds:

* **hard** (training, label known): ``pi_c = 1`` for the record's label, else 0 -- :func:`hard_selection`;
  per-pixel region masks ``(B, C, H, W)`` for detection are hard selections too.
* **soft** (seed §2.1.1): C trainable tensors ``pi_c = sigmoid(w_c)`` in [0, 1], the same for every input --
  :class:`SoftSelection`.
* **adaptive** (beyond the seeds): ``pi(x) = softmax(g(x))`` from a tiny client-side classifier g --
  :class:`AdaptiveSelection`. A fixed pi is the same for every input; pi(x) can follow the input's class.

All of it runs on the client.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F


def hard_selection(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot selection from labels: (B,) int64 -> (B, C) float with ``pi[b, labels[b]] = 1``."""
    check_labels(labels, num_classes)
    return F.one_hot(labels.long(), num_classes).float()


def check_labels(labels: torch.Tensor, num_classes: int, batch: int | None = None) -> None:
    """Raise ``ValueError`` unless ``labels`` is a (B,) integer tensor with values in [0, C)."""
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an int64 tensor of class indices, got {getattr(labels, 'dtype', type(labels))}")
    if labels.dim() != 1 or (batch is not None and labels.shape[0] != batch):
        raise ValueError(f"labels must have shape ({batch if batch is not None else 'B'},), got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got range [{int(labels.min())}, {int(labels.max())}]")


def check_mask(mask: torch.Tensor, num_classes: int, batch: int, spatial: tuple[int, ...]) -> torch.Tensor:
    """Validate a region mask (B, C, *spatial) of 0/1 values; return it as float."""
    want = (batch, num_classes, *spatial)
    if tuple(mask.shape) != want:
        raise ValueError(f"region mask must have shape {want} (B, C, *spatial of the input), got {tuple(mask.shape)}")
    m = mask.float()
    if not torch.all((m == 0) | (m == 1)):
        raise ValueError("region mask values must be 0 or 1")
    return m


def mask_slots(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The classes present in each record of a region mask (B, C, *S) and their masks.

    Returns slots (B, K) int64, K = the most classes present in one record (at least 1; records with
    fewer are padded with absent classes, whose mask is 0 and so contributes nothing), and their masks
    (B, K, *S). Per-pixel hard selection then costs K kernel sets per record, flat in C.
    """
    present = mask.flatten(2).amax(2) > 0  # (B, C)
    k = max(1, int(present.sum(1).max())) if mask.shape[0] else 1
    slots = torch.sort(present.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
    pi = mask.gather(1, slots.reshape(*slots.shape, *([1] * (mask.dim() - 2))).expand(-1, -1, *mask.shape[2:]))
    return slots, pi


def check_region_map(regions: torch.Tensor, num_classes: int, batch: int, spatial: tuple[int, ...]) -> torch.Tensor:
    """Validate a region map (B, *spatial) of class indices in [0, C); return it as int64."""
    want = (batch, *spatial)
    if tuple(regions.shape) != want:
        raise ValueError(f"region map must have shape {want} (B, *spatial of the input), got {tuple(regions.shape)}")
    r = regions.long()
    if r.numel() and (int(r.min()) < 0 or int(r.max()) >= num_classes):
        raise ValueError(f"region map values must lie in [0, {num_classes - 1}], got range [{int(r.min())}, {int(r.max())}]")
    return r


def region_slots(regions: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mask_slots` for a region map (B, *S) of class indices: the work is O(K * S) per record,
    never O(C * S) (no one-hot mask of all C classes is built)."""
    b = regions.shape[0]
    present = torch.zeros(b, num_classes, dtype=torch.int8, device=regions.device)
    present.scatter_(1, regions.reshape(b, -1), 1)
    k = max(1, int(present.sum(1).max())) if b else 1
    slots = torch.sort(present, dim=1, descending=True, stable=True).indices[:, :k]
    pi = regions.unsqueeze(1) == slots.reshape(b, k, *([1] * (regions.dim() - 1)))  # (B, K, *S)
    return slots, pi


class SoftSelection(nn.Module):
    """C trainable selection tensors ``pi_c = sigmoid(w_c)`` in [0, 1] (seed §2.1.1 "soft selection layer").

    Args:
        num_classes: C.
        shape: Per-class tensor shape ``S`` (e.g. the input's (C_in, H, W) for the input incarnation, the
            output's for the output incarnation, or ``()`` for one scalar per class).
        init: Initial value of every pi (default 1/C: an even mixture).

    ``forward(x)`` -> (1, C, *S), independent of x (broadcasts over the batch).
    """

    def __init__(self, num_classes: int, shape: tuple[int, ...] = (), *, init: float | None = None) -> None:
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        init = 1.0 / num_classes if init is None else float(init)
        if not 0 < init < 1:
            raise ValueError(f"init must lie in (0, 1), got {init!r}")
        self.num_classes = int(num_classes)
        self.shape = tuple(int(s) for s in shape)
        self.logits = nn.Parameter(torch.full((self.num_classes, *self.shape), math.log(init / (1 - init))))

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.logits).unsqueeze(0)  # (1, C, *S)


class AdaptiveSelection(nn.Module):
    """Input-adaptive selection ``pi(x) = softmax(g(x))`` with g a tiny classifier run on the client.

    For images (C_in, H, W): conv 5x5 (stride 2 when H, W >= 16) -> conv 3x3 stride 2 -> linear -> linear.
    For flat features (F,): a two-layer perceptron. ``width`` sets its cost (client FLOPs).

    ``forward(x)`` (B, *input_shape) -> (B, C) with rows summing to 1; ``logits(x)`` -> (B, C).
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], *, width: int = 8, hidden: int = 32) -> None:
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        if int(width) < 1 or int(hidden) < 1:
            raise ValueError(f"width and hidden must be >= 1, got {width!r}, {hidden!r}")
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(s) for s in input_shape)
        if len(self.input_shape) == 3:
            c, h, w = self.input_shape
            s1 = 2 if min(h, w) >= 16 else 1
            h1, w1 = (h - 1) // s1 + 1, (w - 1) // s1 + 1  # 5x5, padding 2
            h2, w2 = (h1 - 1) // 2 + 1, (w1 - 1) // 2 + 1  # 3x3, padding 1, stride 2
            self.net = nn.Sequential(
                nn.Conv2d(c, width, 5, stride=s1, padding=2), nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                nn.Flatten(), nn.Linear(2 * width * h2 * w2, hidden), nn.ReLU(),
                nn.Linear(hidden, self.num_classes),
            )
        elif len(self.input_shape) == 1:
            self.net = nn.Sequential(nn.Linear(self.input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, self.num_classes))
        else:
            raise ValueError(f"input_shape must be (C, H, W) or (F,), got {input_shape!r}")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


class PixelSelection(nn.Module):
    """Per-pixel region selector: (B, C, H, W) -> region logits (B, R, H, W).

    Two stride-2 convolutions and a dilated one see about 30 pixels of context at a quarter of the
    resolution (a region is recognised from its surroundings, not from one pixel, and the cost stays near
    1-2% of a small server CNN); the logits are upsampled bilinearly to the record's size. Used by the
    region-selection defenses (``scnl-region``, ``scnl-detect``).
    """

    def __init__(self, in_channels: int, regions: int, width: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(width, regions, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.net(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def check_region_mask(mask: Any, batch: int, hw: tuple[int, ...]) -> torch.Tensor:
    """Validate a (B, 1, H, W) 0/1 region mask (1 on the sensitive region); return it as float."""
    want = (batch, 1, *hw)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != want:
        raise ValueError(f"mask must be a tensor of shape {want} (1 on the sensitive region), got {tuple(getattr(mask, 'shape', ()))}")
    m = mask.float()
    if not torch.all((m == 0) | (m == 1)):
        raise ValueError("mask values must be 0 or 1")
    return m


def train_pixel_selector(selector: nn.Module, batches: Any, *, epochs: int, lr: float, weight: torch.Tensor, check: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    """Train a per-pixel selector alone on region maps: ``epochs`` passes over ``batches`` (each ends with
    the (B, 1, H, W) region map; ``check(map, batch)`` validates it and returns what the cross-entropy
    compares against, (B, 1, H, W) integer-valued), per-pixel cross-entropy weighted by region (``weight``),
    Adam at ``lr``. Used by the region defenses' ``setup``: the selector is a small fraction of the
    server's cost, so many passes over the masks cost seconds, and a selector that starts out finding
    the regions lets the joint stage train the rest on the right selection."""
    opt = torch.optim.Adam(selector.parameters(), lr=lr)
    for _ in range(epochs):
        for batch in batches:
            if len(batch) < 2 or batch[-1] is None or batch[-1].dim() != 4:
                raise ValueError("a region selector's setup needs batches that end with the region map (B, 1, H, W)")
            x = batch[0]
            target = check(batch[-1], len(x))[:, 0].long()
            loss = F.cross_entropy(selector(x), target, weight=weight.to(x.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def best_box(score: torch.Tensor, side: int) -> torch.Tensor:
    """The square box of ``side`` pixels with the largest summed ``score``, one per record.

    Args:
        score: (B, 1, H, W) per-pixel score (e.g. a selector's log-odds for the sensitive region).
        side: The box's side in pixels, 1 <= side <= min(H, W).

    Returns:
        (B, 1, H, W) float mask, 1 inside each record's best box. The sums come from an integral image
        (a few additions per position), so the search costs next to nothing beside the selector.
    """
    if score.dim() != 4 or score.shape[1] != 1:
        raise ValueError(f"score must have shape (B, 1, H, W), got {tuple(score.shape)}")
    b, _, h, w = score.shape
    if not (isinstance(side, int) and 1 <= side <= min(h, w)):
        raise ValueError(f"box side must be an integer in [1, {min(h, w)}], got {side!r}")
    integral = F.pad(score[:, 0].cumsum(1).cumsum(2), (1, 0, 1, 0))  # (B, H+1, W+1)
    sums = integral[:, side:, side:] - integral[:, :-side, side:] - integral[:, side:, :-side] + integral[:, :-side, :-side]
    best = sums.flatten(1).argmax(1)  # (B,) over the (H-side+1) x (W-side+1) positions
    top, left = best // (w - side + 1), best % (w - side + 1)
    rows = torch.arange(h, device=score.device).view(1, h)
    cols = torch.arange(w, device=score.device).view(1, w)
    in_rows = (rows >= top.view(b, 1)) & (rows < top.view(b, 1) + side)  # (B, H)
    in_cols = (cols >= left.view(b, 1)) & (cols < left.view(b, 1) + side)  # (B, W)
    return (in_rows.unsqueeze(2) & in_cols.unsqueeze(1)).unsqueeze(1).to(score.dtype)


def expand_selection(pi: torch.Tensor, num_classes: int, ndim: int) -> torch.Tensor:
    """Reshape a selection so it broadcasts against a per-class tensor (B, C, *T) with ``len(T) = ndim``.

    (b, C) -> (b, C, 1, ..., 1); (b, C, *S) with ``len(S) == ndim`` is returned as is.
    """
    if pi.dim() < 2 or pi.shape[1] != num_classes:
        raise ValueError(f"selection must have shape (B or 1, {num_classes}, ...), got {tuple(pi.shape)}")
    if pi.dim() == 2:
        return pi.reshape(*pi.shape, *([1] * ndim))
    if pi.dim() != 2 + ndim:
        raise ValueError(f"selection must have 2 or {2 + ndim} dimensions here, got shape {tuple(pi.shape)}")
    return pi
