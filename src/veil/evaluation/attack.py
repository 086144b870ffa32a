"""Attribute-inference attack: the headline privacy number (DESIGN part 9; seed 002 §5.2, seed 003 §5.1).

The attacker knows everything but the noise. It holds the client's obfuscator, so it can produce as many
obfuscated records of its own labelled data as it likes: it trains its own models on *obfuscated training
records* (``encode`` output, exactly what leaves the client) to predict the secondary label z,
early-stops on *obfuscated validation records*, and is scored on *obfuscated test records* that it never
trained on. Several architectures are trained; the reported attack accuracy is the one whose validation
accuracy is best (test accuracy of every attacker is reported too).

Each point of exposure is attacked on its own: ``inference`` (``encode(x, None)``) and ``training``
(``encode(x, y)``, hard selection by the known primary label). An *averaging* attack (k obfuscated copies
of one record averaged, as a client that resends a query allows) is reported beside it.

Shapes: records (N, C, H, W); messages either (N, C', H', W') (CNN and MLP attackers) or (N, m) vectors
(e.g. SVD coefficients: MLP attackers only).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from veil.data.tasks import Split, Task
from veil.defenses.base import Defense
from veil.noise import seed_everything
from veil.training.run import EXPOSURES, obfuscate

#: Attackers for image-shaped messages (C, H, W) and for vector messages (m,).
IMAGE_ATTACKERS = ("linear", "mlp", "cnn", "cnn-bn")
VECTOR_ATTACKERS = ("linear", "mlp", "mlp-bn")


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """How hard the attacker tries (saved beside every attack result).

    Attributes:
        attackers: Architectures to train (``linear``, ``mlp``, ``mlp-bn``, ``cnn``, ``cnn-bn``); CNNs
            are skipped (and said so) where the message is not image-shaped.
        epochs: Most epochs per attacker.
        patience: Stop after this many epochs without a better validation accuracy (best weights kept).
        batch_size: Records per batch.
        lr: Adam learning rate (halved whenever validation stalls for ``patience // 2`` epochs).
        weight_decay: AdamW weight decay.
        train_size: Obfuscated training records the attacker uses (``None``: the whole train split).
        val_size: Obfuscated validation records for early stopping (``None``: the whole val split).
        test_size: Obfuscated test records scored (``None``: the whole test split).
        width: Channels of the first conv layer of the CNN attackers (doubling per block).
        views: Independent obfuscations of the training set, cycled over epochs (fresh noise, as an
            attacker holding the obfuscator can draw); 1 = one fixed obfuscated copy.
        averaging_k: Copies averaged by the averaging attack (0 or 1 turns it off).
        exposures: Points of exposure to attack (``inference``, ``training``).
        seed: Seed of the attacker's initialisation, data order and noise draws.
    """

    attackers: tuple[str, ...] = ("linear", "mlp", "cnn", "cnn-bn")
    epochs: int = 40
    patience: int = 6
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    width: int = 32
    views: int = 4
    averaging_k: int = 8
    exposures: tuple[str, ...] = EXPOSURES
    seed: int = 0

    def __post_init__(self) -> None:
        valid = set(IMAGE_ATTACKERS) | set(VECTOR_ATTACKERS)
        if not self.attackers:
            raise ValueError("attackers must name at least one architecture")
        for a in self.attackers:
            if a not in valid:
                raise ValueError(f"unknown attacker {a!r}; valid: {', '.join(sorted(valid))}")
        for name in ("epochs", "patience", "batch_size", "views", "width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
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
            if e not in EXPOSURES:
                raise ValueError(f"unknown exposure {e!r}; valid: {', '.join(EXPOSURES)}")
        object.__setattr__(self, "attackers", tuple(self.attackers))
        object.__setattr__(self, "exposures", tuple(self.exposures))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------- attackers
def _conv_block(c_in: int, c_out: int, bn: bool) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), *( [nn.BatchNorm2d(c_out)] if bn else []), nn.ReLU()]


def build_attacker(name: str, message_shape: tuple[int, ...], num_classes: int, width: int = 32) -> nn.Module:
    """Attacker ``name`` for messages of ``message_shape`` ((C, H, W) or (m,)) -> (B, num_classes) logits.

    * ``linear``: multinomial logistic regression on the flattened message.
    * ``mlp``: two hidden layers (512, 256) with dropout.
    * ``mlp-bn``: three hidden layers with batch norm (vector messages).
    * ``cnn``: two conv blocks (``width``, 2 ``width``) and a 128-unit head (like the server's own model).
    * ``cnn-bn``: three double-conv blocks (``width`` x 1, 2, 4) with batch norm, pooling while the map
      is >= 4 wide.
    """
    d = int(np.prod(message_shape))
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
    if name == "cnn-bn":
        layers = []
        size = min(h, w)
        for c_in, c_out in ((c, width), (width, 2 * width), (2 * width, 4 * width)):
            layers += _conv_block(c_in, c_out, bn=True) + _conv_block(c_out, c_out, bn=True)
            if size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, num_classes))
    raise ValueError(f"unknown attacker {name!r}; valid: {', '.join(sorted(set(IMAGE_ATTACKERS) | set(VECTOR_ATTACKERS)))}")


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


# --------------------------------------------------------------------------------------- training
@torch.no_grad()
def _accuracy(model: nn.Module, m: torch.Tensor, z: torch.Tensor, batch_size: int = 1024) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(m), batch_size):
        correct += int((model(m[i : i + batch_size]).argmax(1) == z[i : i + batch_size]).sum())
    return correct / max(1, len(m))


def train_attacker(
    name: str,
    train_views: list[torch.Tensor],
    z_train: torch.Tensor,
    m_val: torch.Tensor,
    z_val: torch.Tensor,
    num_classes: int,
    config: AttackConfig,
    *,
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train one attacker on obfuscated training messages; keep the weights with the best val accuracy.

    Args:
        train_views: One or more obfuscations (N, *message_shape) of the same training records,
            cycled over epochs.
        z_train, m_val, z_val: Secondary labels of the training records; validation messages and labels.

    Returns:
        The attacker (in eval mode, input standardisation included) and its training record:
        ``val_acc`` (best), ``best_epoch``, ``epochs_run``, ``seconds``.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    seed_everything(config.seed)
    shape = tuple(train_views[0].shape[1:])
    net = build_attacker(name, shape, num_classes, config.width)
    model = nn.Sequential(Standardize(train_views[0]), net)
    with torch.no_grad():
        model.eval()
        model(train_views[0][:2])  # materialise lazy layers
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best_acc, best_epoch, best_state, stall = -1.0, 0, None, 0
    gen = torch.Generator().manual_seed(config.seed)
    t0 = time.time()
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        m_train = train_views[(epoch - 1) % len(train_views)]
        model.train()
        perm = torch.randperm(len(m_train), generator=gen)
        for i in range(0, len(perm), config.batch_size):
            idx = perm[i : i + config.batch_size]
            if len(idx) < 2:  # batch norm needs two records
                continue
            loss = F.cross_entropy(model(m_train[idx]), z_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = _accuracy(model, m_val, z_val)
        if acc > best_acc:
            best_acc, best_epoch, stall = acc, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stall += 1
            if stall == max(1, config.patience // 2):
                for g in opt.param_groups:
                    g["lr"] *= 0.5
            if stall >= config.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    rec = {"val_acc": best_acc, "best_epoch": best_epoch, "epochs_run": epoch, "seconds": round(time.time() - t0, 2)}
    log(f"  attacker {name}: val acc {best_acc:.4f} (best epoch {best_epoch}/{epoch}, {rec['seconds']}s)")
    return model, rec


# --------------------------------------------------------------------------------------- the attack
def _subset(split: Split, size: int | None, seed: int) -> Split:
    if size is None or size >= len(split):
        return split
    keep = np.sort(np.random.default_rng(seed).permutation(len(split))[:size])
    return split.subset(keep)


def _messages(defense: Defense, split: Split, exposure: str, k: int = 1) -> torch.Tensor:
    """Obfuscated messages of ``split`` at ``exposure``; with ``k > 1``, the mean of k independent draws."""
    y = split.y if exposure == "training" else None
    total = obfuscate(defense, split.x, y).float()
    for _ in range(k - 1):
        total += obfuscate(defense, split.x, y).float()
    return total / k


@torch.no_grad()
def is_deterministic(defense: Defense, x: torch.Tensor) -> bool:
    """True if two encodes of the same records are identical (no noise at all)."""
    defense.eval()
    return bool(torch.equal(defense.encode(x), defense.encode(x)))


@torch.no_grad()
def ignores_label(defense: Defense, x: torch.Tensor, y: torch.Tensor) -> bool:
    """True if ``encode(x, y)`` equals ``encode(x, None)`` under the same random state, i.e. the training
    exposure sends exactly what the inference exposure sends (checked on these records)."""
    defense.eval()
    state = torch.get_rng_state()
    a = defense.encode(x, None)
    torch.set_rng_state(state)
    b = defense.encode(x, y)
    return a.shape == b.shape and bool(torch.allclose(a, b))


def attack_exposure(
    defense: Defense,
    task: Task,
    exposure: str,
    config: AttackConfig,
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Attribute-inference attack on one point of exposure.

    Returns a dict with ``attackers`` (per architecture: val_acc, test_acc, best_epoch, epochs_run,
    seconds), ``best`` (name of the attacker with the best validation accuracy), ``attack_acc`` (its test
    accuracy), ``skipped`` (architectures that do not apply to this message shape, with the reason),
    ``message_shape``, and ``averaging`` (the same best architecture retrained and scored on messages that
    are the mean of ``averaging_k`` draws; ``None`` if off).
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if exposure not in EXPOSURES:
        raise ValueError(f"unknown exposure {exposure!r}; valid: {', '.join(EXPOSURES)}")
    tr = _subset(task.train, config.train_size, config.seed)
    va = _subset(task.val, config.val_size, config.seed + 1)
    te = _subset(task.test, config.test_size, config.seed + 2)
    seed_everything(config.seed + 7)
    views = [_messages(defense, tr, exposure) for _ in range(config.views)]
    m_val, m_test = _messages(defense, va, exposure), _messages(defense, te, exposure)
    shape = tuple(m_val.shape[1:])
    names, skipped = attackers_for(shape, config.attackers)
    log(f"[attack/{exposure}] message shape {shape}; {len(tr)} train, {len(va)} val, {len(te)} test records; attackers {names}")
    results: dict[str, Any] = {}
    for name in names:
        model, rec = train_attacker(name, views, tr.z, m_val, va.z, task.num_secondary, config, log=log)
        rec["test_acc"] = _accuracy(model, m_test, te.z)
        results[name] = rec
    best = max(results, key=lambda n: (results[n]["val_acc"], -names.index(n)))
    out: dict[str, Any] = {
        "exposure": exposure,
        "message_shape": list(shape),
        "attackers": results,
        "skipped": {a: "message is not image-shaped (C, H, W); vector messages get MLP attackers" for a in skipped},
        "best": best,
        "attack_acc": results[best]["test_acc"],
        "attack_acc_max_over_attackers": max(r["test_acc"] for r in results.values()),
        "train_records": len(tr),
        "val_records": len(va),
        "test_records": len(te),
        "averaging": None,
    }
    k = config.averaging_k
    if k > 1:
        if is_deterministic(defense, va.x[:64]):
            out["averaging"] = {"k": k, "attacker": best, "test_acc": out["attack_acc"], "note": "deterministic encode: averaging changes nothing"}
        else:
            seed_everything(config.seed + 11)
            avg_views = [_messages(defense, tr, exposure, k) for _ in range(config.views)]
            mv, mt = _messages(defense, va, exposure, k), _messages(defense, te, exposure, k)
            log(f"[attack/{exposure}] averaging attack: mean of k={k} draws per record, attacker {best}")
            model, rec = train_attacker(best, avg_views, tr.z, mv, va.z, task.num_secondary, config, log=log)
            rec.update({"k": k, "attacker": best, "test_acc": _accuracy(model, mt, te.z)})
            out["averaging"] = rec
    return out


def attribute_attack(
    defense: Defense,
    task: Task,
    config: AttackConfig | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Attack every configured point of exposure; add the floors and the configuration.

    Returns ``{"inference": {...}, "training": {...}, "majority_floor", "primary_only_floor", "config"}``
    (see :func:`attack_exposure` for each exposure). Where ``encode`` provably ignores the label (same
    output with and without it under the same random state), the training exposure is the same channel
    as the inference one: it is still attacked unless both are attacked, in which case the inference
    result is reused and marked ``same_as_inference``.
    """
    config = config or AttackConfig()
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out: dict[str, Any] = {
        "majority_floor": task.majority_floor(),
        "primary_only_floor": task.primary_only_floor(),
        "config": config.to_dict(),
    }
    probe = task.val.subset(np.arange(min(64, len(task.val))))
    same = ignores_label(defense, probe.x, probe.y)
    for exposure in config.exposures:
        if exposure == "training" and same and "inference" in out:
            out["training"] = dict(out["inference"], exposure="training", same_as_inference=True)
            log("[attack/training] encode ignores the label (checked): training exposure = inference exposure")
            continue
        out[exposure] = attack_exposure(defense, task, exposure, config, log=log)
        out[exposure]["same_as_inference"] = same if exposure == "training" else None
    return out
