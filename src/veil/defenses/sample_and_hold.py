"""Sample-and-hold sanitization of input feature maps (seed 004, Chun et al.: §3, Algorithm 1, §3.3, Eq. 8).

An input feature map (IFM) is unfolded into a stream (width -> height -> channel, §3.2: the row-major
flatten of a (C, H, W) map), cut into windows of ``n`` samples, and every sample of a window is replaced
by the *non-zero sample closest to the mean of the window's non-zero samples* (Algorithm 1). The
degree of sanitization ``gamma`` (Eq. 6) asks that the probabilistic accuracy (the model's probability of
the true label) fall by at least a factor ``2**gamma``:
``Pr[F(d') in S] <= Pr[F(d) in S] / 2**gamma``; the layer-wise control loop (§3.3, Fig. 3) raises ``n``
until it holds. ``eff_san`` (Eq. 8) scores how finely a layer's sanitization can be graded.

Where it sits in veil's split: the client runs a conv block (conv 3x3, ReLU, max-pool 2) and sends its
output feature map, sanitized; this map is the IFM of the server model's first layer, so the sanitized
IFM is exactly what leaves the client. Optionally the record itself (the IFM of the client's conv) is
sanitized as well, with its own window. The model whose probabilistic accuracy the control loop watches
is the server model, trained first on clean maps (the paper's setting: a trained CNN whose IFMs are
sanitized); veil then fine-tunes the server model on sanitized maps (the paper does not retrain), since an
honest comparison lets the server, and the attacker, adapt.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from veil.defenses.base import Defense, Stage


# ------------------------------------------------------------------------------------------ pure functions
def sample_and_hold(x: torch.Tensor, window: int) -> torch.Tensor:
    """Algorithm 1 on every window of each record's unfolded stream. (B, *S) -> (B, *S).

    Per window ``W`` of ``window`` consecutive stream samples: ``X`` = its non-zero samples; if ``X`` is
    not empty, every sample becomes ``w_q = argmin_{x in X} |x - E[X]|`` (the first one on ties, within
    a relative 1e-5, so that float rounding does not decide between two equally near samples); an
    all-zero window stays zero. The last window may be shorter. Gradients flow to the held samples.
    """
    window = int(window)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if window == 1 or x.numel() == 0:
        return x
    b = x.shape[0]
    s = x.reshape(b, -1)  # (B, L): width fastest, then height, then channel (§3.2)
    length = s.shape[1]
    # zero padding is exact: zeros never enter E[X] nor the choice, and the padded tail is cut off
    w = F.pad(s, (0, (-length) % window)).view(b, -1, window)  # (B, K, n)
    with torch.no_grad():
        nz = w != 0
        count = nz.sum(-1, keepdim=True)
        mean = (w * nz).sum(-1, keepdim=True) / count.clamp(min=1)  # E[X], non-zero samples only
        dist = torch.where(nz, (w - mean).abs(), torch.full_like(w, math.inf))
        # ties (e.g. two non-zero samples are always equally far from their mean) go to the first
        # sample, also when rounding makes the later one look a hair closer
        near = dist <= dist.min(-1, keepdim=True).values * (1 + 1e-5) + 1e-7 * mean.abs()
        q = near.to(torch.uint8).argmax(-1, keepdim=True)  # (B, K, 1); all-zero window -> index 0, a zero
    held = w.gather(-1, q).expand_as(w)
    return held.reshape(b, -1)[:, :length].reshape(x.shape)


def probabilistic_accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``Pr[F(d) in S]`` per record: the softmax probability of the true label. (B, C), (B,) -> (B,)."""
    return logits.softmax(1).gather(1, y[:, None]).squeeze(1)


def sanitization_degree(p_original: float, p_sanitized: float) -> float:
    """Degree of sanitization reached, ``log2(Pr[original] / Pr[sanitized])`` (Eq. 6 solved for gamma)."""
    if p_original <= 0:
        raise ValueError(f"p_original must be > 0, got {p_original}")
    return math.log2(p_original / max(p_sanitized, 1e-12))


