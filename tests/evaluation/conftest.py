"""Shared fixtures for the evaluation tests: digits-lt5 and test-local defenses with known leakage."""

from __future__ import annotations

import pytest
import torch

from veil.data import load_task
from veil.defenses.base import Defense


class PureNoise(Defense):
    """Destroys the input: the message is N(0, I) noise independent of x (and of y)."""

    name = "pure-noise"

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, y)
        return torch.randn_like(x)


class LabelOnlyWhenKnown(Defense):
    """Sends noise at inference; at the training exposure sends the known primary label (plus noise),
    so an attacker can reach the primary-only floor there and no further."""

    name = "label-only"

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, y)
        noise = torch.randn_like(x)
        if y is None:
            return noise
        return noise + 4.0 * y.float().view(-1, 1, 1, 1)


class Constant(Defense):
    """Sends zeros whatever the record: the message carries nothing (neither x nor y)."""

    name = "constant"

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, y)
        return torch.zeros_like(x)


class LeaksInTrainMode(Defense):
    """Noise in eval mode; in train mode (while it trains) it sends the record plus a little noise,
    as a method whose training-time messages differ from its deployed ones might."""

    name = "leaks-in-train-mode"

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, y)
        noise = torch.randn_like(x)
        return x + 0.1 * noise if self.training else noise


class Flatten(Defense):
    """Sends the record as a vector (B, C*H*W), like methods that transmit coefficients."""

    name = "flatten"

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x, y)
        return x.reshape(len(x), -1)

    def decode(self, m: torch.Tensor) -> torch.Tensor:
        return m.reshape(len(m), *self.input_shape)


@pytest.fixture(scope="session")
def digits():
    """digits-lt5 with half the train split kept (the defense's records, 539) and half held out (539):
    the attackers train on the held-out half, as on a run trained with ``train_size``."""
    torch.set_num_threads(1)
    return load_task("digits-lt5", seed=0, train_size=539)


@pytest.fixture()
def make():
    def _make(cls: type[Defense], task) -> Defense:
        torch.manual_seed(0)
        return cls(input_shape=task.input_shape, num_classes=task.num_primary)

    return _make


@pytest.fixture(scope="session")
def fakes():
    """The test-local defenses, by name (test modules cannot import conftest under importlib mode)."""
    return {"pure-noise": PureNoise, "label-only": LabelOnlyWhenKnown, "flatten": Flatten, "constant": Constant, "leaks-in-train-mode": LeaksInTrainMode}
