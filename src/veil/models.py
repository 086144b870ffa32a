"""Server-side task models (what the untrusted side runs on obfuscated records), picked by name."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> nn.Module:
    """Two conv blocks and a two-layer head; works for 8x8 digits and 28x28 MNIST alike."""
    c, h, w = input_shape
    pool = 2 if min(h, w) >= 16 else 1
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2) if pool == 2 else nn.Identity(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d((4, 4)) if min(h, w) >= 16 else nn.Identity(),
        nn.Flatten(),
        nn.LazyLinear(128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 256) -> nn.Module:
    """A two-hidden-layer perceptron on the flattened record."""
    d = 1
    for s in input_shape:
        d *= s
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


_MODELS: dict[str, Callable[..., nn.Module]] = {"cnn": cnn, "mlp": mlp}


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build server model ``name`` for records of ``input_shape`` (lazy layers are materialised)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_models())}")
    model = _MODELS[name](tuple(input_shape), num_classes)
    with torch.no_grad():
        model(torch.zeros(2, *input_shape))  # materialise lazy layers
    return model


def count_flops(fn: Callable[[torch.Tensor], torch.Tensor], input_shape: tuple[int, ...]) -> int:
    """FLOPs of ``fn`` on one record, counted by PyTorch's FlopCounterMode (matmul/conv ops)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(torch.rand(1, *input_shape))
    return int(counter.get_total_flops())


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
