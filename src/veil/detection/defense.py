"""SCNL for detection: per-object region hard selection in training, a per-pixel selector at inference
(seed 000 §2.2 / seed 001 §2.2, the person/car example).

Regions are the background (0) and one per primary class (c + 1). One conditional layer, an
``SCNLConv2d`` (1x1 by default, identity-initialised: each region starts as ``x + init_scale * eps``)
with a kernel set per region, produces the message::

    h(p) = sample of  sum_r pi_r(p) * (k_r * x)(p)  (mean bounded, scale softplus; Eq. 5-7)

``pi`` is

* the data owner's per-object hard selection, where the boxes are known (the training exposure):
  ``pi_{c+1} = 1`` on the box of every object of class c, ``pi_0 = 1`` elsewhere (``mask``: a (B, 1, H, W)
  map of region indices, :func:`veil.detection.scenes.region_map`); in training mode a random
  ``hard_fraction`` of each batch, the rest through the selector, so that the server never relies on
  perfect regions (docs/design.md, "Hard selection carries the label");
* otherwise pi(x), a per-pixel softmax over the regions from a small client CNN (the selector, at a
  quarter of the resolution, upsampled) trained on the regions (per-pixel cross-entropy); with
  ``sharpen`` each pixel takes its argmax region at inference, so the selector's confidence is not sent.

Per-pixel hard selection computes only the kernel sets of the regions present in a record
(:func:`veil.layers.selection.mask_slots`): its cost is flat in the number of classes.

Knob ``lambda_`` (larger = more private): ``lambda_ · mean KL(q(h|x) || N(0, 1))`` over the message, as in
classification. Given record labels ``y`` without a mask (a classification batch), the whole record is the
region of its class.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from veil.defenses.base import Defense, Stage
from veil.layers.learning_rate import scale_learning_rate
from veil.layers.scnl import SCNLConv2d
from veil.layers.selection import PixelSelection, train_pixel_selector


class SCNLDetect(Defense):
    """SCNL over per-object regions: boxes in training, a per-pixel selector at inference (detection).

    Args:
        lambda_: Weight of the VIB charge; larger = more private. >= 0.
        selector_width: Channels of the region selector (its client cost).
        hard_fraction: In training mode with regions, the share of each batch selected by them.
        selector_weight: Weight of the selector's per-pixel cross-entropy against the regions.
        object_weight: Weight of object pixels against background pixels in that cross-entropy.
        kernel_size: Odd side of the layer's kernels (1: per-pixel gain, offset and scale per region).
        out_channels: Channels of the message (0: as many as the input).
        init_scale: Initial noise scale. bound, min_scale: the distribution's mean bound and least scale.
        lr_scale: The client layers learn this many times faster than the server model.
        sharpen: At inference without regions, each pixel takes its argmax region.
        init_gain: Initial gain of the content channel of every region (1: the message starts as the scene
            plus noise; 0: as the regions' templates plus noise, the content channel closed, so that what
            the engine reads of an object's content is what the task paid for against the KL).
        train_selector_alone: The selector learns from the region maps only (its cross-entropy); the
            detection loss and the charge do not reach it (as in ``scnl-region``, where the task's gradient
            taught the selector to let everything through).
        selector_epochs: Passes over the training scenes in which the selector alone learns the region maps
            before the joint stage (``setup``).
        content_closed: The content channel stays closed: every kernel of the layer (mean and scale maps) is
            zero and never trained, so a message is its pixels' region templates (the biases) plus noise of
            a per-region scale, and what the engine can read of an object is the extent the selector gave
            it (no strokes at all).
    """

    name: ClassVar[str] = "scnl-detect"
    knob: ClassVar[str] = "lambda_"
    knob_direction: ClassVar[int] = 1
    budget_option: ClassVar[str] = "selector_width"
    uses: ClassVar[str] = "y,mask"
    uses_mask: ClassVar[bool] = True

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        lambda_: float = 1.0,
        selector_width: int = 4,
        hard_fraction: float = 0.5,
        selector_weight: float = 1.0,
        object_weight: float = 2.0,
        kernel_size: int = 1,
        out_channels: int = 0,
        init_scale: float = 0.5,
        bound: float = 3.0,
        min_scale: float = 0.01,
        lr_scale: float = 5.0,
        sharpen: bool = True,
        init_gain: float = 1.0,
        train_selector_alone: bool = False,
        selector_epochs: int = 0,
        content_closed: bool = False,
    ) -> None:
        super().__init__(input_shape=input_shape, num_classes=num_classes)
        if not (isinstance(lambda_, (int, float)) and math.isfinite(lambda_) and lambda_ >= 0):
            raise ValueError(f"lambda_ must be a finite number >= 0, got {lambda_!r}")
        if not (isinstance(selector_width, int) and 1 <= selector_width <= 256):
            raise ValueError(f"selector_width must be an integer in [1, 256], got {selector_width!r}")
        if not (isinstance(kernel_size, int) and kernel_size >= 1 and kernel_size % 2 == 1 and kernel_size <= 15):
            raise ValueError(f"kernel_size must be an odd integer in [1, 15], got {kernel_size!r}")
        if not (isinstance(out_channels, int) and 0 <= out_channels <= 64):
            raise ValueError(f"out_channels must be an integer in [0, 64], got {out_channels!r}")
        for key, value in (("hard_fraction", hard_fraction),):
            if not 0 <= float(value) <= 1:
                raise ValueError(f"{key} must lie in [0, 1], got {value!r}")
        for key, value in (("selector_weight", selector_weight), ("object_weight", object_weight), ("lr_scale", lr_scale)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0 or (key == "selector_weight" and value == 0)):
                raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
        for key, value in (("sharpen", sharpen), ("train_selector_alone", train_selector_alone), ("content_closed", content_closed)):
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false, got {value!r}")
        if isinstance(selector_epochs, bool) or not (isinstance(selector_epochs, int) and 0 <= selector_epochs <= 1000):
            raise ValueError(f"selector_epochs must be an integer in [0, 1000], got {selector_epochs!r}")
        if not (isinstance(init_gain, (int, float)) and math.isfinite(init_gain) and 0 <= init_gain <= 10):
            raise ValueError(f"init_gain must be a number in [0, 10], got {init_gain!r}")
        self.options = dict(
            lambda_=float(lambda_), selector_width=int(selector_width), hard_fraction=float(hard_fraction),
            selector_weight=float(selector_weight), object_weight=float(object_weight), kernel_size=int(kernel_size),
            out_channels=int(out_channels), init_scale=float(init_scale), bound=float(bound), min_scale=float(min_scale),
            lr_scale=float(lr_scale), sharpen=sharpen, init_gain=float(init_gain),
            train_selector_alone=train_selector_alone, selector_epochs=int(selector_epochs), content_closed=content_closed,
        )
        self.lambda_ = float(lambda_)
        self.regions = self.num_classes + 1  # background + one per primary class
        cin = self.input_shape[0]
        self.out_channels = int(out_channels) or cin
        # the size probe of create_defense builds on the meta device, where the identity initialisation
        # and the parametrisation first import torch's reference decompositions and dynamo (10-20 s on a
        # loaded machine): skip both there; the parameter count is the same
        probe = torch.empty(0).device.type == "meta"
        layer = SCNLConv2d(
            cin, self.out_channels, int(kernel_size), self.regions, init="identity" if self.out_channels == cin and not probe else "default",
            init_scale=float(init_scale), bound=float(bound), min_scale=float(min_scale),
        )
        if float(init_gain) != 1.0 and not probe:
            with torch.no_grad():
                layer.weight[:, layer._channels(0)] *= float(init_gain)  # the mean maps' kernels
        if content_closed and not probe:
            keep = torch.zeros_like(layer.weight)  # no kernel reads the scene: mean and scale come from the region
            with torch.no_grad():
                layer.weight.mul_(keep)
        layer.selector = PixelSelection(cin, self.regions, int(selector_width))
        self.layer = layer if probe else scale_learning_rate(layer, float(lr_scale))  # same parameter count
        if content_closed and not probe:  # zero gradient there, so Adam never moves them off zero
            stored = self.layer.parametrizations.weight.original if hasattr(self.layer, "parametrizations") else self.layer.weight
            self.register_buffer("_content_keep", keep, persistent=False)
            stored.register_hook(lambda g: g * self._content_keep)
        self._last_penalty: torch.Tensor | None = None

    def config(self) -> dict[str, Any]:
        return dict(self.options)

    def stages(self) -> list[Stage]:
        """One joint stage in which the data owner's knowledge (the boxes) reaches ``encode``."""
        return [Stage("joint", use_labels=True)]

    def output_shape(self) -> tuple[int, ...]:
        return (self.out_channels, *self.input_shape[1:])

    def check_mask(self, mask: torch.Tensor, batch: int) -> torch.Tensor:
        """Validate a (B, 1, H, W) map of region indices in [0, num_classes]; return it as int64."""
        want = (batch, 1, *self.input_shape[1:])
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != want:
            raise ValueError(f"mask must be a tensor of shape {want} (region index per pixel: 0 background, c + 1 on objects of class c), got {tuple(getattr(mask, 'shape', ()))}")
        m = mask.long()
        if not torch.equal(m.to(mask.dtype), mask) or (m.numel() and (int(m.min()) < 0 or int(m.max()) > self.num_classes)):
            raise ValueError(f"mask values must be integers in [0, {self.num_classes}] (0 background, c + 1 on objects of class c)")
        return m

    def regions_of(self, x: torch.Tensor, y: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The known region map (B, H, W), from ``mask`` or, for a classification batch, from ``y``."""
        if mask is not None:
            return self.check_mask(mask, x.shape[0])[:, 0]
        if y is not None:
            return (y.long() + 1).view(-1, 1, 1).expand(-1, *x.shape[2:])
        return None

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Client side. x (B, C, H, W) [+ mask (B, 1, H, W) region indices] -> h (B, C', H, W), a fresh sample."""
        self.check_input(x, y)
        b = x.shape[0]
        regions = self.regions_of(x, y, mask)
        logits = self.layer.selector(x)  # (B, R, H, W)
        chosen = logits.detach() if self.options["train_selector_alone"] else logits  # what selects; the CE trains the selector
        sharpen = self.options["sharpen"] and not self.training
        if regions is not None:
            raw = self.layer.raw(x, regions)  # per-pixel hard selection from the region map, flat in C
            if self.training and self.options["hard_fraction"] < 1:
                hard = (torch.rand(b, device=x.device) < self.options["hard_fraction"]).view(b, 1, 1, 1, 1)
                raw = torch.where(hard, raw, self.layer.raw(x, pi=torch.softmax(chosen, 1).unsqueeze(2)))
        elif sharpen:
            raw = self.layer.raw(x, logits.argmax(1))  # each pixel's argmax region
        else:
            raw = self.layer.raw(x, pi=torch.softmax(chosen, 1).unsqueeze(2))
        params = self.layer.distribution.constrain(raw)
        h = self.layer.distribution.rsample(params)
        penalty = self.lambda_ * self.layer.kl(params).mean()
        if regions is not None and self.training and self.options["selector_weight"] > 0:
            weight = self._region_weights().to(x.device)
            penalty = penalty + self.options["selector_weight"] * F.cross_entropy(logits, regions, weight=weight)
        self._last_penalty = penalty
        return h

    def _region_weights(self) -> torch.Tensor:
        weight = torch.full((self.regions,), self.options["object_weight"])
        weight[0] = 1.0
        return weight

    def setup(self, model: torch.nn.Module, loader: Any) -> None:
        """Train the selector alone on the region maps (``selector_epochs`` passes of ``loader``, whose
        batches end with the (B, 1, H, W) region map) before the joint stage."""
        if self.options["selector_epochs"]:
            train_pixel_selector(self.layer.selector, loader, epochs=self.options["selector_epochs"], lr=self.options["lr_scale"] * 1e-3,
                                 weight=self._region_weights(), check=self.check_mask)

    def penalty(self) -> torch.Tensor:
        """``lambda_ * mean KL`` of the last encode (+ the selector's cross-entropy where regions were given)."""
        if self._last_penalty is None:
            return torch.zeros((), device=self._device())
        return self._last_penalty
