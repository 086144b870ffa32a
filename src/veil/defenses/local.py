"""The on-device baseline: the client classifies the record itself and sends only its decision.

``local`` is the "privacy by doing it on the device" point every other defense is compared with: a
client classifier g within the client budget reads the record, and the message is the template of its
decision, nothing else. A defense is worth an untrusted engine only where it beats this baseline's
primary accuracy with the attack near the floor, so the baseline must be the best small model a careful
engineer would put on the device, not a strawman:

* ``arch="tiny"``: the tiny CNN of veil's adaptive selector (:class:`veil.layers.selection.AdaptiveSelection`);
* ``arch="dsconv"``: a batch-normalised CNN of depthwise-separable blocks (:class:`DSConvClassifier`, the
  MobileNet recipe for small budgets), whose width ``--client-budget`` sets;
* ``distill_from=RUN``: either architecture also learns from the soft labels of a reference server model
  (a finished ``none`` run), Hinton et al.'s knowledge distillation. Threat-model assumption: the
  reference was trained on the data owner's own clean records, which the data owner may use to train
  its device model; the reference runs only while the data owner trains, never on the device.

Train it to convergence: ``--patience`` (early stopping on validation accuracy) with an epoch cap at least
as large as any defense it is compared with.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F

from torch import nn

from veil.defenses.base import Defense, Stage
from veil.layers.learning_rate import scale_learning_rate
from veil.layers.selection import AdaptiveSelection

#: The on-device architectures ``local`` offers (``arch``).
ARCHS = ("tiny", "dsconv")


class DSConvClassifier(nn.Module):
    """A small image classifier of depthwise-separable convolutions with batch norm (MobileNet-style).

    (B, C, H, W) -> logits (B, K). A 3x3 stem (stride 2 where H, W >= 16) to ``width`` channels, then
    ``depth`` blocks of depthwise 3x3 + pointwise 1x1 (each with batch norm and ReLU), every other block
    at stride 2 doubling the channels, global average pooling and a linear head. A depthwise-separable
    block costs about 1/9 of a full 3x3 convolution of the same width, so at a client budget of 1% of a
    ResNet it is several times wider than a plain CNN of the same FLOPs.
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], *, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"arch 'dsconv' needs image records (C, H, W), got {tuple(input_shape)}")
        if int(width) < 1 or not 1 <= int(depth) <= 8:
            raise ValueError(f"width must be >= 1 and depth in [1, 8], got {width!r}, {depth!r}")
        c, h, w = (int(v) for v in input_shape)
        stride = 2 if min(h, w) >= 16 else 1
        layers: list[nn.Module] = [nn.Conv2d(c, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        ch = width
        for i in range(int(depth)):
            down = i % 2 == 0  # blocks 1, 3, ... halve the map and double the channels
            out = 2 * ch if down else ch
            layers += [
                nn.Conv2d(ch, ch, 3, stride=2 if down else 1, padding=1, groups=ch, bias=False), nn.BatchNorm2d(ch), nn.ReLU(),
                nn.Conv2d(ch, out, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(),
            ]
            ch = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, int(num_classes))]
        self.net = nn.Sequential(*layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-label term: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over the batch.

    (B, K) logits each; the ``T^2`` keeps its gradient's scale comparable to the cross-entropy's as T grows.
    """
    t = float(temperature)
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True) * t * t


def load_reference(run: str, input_shape: tuple[int, ...], num_classes: int, option: str = "distill_from") -> nn.Module:
    """The server model of a finished ``none`` run (the teacher for distillation, the reference of
    ``select-salient``), in eval mode, frozen. ``option`` names the option in error messages."""
    from pathlib import Path

    from veil.io import load_weights, read_json
    from veil.models import create_model

    folder = Path(run)
    for name in ("config.json", "model.safetensors", "metrics.json"):
        if not (folder / name).is_file():
            raise ValueError(f"{option}: {folder} is not a finished run folder (no {name})")
    config = read_json(folder / "config.json")
    if not isinstance(config, dict) or config.get("defense") != "none":
        raise ValueError(f"{option}: {folder} was trained with defense {config.get('defense') if isinstance(config, dict) else None!r}; the reference must be an undefended ('none') run, whose model reads clean records")
    model = create_model(str(config.get("model")), tuple(input_shape), int(num_classes))
    state = load_weights(folder / "model.safetensors")
    with torch.no_grad():  # LazyLinear layers take their shape from one forward pass before the weights load
        model(torch.zeros(1, *input_shape))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{option}: {folder}'s model does not fit records of shape {tuple(input_shape)} with {num_classes} classes ({err})") from err
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


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

    Args:
        arch: ``tiny`` or ``dsconv`` (see the module's docstring).
        width: g's width (what ``--client-budget`` sets). hidden: the tiny CNN's hidden units.
        depth: ``dsconv``'s number of depthwise-separable blocks.
        distill_from: A finished ``none`` run folder whose server model's soft labels g also learns from.
        distill_weight: alpha in ``(1 - alpha) * CE(g, y) + alpha * distillation_loss``.
        distill_temperature: T of the soft labels.
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
        arch: str = "tiny",
        depth: int = 3,
        distill_from: str | None = None,
        distill_weight: float = 0.7,
        distill_temperature: float = 4.0,
    ) -> None:
        super().__init__(input_shape=input_shape, num_classes=num_classes)
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 8:
            raise ValueError(f"depth must be an integer in [1, 8], got {depth!r}")
        if distill_from is not None and (not isinstance(distill_from, str) or not distill_from):
            raise ValueError(f"distill_from must be a run folder, got {distill_from!r}")
        if isinstance(distill_weight, bool) or not isinstance(distill_weight, (int, float)) or not 0 <= distill_weight <= 1:
            raise ValueError(f"distill_weight must be a number in [0, 1], got {distill_weight!r}")
        if isinstance(distill_temperature, bool) or not isinstance(distill_temperature, (int, float)) or not 0 < distill_temperature <= 100:
            raise ValueError(f"distill_temperature must be a number in (0, 100], got {distill_temperature!r}")
        self.arch, self.depth = arch, int(depth)
        self.distill_from, self.distill_weight, self.distill_temperature = distill_from, float(distill_weight), float(distill_temperature)
        self._teacher: list[nn.Module] = []  # loaded on first use; a plain list, so it is never saved with the client
        for key, value in (("width", width), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if isinstance(classifier_weight, bool) or not isinstance(classifier_weight, (int, float)) or not classifier_weight >= 0:
            raise ValueError(f"classifier_weight must be a number >= 0, got {classifier_weight!r}")
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not lr_scale > 0:
            raise ValueError(f"lr_scale must be a number > 0, got {lr_scale!r}")
        self.width, self.hidden, self.classifier_weight = int(width), int(hidden), float(classifier_weight)
        self.lr_scale = float(lr_scale)
        net = (
            DSConvClassifier(self.num_classes, self.input_shape, width=self.width, depth=self.depth)
            if arch == "dsconv" else AdaptiveSelection(self.num_classes, self.input_shape, width=self.width, hidden=self.hidden)
        )
        self.classifier = scale_learning_rate(net, self.lr_scale)
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
        self._last_penalty = self._classifier_loss(x, logits, y) if (y is not None and self.training) else None
        return torch.einsum("bk,k...->b...", decision, self.templates)  # (B, C, H, W)

    def _classifier_loss(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """g's loss: cross-entropy on y, mixed with the teacher's soft labels where ``distill_from`` is set."""
        ce = F.cross_entropy(logits, y)
        if self.distill_from is None:
            return self.classifier_weight * ce
        if not self._teacher:
            self._teacher.append(load_reference(self.distill_from, self.input_shape, self.num_classes).to(x.device))
        with torch.no_grad():
            soft = self._teacher[0](x)  # (B, K)
        a = self.distill_weight
        return self.classifier_weight * ((1 - a) * ce + a * distillation_loss(logits, soft, self.distill_temperature))

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
        return {"width": self.width, "hidden": self.hidden, "classifier_weight": self.classifier_weight, "lr_scale": self.lr_scale,
                "arch": self.arch, "depth": self.depth, "distill_from": self.distill_from, "distill_weight": self.distill_weight,
                "distill_temperature": self.distill_temperature}
