"""Redaction: locate the sensitive region on the device and blank it (what face and plate blurring tools do).

The baseline every mask-supervised defense must beat. With the same supervision ``scnl-region`` gets (the
data owner's region masks), a client-side locator within the client budget (the per-pixel selector of the
region defenses, :class:`veil.layers.selection.PixelSelection`) finds the sensitive region and the client
replaces it, nothing else::

    m = (1 - r) * x + r * fill(x)

with ``r`` the located region (per pixel, or the best square box of a known side with ``box``, grown by
``grow`` pixels) and ``fill`` zeros, Gaussian noise, or a blur of the record. The server trains on redacted
records; no noise touches the rest of the record and nothing is charged: if redaction matches a defense
that adds task-conditioned noise, that noise adds nothing.

``redact-oracle`` blanks the *true* region at every exposure (no client cost, no locator errors): the bound
for any defense that hides the whole region.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from veil.defenses.base import Defense, Stage
from veil.layers.learning_rate import scale_learning_rate
from veil.layers.selection import PixelSelection, best_box, check_region_mask, train_pixel_selector

FILLS = ("zero", "noise", "blur", "inpaint")
#: The locator's cross-entropy weights (content, sensitive), as the region defenses': it errs toward hiding.
LOCATOR_CE_WEIGHT = (1.0, 4.0)
#: Side of the box blur of ``fill="blur"`` (pixels).
BLUR_SIDE = 9
#: Window sides of ``fill="inpaint"``, tried in turn until every closed pixel has open pixels around it.
INPAINT_SIDES = (3, 5, 9, 17, 33)


def redact(x: torch.Tensor, region: torch.Tensor, fill: str) -> torch.Tensor:
    """``(1 - region) * x + region * fill(x)``: x (B, C, H, W), region (B, 1, H, W) in [0, 1].

    ``zero``: the region becomes 0; ``noise``: standard Gaussian noise (fresh each call, from torch's
    generator, which the deployment path fills from the OS); ``blur``: a box blur of side ``BLUR_SIDE``;
    ``inpaint``: each closed pixel becomes the mean of the open pixels around it (:func:`inpaint`), so that
    what is drawn over the content is replaced by the content around it and the fill carries nothing of the
    closed pixels themselves.
    """
    if fill == "zero":
        filler = torch.zeros_like(x)
    elif fill == "noise":
        filler = torch.randn_like(x)
    elif fill == "blur":
        filler = F.avg_pool2d(x, BLUR_SIDE, stride=1, padding=BLUR_SIDE // 2, count_include_pad=False)
    elif fill == "inpaint":
        filler = inpaint(x, region)
    else:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    return (1 - region) * x + region * filler


def inpaint(x: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Every pixel's open-weighted local mean: ``pool(x * open) / pool(open)``, ``open = 1 - region``.

    Normalized convolution with square windows of the sides in ``INPAINT_SIDES``: a pixel takes the
    smallest window that holds some open weight; a pixel with none even in the largest takes the mean of
    its record's open pixels (0 where the whole record is closed). The result depends on ``x`` only through
    ``x * open``: a fully closed pixel's own value never reaches any fill.
    """
    open_ = 1 - region
    xo = x * open_
    filler = torch.zeros_like(x)
    done = torch.zeros_like(open_)
    for side in INPAINT_SIDES:
        weight = F.avg_pool2d(open_, side, stride=1, padding=side // 2, count_include_pad=False)
        mean = F.avg_pool2d(xo, side, stride=1, padding=side // 2, count_include_pad=False) / weight.clamp(min=1e-6)
        take = (weight > 1e-6).to(x.dtype) * (1 - done)
        filler = filler + take * mean
        done = done + take
    total = open_.sum(dim=(2, 3), keepdim=True)
    record_mean = xo.sum(dim=(2, 3), keepdim=True) / total.clamp(min=1e-6)
    return filler + (1 - done) * record_mean


def grow_region(region: torch.Tensor, pixels: int) -> torch.Tensor:
    """``region`` (B, 1, H, W) grown by ``pixels`` on every side (a max filter of side ``2 * pixels + 1``)."""
    if pixels == 0:
        return region
    return F.max_pool2d(region, 2 * pixels + 1, stride=1, padding=pixels)


class FillsRegion:
    """What the defenses that replace part of the record share: no noise unless ``fill="noise"``, and a
    config that is the validated ``options``."""

    options: dict[str, Any]

    @property
    def deterministic(self) -> bool:
        """No noise unless ``fill="noise"``: the message is a function of the record."""
        return self.options["fill"] != "noise"

    def config(self) -> dict[str, Any]:
        return dict(self.options)


def _check_options(fill: Any, grow: Any, box: Any, input_shape: tuple[int, ...]) -> None:
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    if isinstance(grow, bool) or not (isinstance(grow, int) and 0 <= grow <= 8):
        raise ValueError(f"grow must be an integer in [0, 8], got {grow!r}")
    side = min(input_shape[1:])
    if isinstance(box, bool) or not (isinstance(box, int) and 0 <= box <= side):
        raise ValueError(f"box must be an integer in [0, {side}] (0: per-pixel), got {box!r}")


class Redaction(FillsRegion, Defense):
    """Redaction: a client locator trained on the region masks finds the sensitive region; it is blanked.

    Client (``encode``): region logits = locator(x) (B, 2, H, W); r = argmax per pixel (or the best box of
    side ``box``), grown by ``grow``; message = ``redact(x, r, fill)``. The locator learns from the masks
    alone (per-pixel cross-entropy, the sensitive region weighed up so it errs toward hiding): first
    ``locator_epochs`` passes alone in ``setup``, then beside the joint stage; the task loss never reaches
    it. The server trains on redacted records from the first step.

    Args:
        locator_width: The locator's channels (what ``--client-budget`` sets).
        fill: ``zero``, ``noise``, ``blur`` or ``inpaint`` (the mean of the open pixels around it).
        grow: Pixels by which the located region is grown.
        box: Side of the sensitive region where it is one square box per record (0: per pixel).
        locator_epochs: Passes in which the locator alone learns the masks at the start of training.
        lr_scale: The locator learns this many times faster than the server model under the loop's one lr.

    No knob: what is hidden is what the locator finds; ``grow`` trades task content for coverage.
    """

    name: ClassVar[str] = "redact"
    budget_option: ClassVar[str] = "locator_width"
    uses_mask: ClassVar[bool] = True
    uses: ClassVar[str] = "mask"

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        locator_width: int = 8,
        fill: str = "zero",
        grow: int = 0,
        box: int = 0,
        locator_epochs: int = 20,
        lr_scale: float = 5.0,
    ) -> None:
        super().__init__(input_shape=input_shape, num_classes=num_classes)
        _check_options(fill, grow, box, self.input_shape)
        if isinstance(locator_width, bool) or not (isinstance(locator_width, int) and 1 <= locator_width <= 256):
            raise ValueError(f"locator_width must be an integer in [1, 256], got {locator_width!r}")
        if isinstance(locator_epochs, bool) or not (isinstance(locator_epochs, int) and 0 <= locator_epochs <= 1000):
            raise ValueError(f"locator_epochs must be an integer in [0, 1000], got {locator_epochs!r}")
        if isinstance(lr_scale, bool) or not (isinstance(lr_scale, (int, float)) and lr_scale > 0):
            raise ValueError(f"lr_scale must be a number > 0, got {lr_scale!r}")
        self.options = dict(locator_width=int(locator_width), fill=fill, grow=int(grow), box=int(box), locator_epochs=int(locator_epochs), lr_scale=float(lr_scale))
        self.locator = scale_learning_rate(PixelSelection(self.input_shape[0], 2, int(locator_width)), float(lr_scale))
        self._last_penalty: torch.Tensor | None = None

    def stages(self) -> list[Stage]:
        """One joint stage in which the region masks reach ``encode`` (they train the locator)."""
        return [Stage("joint", use_labels=True)]

    def located(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(region logits (B, 2, H, W), the located region (B, 1, H, W) in {0, 1}, grown)."""
        logits = self.locator(x)
        if self.options["box"]:
            region = best_box((logits[:, 1:] - logits[:, :1]).detach(), self.options["box"])
        else:
            region = (logits.argmax(1, keepdim=True) == 1).to(x.dtype)
        return logits, grow_region(region, self.options["grow"])

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Client side. x (B, C, H, W) [+ mask (B, 1, H, W), which trains the locator] -> the redacted record."""
        self.check_input(x, y)
        logits, region = self.located(x)
        self._last_penalty = None
        if mask is not None and self.training:
            target = check_region_mask(mask, x.shape[0], self.input_shape[1:])[:, 0].long()
            self._last_penalty = F.cross_entropy(logits, target, weight=torch.tensor(LOCATOR_CE_WEIGHT, device=x.device))
        return redact(x, region, self.options["fill"])

    def setup(self, model: torch.nn.Module, loader: Any) -> None:
        """Train the locator alone on the region masks (``locator_epochs`` passes of ``loader``)."""
        if self.options["locator_epochs"]:
            train_pixel_selector(self.locator, loader, epochs=self.options["locator_epochs"], lr=self.options["lr_scale"] * 1e-3,
                                 weight=torch.tensor(LOCATOR_CE_WEIGHT),
                                 check=lambda m, b: check_region_mask(m, b, self.input_shape[1:]))

    def penalty(self) -> torch.Tensor:
        """The locator's cross-entropy against the masks (training with masks only; no privacy charge)."""
        if self._last_penalty is None:
            return torch.zeros((), device=self._device())
        return self._last_penalty


class OracleRedaction(FillsRegion, Defense):
    """Redaction of the *true* sensitive region at every exposure: the bound row (no client network).

    ``encode(x, mask=...)`` -> ``redact(x, grow(mask), fill)``. Not deployable (the client does not know the
    region at inference); it says what hiding exactly the region costs the task. Needs the mask always.
    """

    name: ClassVar[str] = "redact-oracle"
    uses_mask: ClassVar[bool] = True
    oracle_mask: ClassVar[bool] = True
    uses: ClassVar[str] = "mask"

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int, fill: str = "zero", grow: int = 0) -> None:
        super().__init__(input_shape=input_shape, num_classes=num_classes)
        _check_options(fill, grow, 0, self.input_shape)
        self.options = dict(fill=fill, grow=int(grow))

    def stages(self) -> list[Stage]:
        return [Stage("joint", use_labels=True)]

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) and its true mask (B, 1, H, W) -> the record with the region replaced."""
        self.check_input(x, y)
        if mask is None:
            raise ValueError("redact-oracle needs the true region mask at every exposure (a task with masks, e.g. fashion-tag)")
        region = grow_region(check_region_mask(mask, x.shape[0], self.input_shape[1:]), self.options["grow"])
        return redact(x, region, self.options["fill"])
