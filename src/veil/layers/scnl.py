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
  pixel p of the input goes through class c's kernels where ``mask[c, p] = 1``; or with an integer region
  map (B, *spatial) of class indices, the same without building a mask of all C classes. Only the kernel
  sets of the classes present in a record are computed (conv, additive), so the cost stays flat in C;
* ``layer(x)`` -- the layer's own selector (soft or adaptive), the inference path;
* ``layer(x, pi=...)`` -- an explicit selection tensor.

With a selection pi, the two incarnations of seed §2.1.1 are::

    incarnation="input":   raw = sum_c k_c * (pi_c ⊙ x) + pi_c ⊙ b_c     (pi multiplies the input)
    incarnation="output":  raw = sum_c pi_c ⊙ (k_c * x + b_c)           (pi multiplies the outputs)

and the distribution's constraint (softplus scale, bounded mean) is applied to the mixed raw maps, so that
hard selection equals either formula with ``pi = one_hot(label)`` (the oracle test checks this). The
bias is weighted by pi so that the identity holds exactly; where pi has one value per input channel and
pixel (a soft selection of the input's shape), the bias of an output pixel is weighted by the mean of
pi_c over the input channels at that pixel (for a strided or padded convolution: at the input pixel the
kernel is centred on).

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
        _check_dist_options(type(self).__name__, distribution, dist_options)
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
        if labels is not None and labels.dim() == 1 + len(self._spatial(x)) and not labels.is_floating_point():
            # a region map (B, *spatial) of class indices: per-pixel hard selection without a (B, C, ...) mask
            slots, pi = region_slots(check_region_map(labels, self.num_classes, x.shape[0], self._spatial(x)), self.num_classes)
            if type(self)._raw_slots is SCNLBase._raw_slots:
                return self._raw_input(x, self._mask_to_pi(F.one_hot(labels.long(), self.num_classes).movedim(-1, 1).to(x.dtype)))
            return self._raw_slots(x, slots, pi.to(x.dtype))
        if labels is not None:  # region mask: per-pixel hard selection, pixels pass through their class's kernels
            mask = check_mask(labels, self.num_classes, x.shape[0], self._spatial(x))
            if type(self)._raw_slots is SCNLBase._raw_slots:
                return self._raw_input(x, self._mask_to_pi(mask))
            slots, pi = mask_slots(mask)
            return self._raw_slots(x, slots, pi)
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

    def _raw_slots(self, x: torch.Tensor, slots: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:  # pragma: no cover - optional
        """Per-pixel hard selection from the K classes present in each record (:func:`mask_slots`), so
        its cost grows with the objects in a record, not with C. Layers without it use the all-C formula."""
        raise NotImplementedError

    def _raw_all(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


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


#: Keyword arguments a layer passes on to its distribution (:func:`veil.layers.distributions.create_distribution`).
DIST_OPTIONS = ("bound", "min_scale", "temperature", "trials")
#: Arguments only a convolution takes; elementwise and fully connected layers refuse them by name.
CONV_ONLY = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


def _check_dist_options(layer: str, distribution: str | Distribution, options: dict) -> None:
    """Refuse keyword arguments that are neither the layer's own nor its distribution's, naming the layer."""
    conv_only = sorted(k for k in options if k in CONV_ONLY)
    if conv_only:
        raise TypeError(
            f"{layer} got convolution argument(s) {conv_only}: it is not a convolution "
            f"(SCNLConv2d takes kernel_size, stride, padding, dilation, groups)"
        )
    unknown = sorted(k for k in options if k not in DIST_OPTIONS)
    if unknown:
        raise TypeError(
            f"{layer} got unexpected keyword argument(s) {unknown}; besides its own arguments it passes only "
            f"{', '.join(DIST_OPTIONS)} to its distribution"
        )
    if options and isinstance(distribution, Distribution):
        raise ValueError(f"{layer}: distribution options {sorted(options)} given with a Distribution instance; set them on the instance")


def _pair(value: int | tuple[int, int], name: str, layer: str, minimum: int) -> tuple[int, int]:
    """``v`` or ``(v_h, v_w)`` as a pair of ints >= ``minimum``; a ``ValueError`` naming the layer otherwise."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair)):
        raise ValueError(f"{layer}: {name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


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

    Takes ``nn.Conv2d``'s geometry: ``kernel_size``, ``stride``, ``padding`` (an int, a pair, ``"same"`` or
    ``"valid"``; default ``"same"``, which needs an odd kernel and stride 1, so a per-pixel selection lines
    up with the output), ``dilation`` and ``groups``; they apply to every class's convolutions alike, hard
    selection included. Kernels ``weight`` (C, P * C_out, C_in / groups, kH, kW) and ``bias`` (C, P * C_out);
    ``P`` raw maps per output channel (2 for gaussian/laplace: mean and scale). Within a class, the output
    channels are ordered group by group, each group holding its P maps (``(groups, P, C_out / groups)``),
    so that an output channel's mean and scale come from the same input group.

    Shapes: x (B, C_in, H, W) -> h (B, C_out, H', W') with H', W' as for ``nn.Conv2d``. Hard selection by
    labels (B,) costs one grouped convolution with the B gathered kernel sets, flat in C.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        num_classes: int,
        distribution: str | Distribution = "gaussian",
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = "same",
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        incarnation: str = "input",
        selector: nn.Module | None = None,
        bias: bool = True,
        init: str = "default",
        init_scale: float = 0.5,
        **dist_options: float,
    ) -> None:
        super().__init__(num_classes, distribution, incarnation=incarnation, selector=selector, **dist_options)
        name = type(self).__name__
        if init not in ("default", "identity"):
            raise ValueError(f"{name}: init must be 'default' or 'identity', got {init!r}")
        if not (isinstance(in_channels, int) and isinstance(out_channels, int) and in_channels >= 1 and out_channels >= 1):
            raise ValueError(f"{name}: in_channels and out_channels must be integers >= 1, got {in_channels!r}, {out_channels!r}")
        self.kernel_size = _pair(kernel_size, "kernel_size", name, 1)
        self.stride = _pair(stride, "stride", name, 1)
        self.dilation = _pair(dilation, "dilation", name, 1)
        if not (isinstance(groups, int) and groups >= 1 and in_channels % groups == 0 and out_channels % groups == 0):
            raise ValueError(f"{name}: groups must be an integer >= 1 dividing in_channels ({in_channels}) and out_channels ({out_channels}), got {groups!r}")
        if not isinstance(bias, bool):
            raise ValueError(f"{name}: bias must be True or False, got {bias!r}")
        if padding == "valid":
            padding = 0
        elif padding == "same":
            if self.stride != (1, 1) or any(k % 2 == 0 for k in self.kernel_size):
                raise ValueError(
                    f"{name}: padding='same' needs an odd kernel_size and stride 1, got kernel_size={kernel_size!r}, "
                    f"stride={stride!r}; give padding as an int or pair"
                )
            padding = tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size))
        elif isinstance(padding, str):
            raise ValueError(f"{name}: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        self.padding = _pair(padding, "padding", name, 0)
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        kh, kw = self.kernel_size
        po = self.num_params * self.out_channels
        self.weight = nn.Parameter(torch.empty(self.num_classes, po, self.in_channels // self.groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(self.num_classes, po)) if bias else None
        _init_per_class(self.weight, self.bias, self.in_channels // self.groups * kh * kw)
        if init == "identity":
            self._identity_init(init_scale)

    def _channels(self, p: int) -> torch.Tensor:
        """Indices (C_out,) of parameter map ``p``'s output channels in a class's (groups, P, C_out/groups) order."""
        cg = self.out_channels // self.groups
        j = torch.arange(self.out_channels)
        return (j // cg) * (self.num_params * cg) + p * cg + j % cg

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Output (H', W') for an input of (height, width), as ``nn.Conv2d`` computes it."""
        return tuple(  # type: ignore[return-value]
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip((height, width), self.padding, self.dilation, self.kernel_size, self.stride)
        )

    @torch.no_grad()
    def _identity_init(self, init_scale: float) -> None:
        """Every class starts as ``h = x + init_scale * eps`` (Dirac mean kernels, constant scale) plus a
        small random part: the content is readable under any selection from the first step, so the
        server is not first taught to read the class fingerprint alone (docs/design.md, "Pitfalls")."""
        if not init_scale > self.distribution.min_scale:
            raise ValueError(f"init_scale must exceed min_scale {self.distribution.min_scale}, got {init_scale!r}")
        self.weight.mul_(0.05)
        loc = self._channels(0)
        for c in range(self.num_classes):
            dirac = torch.empty(self.out_channels, self.in_channels // self.groups, *self.kernel_size)
            nn.init.dirac_(dirac, self.groups)
            self.weight[c, loc] += dirac
        if self.bias is not None:
            self.bias.zero_()
            for p in range(1, self.num_params):
                self.bias[:, self._channels(p)] = math.log(math.expm1(init_scale - self.distribution.min_scale))

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        ho, wo = self.output_size(x.shape[2], x.shape[3])
        if ho < 1 or wo < 1:
            raise ValueError(f"{type(self).__name__}: input {tuple(x.shape[2:])} is too small for kernel_size {self.kernel_size}, padding {self.padding}, dilation {self.dilation}")

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
        return F.conv2d(x, weight, stride=self.stride, padding=self.padding, dilation=self.dilation, groups=groups)

    def _spatial(self, x):
        return tuple(x.shape[2:])

    def _mask_to_pi(self, mask):
        return mask.unsqueeze(2)  # (B, C, 1, H, W): the same selection for every input channel

    def _split(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, P*Co, H', W') in (groups, P, Co/groups) channel order -> (B, P, Co, H', W')."""
        g = self.groups
        raw = raw.unflatten(1, (g, self.num_params, self.out_channels // g)).transpose(1, 2)  # (B, P, g, Co/g, ...)
        return raw.flatten(2, 3)

    def _pi_at_output(self, pi_bar: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A per-pixel selection (b, C, 1, H|1, W|1) read at each output pixel's kernel centre (b, C, 1, H'|1, W'|1).

        The bias of an output pixel is weighted by the selection where its kernel is centred on the
        input; with "same" geometry that is the pixel itself.
        """
        ho, wo = self.output_size(x.shape[2], x.shape[3])
        for dim, n_out in ((3, ho), (4, wo)):
            n_in = pi_bar.shape[dim]
            if n_in == 1:
                continue
            i = dim - 3
            centre = torch.arange(n_out, device=pi_bar.device) * self.stride[i] - self.padding[i] + self.dilation[i] * (self.kernel_size[i] // 2)
            pi_bar = pi_bar.index_select(dim, centre.clamp(0, n_in - 1))
        return pi_bar

    def _raw_hard(self, x, labels):
        self._check(x)
        b, ci, h, w = x.shape
        weight = self.weight[labels].flatten(0, 1)  # (B * P*Co, Ci/g, kH, kW): only the selected kernels
        out = self._conv(x.reshape(1, b * ci, h, w), weight, b * self.groups)
        out = out.view(b, -1, *out.shape[2:])
        if self.bias is not None:
            out = out + self.bias[labels][:, :, None, None]
        return self._split(out)

    def _raw_all(self, x):
        self._check(x)
        b, c, g = x.shape[0], self.num_classes, self.groups
        # grouped conv splits its output channels group-major, so order the kernels (g, C, P*Co/g)
        weight = self.weight.unflatten(1, (g, -1)).transpose(0, 1).flatten(0, 2)
        out = self._conv(x, weight, g)  # (B, g * C * P*Co/g, H', W')
        out = out.unflatten(1, (g, c, -1)).transpose(1, 2).flatten(2, 3)  # (B, C, P*Co, H', W')
        if self.bias is not None:
            out = out + self.bias[None, :, :, None, None]
        return torch.stack([self._split(out[:, k]) for k in range(c)], 1)  # (B, C, P, Co, H', W')

    def _raw_slots(self, x, slots, pi):
        self._check(x)
        b, ci, h, w = x.shape
        k = slots.shape[1]
        xin = (x.unsqueeze(1) * pi.unsqueeze(2)).reshape(1, b * k * ci, h, w)  # pi_k ⊙ x for each present class
        out = self._conv(xin, self.weight[slots].flatten(0, 2), b * k * self.groups)  # only the present kernels
        out = out.view(b, k, -1, *out.shape[2:]).sum(1)
        if self.bias is not None:
            pibar = self._pi_at_output(pi.unsqueeze(2), x)  # (B, K, 1, H', W')
            out = out + (pibar * self.bias[slots][:, :, :, None, None]).sum(1)
        return self._split(out)

    def _raw_input(self, x, pi):
        self._check(x)
        b, ci, h, w = x.shape
        c = self.num_classes
        pi_e = expand_selection(pi, c, 3)  # (b, C, Ci|1, H|1, W|1)
        xin = (x.unsqueeze(1) * pi_e).reshape(b, c * ci, h, w)  # pi_c ⊙ x for every class
        out = self._conv(xin, self.weight.flatten(0, 1), c * self.groups)
        out = out.view(b, c, -1, *out.shape[2:]).sum(1)  # sum_c k_c * (pi_c ⊙ x)
        if self.bias is not None:
            pibar = self._pi_at_output(pi_e.mean(2, keepdim=True), x)  # (b, C, 1, H'|1, W'|1)
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
        if not (isinstance(in_features, int) and isinstance(out_features, int) and in_features >= 1 and out_features >= 1):
            raise ValueError(f"SCNLLinear: in_features and out_features must be integers >= 1, got {in_features!r}, {out_features!r}")
        if not isinstance(bias, bool):
            raise ValueError(f"SCNLLinear: bias must be True or False, got {bias!r}")
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
