"""The on-device baseline: the client classifies the record itself and sends only its decision.

``local`` is the "privacy by doing it on the device" point every other defense is compared with: a
client classifier g of the same size as veil's adaptive selector (the tiny CNN of
:class:`veil.layers.selection.AdaptiveSelection`, about 3% of the ``cnn`` server's FLOPs on mnist at the
default ``width``) reads the record, and the message is the template of its decision, nothing else. A
defense is worth an untrusted engine only where it beats this baseline's primary accuracy with the
attack near the floor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F

from veil.defenses.base import Defense, Stage
from veil.layers.scnl import scale_learning_rate
from veil.layers.selection import AdaptiveSelection


def decision_templates(num_classes: int, input_shape: tuple[int, ...]) -> torch.Tensor:
    """One fixed record per class: class k lights the k-th of K equal segments of the flattened record.

    (K, *input_shape) in {0, 1}: for a one-channel image the segments are horizontal bands (class 0 the
    top rows, class K-1 the bottom ones), so a server model and the attackers read a decision message as
    they read a record, and a PNG of it shows which class was sent. Bands are read at once by any
    convolutional server; an earlier code (the whole record filled with k / (K - 1)) asked the server to
    tell 10 grey levels apart, which a batch-normalised ResNet learnt slowly.
    """
    k, size = int(num_classes), math.prod(int(s) for s in input_shape)
    if size < k:
        raise ValueError(f"a record of shape {tuple(input_shape)} has fewer entries ({size}) than classes ({k})")
    segment = torch.arange(size) * k // size  # (size,) segment of each entry, 0..K-1
    return (segment.unsqueeze(0) == torch.arange(k).unsqueeze(1)).float().reshape(k, *input_shape)


class LocalDecision(Defense):
    """On-device baseline: a small client classifier's decision, sent as a class template.

    Client (``encode``): logits = g(x) (B, K); message = sum_k d_k * template_k (B, C, H, W), where d is
    the one-hot argmax of the logits, in training too, so the server trains on exactly the messages it
    will receive. g learns from the label alone (cross-entropy in ``penalty``), as any on-device
    classifier would: no gradient flows from the server into g. (An earlier version passed the server's
    gradient back through the argmax (straight-through); while the server is untrained that gradient is
    noise summed over every pixel of the template, and it drowned g's own signal: on fashion-tag at 1% of
    the ResNet's FLOPs g stayed at chance, 0.164, and on mnist-lt5 it trailed SCNL's selector of the same
    size.) The message never depends on the label, so both points of exposure send the same thing.
    Deterministic: no noise is needed, because nothing but the decision leaves the client.

    Server (``decode``): identity; the server model learns to read the template.

    No knob: the trade-off is set by g's size (``width``, ``hidden``), i.e. the client's compute.
    ``lr_scale`` (default 5, as SCNL's client layers) lets g learn that many times faster than the server
    under the loop's one learning rate, so the baseline is not handicapped against SCNL's selector.
    """

    name = "local"
    budget_option = "width"
    deterministic = True

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        width: int = 8,
        hidden: int = 32,
        classifier_weight: float = 1.0,
        lr_scale: float = 5.0,
    ) -> None:
        super().__init__(input_shape=input_shape, num_classes=num_classes)
        for key, value in (("width", width), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if isinstance(classifier_weight, bool) or not isinstance(classifier_weight, (int, float)) or not classifier_weight >= 0:
            raise ValueError(f"classifier_weight must be a number >= 0, got {classifier_weight!r}")
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not lr_scale > 0:
            raise ValueError(f"lr_scale must be a number > 0, got {lr_scale!r}")
        self.width, self.hidden, self.classifier_weight = int(width), int(hidden), float(classifier_weight)
        self.lr_scale = float(lr_scale)
        self.classifier = scale_learning_rate(
            AdaptiveSelection(self.num_classes, self.input_shape, width=self.width, hidden=self.hidden), self.lr_scale
        )
        # fixed, not trained: a buffer, so it travels with the saved obfuscator but is not a parameter
        self.register_buffer("templates", decision_templates(self.num_classes, self.input_shape))
        self._last_penalty: torch.Tensor | None = None

    def stages(self) -> list[Stage]:
        # labels are known while training: they supervise the classifier (the message ignores them)
        return [Stage("joint", use_labels=True)]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The client classifier's logits, (B, C, H, W) -> (B, K)."""
        return self.classifier.logits(x)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(B, *input_shape) -> (B, *input_shape): the template of the client's decision."""
        self.check_input(x, y)
        logits = self.logits(x)  # (B, K)
        decision = F.one_hot(logits.argmax(1), self.num_classes).to(logits.dtype)  # (B, K), no gradient to g
        self._last_penalty = (
            self.classifier_weight * F.cross_entropy(logits, y) if (y is not None and self.training) else None
        )
        return torch.einsum("bk,k...->b...", decision, self.templates)  # (B, C, H, W)

    def penalty(self) -> torch.Tensor:
        """``classifier_weight`` x cross-entropy of the client classifier on the known labels (else 0)."""
        if self._last_penalty is None:
            return torch.zeros((), device=self._device())
        return self._last_penalty

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The client's own decision (B,) int64, what the template encodes."""
        self.check_input(x)
        return self.logits(x).argmax(1)

    def config(self) -> dict[str, Any]:
        return {"width": self.width, "hidden": self.hidden, "classifier_weight": self.classifier_weight, "lr_scale": self.lr_scale}
