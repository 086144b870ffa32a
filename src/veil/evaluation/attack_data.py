"""What the attribute attack (:mod:`veil.evaluation.attack`) trains and scores on: the attacker's records,
disjoint from the defense's (:func:`attacker_splits`), and the messages a defense sends of them at each
point of exposure, with the checks that tell whether two exposures send the same channel."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from veil.data.tasks import Split, Task
from veil.defenses.base import Defense
from veil.evaluation.attack_config import ATTACK_EXPOSURES
from veil.training.run import EXPOSURES


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
    """Messages of ``split`` at ``exposure`` (:data:`~veil.evaluation.attack_config.ATTACK_EXPOSURES`); with ``k > 1``, the mean of k draws.

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
