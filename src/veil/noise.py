"""Where the randomness comes from.

Training, evaluation and tests seed PyTorch's generator for reproducibility (:func:`seed_everything`).
Noise that protects records sent to another party (``veil export``, federated clients, the incremental
hand-over, :func:`veil.training.obfuscate`) must not be predictable by that party: a seed taken from a
config file, a round number or a partition id lets the receiver redraw the noise and subtract it. Those
paths obfuscate inside :func:`private_noise`, which seeds PyTorch's generator from the operating
system's entropy for that block alone and gives the caller's generator state back afterwards.

Reproducible deployment noise exists only as an explicit research opt-in: pass a ``torch.Generator``
(seeded by you) and record that you did (``veil export --reproducible-noise SEED`` writes it into the
file's metadata).
"""

from __future__ import annotations

import contextlib
import random
import secrets
from collections.abc import Iterator

import numpy as np
import torch

#: Names written into output metadata for the two sources of deployment noise.
OS_ENTROPY = "os-entropy"
REPRODUCIBLE = "reproducible"


def seed_everything(seed: int) -> None:
    """Deterministic seeding for experiments and tests."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def draw_noise_seed(generator: torch.Generator | None = None) -> int:
    """A 63-bit seed: from ``secrets`` (OS entropy) by default, else drawn from ``generator``.

    Drawing from ``generator`` advances it, so successive calls with one research generator give
    different (but reproducible) streams.
    """
    if generator is None:
        return secrets.randbits(63)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device).item())


@contextlib.contextmanager
def private_noise(generator: torch.Generator | None = None) -> Iterator[None]:
    """Run the block with PyTorch's generators freshly seeded, then restore the caller's state.

    Defenses draw their noise with ``torch.randn_like`` and friends (the global generator); inside this
    block that generator is seeded from the OS entropy (``secrets.randbits(63)``), so nothing the
    receiver knows (config, weights, round, partition id, the training seed) determines the noise, and
    two blocks never share a stream. On exit the caller's generator state (CPU and accelerators) is
    put back, so training and evaluation that seeded it stay reproducible.

    Args:
        generator: Research opt-in only: draw the block's seed from this generator instead, making the
            noise reproducible by whoever holds it. Never for records that leave for another party in
            deployment.

    Not thread-safe: the global generator is shared by all threads of the process.
    """
    seed = draw_noise_seed(generator)  # before forking: advancing ``generator`` must survive the block
    acc = torch.accelerator.current_accelerator()
    devices = range(torch.get_device_module(acc.type).device_count()) if acc is not None else []
    with torch.random.fork_rng(devices=devices, device_type=acc.type if acc is not None else None):
        torch.manual_seed(seed)  # CPU and every accelerator
        yield
