"""Hard-concrete gates (Louizos, Welling & Kingma, "Learning Sparse Neural Networks through L0
Regularization", ICLR 2018) and gradient reversal (Ganin & Lempitsky, ICML 2015), for mask-free selection.

A gate ``g`` in [0, 1] per location, with log-odds ``log_alpha`` (any shape):

* training, Eq. 10: ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
  ``g = clamp(s (zeta - gamma) + gamma, 0, 1)``: exactly 0 or 1 with positive probability, differentiable
  in between;
* the expected L0 charge, Eq. 12: ``P(g != 0) = sigmoid(log_alpha - beta log(-gamma / zeta))``;
* inference: the deterministic gate ``clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``, taken to
  0/1 at 1/2 where the gate's confidence must not leave the client.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: The paper's stretch interval and temperature (beta = 2/3, gamma = -0.1, zeta = 1.1).
BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1


def hard_concrete_sample(log_alpha: torch.Tensor, *, beta: float = BETA, generator: torch.Generator | None = None) -> torch.Tensor:
    """A reparameterised hard-concrete sample (Eq. 10), same shape as ``log_alpha``, values in [0, 1]."""
    u = torch.rand(log_alpha.shape, device=log_alpha.device, dtype=log_alpha.dtype, generator=generator).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def hard_concrete_mean(log_alpha: torch.Tensor) -> torch.Tensor:
    """The deterministic test-time gate ``clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def open_probability(log_alpha: torch.Tensor, *, beta: float = BETA) -> torch.Tensor:
    """``P(g != 0)`` of the hard-concrete gate (Eq. 12): the expected L0 norm per location."""
    return torch.sigmoid(log_alpha - beta * math.log(-GAMMA / ZETA))


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:  # type: ignore[override]
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.weight * grad, None


def reverse_gradient(x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Identity forward; the gradient is multiplied by ``-weight`` on the way back (gradient reversal).

    What stands before it is trained to *raise* the loss of what stands after it: the min-max of an
    adversary (which minimises its loss) against an obfuscator, in one backward pass.
    """
    return _Reverse.apply(x, float(weight))


class SecretAdversary(nn.Module):
    """A small CNN that reads the secret's label from a message: (B, C, H, W) -> logits (B, classes).

    Trained on the data owner's side against the obfuscator (known-secret mode); never part of the client
    that ships, nor of the message.
    """

    def __init__(self, in_channels: int, classes: int, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(8 * width, classes),
        )

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return self.net(m)


class ObjectReader(nn.Module):
    """A batch-norm CNN ending in a global max pool: reads a small object wherever it sits on the canvas.

    (B, C, H, W) -> logits (B, classes). Measured on fashion-tag (a 14x14 tag digit at a random place beside
    a garment), trained on the clean records of 300 known secrets: 0.86 test accuracy (0.93 with random
    shifts, :func:`shifted`), where :class:`SecretAdversary` memorised the 300 and read 0.12 (chance 0.10).
    """

    def __init__(self, in_channels: int, classes: int, width: int = 32) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.net = nn.Sequential(
            *block(in_channels, width), *block(width, width), nn.MaxPool2d(2, ceil_mode=True),
            *block(width, 2 * width), nn.MaxPool2d(2, ceil_mode=True), *block(2 * width, 2 * width),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def shifted(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """``x`` (B, C, H, W) rolled by one random (dy, dx) in [-max_shift, max_shift]^2 (wrapping round): the
    augmentation that teaches a reader of small objects that where the object sits does not matter."""
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,)))
    return torch.roll(x, (dy, dx), (2, 3))
