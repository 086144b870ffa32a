"""Placements of an SCNL in a network (seed 000 §5, "embodiments") as plain module compositions.

With a network N = N2 ∘ N1, regular layers L = L_n ∘ ... ∘ L_0 and a stochastic conditional layer S_L:

1. :class:`OnInput`     x -> L_0..L_n -> S_L -> (N)                           (embodiment 1)
2. :class:`MergeBefore` merge(N1(x), L(x)) -> S_L -> (N2)                    (embodiment 2)
3. :class:`MergeAfter`  merge(N1(x), S_L(L(x))) -> (N2)                      (embodiment 3)

``merge`` is ``"concat"`` (along channels/features, dim 1) or ``"add"``. Every composition is called as
``module(x, labels=None, pi=None)`` and passes the selection through to S_L unchanged, so hard selection,
region masks and soft/adaptive selection work in any placement. The part after the composition (N or N2)
is the server's model and is not included here.
"""

from __future__ import annotations

import torch
from torch import nn

from veil.layers.scnl_base import SCNLBase

MERGES = ("concat", "add")


def merge(a: torch.Tensor, b: torch.Tensor, how: str) -> torch.Tensor:
    """Merge two branch outputs: ``concat`` along dim 1 or elementwise ``add`` (shapes must agree)."""
    if how == "concat":
        if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
            raise ValueError(f"concat needs equal batch and trailing dims, got {tuple(a.shape)} and {tuple(b.shape)}")
        return torch.cat([a, b], 1)
    if how == "add":
        if a.shape != b.shape:
            raise ValueError(f"add needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
        return a + b
    raise ValueError(f"unknown merge {how!r}; valid: {', '.join(MERGES)}")


def _identity_if_none(m: nn.Module | None) -> nn.Module:
    return nn.Identity() if m is None else m


class OnInput(nn.Module):
    """Embodiment 1: ``S_L(L(x))`` with regular layers ``L`` before the SCNL (``L`` may be empty)."""

    def __init__(self, scnl: SCNLBase, pre: nn.Module | None = None) -> None:
        super().__init__()
        self.pre = _identity_if_none(pre)
        self.scnl = scnl

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, *, pi: torch.Tensor | None = None) -> torch.Tensor:
        return self.scnl(self.pre(x), labels, pi=pi)


class _Merge(nn.Module):
    """What the merging embodiments hold: the network ``n1``, the SCNL, the ``pre`` part and the merge."""

    def __init__(self, n1: nn.Module, scnl: SCNLBase, pre: nn.Module | None = None, *, how: str = "concat") -> None:
        super().__init__()
        if how not in MERGES:
            raise ValueError(f"unknown merge {how!r}; valid: {', '.join(MERGES)}")
        self.n1, self.pre, self.scnl, self.how = n1, _identity_if_none(pre), scnl, how


class MergeBefore(_Merge):
    """Embodiment 2: ``S_L(merge(N1(x), L(x)))``; the result goes on to N2."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, *, pi: torch.Tensor | None = None) -> torch.Tensor:
        return self.scnl(merge(self.n1(x), self.pre(x), self.how), labels, pi=pi)


class MergeAfter(_Merge):
    """Embodiment 3: ``merge(N1(x), S_L(L(x)))``; the result goes on to N2."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, *, pi: torch.Tensor | None = None) -> torch.Tensor:
        return merge(self.n1(x), self.scnl(self.pre(x), labels, pi=pi), self.how)
