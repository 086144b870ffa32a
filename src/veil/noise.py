"""Where the randomness comes from.

Training, evaluation and tests seed PyTorch's generator for reproducibility (:func:`seed_everything`).
Noise that protects records sent to another party (``veil export``, federated clients, the incremental
hand-over, :func:`veil.training.obfuscate`) must not be predictable by that party: a seed taken from a
config file, a round number or a partition id lets the receiver redraw the noise and subtract it. Those
paths obfuscate inside :func:`private_noise`, which fills PyTorch's generator state from the operating
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


#: Largest seed a config may hold: seeds are offset (per client, round, stage) and handed to NumPy and
#: scikit-learn, which take at most 2^32 - 1.
MAX_SEED = 2**31 - 1


def check_seed(seed: object, name: str = "seed") -> None:
    """``ValueError`` naming ``name`` unless ``seed`` is an integer in [0, MAX_SEED]."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, {MAX_SEED}], got {seed!r}")


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
    _check_generator(generator)
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device).item())


def _check_generator(generator: object) -> None:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


# PyTorch's CPU generator is a Mersenne Twister (mt19937) that keeps only the low 32 bits of the seed
# given to ``manual_seed``: seeded that way, every stream is one of 2**32, which a receiver who knows
# a few noise values (a record's blank background) can search exhaustively. So the 624 state words are
# filled with entropy directly. Layout of ``torch.get_rng_state()`` (torch's legacy THGeneratorState):
# uint64 initial seed, int32 left, int32 seeded, uint64 next, uint64 state[624] (low 32 bits used), ...
_MT_WORDS = 624
_MT_STATE_OFFSET = 24


def _set_cpu_state(words: np.ndarray) -> None:
    """Put 624 uint32 words into the global CPU generator's Mersenne Twister state (seeded first)."""
    state = torch.get_rng_state().numpy().copy()
    stored = state[_MT_STATE_OFFSET : _MT_STATE_OFFSET + 8 * _MT_WORDS].view(np.uint64)
    seed = int(state[:8].view(np.uint64)[0])
    if stored[0] != seed & 0xFFFFFFFF or int(state[8:12].view(np.int32)[0]) != 1:
        # fail closed: a torch whose state layout differs would silently keep 32-bit streams
        raise RuntimeError("unexpected layout of torch's CPU generator state; cannot seed its full Mersenne Twister state (veil supports the pinned torch version)")
    stored[:] = words.astype(np.uint64)
    torch.set_rng_state(torch.from_numpy(state))


@contextlib.contextmanager
def private_noise(generator: torch.Generator | None = None) -> Iterator[None]:
    """Run the block with PyTorch's generators freshly seeded, then restore the caller's state.

    Defenses draw their noise with ``torch.randn_like`` and friends (the global generator); inside this
    block that generator holds a state drawn from the OS entropy (``secrets``): the CPU generator's
    whole 19937-bit Mersenne Twister state, accelerators a 63-bit seed. Nothing the receiver knows
    (config, weights, round, partition id, the training seed) determines the noise, and two blocks
    never share a stream. On exit the caller's generator state (CPU and accelerators) is put back, so
    training and evaluation that seeded it stay reproducible.

    Args:
        generator: Research opt-in only: draw the block's state from this generator instead, making
            the noise reproducible by whoever holds it. Never for records that leave for another party
            in deployment.

    Not thread-safe: the global generator is shared by all threads of the process. The Mersenne Twister
    is not a cryptographic generator: in principle its state can be solved from enough exactly known
    outputs of one block; keep blocks (calls) to the records of one hand-over.
    """
    # draw before forking: advancing ``generator`` must survive the block
    seed = draw_noise_seed(generator)
    if generator is None:
        words = np.frombuffer(secrets.token_bytes(4 * _MT_WORDS), dtype=np.uint32)
    else:
        words = torch.randint(0, 2**32, (_MT_WORDS,), generator=generator, device=generator.device, dtype=torch.int64).cpu().numpy().astype(np.uint32)
    acc = torch.accelerator.current_accelerator()
    devices = range(torch.get_device_module(acc.type).device_count()) if acc is not None else []
    with torch.random.fork_rng(devices=devices, device_type=acc.type if acc is not None else None):
        torch.manual_seed(seed)  # every accelerator (64-bit seeds there); resets cached normals
        _set_cpu_state(words)
        yield
