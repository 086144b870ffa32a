"""Cloak (Mireshghallah et al., 2020), the baseline of the ANI paper (seed 002 §2.2, Eq. 2-3).

The client perturbs every record with one *fixed* (input-independent) learnt noise distribution::

    x' = (x + v) * b + mu,     v ~ N(0, sigma^2)                                  (Eq. 2, Eq. 3)

sigma, mu and the mask b are tensors of the record's shape. Cloak learns sigma by maximising it while
keeping the primary accuracy (the perturbation-maximisation phase), then suppresses the entries whose
sigma reached a threshold (b = 0 there, b = 1 elsewhere) and learns the constant values mu that
replace them (the second phase). sigma is bounded as in Cloak's code,
``sigma = sigma_min + (sigma_max - sigma_min) * (1 + tanh(rho)) / 2``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from veil.defenses.base import Defense, Stage


def cloak_perturb(x: torch.Tensor, v: torch.Tensor, b: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Eq. 2 of the ANI paper (Cloak): ``x' = (x + v) * b + mu``; b and mu broadcast over the batch."""
    return (x + v) * b + mu


class Cloak(Defense):
    """Cloak: fixed learnt Gaussian noise, suppression mask and constants, ``x' = (x + v)*b + mu``.

    Client: the whole method (an elementwise affine map plus noise; no FLOPs worth counting).
    ``encode`` returns x' of the input's shape (B, C, H, W). Server: the task model on x'.
    The label is never used by the client.

    Training (three stages through the one loop; the server model trains in all of them, as the ANI
    paper does for Cloak):

    0. ``"pretrain"``: the server model alone on clean records (no noise, rho and mu frozen): Cloak
       maximises sigma on a pre-trained model, so the noise is learnt against a model that already reads
       the task, not against a random one.
    1. ``"noise"``: rho (hence sigma) trains with b = 1 and mu = 0 to minimise cross-entropy plus
       ``penalty() = -lambda_ * ln(mean_i sigma_i^2)``: the noise-maximising term, whose gradient is
       kept (public ports that freeze rho never learn the noise).
    2. ``"suppress"``: sigma is frozen, ``b = [sigma < threshold]`` and mu trains (cross-entropy).

    After training (and whenever the stage is not ``"noise"``) the mask is applied.

    Knob: ``lambda_`` (larger = larger sigma and more suppressed entries = more private).

    Args:
        input_shape: (C, H, W) of a record.
        num_classes: Number of primary classes (unused by the method).
        lambda_: Weight of the sigma-maximising term (on mnist-lt5, 10k records, 4 epochs: 0.01 gives mean
            sigma 0.47 with 9% of entries suppressed, 0.05 gives 1.10 with 56%).
        sigma_min, sigma_max: Bounds of sigma (Cloak's code uses 1e-4 and 2).
        threshold: Entries with sigma >= threshold are suppressed (b = 0).
        init_sigma: Starting sigma of every entry (in (sigma_min, sigma_max)).
        rho_scale: rho = rho_scale * r with r the trained tensor; under Adam this multiplies the step
            on rho, so that per-entry noise parameters move within short runs (the papers train for 50
            epochs; veil's benchmarks for 2-3).
    """

    name = "cloak"
    knob = "lambda_"
    knob_direction = 1

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        lambda_: float = 0.01,
        sigma_min: float = 1e-4,
        sigma_max: float = 2.0,
        threshold: float = 1.0,
        init_sigma: float = 0.3,
        rho_scale: float = 25.0,
    ) -> None:
        super().__init__(input_shape=input_shape, num_classes=num_classes)
        for key, val in (("lambda_", lambda_), ("sigma_min", sigma_min), ("sigma_max", sigma_max), ("threshold", threshold), ("init_sigma", init_sigma), ("rho_scale", rho_scale)):
            if not (isinstance(val, (int, float)) and math.isfinite(val)):
                raise ValueError(f"{key} must be a finite number, got {val!r}")
        if lambda_ < 0:
            raise ValueError(f"lambda_ must be >= 0, got {lambda_!r}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
        if not sigma_min < init_sigma < sigma_max:
            raise ValueError(f"init_sigma must lie in ({sigma_min}, {sigma_max}), got {init_sigma!r}")
        if rho_scale <= 0:
            raise ValueError(f"rho_scale must be > 0, got {rho_scale!r}")
        self.lambda_ = float(lambda_)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.threshold = float(threshold)
        self.init_sigma = float(init_sigma)
        self.rho_scale = float(rho_scale)
        # invert sigma(rho) at init_sigma so that every entry starts there
        rho0 = math.atanh(2 * (self.init_sigma - self.sigma_min) / (self.sigma_max - self.sigma_min) - 1)
        self.r = nn.Parameter(torch.full(self.input_shape, rho0 / self.rho_scale))
        self.mu = nn.Parameter(torch.zeros(self.input_shape))

    # --------------------------------------------------------------------------- the noise tensors
    def sigma(self) -> torch.Tensor:
        """Per-entry standard deviation (C, H, W), in [sigma_min, sigma_max]."""
        rho = self.rho_scale * self.r
        return self.sigma_min + (self.sigma_max - self.sigma_min) * (1.0 + torch.tanh(rho)) / 2.0

    def mask(self) -> torch.Tensor:
        """b (C, H, W): 1 where the entry is kept, 0 where sigma >= threshold (suppressed, replaced by mu).

        All ones during the ``"noise"`` stage (phase 1 learns sigma on the unmasked record).
        """
        if self.stage == "noise":
            return torch.ones_like(self.mu)
        return (self.sigma() < self.threshold).to(self.mu.dtype).detach()

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> x' (B, C, H, W), Eq. 2-3 with fresh noise on every call.

        In the ``pretrain`` stage only: x itself (the server model's pre-training on clean records).
        """
        self.check_input(x, y)
        if self.stage == "pretrain":
            return x
        v = self.sigma() * torch.randn_like(x)  # Eq. 3, reparameterised so the CE gradient reaches rho
        return cloak_perturb(x, v, self.mask(), self.mu)

    def penalty(self) -> torch.Tensor:
        """``-lambda_ * ln(mean sigma^2)``: minimising it maximises the noise (phase 1 of Cloak); 0 in pretrain."""
        if self.stage == "pretrain":
            return torch.zeros((), device=self._device())
        return -self.lambda_ * torch.log(self.sigma().pow(2).mean())

    # --------------------------------------------------------------------------- stages
    def stages(self) -> list[Stage]:
        return [Stage("pretrain", epoch_share=0.25), Stage("noise", epoch_share=0.5), Stage("suppress", epoch_share=0.25)]

    def set_stage(self, name: str) -> None:
        super().set_stage(name)
        self.r.requires_grad_(name == "noise")
        self.mu.requires_grad_(name == "suppress")
        if name == "noise":
            with torch.no_grad():
                self.mu.zero_()  # phase 1 runs with mu = 0 (Eq. 2 with b = 1)

    def suppressed_fraction(self) -> float:
        """Share of entries with b = 0 under the final mask."""
        return float((self.sigma() >= self.threshold).float().mean())

    def config(self) -> dict[str, Any]:
        return {
            "lambda_": self.lambda_,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "threshold": self.threshold,
            "init_sigma": self.init_sigma,
            "rho_scale": self.rho_scale,
        }
