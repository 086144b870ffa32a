"""Adaptive Noise Injection (ANI; Kariyappa, Dia and Qureshi; seed 002 §4).

The client mixes every record with unit Gaussian noise, pixel by pixel, with weights computed from the
record itself by a small encoder-decoder network f_psi (Eq. 5-6)::

    w  = f_psi(x) = tanh(exp(a(x)))          in (0, 1)^N      (Table 2: "... - Exp - Tanh")
    x' = w * x + (1 - w) * v,   v ~ N(0, I)                    (Eq. 5, Eq. 6)

and f_psi is trained jointly with the server model f_theta on the loss of Eq. 24::

    L = E_(x,y) H(y, f_theta(x')) - lambda * sum_i ln(1 - w_i)

The second term is (up to constants) -lambda * H(X'|X) (Eq. 18-22): it pushes w down, i.e. more noise.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from veil.defenses.base import Defense, Recipe


def ani_mix(x: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Eq. 5 of the ANI paper: ``x' = w * x + (1 - w) * v`` (all tensors of the same shape)."""
    return w * x + (1.0 - w) * v


def log_one_minus_tanh_exp(a: torch.Tensor) -> torch.Tensor:
    """``ln(1 - tanh(exp(a)))``, computed without cancellation.

    ``1 - tanh(u) = 2 * sigmoid(-2u)``, so the log is ``ln 2 + logsigmoid(-2 exp(a))``; finite even
    where ``tanh(exp(a))`` rounds to 1 in float32 (the naive form gives ``-inf`` there).
    """
    return math.log(2.0) + F.logsigmoid(-2.0 * torch.exp(a.clamp(max=30.0)))


class WConv2(nn.Module):
    """The f_psi network of ANI for MNIST-sized inputs (Table 2, Fig. 3: WConv-2).

    ``Conv 3x3, hidden - Maxpool /2 - Linear - Upscale x2 - Conv 3x3, C - Exp - Tanh``.
    "Linear" is read as a per-position linear map (a 1x1 convolution, hidden -> hidden): a fully
    connected layer over the whole embedding would cost more than the server model on MNIST, while
    the paper states f_psi costs about 5% of f_theta (App. B). A ReLU follows the first convolution.

    Shapes: (B, C, H, W) -> pre-activation ``a`` (B, C, H, W); ``w = tanh(exp(a))``.
    """

    def __init__(self, channels: int, hidden: int = 8) -> None:
        super().__init__()
        self.enc = nn.Conv2d(channels, hidden, 3, padding=1)
        self.linear = nn.Conv2d(hidden, hidden, 1)
        self.dec = nn.Conv2d(hidden, channels, 3, padding=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activation ``a`` of the weights (B, C, H, W); ``w = tanh(exp(a))``."""
        h = F.relu(self.enc(x))  # (B, hidden, H, W)
        h = F.max_pool2d(h, 2, ceil_mode=True)  # (B, hidden, ceil(H/2), ceil(W/2)): encoder embedding
        h = self.linear(h)
        h = F.interpolate(h, size=x.shape[-2:], mode="nearest")  # upscale x2 back to (H, W)
        return self.dec(h)  # (B, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.exp(self.logits(x).clamp(max=30.0)))


class AdaptiveNoiseInjection(Defense):
    """ANI: input-adaptive mixing with unit Gaussian noise, ``x' = w*x + (1-w)*v``, ``w = f_psi(x)``.

    Client: f_psi (a WConv-2 encoder-decoder, about 3% of the ``cnn`` server model's FLOPs on
    28x28 MNIST) and the mixing of Eq. 5; ``encode`` returns x' of the input's shape (B, C, H, W).
    Server: the task model on x' (``decode`` is the identity). The label is never used by the client.

    Training: one joint stage with the paper's recipe (:attr:`recipe`: SGD, lr 0.1, cosine annealing; one
    learning rate for psi and theta, as in Algorithm 1); f_psi and the server model minimise Eq. 24, cross-entropy plus
    ``penalty() = -lambda_ * mean_batch(sum_i ln(1 - w_i))`` (the sum runs over all N = C*H*W
    entries of a record, as in the paper).

    Knob: ``lambda_`` (larger = smaller w = more noise = more private, lower accuracy).

    Args:
        input_shape: (C, H, W) of a record.
        num_classes: Number of primary classes (unused by the method; kept for the interface).
        lambda_: Weight of the conditional-entropy term of Eq. 24 (a sum over all N entries, so its
            scale depends on N and on the number of steps). On 28x28 mnist-lt5, 3000 records, 3 epochs
            of SGD (the recipe): mean (1 - w) 0.025 at 1e-6, 0.37 at 1e-5, 0.97 at 3e-5, 0.997 at 1e-4.
        hidden: Channels of the WConv-2 embedding (8 in Table 2).
    """

    name = "ani"
    knob = "lambda_"
    knob_direction = 1
    budget_option = "hidden"  # f_psi's width: sized by --client-budget
    #: §5.1: "SGD ... initial learning rate of 0.1 decayed with cosine annealing". Momentum 0.9 is not
    #: stated in the paper; it is the usual companion of that schedule. Under SGD the step on psi is
    #: proportional to the gradient, so lambda trades the two terms of Eq. 24 against each other; under
    #: Adam (the loop's default) the step is normalised and the penalty wins outright past a threshold.
    recipe = Recipe(optimizer="sgd", lr=0.1, momentum=0.9, schedule="cosine")

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int, lambda_: float = 1e-4, hidden: int = 8) -> None:
        super().__init__(input_shape=input_shape, num_classes=num_classes)
        if not (isinstance(lambda_, (int, float)) and math.isfinite(lambda_) and lambda_ >= 0):
            raise ValueError(f"lambda_ must be a finite number >= 0, got {lambda_!r}")
        if not (isinstance(hidden, int) and hidden >= 1):
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
        self.lambda_ = float(lambda_)
        self.hidden = hidden
        self.f_psi = WConv2(self.input_shape[0], hidden)
        self._last_penalty: torch.Tensor | None = None
        self._last_w: torch.Tensor | None = None

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """w = f_psi(x) in (0, 1), shape (B, C, H, W): how much of each entry is kept (Eq. 6)."""
        self.check_input(x)
        return self.f_psi(x)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> x' (B, C, H, W), Eq. 5 with fresh noise v ~ N(0, I) on every call."""
        self.check_input(x, y)
        a = self.f_psi.logits(x)  # (B, C, H, W)
        w = torch.tanh(torch.exp(a.clamp(max=30.0)))
        # Eq. 24, second term: -lambda * sum_i ln(1 - w_i), averaged over the batch like the first
        self._last_penalty = -self.lambda_ * log_one_minus_tanh_exp(a).flatten(1).sum(1).mean()
        self._last_w = w.detach()
        v = torch.randn_like(x)  # Eq. 6: unit normal, independent of x
        return ani_mix(x, w, v)

    def penalty(self) -> torch.Tensor:
        if self._last_penalty is None:
            return torch.zeros((), device=self._device())
        return self._last_penalty

    def noise_level(self) -> float | None:
        """Mean of (1 - w) over the last batch (0: no noise, 1: pure noise); ``None`` before encode."""
        return None if self._last_w is None else float((1.0 - self._last_w).mean())

    def config(self) -> dict[str, Any]:
        return {"lambda_": self.lambda_, "hidden": self.hidden}
