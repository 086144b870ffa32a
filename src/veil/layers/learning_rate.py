"""Per-module learning rates under one optimiser (:func:`scale_learning_rate`)."""

from __future__ import annotations

import torch
from torch import nn


class _Scale(nn.Module):
    """Parametrisation ``p = factor * stored``."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored * self.factor

    def right_inverse(self, p: torch.Tensor) -> torch.Tensor:
        return p / self.factor


def scale_learning_rate(module: nn.Module, factor: float) -> nn.Module:
    """Make an Adam-type optimiser move every parameter of ``module`` ``factor`` times faster.

    Each parameter p is stored as ``p / factor`` and used as ``factor * stored``
    (``torch.nn.utils.parametrize``); Adam's step is invariant to the gradient's scale, so the
    effective step in p is ``factor * lr``. veil's one training loop has one learning rate for the
    server model and the defense; this lets the small client-side layers (elementwise templates,
    a tiny selector) learn as fast as they need within a few epochs. Values are unchanged.
    """
    from torch.nn.utils import parametrize

    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor!r}")
    if factor == 1:
        return module
    for sub in list(module.modules()):
        for name, p in list(sub.named_parameters(recurse=False)):
            parametrize.register_parametrization(sub, name, _Scale(factor))
    return module
