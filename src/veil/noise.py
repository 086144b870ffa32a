"""Where the randomness comes from.

Training and tests seed PyTorch's generator for reproducibility. Noise that protects data in deployment
(``veil export``, the client in serving) must not be predictable from a seed in a config file, so those
paths call :func:`reseed_from_os`, which seeds PyTorch's generator from the operating system's entropy.
"""

from __future__ import annotations

import random
import secrets

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Deterministic seeding for experiments and tests."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def reseed_from_os() -> None:
    """Seed PyTorch's global generator from ``secrets`` (OS entropy): unpredictable deployment noise."""
    torch.manual_seed(secrets.randbits(63))
