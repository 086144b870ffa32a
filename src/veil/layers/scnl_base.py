"""The selection logic every SCNL shares (:class:`SCNLBase`) and the checks of its keyword arguments.

What the selections mean and how the incarnations mix the per-class kernels: :mod:`veil.layers.scnl`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from veil.layers.distributions import Distribution, create_distribution
from veil.layers.selection import check_labels, check_mask, check_region_map, expand_selection, mask_slots, region_slots

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
