"""SCNLs without kernels of their own: :class:`SCNLAdditive` (per-class gain, offset and scale tensors of
the record's shape) and :class:`ConditionalStochastic` (any module, made conditional and stochastic)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from veil.layers.distributions import Distribution
from veil.layers.scnl_base import SCNLBase
from veil.layers.selection import expand_selection


class SCNLAdditive(SCNLBase):
    """Additive SCNL: per-class learnt gain, offset and scale tensors of the record's own shape.

    ``raw_mu_c = gain_c ⊙ x + offset_c`` and ``raw_scale_c = scale_c`` (input-independent), so
    ``h = bound·tanh(sum_c pi_c ⊙ raw_mu_c / bound) + softplus(sum_c pi_c ⊙ scale_c) ⊙ eps``.
    ``offset_c`` is a class template; ``gain_c`` is the content channel (the privacy knob of the defense
    drives it toward 0, leaving an output that depends on x only through the selection pi(x)).
    Elementwise, so the input and output incarnations coincide.

    Shapes: x (B, *shape) -> h (B, *shape). Discrete distributions (one raw map) use ``raw_mu_c`` only.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        num_classes: int,
        distribution: str | Distribution = "gaussian",
        *,
        incarnation: str = "input",
        selector: nn.Module | None = None,
        init_gain: float = 1.0,
        init_scale: float = 0.5,
        **dist_options: float,
    ) -> None:
        super().__init__(num_classes, distribution, incarnation=incarnation, selector=selector, **dist_options)
        if not shape or any(int(s) < 1 for s in shape):
            raise ValueError(f"shape must be a non-empty tuple of positive sizes, got {shape!r}")
        if not init_scale > self.distribution.min_scale:
            raise ValueError(f"init_scale must exceed min_scale {self.distribution.min_scale}, got {init_scale!r}")
        self.shape = tuple(int(s) for s in shape)
        c = self.num_classes
        self.gain = nn.Parameter(torch.full((c, *self.shape), float(init_gain)))
        self.offset = nn.Parameter(0.01 * torch.randn(c, *self.shape))
        # softplus^-1(init_scale - min_scale), the same for every class and element
        inv = math.log(math.expm1(init_scale - self.distribution.min_scale))
        self.scale = nn.Parameter(torch.full((c, self.num_params - 1, *self.shape), inv)) if self.num_params > 1 else None

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")

    def _spatial(self, x):
        return tuple(x.shape[2:]) if len(self.shape) == 3 else self.shape

    def _mask_to_pi(self, mask):
        return mask.unsqueeze(2) if len(self.shape) == 3 else mask

    def _raw_hard(self, x, labels):
        self._check(x)
        loc = self.gain[labels] * x + self.offset[labels]  # (B, *shape)
        if self.scale is None:
            return loc.unsqueeze(1)
        return torch.cat([loc.unsqueeze(1), self.scale[labels]], 1)  # (B, P, *shape)

    def _raw_slots(self, x, slots, pi):
        self._check(x)
        pi = pi.unsqueeze(2) if len(self.shape) == 3 else pi  # (B, K, 1|F, *S)
        loc = (pi * (self.gain[slots] * x.unsqueeze(1) + self.offset[slots])).sum(1)  # (B, *shape)
        if self.scale is None:
            return loc.unsqueeze(1)
        return torch.cat([loc.unsqueeze(1), (pi.unsqueeze(2) * self.scale[slots]).sum(1)], 1)

    def _raw_all(self, x):
        self._check(x)
        loc = self.gain.unsqueeze(0) * x.unsqueeze(1) + self.offset.unsqueeze(0)  # (B, C, *shape)
        if self.scale is None:
            return loc.unsqueeze(2)
        return torch.cat([loc.unsqueeze(2), self.scale.unsqueeze(0).expand(x.shape[0], *self.scale.shape)], 2)


class ConditionalStochastic(SCNLBase):
    """Makes any module conditional and stochastic (GRU/LSTM, a transformer block, an MLP...).

    ``factory()`` builds one copy per class; a copy's output (its first element if it returns a tuple,
    as ``nn.GRU`` does) holds the P raw parameter maps side by side along ``param_dim`` (so size that
    dimension P * F: e.g. ``nn.GRU(d, 2 * hidden)`` for a Gaussian). Hard selection runs each class's
    copy on its own records only (total work flat in C). The output incarnation (default) equals hard
    selection with one-hot pi exactly; the input one (``copy_c(pi_c ⊙ x)``) does so only for modules
    with ``f(0) = 0``.

    Shapes: x (B, ...) -> h = the copy's output with ``param_dim`` divided by P.
    """

    def __init__(
        self,
        factory: Callable[[], nn.Module],
        num_classes: int,
        distribution: str | Distribution = "gaussian",
        *,
        incarnation: str = "output",
        selector: nn.Module | None = None,
        param_dim: int = -1,
        **dist_options: float,
    ) -> None:
        super().__init__(num_classes, distribution, incarnation=incarnation, selector=selector, **dist_options)
        self.branches = nn.ModuleList([factory() for _ in range(self.num_classes)])
        self.param_dim = int(param_dim)

    def _run(self, c: int, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[c](x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        d = self.param_dim % out.dim()
        if d == 0:
            raise ValueError("param_dim cannot be the batch dimension")
        n = out.shape[d]
        if n % self.num_params:
            raise ValueError(f"module output dim {d} has size {n}, not a multiple of the {self.num_params} parameters of {self.distribution.name}")
        return out.unflatten(d, (self.num_params, n // self.num_params)).movedim(d, 1)  # (B, P, ...)

    def _raw_hard(self, x, labels):
        parts, order = [], []
        for c in labels.unique().tolist():  # only the classes present, each on its own records
            idx = (labels == c).nonzero(as_tuple=True)[0]
            parts.append(self._run(c, x[idx]))
            order.append(idx)
        out = torch.cat(parts)
        return out[torch.argsort(torch.cat(order))]

    def _raw_all(self, x):
        return torch.stack([self._run(c, x) for c in range(self.num_classes)], 1)  # (B, C, P, ...)

    def _raw_input(self, x, pi):
        if self.incarnation == "output":
            return self._raw_output(x, pi)
        pi_e = expand_selection(pi, self.num_classes, x.dim() - 1)
        return sum(self._run(c, x * pi_e[:, c]) for c in range(self.num_classes))
