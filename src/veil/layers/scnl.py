"""Stochastic conditional noise layers (SCNL), seed 000/001 §1 and §3.

Per class c, trainable kernels give the raw parameters of a distribution; the layer outputs a
reparameterised sample, never the parameters themselves (Eq. 5-7 of seed 000)::

    mu_c    = x * k_mu_c                      (Eq. 5)
    sigma_c = x * k_sigma_c                   (Eq. 6; made positive by softplus)
    h_c     = mu_c + sigma_c * eps            (Eq. 7; eps ~ N(0, 1), or Laplace/relaxed discrete)

Incarnations: :class:`SCNLConv2d` (§1.1.3), :class:`SCNLLinear` (§1.2.3), :class:`SCNLAdditive`
(per-class learnt gain, offset (template) and scale tensors) and :class:`ConditionalStochastic`, which
makes any module (GRU/LSTM, a transformer block, ...) conditional and stochastic.

Selection (how the C kernel sets are combined; see :mod:`veil.layers.selection`) is chosen by the call:

* ``layer(x, labels)`` with labels (B,) int64 -- **hard selection**: only the selected class's kernels are
  computed for each record (gathered weights + a grouped convolution / batched matmul), so the cost stays
  flat as C grows;
* ``layer(x, mask)`` with a (B, C, *spatial) 0/1 region mask -- per-pixel hard selection (detection):
  pixel p of the input goes through class c's kernels where ``mask[c, p] = 1``;
* ``layer(x)`` -- the layer's own selector (soft or adaptive), the inference path;
* ``layer(x, pi=...)`` -- an explicit selection tensor.

With a selection pi, the two incarnations of seed §2.1.1 are::

    incarnation="input":   raw = sum_c k_c * (pi_c ⊙ x) + pi_c ⊙ b_c     (pi multiplies the input)
    incarnation="output":  raw = sum_c pi_c ⊙ (k_c * x + b_c)           (pi multiplies the outputs)

and the distribution's constraint (softplus scale, bounded mean) is applied to the mixed raw maps, so that
hard selection equals either formula with ``pi = one_hot(label)`` (the oracle test checks this). The
bias is weighted by pi so that the identity holds exactly.

Everything here runs on the client. The privacy knob lives in the defense (:mod:`veil.defenses.scnl`):
it scales :meth:`SCNLBase.kl`, the VIB charge of the information the layer lets through.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from veil.layers.distributions import Distribution, create_distribution
from veil.layers.selection import check_labels, check_mask, expand_selection

INCARNATIONS = ("input", "output")


class SCNLBase(nn.Module):
    """Shared selection logic; subclasses give the per-class raw parameter maps.

    Subclasses implement ``_raw_hard(x, labels) -> (B, P, *out)``, ``_raw_all(x) -> (B, C, P, *out)`` and,
    where the input incarnation differs from the output one, ``_raw_input(x, pi) -> (B, P, *out)``.
    ``_spatial(x)`` names the input dims a region mask covers.
    """

    def __init__(
        self,
        num_classes: int,
        distribution: str | Distribution = "gaussian",
        *,
        incarnation: str = "input",
        selector: nn.Module | None = None,
        **dist_options: float,
    ) -> None:
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        if incarnation not in INCARNATIONS:
            raise ValueError(f"unknown incarnation {incarnation!r}; valid: {', '.join(INCARNATIONS)}")
        self.num_classes = int(num_classes)
        self.distribution = distribution if isinstance(distribution, Distribution) else create_distribution(distribution, **dist_options)
        self.num_params = self.distribution.num_params
        self.incarnation = incarnation
        self.selector = selector

    # ----------------------------------------------------------------------------- public
    def raw(self, x: torch.Tensor, labels: torch.Tensor | None = None, *, pi: torch.Tensor | None = None) -> torch.Tensor:
        """Raw (unconstrained) distribution parameters (B, P, *out) under the given selection."""
        if labels is not None and pi is not None:
            raise ValueError("give either labels (hard selection) or pi (a selection tensor), not both")
        if labels is not None and labels.dim() == 1:
            check_labels(labels, self.num_classes, x.shape[0])
            return self._raw_hard(x, labels.long())
        if labels is not None:  # region mask: per-pixel hard selection, pixels pass through their class's kernels
            mask = check_mask(labels, self.num_classes, x.shape[0], self._spatial(x))
            return self._raw_input(x, self._mask_to_pi(mask))
        if pi is None:
            if self.selector is None:
                raise ValueError("no labels, no pi and no selector: give labels (training) or attach a selector (inference)")
            pi = self.selector(x)
        return self._raw_input(x, pi) if self.incarnation == "input" else self._raw_output(x, pi)

    def params(self, x: torch.Tensor, labels: torch.Tensor | None = None, *, pi: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Constrained distribution parameters, each (B, *out) (e.g. (mu, sigma))."""
        return self.distribution.constrain(self.raw(x, labels, pi=pi))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, *, pi: torch.Tensor | None = None) -> torch.Tensor:
        """A reparameterised sample h (B, *out); stochastic in train and eval mode alike."""
        return self.distribution.rsample(self.params(x, labels, pi=pi))

    def kl(self, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """VIB charge KL(q(h|x) || prior) per output element (B, *out) for ``params`` from :meth:`params`."""
        return self.distribution.kl(params)

    # ----------------------------------------------------------------------------- selection formulas
    def _raw_output(self, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        """Output incarnation: raw = sum_c pi_c ⊙ raw_c (pi multiplies the per-class outputs)."""
        per_class = self._raw_all(x)  # (B, C, P, *out)
        pi_e = expand_selection(pi, self.num_classes, per_class.dim() - 3).unsqueeze(2)  # (b, C, 1, *S)
        return (pi_e * per_class).sum(1)

    def _raw_input(self, x: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        """Input incarnation; layers where the two coincide (elementwise ones) reuse the output formula."""
        return self._raw_output(x, pi)

    def _mask_to_pi(self, mask: torch.Tensor) -> torch.Tensor:
        return mask

    def _spatial(self, x: torch.Tensor) -> tuple[int, ...]:
        return tuple(x.shape[1:])

    def _raw_hard(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _raw_all(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _init_per_class(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int) -> None:
    """PyTorch's default Conv/Linear initialisation, drawn independently for every class."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        for c in range(weight.shape[0]):
            nn.init.kaiming_uniform_(weight[c], a=math.sqrt(5))
        if bias is not None:
            bias.uniform_(-bound, bound)


class SCNLConv2d(SCNLBase):
    """Stochastic conditional convolutional noise layer (seed 000 §1.1.3, Eq. 5-7).

    Kernels ``weight`` (C, P * C_out, C_in, k, k) and ``bias`` (C, P * C_out); ``P`` raw maps per output
    channel (2 for gaussian/laplace: mean and scale). Stride 1, "same" padding (odd ``kernel_size``), so a
    per-pixel selection lines up with the output.

    Shapes: x (B, C_in, H, W) -> h (B, C_out, H, W). Hard selection by labels (B,) costs one grouped
    convolution with the B gathered kernel sets, flat in C.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        num_classes: int,
        distribution: str | Distribution = "gaussian",
        *,
        incarnation: str = "input",
        selector: nn.Module | None = None,
        bias: bool = True,
        init: str = "default",
        init_scale: float = 0.5,
        **dist_options: float,
    ) -> None:
        super().__init__(num_classes, distribution, incarnation=incarnation, selector=selector, **dist_options)
        if init not in ("default", "identity"):
            raise ValueError(f"init must be 'default' or 'identity', got {init!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number ('same' padding), got {kernel_size!r}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels!r}, {out_channels!r}")
        self.in_channels, self.out_channels, self.kernel_size = int(in_channels), int(out_channels), int(kernel_size)
        self.padding = kernel_size // 2
        po = self.num_params * self.out_channels
        self.weight = nn.Parameter(torch.empty(self.num_classes, po, self.in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(self.num_classes, po)) if bias else None
        _init_per_class(self.weight, self.bias, self.in_channels * kernel_size * kernel_size)
        if init == "identity":
            self._identity_init(init_scale)

    @torch.no_grad()
    def _identity_init(self, init_scale: float) -> None:
        """Every class starts as ``h = x + init_scale * eps`` (Dirac mean kernels, constant scale) plus a
        small random part: the content is readable under any selection from the first step, so the
        server is not first taught to read the class fingerprint alone (DESIGN part 1)."""
        if not init_scale > self.distribution.min_scale:
            raise ValueError(f"init_scale must exceed min_scale {self.distribution.min_scale}, got {init_scale!r}")
        self.weight.mul_(0.05)
        co = self.out_channels
        for c in range(self.num_classes):
            dirac = torch.empty(co, self.in_channels, self.kernel_size, self.kernel_size)
            nn.init.dirac_(dirac)
            self.weight[c, :co] += dirac
        if self.bias is not None:
            self.bias.zero_()
            if self.num_params > 1:
                self.bias[:, co:] = math.log(math.expm1(init_scale - self.distribution.min_scale))

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")

    def _spatial(self, x):
        return tuple(x.shape[2:])

    def _mask_to_pi(self, mask):
        return mask.unsqueeze(2)  # (B, C, 1, H, W): the same selection for every input channel

    def _split(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.unflatten(1, (self.num_params, self.out_channels))  # (B, P*Co, H, W) -> (B, P, Co, H, W)

    def _raw_hard(self, x, labels):
        self._check(x)
        b, ci, h, w = x.shape
        k = self.kernel_size
        weight = self.weight[labels].reshape(-1, ci, k, k)  # (B * P*Co, Ci, k, k): only the selected kernels
        out = F.conv2d(x.reshape(1, b * ci, h, w), weight, padding=self.padding, groups=b).view(b, -1, h, w)
        if self.bias is not None:
            out = out + self.bias[labels][:, :, None, None]
        return self._split(out)

    def _raw_all(self, x):
        self._check(x)
        b, _, h, w = x.shape
        out = F.conv2d(x, self.weight.flatten(0, 1), padding=self.padding)  # (B, C * P*Co, H, W)
        out = out.view(b, self.num_classes, -1, h, w)
        if self.bias is not None:
            out = out + self.bias[None, :, :, None, None]
        return out.unflatten(2, (self.num_params, self.out_channels))  # (B, C, P, Co, H, W)

    def _raw_input(self, x, pi):
        self._check(x)
        b, ci, h, w = x.shape
        c, k = self.num_classes, self.kernel_size
        pi_e = expand_selection(pi, c, 3)  # (b, C, Ci|1, H|1, W|1)
        xin = (x.unsqueeze(1) * pi_e).reshape(b, c * ci, h, w)  # pi_c ⊙ x for every class
        out = F.conv2d(xin, self.weight.reshape(-1, ci, k, k), padding=self.padding, groups=c)
        out = out.view(b, c, -1, h, w).sum(1)  # sum_c k_c * (pi_c ⊙ x)
        if self.bias is not None:
            pibar = pi_e.mean(2, keepdim=True)  # (b, C, 1, H|1, W|1): the selection at each output pixel
            out = out + (pibar * self.bias[None, :, :, None, None]).sum(1)
        return self._split(out)


class SCNLLinear(SCNLBase):
    """Stochastic conditional fully connected noise layer (seed 000 §1.2.3, Eq. 4 made stochastic).

    ``weight`` (C, P * F_out, F_in), ``bias`` (C, P * F_out). Shapes: x (B, F_in) -> h (B, F_out).
    Hard selection is one batched matmul with the B gathered weight matrices (flat in C).
    A region mask is per input feature: (B, C, F_in).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_classes: int,
        distribution: str | Distribution = "gaussian",
        *,
        incarnation: str = "input",
        selector: nn.Module | None = None,
        bias: bool = True,
        **dist_options: float,
    ) -> None:
        super().__init__(num_classes, distribution, incarnation=incarnation, selector=selector, **dist_options)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features!r}, {out_features!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        po = self.num_params * self.out_features
        self.weight = nn.Parameter(torch.empty(self.num_classes, po, self.in_features))
        self.bias = nn.Parameter(torch.empty(self.num_classes, po)) if bias else None
        _init_per_class(self.weight, self.bias, self.in_features)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (B, {self.in_features}), got {tuple(x.shape)}")

    def _split(self, raw):
        return raw.unflatten(-1, (self.num_params, self.out_features))

    def _raw_hard(self, x, labels):
        self._check(x)
        out = torch.bmm(self.weight[labels], x.unsqueeze(2)).squeeze(2)  # (B, P*Fo)
        if self.bias is not None:
            out = out + self.bias[labels]
        return self._split(out)

    def _raw_all(self, x):
        self._check(x)
        out = torch.einsum("bi,coi->bco", x, self.weight)
        if self.bias is not None:
            out = out + self.bias
        return self._split(out)  # (B, C, P, Fo)

    def _raw_input(self, x, pi):
        self._check(x)
        pi_e = expand_selection(pi, self.num_classes, 1)  # (b, C, Fi|1)
        out = torch.einsum("bci,coi->bo", x.unsqueeze(1) * pi_e, self.weight)  # sum_c W_c (pi_c ⊙ x)
        if self.bias is not None:
            out = out + torch.einsum("bc,co->bo", pi_e.mean(2), self.bias)
        return self._split(out)


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
