"""Secrets read from reconstructions: an attribute attack that goes through a reconstruction attack.

The attacker trains a classifier of the secret z on *clean* records of its own (the attribute attack's
training records, disjoint from the defense's; early stopping on its clean validation records), then
runs it on the records a reconstruction attack (the decoder, the decoder with a prior, the input
inversion) recovered from test messages. Its accuracy on those test records is an attribute attack like
the others, counted in the best attack (``secret_from_*_acc`` in ``privacy.json``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable

import torch

from veil.data.tasks import Task
from veil.evaluation.attack_config import AttackConfig
from veil.evaluation.attack_data import attacker_splits
from veil.evaluation.attacker_training import _accuracy, train_attacker
from veil.evaluation.attackers import AttackerModel


@dataclasses.dataclass
class SecretReader:
    """A secret classifier trained on clean records, with its clean validation accuracy."""

    model: AttackerModel
    architecture: str
    clean_val_acc: float

    def read(self, records: torch.Tensor, z: torch.Tensor) -> dict[str, Any]:
        """Accuracy of the classifier on reconstructed records (N, C, H, W) whose secrets are ``z`` (N,),
        with the binomial standard error of that accuracy."""
        acc = _accuracy(self.model, records.float(), z)
        return {"acc": acc, "stderr": math.sqrt(acc * (1 - acc) / max(1, len(z))), "records": len(z),
                "classifier": self.architecture, "clean_val_acc": self.clean_val_acc}


#: Classifiers tried on the clean records; the one with the best clean validation accuracy reads the secrets.
READERS = ("mlp", "cnn", "cnn-bn")


def train_secret_reader(task: Task, config: AttackConfig, *, architectures: tuple[str, ...] = READERS, log: Callable[[str], None] | None = None) -> SecretReader:
    """Train each of ``architectures`` (:func:`veil.evaluation.attack.build_attacker`) to read z from clean
    records; keep the one with the best clean validation accuracy (the test records are not looked at).

    Uses the attribute attack's records (:func:`attacker_splits` with ``config``'s sizes and seed): clean
    training records, clean validation records for early stopping.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    tr, va, _ = attacker_splits(task, config.train_size, config.val_size, config.seed)
    log(f"[secret-readout] training secret classifiers {list(architectures)} on {len(tr)} clean records")
    best: SecretReader | None = None
    for name in architectures:
        model, rec = train_attacker(name, [tr.x], tr.z, va.x, va.z, task.num_secondary, config, log=log)
        if best is None or rec["val_acc"] > best.clean_val_acc:
            best = SecretReader(model, name, rec["val_acc"])
    assert best is not None
    return best


__all__ = ["SecretReader", "train_secret_reader"]
