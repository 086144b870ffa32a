"""Shredder-style learnt noise on an intermediate feature map (Mireshghallah et al., ASPLOS 2020;
described in seed 002 App. D).

The network is split: the client evaluates its first layers (here a small convolution block, learnt
without noise first, then frozen) and adds a noise tensor to the intermediate feature map before it
leaves; the server evaluates the rest::

    h  = g(x)                   client feature map, (B, K, H', W')
    h' = h + n_k,               n_k drawn uniformly from a collection {n_1, ..., n_T} of learnt tensors

Shredder casts the noise tensors as trainable parameters and learns them with a loss that balances
accuracy against noise magnitude: cross-entropy minus lambda times the mean absolute noise
(maximising the noise, as with Cloak). At inference one tensor of the learnt collection is drawn per
record, so the noise is stochastic but each draw is one of T fixed learnt tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from veil.defenses.base import Defense, Stage


class ShredderNoise(Defense):
    """Shredder-style split inference: client conv block, then one of T learnt additive noise tensors.

    Client: ``Conv 3x3 (C -> channels) - ReLU - MaxPool /2`` (the pool only for records of 16x16 or
    more) and the noise addition; ``encode`` returns the noisy feature map (B, channels, H', W'),
    which is what :meth:`output_shape` reports and what the server model is built for.
    Server: the rest of the network (the task model built on ``output_shape()``).

    Training (two stages through the one loop):

    1. ``"pretrain"``: the client block and the server model train on clean features (Shredder
       starts from a pre-trained network).
    2. ``"noise"``: the client block is frozen (so it cannot grow its features to drown the noise)
       and the noise collection trains on cross-entropy plus
       ``penalty() = -lambda_ * mean|n|``; the server model is retrained too unless
       ``retrain_server=False`` (Shredder's original setting keeps it fixed).

    Knob: ``lambda_`` (larger = larger noise = more private).

    Args:
        input_shape: (C, H, W) of a record.
        num_classes: Number of primary classes (unused by the method).
        lambda_: Weight of the noise-maximising term (1.0 gives mean|n| / mean|features| of about 1.2
            on mnist-lt5 after 2 + 2 epochs).
        channels: Channels of the client feature map.
        num_tensors: Size T of the learnt noise collection.
        init_scale: Noise tensors start as Laplace(0, init_scale) samples.
        noise_scale: n = noise_scale * r with r the trained tensors; under Adam this multiplies the
            step on n, so that the noise moves within short runs.
        retrain_server: Whether the server model trains in the ``"noise"`` stage.
    """

    name = "shredder"
    knob = "lambda_"
    knob_direction = 1
    budget_option = "channels"

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        lambda_: float = 1.0,
        channels: int = 8,
        num_tensors: int = 32,
        init_scale: float = 0.1,
        noise_scale: float = 10.0,
        retrain_server: bool = True,
    ) -> None:
        super().__init__(input_shape=input_shape, num_classes=num_classes)
        for key, val in (("lambda_", lambda_), ("init_scale", init_scale), ("noise_scale", noise_scale)):
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val >= 0):
                raise ValueError(f"{key} must be a finite number >= 0, got {val!r}")
        if noise_scale <= 0:
            raise ValueError(f"noise_scale must be > 0, got {noise_scale!r}")
        for key, val in (("channels", channels), ("num_tensors", num_tensors)):
            if not (isinstance(val, int) and val >= 1):
                raise ValueError(f"{key} must be a positive integer, got {val!r}")
        self.lambda_ = float(lambda_)
        self.channels = channels
        self.num_tensors = num_tensors
        self.init_scale = float(init_scale)
        self.noise_scale = float(noise_scale)
        self.retrain_server = bool(retrain_server)
        c, h, w = self.input_shape
        self.pool = min(h, w) >= 16
        self.conv = nn.Conv2d(c, channels, 3, padding=1)
        fh, fw = ((h + 1) // 2, (w + 1) // 2) if self.pool else (h, w)
        self._feature_shape = (channels, fh, fw)
        laplace = torch.distributions.Laplace(0.0, max(self.init_scale, 1e-12))
        self.r = nn.Parameter(laplace.sample((num_tensors, *self._feature_shape)) / self.noise_scale)
        self._last_index: torch.Tensor | None = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Client feature map before noise: (B, C, H, W) -> (B, channels, H', W')."""
        h = F.relu(self.conv(x))
        return F.max_pool2d(h, 2, ceil_mode=True) if self.pool else h

    def noise(self) -> torch.Tensor:
        """The learnt collection (T, channels, H', W')."""
        return self.noise_scale * self.r

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> features + n_k (B, channels, H', W'); k uniform in {1..T} per record."""
        self.check_input(x, y)
        h = self.features(x)
        if self.stage == "pretrain":
            return h  # phase 1: the clean split network
        k = torch.randint(0, self.num_tensors, (x.shape[0],), device=x.device)
        self._last_index = k
        return h + self.noise()[k]

    def penalty(self) -> torch.Tensor:
        """``-lambda_ * mean|n|`` over the collection (zero in the pretrain stage)."""
        if self.stage == "pretrain":
            return torch.zeros((), device=self._device())
        return -self.lambda_ * self.noise().abs().mean()

    def output_shape(self) -> tuple[int, ...]:
        return self._feature_shape

    def stages(self) -> list[Stage]:
        return [Stage("pretrain", epoch_share=0.5), Stage("noise", epoch_share=0.5, train_model=self.retrain_server)]

    def set_stage(self, name: str) -> None:
        super().set_stage(name)
        for p in self.conv.parameters():
            p.requires_grad_(name == "pretrain")
        self.r.requires_grad_(name == "noise")

    @torch.no_grad()
    def noise_to_signal(self, x: torch.Tensor) -> float:
        """mean|n| / mean|g(x)| on a batch: the noise magnitude relative to the client features."""
        return float(self.noise().abs().mean() / self.features(x).abs().mean().clamp_min(1e-12))

    def config(self) -> dict[str, Any]:
        return {
            "lambda_": self.lambda_,
            "channels": self.channels,
            "num_tensors": self.num_tensors,
            "init_scale": self.init_scale,
            "noise_scale": self.noise_scale,
            "retrain_server": self.retrain_server,
        }
