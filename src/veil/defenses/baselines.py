"""Plain baselines: no defense, and fixed (untrained) additive Gaussian noise."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from veil.defenses.base import Defense


class NoDefense(Defense):
    """Sends the record in the clear: ``encode(x) = x``. The utility ceiling and privacy floor."""

    uses: ClassVar[str] = "none"
    name = "none"

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, y)
        return x


class GaussianNoise(Defense):
    """Fixed additive noise ``x' = x + sigma * eps``, eps ~ N(0, I). Client: all. Server: nothing.

    Knob: ``sigma`` (larger = more private). Nothing trains; the server model adapts to the noise.
    """

    uses: ClassVar[str] = "none"
    name = "gaussian"
    knob = "sigma"

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int, sigma: float = 0.5) -> None:
        super().__init__(input_shape=input_shape, num_classes=num_classes)
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma!r}")
        self.sigma = float(sigma)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, y)
        return x + self.sigma * torch.randn_like(x)

    def config(self) -> dict[str, Any]:
        return {"sigma": self.sigma}
