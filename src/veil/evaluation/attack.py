"""Attribute-inference attack: the headline privacy number (docs/design.md, "The attackers"; seed 002 §5.2, seed 003 §5.1).

The attacker knows everything but the noise, and is at least as strong as the engine it stands for:

* It holds the client's obfuscator, so it can produce as many obfuscated records of its own labelled data
  as it likes (``views``: fresh obfuscations of its training records, cycled over epochs).
* Its records are disjoint from the records the defense trained on (:func:`attacker_splits`): the train
  records ``load_task(..., train_size=n)`` did not keep (``task.held_out``), topped up from the validation
  split where those are fewer than the defense had, so it trains on messages of *unseen* records, the kind
  it is scored on. It early-stops on obfuscated validation records and is scored on obfuscated test records.
* Its architectures include the server model's own (``server``: the run's server model, after the
  method's ``decode``, so with the engine's capacity) beside linear, MLP, CNN and a deeper CNN with batch
  norm at ``width`` >= the server's 32 channels. The reported attack accuracy is the test accuracy of the
  attacker whose validation accuracy is best (every attacker's test accuracy is reported too).

Points of exposure (:data:`ATTACK_EXPOSURES`), each attacked on its own:

* ``inference``: ``encode(x, None)`` in eval mode (a remote service sees the message alone).
* ``training``: ``encode(x, y)`` in eval mode (hard selection by the known label). The engine receives y
  with the message, so the attacker does too: one-hot y as extra constant channels (image messages) or
  extra features (vectors), appended after standardisation.
* ``training-time``: what the defense sends *while it trains* (train mode, its last training stage, y to
  ``encode`` where that stage uses labels; the attacker again gets y). Attacked only where those messages
  differ from the eval-mode ones under the same random state (SCNL mixes hard and selector-selected records
  in train mode, for instance); otherwise the eval-mode result is reused and says so.

An *averaging* attack (the mean of k obfuscations of one record, as a client that resends a query allows)
is reported beside each. Noise is drawn from PyTorch's generator seeded by ``AttackConfig.seed``, so a
measurement is reproducible; deployment noise is another matter (:mod:`veil.noise`).

Shapes: records (N, C, H, W); messages either (N, C', H', W') (CNN and MLP attackers) or (N, m) vectors
(e.g. SVD coefficients: MLP attackers, and ``server`` after ``decode``).
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
from veil.noise import check_seed, seed_everything
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
        batch_size: Records per batch.
        lr: Adam learning rate (halved whenever validation stalls for ``patience // 2`` epochs).
        weight_decay: AdamW weight decay.
        train_size: Obfuscated training records the attacker uses, all disjoint from the defense's
            training records (``None``: as many as the defense trained on, where that many exist).
        val_size: Obfuscated validation records for early stopping (``None``: the whole val split, or a
            fifth of it where the rest is needed for training; see :func:`attacker_splits`).
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


# --------------------------------------------------------------------------------------- attackers
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
      architecture and width (its input is the *decoded* message; see :func:`attack_exposure`).
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


# --------------------------------------------------------------------------------------- training
def _on(device: torch.device, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(device, non_blocking=True) for t in tensors]


@torch.no_grad()
def _accuracy(model: nn.Module, m: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 1024) -> float:
    model.eval()
    device = next(iter(model.buffers())).device  # Standardize's buffers: every attacker has them
    correct = 0
    for i in range(0, len(m), batch_size):
        mb, yb, zb = _on(device, m[i : i + batch_size], None if y is None else y[i : i + batch_size], z[i : i + batch_size])
        correct += int((model(mb, yb).argmax(1) == zb).sum())
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
    y_train: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    num_labels: int = 0,
    defense: Defense | None = None,
    server_model: str = "cnn",
    log: Callable[[str], None] | None = None,
) -> tuple[AttackerModel, dict[str, Any]]:
    """Train one attacker on obfuscated training messages; keep the weights with the best val accuracy.

    Args:
        train_views: One or more obfuscations (N, *message_shape) of the same training records,
            cycled over epochs.
        z_train, m_val, z_val: Secondary labels of the training records; validation messages and labels.
        y_train, y_val, num_labels: Primary labels given beside the messages (training exposures) and
            their number of classes (0: the attacker sees the message alone).
        defense, server_model: For the ``server`` attacker: the method (its ``decode``) and the server
            model's name.

    Returns:
        The attacker (in eval mode; ``model(m, y)``) and its training record: ``val_acc`` (best),
        ``best_epoch``, ``epochs_run``, ``seconds``, ``parameters``.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    seed_everything(config.seed)
    device = config.torch_device()
    model = make_attacker(name, train_views[0], num_classes, config, defense=defense, num_labels=num_labels, server_model=server_model).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
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
            mb, yb, zb = _on(device, m_train[idx], None if y_train is None else y_train[idx], z_train[idx])
            loss = F.cross_entropy(model(mb, yb), zb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = _accuracy(model, m_val, z_val, y_val)
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
    rec = {"val_acc": best_acc, "best_epoch": best_epoch, "epochs_run": epoch, "seconds": round(time.time() - t0, 2),
           "parameters": sum(p.numel() for p in params), "device": str(device)}
    log(f"  attacker {name}: val acc {best_acc:.4f} (best epoch {best_epoch}/{epoch}, {rec['seconds']}s)")
    return model, rec


# --------------------------------------------------------------------------------------- records
def _subset(split: Split, size: int | None, seed: int) -> Split:
    if size is None or size >= len(split):
        return split
    keep = np.sort(np.random.default_rng(seed).permutation(len(split))[:size])
    return split.subset(keep)


def _concat(a: Split, b: Split) -> Split:
    mask = torch.cat([a.mask, b.mask]) if a.mask is not None and b.mask is not None else None
    return Split(torch.cat([a.x, b.x]), torch.cat([a.y, b.y]), torch.cat([a.z, b.z]), mask)


def attacker_splits(task: Task, train_size: int | None, val_size: int | None, seed: int) -> tuple[Split, Split, dict[str, Any]]:
    """The attacker's training and early-stopping records, disjoint from the records the defense trained on.

    The defense trained on ``task.train``. The attacker trains on ``task.held_out`` (the train records
    ``load_task(..., train_size=n)`` left out), ``train_size`` of them (``None``: as many as the defense
    had). Where those are fewer, it tops up from the validation split: ``val_size`` validation records
    (``None``: a fifth) are kept for early stopping and the rest join the training records. Where even
    that gives fewer records than the defense had, the shortfall is stated in the returned record.

    A ``Task`` built by hand with ``held_out=None`` does not record which records the defense trained
    on; the attacker then trains on ``task.train`` (as before) and the record says the records may overlap.

    Returns:
        (training records, validation records, record of counts and sources).
    """
    wanted = int(train_size) if train_size is not None else len(task.train)
    if task.held_out is None:
        tr, va = _subset(task.train, train_size, seed), _subset(task.val, val_size, seed + 1)
        return tr, va, {
            "train_records": len(tr), "val_records": len(va), "defense_train_records": None,
            "from_held_out": 0, "from_val": 0, "from_task_train": len(tr), "disjoint_from_defense_training": None,
            "note": "task.held_out is None: the task does not say which records the defense trained on; "
            "the attacker trained on task.train, which may be those records",
        }
    held = task.held_out
    if len(held) >= wanted:
        tr, va, from_val = _subset(held, wanted, seed), _subset(task.val, val_size, seed + 1), 0
    else:
        perm = np.random.default_rng(seed + 1).permutation(len(task.val))
        n_val = min(len(task.val), val_size if val_size is not None else max(2, len(task.val) // 5))
        extra = np.sort(perm[n_val:][: wanted - len(held)])
        va, from_val = task.val.subset(np.sort(perm[:n_val])), len(extra)
        tr = _concat(held, task.val.subset(extra)) if len(extra) else held
    out = {
        "train_records": len(tr), "val_records": len(va), "defense_train_records": len(task.train),
        "from_held_out": len(tr) - from_val, "from_val": from_val, "from_task_train": 0, "disjoint_from_defense_training": True,
        "note": None,
    }
    if len(tr) < wanted:
        out["note"] = (f"only {len(tr)} records disjoint from the defense's training records are left "
                       f"({len(held)} held-out train records, {from_val} from the validation split); {wanted} were wanted")
    if len(tr) < 2:
        raise ValueError(f"no records disjoint from the defense's training records are left for the attacker (task {task.name!r}: "
                         f"{len(held)} held out, validation split {len(task.val)}); load the task with a smaller train_size")
    return tr, va, out


# --------------------------------------------------------------------------------------- messages
def _last_stage(defense: Defense):
    return defense.stages()[-1]


def training_time_copy(defense: Defense) -> Defense:
    """A copy of ``defense`` in train mode at its last training stage: what it sent while it trained."""
    d = copy.deepcopy(defense)
    d.set_stage(_last_stage(d).name)
    d.train()
    return d


@torch.no_grad()
def _encode(
    defense: Defense, x: torch.Tensor, y: torch.Tensor | None, mask: torch.Tensor | None = None, *, batch_size: int = 512
) -> torch.Tensor:
    """``defense.encode_batch`` over batches (the region ``mask`` goes with ``y``), in whatever mode ``defense`` is in.

    Vector messages whose width varies from batch to batch (SVD in train mode sends a random number m' of
    coefficients) are zero-padded to the widest: a coefficient not sent reads as 0, which ``decode``
    treats the same way.
    """
    cut = lambda t, i: None if t is None else t[i : i + batch_size]  # noqa: E731
    parts = [defense.encode_batch(x[i : i + batch_size], cut(y, i), cut(mask, i)).float() for i in range(0, len(x), batch_size)]
    if not parts:
        return torch.empty(0)
    if len({p.shape[1:] for p in parts}) > 1:
        if any(p.dim() != 2 for p in parts):
            raise ValueError(f"{defense.name}: message shapes vary between batches: {sorted({tuple(p.shape[1:]) for p in parts})}")
        width = max(p.shape[1] for p in parts)
        parts = [F.pad(p, (0, width - p.shape[1])) for p in parts]
    return torch.cat(parts)


def common_width(*messages: torch.Tensor) -> list[torch.Tensor]:
    """Vector messages (N, m) of different widths zero-padded to the widest (a method that sends a varying
    number of coefficients, such as SVD with ``keep`` < 1, gives each call its own width); others unchanged."""
    if not messages or any(m.dim() != 2 for m in messages) or len({m.shape[1] for m in messages}) == 1:
        return list(messages)
    width = max(m.shape[1] for m in messages)
    return [F.pad(m, (0, width - m.shape[1])) for m in messages]


def _messages(defense: Defense, split: Split, exposure: str, k: int = 1) -> torch.Tensor:
    """Messages of ``split`` at ``exposure`` (:data:`ATTACK_EXPOSURES`); with ``k > 1``, the mean of k draws.

    Noise comes from PyTorch's global generator (seeded by the caller), so measurements reproduce.
    """
    if exposure == "training-time":
        sender = training_time_copy(defense)
        labelled = _last_stage(defense).use_labels
    elif exposure in EXPOSURES:
        sender = defense.eval()
        labelled = exposure == "training"
    else:
        raise ValueError(f"unknown exposure {exposure!r}; valid: {', '.join(ATTACK_EXPOSURES)}")
    # the data owner's knowledge (label, region mask) reaches encode only where it is known
    y, mask = (split.y if labelled else None), sender.mask_for(labelled, split.mask)
    # vector messages whose width varies from call to call (SVD) are padded to one width, here across the
    # k draws and in attack_exposure across views and splits (common_width)
    draws = common_width(*(_encode(sender, split.x, y, mask) for _ in range(k)))
    return torch.stack(draws).mean(0) if k > 1 else draws[0]


@torch.no_grad()
def is_deterministic(defense: Defense, x: torch.Tensor) -> bool:
    """True if two encodes of the same records are identical (no noise at all)."""
    defense.eval()
    return bool(torch.equal(defense.probe(x), defense.probe(x)))


@torch.no_grad()
def ignores_label(defense: Defense, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> bool:
    """True if ``encode(x, y)`` (with the region ``mask`` where there is one) equals ``encode(x, None)``
    under the same random state, i.e. the training exposure sends exactly what the inference exposure
    sends (checked on these records)."""
    defense.eval()
    state = torch.get_rng_state()
    a = defense.encode_batch(x, None, defense.mask_for(False, mask))
    torch.set_rng_state(state)
    b = defense.encode_batch(x, y, mask)
    return a.shape == b.shape and bool(torch.allclose(a, b))


@torch.no_grad()
def training_time_differs(defense: Defense, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None, *, tries: int = 8) -> bool:
    """True if what ``defense`` sends in train mode (last stage; y where that stage uses labels) differs
    from its eval-mode ``encode`` of the same records and label under the same random state.

    Checked under ``tries`` random states, since a method may change its train-mode message only now
    and then (SVD removes coefficients with probability ``removal_prob`` per batch).
    """
    labelled = _last_stage(defense).use_labels
    y_used, mask_used = (y if labelled else None), defense.mask_for(labelled, mask)
    sender = training_time_copy(defense)
    state = torch.get_rng_state()
    try:
        for _ in range(tries):
            trial = torch.get_rng_state()
            a = defense.eval().encode_batch(x, y_used, mask_used)
            torch.set_rng_state(trial)
            b = sender.encode_batch(x, y_used, mask_used)
            if a.shape != b.shape or not bool(torch.allclose(a, b)):
                return True
            torch.rand(1)  # the next try starts from another state
        return False
    finally:
        torch.set_rng_state(state)


# --------------------------------------------------------------------------------------- the attack
def attack_exposure(
    defense: Defense,
    task: Task,
    exposure: str,
    config: AttackConfig,
    *,
    server_model: str = "cnn",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Attribute-inference attack on one point of exposure (:data:`ATTACK_EXPOSURES`).

    Args:
        server_model: Name of the engine's model (``veil.models``), built by the ``server`` attacker.

    Returns a dict with ``attackers`` (per architecture: val_acc, test_acc, best_epoch, epochs_run,
    seconds, parameters), ``best`` (name of the attacker with the best validation accuracy), ``attack_acc``
    (its test accuracy), ``skipped`` (architectures that do not apply to this message shape, with the
    reason), ``message_shape``, ``attacker_gets_label``, ``records`` (counts and sources of the attacker's
    records, :func:`attacker_splits`), ``reachable_floor`` and ``under_trained`` (the best attacker is more
    than four binomial standard deviations below the floor its inputs allow) and ``averaging`` (the same best architecture retrained and scored
    on messages that are the mean of ``averaging_k`` draws; ``None`` if off).
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if exposure not in ATTACK_EXPOSURES:
        raise ValueError(f"unknown exposure {exposure!r}; valid: {', '.join(ATTACK_EXPOSURES)}")
    tr, va, records = attacker_splits(task, config.train_size, config.val_size, config.seed)
    te = _subset(task.test, config.test_size, config.seed + 2)
    labelled = exposure in LABELLED_EXPOSURES
    lab = {"num_labels": task.num_primary if labelled else 0, "defense": defense, "server_model": server_model}
    y_tr, y_va, y_te = (s.y if labelled else None for s in (tr, va, te))
    seed_everything(config.seed + 7)
    views = [_messages(defense, tr, exposure) for _ in range(config.views)]
    m_val, m_test = _messages(defense, va, exposure), _messages(defense, te, exposure)
    *views, m_val, m_test = common_width(*views, m_val, m_test)
    shape = tuple(m_val.shape[1:])
    names, skipped = attackers_for(shape, config.attackers)
    log(f"[attack/{exposure}] message shape {shape}; {len(tr)} train, {len(va)} val, {len(te)} test records; attackers {names}"
        + ("; the attacker reads y beside the message" if labelled else ""))
    if records["note"]:
        log(f"[attack/{exposure}] note: {records['note']}")
    results: dict[str, Any] = {}
    for name in names:
        model, rec = train_attacker(name, views, tr.z, m_val, va.z, task.num_secondary, config, y_train=y_tr, y_val=y_va, log=log, **lab)
        rec["test_acc"] = _accuracy(model, m_test, te.z, y_te)
        results[name] = rec
    best = max(results, key=lambda n: (results[n]["val_acc"], -names.index(n)))
    out: dict[str, Any] = {
        "exposure": exposure,
        "message_shape": list(shape),
        "attacker_gets_label": labelled,
        "server_model": server_model if "server" in names else None,
        "attackers": results,
        "skipped": {a: "message is not image-shaped (C, H, W); vector messages get MLP attackers" for a in skipped},
        "best": best,
        "attack_acc": results[best]["test_acc"],
        "attack_acc_max_over_attackers": max(r["test_acc"] for r in results.values()),
        "train_records": len(tr),
        "val_records": len(va),
        "test_records": len(te),
        "records": records,
        "averaging": None,
    }
    # any sound attacker reaches the floor its inputs allow (the majority class; from y, the primary-only
    # floor): a best attacker clearly below it is under-trained, and its number is no evidence of privacy
    floor = task.primary_only_floor() if labelled else task.majority_floor()
    out["reachable_floor"] = floor
    out["under_trained"] = out["attack_acc"] < floor - 4 * math.sqrt(floor * (1 - floor) / max(1, len(te)))
    if out["under_trained"]:
        log(f"[attack/{exposure}] WARNING: best attack {out['attack_acc']:.4f} is below the floor {floor:.4f} its inputs allow: "
            "the attackers are under-trained (more epochs, records or views)")
    k = config.averaging_k
    if k > 1:
        if is_deterministic(defense, va.x[:64]) and exposure != "training-time":
            out["averaging"] = {"k": k, "attacker": best, "test_acc": out["attack_acc"], "note": "deterministic encode: averaging changes nothing"}
        else:
            seed_everything(config.seed + 11)
            avg_views = [_messages(defense, tr, exposure, k) for _ in range(config.views)]
            mv, mt = _messages(defense, va, exposure, k), _messages(defense, te, exposure, k)
            *avg_views, mv, mt = common_width(*avg_views, mv, mt)
            log(f"[attack/{exposure}] averaging attack: mean of k={k} draws per record, attacker {best}")
            model, rec = train_attacker(best, avg_views, tr.z, mv, va.z, task.num_secondary, config, y_train=y_tr, y_val=y_va, log=log, **lab)
            rec.update({"k": k, "attacker": best, "test_acc": _accuracy(model, mt, te.z, y_te)})
            out["averaging"] = rec
    return out


def attribute_attack(
    defense: Defense,
    task: Task,
    config: AttackConfig | None = None,
    *,
    server_model: str = "cnn",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Attack every configured point of exposure; add the floors and the configuration.

    Returns ``{"inference": {...}, "training": {...}, "training-time": {...}, "majority_floor",
    "primary_only_floor", "config", "server_model"}`` (see :func:`attack_exposure` for each exposure).
    ``training`` is always attacked on its own, since its attacker reads y (``same_messages_as_inference``
    says whether ``encode`` ignores the label). ``training-time`` is attacked where the train-mode
    messages differ from the eval-mode ones (:func:`training_time_differs`); otherwise it is the same
    channel as ``training`` (the last stage uses labels, or ``encode`` ignores them) and that result is
    reused, marked ``same_as``.
    """
    config = config or AttackConfig()
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out: dict[str, Any] = {
        "majority_floor": task.majority_floor(),
        "primary_only_floor": task.primary_only_floor(),
        "config": config.to_dict(),
        "server_model": server_model,
    }
    probe = task.val.subset(np.arange(min(64, len(task.val))))
    same = ignores_label(defense, probe.x, probe.y, probe.mask)
    differs = training_time_differs(defense, probe.x, probe.y, probe.mask)
    # exposures in dependency order, so that a reused result exists when it is needed
    for exposure in sorted(config.exposures, key=ATTACK_EXPOSURES.index):
        if exposure == "training-time" and not differs:
            if _last_stage(defense).use_labels or same:
                if "training" not in out:
                    out["training"] = attack_exposure(defense, task, "training", config, server_model=server_model, log=log)
                    out["training"]["same_messages_as_inference"] = same
                out[exposure] = dict(out["training"], exposure=exposure, same_as="training")
                log("[attack/training-time] train-mode messages equal the eval-mode ones (checked): same channel as the training exposure")
                continue
        out[exposure] = attack_exposure(defense, task, exposure, config, server_model=server_model, log=log)
        if exposure == "training":
            out[exposure]["same_messages_as_inference"] = same
        if exposure == "training-time":
            out[exposure]["same_as"] = None
    return out


__all__ = [
    "ATTACK_EXPOSURES", "AttackConfig", "AttackerModel", "attack_exposure", "attacker_splits", "attackers_for", "attribute_attack",
    "build_attacker", "ignores_label", "is_deterministic", "train_attacker", "training_time_differs",
]
