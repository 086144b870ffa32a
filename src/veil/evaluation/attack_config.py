"""How hard the attribute attack tries (:class:`AttackConfig`), and the points of exposure and attacker
architectures it knows (the attack itself: :mod:`veil.evaluation.attack`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from veil.noise import check_seed
from veil.training.loop import resolve_device
from veil.training.run import EXPOSURES

#: Points of exposure an attack can target (``EXPOSURES`` plus the train-mode messages).
ATTACK_EXPOSURES = (*EXPOSURES, "training-time")
#: Exposures at which the engine receives the primary label with the message (so the attacker gets it).
LABELLED_EXPOSURES = ("training", "training-time")
#: Attackers for image-shaped messages (C, H, W) and for vector messages (m,).
IMAGE_ATTACKERS = ("linear", "mlp", "cnn", "cnn-bn", "server")
VECTOR_ATTACKERS = ("linear", "mlp", "mlp-bn", "server")


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """How hard the attacker tries (saved beside every attack result).

    Attributes:
        attackers: Architectures to train (``linear``, ``mlp``, ``mlp-bn``, ``cnn``, ``cnn-bn``, ``server``:
            the run's server model after the method's ``decode``); CNNs are skipped (and said so) where the
            message is not image-shaped.
        epochs: Most epochs per attacker.
        patience: Stop after this many epochs without a better validation accuracy (best weights kept).
        min_epochs: Never stop before this epoch (capped at ``epochs``). Attackers on noisy messages often sit at
            chance for a few epochs before they start to read the secret: with 8 epochs and patience 2, a CNN
            stopped at epoch 3 on ANI's fashion-tag messages (0.12, "private"); trained on, its accuracy rose
            to 0.60 at epoch 19. An early stop inside that plateau is a false privacy claim.
        batch_size: Records per batch.
        lr: Adam learning rate (halved whenever validation stalls for ``patience // 2`` epochs).
        weight_decay: AdamW weight decay.
        train_size: Obfuscated training records the attacker uses, all disjoint from the defense's
            training records (``None``: as many as the defense trained on, where that many exist).
        val_size: Obfuscated validation records for early stopping (``None``: the whole val split, or a
            fifth of it where the rest is needed for training; see :func:`veil.evaluation.attack_data.attacker_splits`).
        test_size: Obfuscated test records scored (``None``: the whole test split).
        width: Channels of the first conv layer of the CNN attackers (doubling per block); at least the
            server model's 32 by default.
        views: Independent obfuscations of the training set, cycled over epochs (fresh noise, as an
            attacker holding the obfuscator can draw); 1 = one fixed obfuscated copy.
        averaging_k: Copies averaged by the averaging attack (0 or 1 turns it off).
        exposures: Points of exposure to attack (``inference``, ``training``, ``training-time``).
        seed: Seed of the attacker's initialisation, data order and noise draws.
        device: Where the attackers train: ``cpu``, ``cuda`` (``cuda:N``) or ``auto`` (cuda when available).
            The messages are drawn on the CPU either way; numbers from another device differ slightly.
    """

    attackers: tuple[str, ...] = ("linear", "mlp", "cnn", "cnn-bn", "server")
    epochs: int = 40
    patience: int = 6
    min_epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    width: int = 32
    views: int = 4
    averaging_k: int = 8
    exposures: tuple[str, ...] = ATTACK_EXPOSURES
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_seed(self.seed, "eval seed")
        valid = set(IMAGE_ATTACKERS) | set(VECTOR_ATTACKERS)
        if not self.attackers:
            raise ValueError("attackers must name at least one architecture")
        for a in self.attackers:
            if a not in valid:
                raise ValueError(f"unknown attacker {a!r}; valid: {', '.join(sorted(valid))}")
        if isinstance(self.min_epochs, bool) or not (isinstance(self.min_epochs, int) and 0 <= self.min_epochs <= 10_000):
            raise ValueError(f"min_epochs must be an integer in [0, 10000], got {self.min_epochs!r}")
        for name in ("epochs", "patience", "batch_size", "views", "width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        # every view is a full obfuscated copy of the attacker's records, and width sizes every CNN
        # attacker: bounded before anything is allocated
        for name, most in (("views", 64), ("averaging_k", 64), ("width", 1024), ("epochs", 10_000)):
            if int(getattr(self, name)) > most:
                raise ValueError(f"{name} must be <= {most}, got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("train_size", "val_size", "test_size"):
            v = getattr(self, name)
            if v is not None and int(v) < 2:
                raise ValueError(f"{name} must be >= 2 or None, got {v!r}")
        if self.averaging_k < 0:
            raise ValueError(f"averaging_k must be >= 0, got {self.averaging_k!r}")
        for e in self.exposures:
            if e not in ATTACK_EXPOSURES:
                raise ValueError(f"unknown exposure {e!r}; valid: {', '.join(ATTACK_EXPOSURES)}")
        if not (self.device in ("cpu", "auto") or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        object.__setattr__(self, "attackers", tuple(self.attackers))
        object.__setattr__(self, "exposures", tuple(self.exposures))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def torch_device(self) -> torch.device:
        """The device the attackers train on (``auto`` resolved, as training resolves it)."""
        return resolve_device(self.device)