def sanitization_efficiency(probabilities: Sequence[float], *, decimals: int = 4) -> float:
    """``eff_san`` of Eq. 8: distinct probabilistic accuracies / number of window sizes in the range.

    Args:
        probabilities: The probabilistic accuracy at each window size of a contiguous range (the paper
            uses sizes 2..150, i.e. 149 values).
        decimals: Probabilities are compared after rounding to this many decimals (the paper does not say
            its resolution; 4 decimals reproduce its counts' order of magnitude).
    """
    p = np.asarray(list(probabilities), dtype=np.float64)
    if p.size == 0:
        raise ValueError("probabilities must hold at least one value (one per window size)")
    return len(np.unique(np.round(p, decimals))) / p.size


# ------------------------------------------------------------------------------------------ the defense
class SampleAndHold(Defense):
    """Sample-and-hold sanitization of the client's feature map, window set by gamma (seed 004 §3.3).

    Client: [sample-and-hold on x with window ``windows[0]`` if ``sanitize_input``] -> conv 3x3, ReLU,
    max-pool 2 -> sample-and-hold with window ``windows[1]`` -> sent: (B, client_channels, H/2, W/2).
    Server: nothing in ``decode`` (identity); the server model reads the sanitized map.

    Knob: ``gamma`` >= 0, the degree of sanitization (Eq. 6): the calibrated windows make the server
    model's mean probabilistic accuracy on calibration records at most ``2**-gamma`` times its clean one.
    **Larger is more private** (longer windows, fewer distinct samples) and less accurate. A two-class
    model that is near-certain on clean data cannot fall much below chance, so gamma much above 1 may be
    unreachable: the loop then stops at the longest window and says so (``reached`` buffer = 0).

    Stages: ``pretrain`` (client block and server model on clean maps, windows = 1) and ``sanitize``
    (``setup`` runs the control loop on the training loader with the pretrained server model; the client
    block is frozen so the calibration stays valid; the server model fine-tunes on sanitized maps).

    Deterministic by design: Algorithm 1 is a deterministic function of the IFM (``deterministic =
    True``; the contract's noise test is skipped). Calibrated windows are buffers (saved with the weights).

    Args:
        gamma: Degree of sanitization (knob).
        client_channels: Channels of the client conv block.
        sanitize_input: Also sanitize the record itself (the IFM of the client conv), with its own window.
        calibration_size: Training records the control loop evaluates.
        max_window: Longest window tried (0: the whole stream of the layer).
    """

    name = "sample-and-hold"
    knob = "gamma"
    knob_direction = 1
    budget_option = "client_channels"
    deterministic = True

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        gamma: float = 0.5,
        client_channels: int = 4,
        sanitize_input: bool = False,
        calibration_size: int = 512,
        max_window: int = 0,
    ) -> None:
        super().__init__(input_shape=input_shape, num_classes=num_classes)
        if not (float(gamma) >= 0 and math.isfinite(float(gamma))):
            raise ValueError(f"gamma (degree of sanitization) must be a finite number >= 0, got {gamma!r}")
        if int(client_channels) < 1 or int(client_channels) != client_channels:
            raise ValueError(f"client_channels must be an integer >= 1, got {client_channels!r}")
        if int(calibration_size) < 1:
            raise ValueError(f"calibration_size must be >= 1, got {calibration_size!r}")
        if int(max_window) < 0:
            raise ValueError(f"max_window must be >= 0 (0: whole stream), got {max_window!r}")
        self.gamma = float(gamma)
        self.client_channels = int(client_channels)
        self.sanitize_input = bool(sanitize_input)
        self.calibration_size = int(calibration_size)
        self.max_window = int(max_window)
        c, h, w = self.input_shape
        pool = 2 if min(h, w) >= 4 else 1
        self.client = nn.Sequential(
            nn.Conv2d(c, self.client_channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(pool) if pool == 2 else nn.Identity()
        )
        self._out_shape = (self.client_channels, h // pool, w // pool)
        # window n per sanitized IFM: [record, sent feature map]; 1 = untouched
        self.register_buffer("windows", torch.ones(2, dtype=torch.int64))
        # degree of sanitization the calibration reached, and whether it met gamma (1) or not (0)
        self.register_buffer("achieved", torch.zeros(()))
        self.register_buffer("reached", torch.ones((), dtype=torch.int64))

    # -------------------------------------------------------------------------------- the contract
    def stages(self) -> list[Stage]:
        return [Stage("pretrain", epoch_share=0.5), Stage("sanitize", epoch_share=0.5)]

    def set_stage(self, name: str) -> None:
        super().set_stage(name)
        pretrain = name == "pretrain"
        for p in self.client.parameters():
            p.requires_grad_(pretrain)  # frozen while sanitized: the calibration holds for these weights
        if pretrain:
            self.windows.fill_(1)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Client: (B, C, H, W) -> sanitized feature map (B, client_channels, H/2, W/2), all that is sent."""
        self.check_input(x, y)
        if self.sanitize_input:
            x = sample_and_hold(x, int(self.windows[0]))
        return sample_and_hold(self.client(x), int(self.windows[1]))

    def output_shape(self) -> tuple[int, ...]:
        return self._out_shape

    def setup(self, model: nn.Module, loader: Any) -> None:
        """In the ``sanitize`` stage: run the control loop (§3.3) with the pretrained server ``model``."""
        if self._stage == "sanitize":
            self.calibrate(model, loader)

    def config(self) -> dict[str, Any]:
        return {
            "gamma": self.gamma,
            "client_channels": self.client_channels,
            "sanitize_input": self.sanitize_input,
            "calibration_size": self.calibration_size,
            "max_window": self.max_window,
        }

    # -------------------------------------------------------------------------------- control loop
    @torch.no_grad()
    def calibrate(self, model: nn.Module, loader: Iterable, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Layer-wise control loop (§3.3, Fig. 3): raise the windows until gamma holds.

        The windows of the sanitized IFMs are raised by one in turn (``n++`` per layer, round robin),
        and after every raise the server model's mean probabilistic accuracy on ``calibration_size``
        training records is compared with the clean one; the loop stops at the first setting with
        ``log2(p_clean / p_sanitized) >= gamma`` (Eq. 6), or when every window is at its longest.

        Returns:
            ``{"windows": [...], "achieved": gamma reached, "reached": bool, "p_clean": .., "p_sanitized": ..}``
        """
        log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        xs, ys, seen = [], [], 0
        for batch in loader:
            xs.append(batch[0])
            ys.append(batch[1])
            seen += len(batch[1])
            if seen >= self.calibration_size:
                break
        if not xs:
            raise ValueError("calibration needs at least one batch of records; the loader is empty")
        x, y = torch.cat(xs)[: self.calibration_size], torch.cat(ys)[: self.calibration_size]
        was = model.training
        model.eval()
        self.windows.fill_(1)
        clean = self.client(x)  # (N, C', H', W'), reused while the record itself is not sanitized
        p_clean = float(probabilistic_accuracy(model(clean), y).mean())

        def p_at() -> float:
            f = clean if not self.sanitize_input else self.client(sample_and_hold(x, int(self.windows[0])))
            return float(probabilistic_accuracy(model(sample_and_hold(f, int(self.windows[1]))), y).mean())

        layers = [0, 1] if self.sanitize_input else [1]
        longest = {0: math.prod(self.input_shape), 1: math.prod(self._out_shape)}
        if self.max_window:
            longest = {k: min(v, self.max_window) for k, v in longest.items()}
        p, achieved, steps = p_clean, 0.0, 0
        while True:
            achieved = sanitization_degree(p_clean, p)
            if achieved >= self.gamma:
                break
            grown = False
            for layer in layers:
                if int(self.windows[layer]) < longest[layer]:
                    self.windows[layer] += 1
                    grown = True
                    p = p_at()
                    achieved = sanitization_degree(p_clean, p)
                    if achieved >= self.gamma:
                        break
            steps += 1
            if steps % 50 == 0:
                log(f"[sample-and-hold] control loop: windows {self.windows.tolist()}, gamma reached {achieved:.3f} of {self.gamma}")
            if achieved >= self.gamma or not grown:
                break
        reached = achieved >= self.gamma
        self.achieved.fill_(achieved)
        self.reached.fill_(int(reached))
        if not reached:
            log(f"[sample-and-hold] gamma={self.gamma} not reachable: stopped at windows {self.windows.tolist()} (reached {achieved:.3f})")
        model.train(was)
        return {"windows": self.windows.tolist(), "achieved": achieved, "reached": reached, "p_clean": p_clean, "p_sanitized": p}
