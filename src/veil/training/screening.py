"""Screening (seed 000 §4.1): hide a random part of each obfuscated record at every training iteration,
so that the server model cannot lean on the obfuscator's bias in any one region."""

from __future__ import annotations

import dataclasses
import math

import torch

SCREEN_MODES = ("rect", "pixel")


def screen(x: torch.Tensor, ratio: float, *, mode: str = "rect", generator: torch.Generator | None = None) -> torch.Tensor:
    """Hide a random part of each record: hidden values are set to 0.

    Args:
        x: Records (B, C, H, W).
        ratio: Share of each record's pixels hidden, in [0, 1). 0 returns ``x`` unchanged.
        mode: ``"rect"``: one random rectangle of about ``ratio * H * W`` pixels per record (same on
            every channel); ``"pixel"``: each pixel hidden independently with probability ``ratio``.
        generator: Source of the masks (a fresh draw every call: every iteration). The masks are drawn
            on the generator's device (the CPU without one) and moved to ``x``'s, so a seeded CPU
            generator screens alike wherever ``x`` is.

    Returns:
        (B, C, H, W), the screened records.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"screen ratio must lie in [0, 1), got {ratio!r}")
    if mode not in SCREEN_MODES:
        raise ValueError(f"unknown screen mode {mode!r}; valid: {', '.join(SCREEN_MODES)}")
    if ratio == 0.0 or len(x) == 0:
        return x
    b, _, h, w = x.shape
    where = generator.device if generator is not None else torch.device("cpu")
    if mode == "pixel":
        keep = torch.rand(b, 1, h, w, generator=generator, device=where) >= ratio
        return x * keep.to(x.device, x.dtype)
    # rectangle with the aspect of the record, area ~ ratio * H * W
    rh = min(h, max(1, round(h * math.sqrt(ratio))))
    rw = min(w, max(1, round(w * ratio * h / rh)))
    top = torch.randint(0, h - rh + 1, (b,), generator=generator, device=where)
    left = torch.randint(0, w - rw + 1, (b,), generator=generator, device=where)
    rows = torch.arange(h, device=where).view(1, h, 1)
    cols = torch.arange(w, device=where).view(1, 1, w)
    hide = ((rows >= top.view(b, 1, 1)) & (rows < (top + rh).view(b, 1, 1)) & (cols >= left.view(b, 1, 1)) & (cols < (left + rw).view(b, 1, 1)))
    return x * (~hide).unsqueeze(1).to(x.device, x.dtype)  # (B, 1, H, W) broadcast over channels


@dataclasses.dataclass(frozen=True)
class Screening:
    """How :func:`veil.training.loop.fit` screens the records flagged in :class:`~veil.training.loop.Messages`.

    Attributes:
        ratio: Share of each flagged record hidden at every iteration, in [0, 1) (0: off).
        mode: ``rect`` (one rectangle) or ``pixel`` (independent pixels).
    """

    ratio: float = 0.25
    mode: str = "rect"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"screen_ratio must lie in [0, 1), got {self.ratio!r}")
        if self.mode not in SCREEN_MODES:
            raise ValueError(f"screen_mode must be one of {SCREEN_MODES}, got {self.mode!r}")

    def __call__(self, x: torch.Tensor, flags: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, C, H, W) records with a fresh screen on those where ``flags`` (B,) is set."""
        if self.ratio == 0 or not bool(flags.any()):
            return x
        return torch.where(flags.view(-1, 1, 1, 1), screen(x, self.ratio, mode=self.mode, generator=generator), x)
