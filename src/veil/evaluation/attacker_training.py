"""Training and scoring one attacker of the attribute attack (:mod:`veil.evaluation.attack`): AdamW with
early stopping on obfuscated validation records, the best weights kept."""

from __future__ import annotations

import copy
import sys
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from veil.defenses.base import Defense
from veil.evaluation.attack_config import AttackConfig
from veil.evaluation.attackers import AttackerModel, make_attacker
from veil.noise import seed_everything


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
            if stall >= config.patience and epoch >= config.min_epochs:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    # best at the last allowed epoch: the attacker was still learning, so its accuracy is a lower bound
    still_improving = best_epoch == epoch == config.epochs and config.epochs > 1
    rec = {"val_acc": best_acc, "best_epoch": best_epoch, "epochs_run": epoch, "seconds": round(time.time() - t0, 2),
           "parameters": sum(p.numel() for p in params), "device": str(device), "still_improving": still_improving}
    log(f"  attacker {name}: val acc {best_acc:.4f} (best epoch {best_epoch}/{epoch}, {rec['seconds']}s)"
        + ("; still improving at the epoch cap: a lower bound, give it more epochs" if still_improving else ""))
    return model, rec
