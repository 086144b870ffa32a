"""The attacker architectures of the attribute attack (:mod:`veil.evaluation.attack`) and what wraps them:
[the method's decode] -> standardise -> [one-hot y] -> network (:class:`AttackerModel`)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from veil.defenses.base import Defense
from veil.evaluation.attack_config import IMAGE_ATTACKERS, VECTOR_ATTACKERS, AttackConfig


def _conv_block(c_in: int, c_out: int, bn: bool) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), *( [nn.BatchNorm2d(c_out)] if bn else []), nn.ReLU()]


def build_attacker(
    name: str, message_shape: tuple[int, ...], num_classes: int, width: int = 32, *, server_model: str = "cnn"
) -> nn.Module:
    """Attacker ``name`` for inputs of ``message_shape`` ((C, H, W) or (m,)) -> (B, num_classes) logits.

    * ``linear``: multinomial logistic regression on the flattened message.
    * ``mlp``: two hidden layers (512, 256) with dropout.
    * ``mlp-bn``: three hidden layers with batch norm (vector messages).
    * ``cnn``: two conv blocks (``width``, 2 ``width``) and a 128-unit head (like the server's own model).
    * ``cnn-bn``: three double-conv blocks (``width`` x 1, 2, 4) with batch norm, pooling while the map
      is >= 4 wide.
    * ``server``: ``veil.models.create_model(server_model, message_shape, num_classes)``, the engine's own
      architecture and width (its input is the *decoded* message; see :func:`veil.evaluation.attack.attack_exposure`).
    """
    d = int(np.prod(message_shape))
    if name == "server":
        from veil.models import create_model

        return create_model(server_model, tuple(message_shape), num_classes)
    if name == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(d, num_classes))
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(d, 512), nn.ReLU(), nn.Dropout(0.2), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, num_classes)
        )
    if name == "mlp-bn":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(d, 512), nn.BatchNorm1d(512), nn.ReLU(),
            nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(),
            nn.Linear(256, num_classes),
        )
    if name not in ("cnn", "cnn-bn"):
        raise ValueError(f"unknown attacker {name!r}; valid: {', '.join(sorted(set(IMAGE_ATTACKERS) | set(VECTOR_ATTACKERS)))}")
    if len(message_shape) != 3:
        raise ValueError(f"attacker {name!r} needs image-shaped messages (C, H, W), got shape {tuple(message_shape)}")
    c, h, w = message_shape
    if name == "cnn":
        layers: list[nn.Module] = []
        size = min(h, w)
        for c_in, c_out in ((c, width), (width, 2 * width)):
            layers += _conv_block(c_in, c_out, bn=False)
            if size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d((min(4, size), min(4, size))), nn.Flatten(), nn.LazyLinear(128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, num_classes))
    layers = []
    size = min(h, w)
    for c_in, c_out in ((c, width), (width, 2 * width), (2 * width, 4 * width)):
        layers += _conv_block(c_in, c_out, bn=True) + _conv_block(c_out, c_out, bn=True)
        if size >= 4:
            layers.append(nn.MaxPool2d(2))
            size //= 2
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, num_classes))


def attackers_for(shape: tuple[int, ...], wanted: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Split ``wanted`` into the attackers that apply to messages of ``shape`` and those skipped."""
    image = len(shape) == 3
    ok = [a for a in wanted if image or a not in ("cnn", "cnn-bn")]
    if not image and "mlp-bn" not in ok and any(a in ("cnn", "cnn-bn") for a in wanted):
        ok.append("mlp-bn")  # a vector message still meets a deep attacker
    return ok, [a for a in wanted if a not in ok]


class Standardize(nn.Module):
    """Fixed affine map (m - mean) / std with statistics from the attacker's training messages.

    Per channel for image-shaped messages, per feature for vectors (std floored so that constant
    features do not blow up).
    """

    def __init__(self, m: torch.Tensor) -> None:
        super().__init__()
        if m.dim() == 4:
            mean = m.mean(dim=(0, 2, 3), keepdim=True)[0]
            std = m.std(dim=(0, 2, 3), keepdim=True)[0]
        else:
            flat = m.reshape(len(m), -1)
            mean, std = flat.mean(0).reshape(m.shape[1:]), flat.std(0)
            std = std.clamp_min(max(float(std.median()) * 0.1, 1e-6)).reshape(m.shape[1:])
        self.register_buffer("mean", mean)
        self.register_buffer("std", std.clamp_min(1e-6))

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return (m - self.mean) / self.std


class _Decode(nn.Module):
    """The method's server-side ``decode`` (a frozen copy, always in eval mode): (B, *message) -> (B, *decoded)."""

    def __init__(self, defense: Defense) -> None:
        super().__init__()
        self.defense = copy.deepcopy(defense).eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "_Decode":
        super().train(mode)
        self.defense.eval()  # decode is the engine's fixed first step, not part of the attacker's training
        return self

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return self.defense.decode(m)


def with_label(h: torch.Tensor, y: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Append one-hot ``y`` to standardised inputs: (B, C, H, W) -> (B, C + K, H, W) as constant channels,
    (B, *rest) -> (B, prod(rest) + K) as features."""
    onehot = F.one_hot(y, num_labels).to(h.dtype)  # (B, K)
    if h.dim() == 4:
        return torch.cat([h, onehot[:, :, None, None].expand(-1, -1, *h.shape[2:])], 1)
    return torch.cat([h.flatten(1), onehot], 1)


class AttackerModel(nn.Module):
    """What an attacker runs on a message: [decode] -> standardise -> [append one-hot y] -> network.

    ``forward(m, y)``: m (B, *message_shape), y (B,) primary labels (used only if ``num_labels`` > 0)
    -> (B, num_classes) logits.
    """

    def __init__(self, net: nn.Module, standardize: Standardize, *, decode: nn.Module | None = None, num_labels: int = 0) -> None:
        super().__init__()
        self.decode, self.standardize, self.net, self.num_labels = decode, standardize, net, num_labels

    def inputs(self, m: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.standardize(self.decode(m) if self.decode is not None else m)
        if self.num_labels:
            if y is None:
                raise ValueError("this attacker reads the primary label beside the message; pass y")
            h = with_label(h, y, self.num_labels)
        return h

    def forward(self, m: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(self.inputs(m, y))


def _has_decode(defense: Defense) -> bool:
    return type(defense).decode is not Defense.decode


def make_attacker(
    name: str,
    m_train: torch.Tensor,
    num_classes: int,
    config: AttackConfig,
    *,
    defense: Defense | None = None,
    num_labels: int = 0,
    server_model: str = "cnn",
) -> AttackerModel:
    """An untrained :class:`AttackerModel` for training messages ``m_train`` (N, *message_shape).

    The ``server`` attacker runs the method's ``decode`` (from ``defense``) first, as the engine does;
    ``num_labels`` > 0 appends one-hot primary labels (training exposures).
    """
    decode = _Decode(defense) if name == "server" and defense is not None and _has_decode(defense) else None
    with torch.no_grad():
        h = torch.cat([decode(m_train[i : i + 1024]) for i in range(0, len(m_train), 1024)]) if decode is not None else m_train
    std = Standardize(h)
    probe = std(h[:2])
    if num_labels:
        probe = with_label(probe, torch.zeros(len(probe), dtype=torch.long), num_labels)
    net = build_attacker(name, tuple(probe.shape[1:]), num_classes, config.width, server_model=server_model)
    model = AttackerModel(net, std, decode=decode, num_labels=num_labels)
    with torch.no_grad():
        model.eval()
        net(probe)  # materialise lazy layers
    return model
