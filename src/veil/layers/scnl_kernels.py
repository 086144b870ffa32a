"""SCNLs with per-class kernels: the convolution :class:`SCNLConv2d` (seed 000 §1.1.3) and the fully
connected :class:`SCNLLinear` (§1.2.3). The selection logic they share: :mod:`veil.layers.scnl_base`."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from veil.layers.distributions import Distribution
from veil.layers.scnl_base import SCNLBase
from veil.layers.selection import expand_selection


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
