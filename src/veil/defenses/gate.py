"""Mask-free selection: per-pixel hard-concrete gates that learn from y alone which pixels the task needs.

Where the secret sits beside or on the task's content (a tag on a garment) and nobody marks where it is,
the client must find out what to keep from the task itself. ``scnl-region`` learnt its per-pixel selector
from masks, because with the task loss alone "the task pays for letting everything through". Here the
selector's output is an L0-charged gate (Louizos et al., ICLR 2018; :mod:`veil.layers.gates`): each
pixel's gate costs ``lambda_ · P(open)``, so a pixel the task does not pay for is closed for free, and one
the task needs stays open as long as its worth to the task exceeds the charge. The message is the seed's
two-region additive SCNL with the gate as its selection (open: content + little noise; closed: a learnt
template + noise; no value of a closed pixel reaches the message)::

    g = hard-concrete(log_alpha(x))                     # (B, 1, H, W), a sample in training
    h = g ⊙ (x + open_scale · eps_1) + (1 - g) ⊙ (offset + closed_scale · eps_2)

``log_alpha(x)`` comes from a small client CNN (:class:`veil.layers.selection.PixelSelection`, sized by
``selector_width``, the client budget); its last bias starts at ``init_open`` (the gates start open: a
curriculum from open to closed, so the server first learns the content and the charge then closes what it
does not use). At inference each gate is the deterministic hard-concrete value taken to 0/1 at 1/2
(``sharpen``), so its confidence is not sent.

``scnl-gate-z`` (known-secret mode) adds an adversary on the message that reads the secret z where the data
owner knows it (``secret_fraction`` of the training records); the gradient reversal in front of it
(Ganin & Lempitsky 2015) trains the gates and templates to defeat it: a min-max in one backward pass, the
ANI/DeepObfuscator recipe. The adversary is training machinery on the data owner's side, not client code.

Knob ``lambda_`` (larger = more private): the weight of the gates' expected L0 norm (mean open probability).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from veil.defenses.base import Defense, Stage, check_secret, number_option
from veil.layers.gates import SecretAdversary, hard_concrete_mean, hard_concrete_sample, open_probability, reverse_gradient
from veil.layers.learning_rate import scale_learning_rate
from veil.layers.selection import PixelSelection


class SCNLGate(Defense):
    """Per-pixel L0 gates learnt from y alone; closed pixels send noise.

    Args:
        lambda_: Weight of the expected L0 charge (mean open probability of the gates); larger = more
            private (more closed). >= 0.
        selector_width: Channels of the gate network (its client cost; ``--client-budget`` sets it).
        init_open: Initial log-odds of every gate (the last bias of the gate network): > 0 starts open.
        open_scale: Noise standard deviation on open pixels (records in [0, 1]).
        closed_scale: Noise standard deviation on closed pixels, around the learnt template.
        lr_scale: The client layers learn this many times faster than the server model.
        sharpen: At inference each gate is 0 or 1 (the deterministic gate at 1/2), so its confidence is not sent.
    """

    uses: ClassVar[str] = "y"
    name: ClassVar[str] = "scnl-gate"
    knob: ClassVar[str] = "lambda_"
    knob_direction: ClassVar[int] = 1
    budget_option: ClassVar[str] = "selector_width"

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        lambda_: float = 1.0,
        selector_width: int = 8,
        init_open: float = 3.0,
        open_scale: float = 0.05,
        closed_scale: float = 0.5,
        lr_scale: float = 5.0,
        sharpen: bool = True,
    ) -> None:
        super().__init__(input_shape=input_shape, num_classes=num_classes)
        if isinstance(selector_width, bool) or not (isinstance(selector_width, int) and 1 <= selector_width <= 256):
            raise ValueError(f"selector_width must be an integer in [1, 256], got {selector_width!r}")
        if not isinstance(sharpen, bool):
            raise ValueError(f"sharpen must be true or false, got {sharpen!r}")
        self.options: dict[str, Any] = dict(
            lambda_=number_option("lambda_", lambda_, 0, 1e6), selector_width=int(selector_width),
            init_open=number_option("init_open", init_open, -20, 20), open_scale=number_option("open_scale", open_scale, 0, 10),
            closed_scale=number_option("closed_scale", closed_scale, 0, 10), lr_scale=number_option("lr_scale", lr_scale, 0, 1e3, lo_open=True),
            sharpen=sharpen,
        )
        self.lambda_ = self.options["lambda_"]
        c, h, w = self.input_shape
        client = nn.Module()
        client.selector = PixelSelection(c, 1, int(selector_width))
        with torch.no_grad():
            client.selector.net[-1].bias.fill_(self.options["init_open"])
        client.offset = nn.Parameter(torch.zeros(c, h, w))  # what a closed pixel shows (before its noise)
        self.client = scale_learning_rate(client, self.options["lr_scale"])
        self._last_penalty: torch.Tensor | None = None

    def config(self) -> dict[str, Any]:
        return dict(self.options)

    def stages(self) -> list[Stage]:
        """One joint stage at the training exposure (what the data owner knows reaches ``encode``: the known
        secrets in ``scnl-gate-z``; the gates never read y)."""
        return [Stage("joint", use_labels=True)]

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate g (B, 1, H, W) in [0, 1], log-odds (B, 1, H, W)): a sample in training, deterministic
        (0/1 with ``sharpen``) in eval mode."""
        log_alpha = self.client.selector(x)
        if self.training:
            return hard_concrete_sample(log_alpha), log_alpha
        g = hard_concrete_mean(log_alpha)
        return ((g > 0.5).to(x.dtype) if self.options["sharpen"] else g), log_alpha

    def message(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``g ⊙ (x + open noise) + (1 - g) ⊙ (template + closed noise)``: (B, C, H, W), a fresh sample."""
        o = self.options
        opened = x + o["open_scale"] * torch.randn_like(x)
        closed = self.client.offset + o["closed_scale"] * torch.randn_like(x)
        return g * opened + (1 - g) * closed

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Client side. x (B, C, H, W) -> h (B, C, H, W). ``y`` is validated, never used: the gates see x only."""
        self.check_input(x, y)
        g, log_alpha = self.gates(x)
        h = self.message(x, g)
        self._last_penalty = self.lambda_ * open_probability(log_alpha).mean()
        return h

    def penalty(self) -> torch.Tensor:
        """``lambda_ · mean P(gate open)`` of the last encode (+ the adversary's term, known-secret mode)."""
        if self._last_penalty is None:
            return torch.zeros((), device=self._device())
        return self._last_penalty


class SCNLGateSecret(SCNLGate):
    """scnl-gate against an adversary on the known secrets.

    Args (beyond :class:`SCNLGate`'s):
        secret_fraction: Share of the training records whose secret the data owner hands over (the
            training loop keeps the same records throughout; the rest carry -1).
        secret_classes: Number of the secret's classes (the adversary's outputs).
        adversary_weight: Weight of the adversary's cross-entropy in the loss; the obfuscator receives that
            weighted gradient reversed.
        adversary_width: Channels of the adversary's first convolution.
    """

    uses: ClassVar[str] = "y,z"
    name: ClassVar[str] = "scnl-gate-z"
    uses_secret: ClassVar[bool] = True

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        secret_fraction: float = 0.1,
        secret_classes: int = 10,
        adversary_weight: float = 1.0,
        adversary_width: int = 16,
        **options: Any,
    ) -> None:
        super().__init__(input_shape=input_shape, num_classes=num_classes, **options)
        if isinstance(secret_classes, bool) or not (isinstance(secret_classes, int) and 2 <= secret_classes <= 100_000):
            raise ValueError(f"secret_classes must be an integer >= 2, got {secret_classes!r}")
        if isinstance(adversary_width, bool) or not (isinstance(adversary_width, int) and 1 <= adversary_width <= 256):
            raise ValueError(f"adversary_width must be an integer in [1, 256], got {adversary_width!r}")
        self.secret_fraction = number_option("secret_fraction", secret_fraction, 0, 1)
        self.options.update(
            secret_fraction=self.secret_fraction, secret_classes=int(secret_classes),
            adversary_weight=number_option("adversary_weight", adversary_weight, 0, 1e3), adversary_width=int(adversary_width),
        )
        self.adversary = scale_learning_rate(SecretAdversary(self.input_shape[0], int(secret_classes), int(adversary_width)), self.options["lr_scale"])

    def client_parameter_count(self) -> int:
        """The gates and template only: the adversary stays with the data owner's training."""
        return sum(p.numel() for p in self.client.parameters())

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None, *, secret: torch.Tensor | None = None) -> torch.Tensor:
        """Client side. x (B, C, H, W) [+ secret (B,) int64, -1 where unknown] -> h (B, C, H, W).

        The secret never shapes ``h``; in training mode it adds the adversary's cross-entropy on the known
        records to the penalty, with the gradient into ``h`` reversed.
        """
        h = super().encode(x, y)
        if secret is None or not self.training:
            return h
        k = self.options["secret_classes"]
        check_secret(secret, x.shape[0], k)
        known = secret >= 0
        if known.any():
            logits = self.adversary(reverse_gradient(h[known]))  # the adversary descends, the obfuscator ascends
            self._last_penalty = self._last_penalty + self.options["adversary_weight"] * F.cross_entropy(logits, secret[known].long())
        return h
