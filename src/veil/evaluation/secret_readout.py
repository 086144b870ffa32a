"""Secrets read from reconstructions: an attribute attack that goes through a reconstruction attack.

The attacker trains a classifier of the secret z on *clean* records of its own (the attribute attack's
training records, disjoint from the defense's; early stopping on its clean validation records), then
runs it on the records a reconstruction attack (the decoder, the decoder with a prior, the input
inversion) recovered from test messages. Its accuracy on those test records is an attribute attack like
the others, counted in the best attack (``secret_from_*_acc`` in ``privacy.json``).

The classifiers depend only on the task's clean records and the attack settings, not on the defense, so
every evaluation of runs of one task trains the same ones. ``cache_dir`` keeps the chosen classifier as
``secret-reader-KEY.safetensors`` (+ ``.json``), where KEY hashes the clean training and validation records,
the settings and the architectures tried; a later evaluation with the same KEY loads it, checks its clean
validation accuracy again, and says so in its log and in ``privacy.json`` (``from_cache``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from veil.data.tasks import Task
from veil.evaluation.attack_config import AttackConfig
from veil.evaluation.attack_data import attacker_splits
from veil.evaluation.attacker_training import _accuracy, train_attacker
from veil.evaluation.attackers import AttackerModel, make_attacker
from veil.io import load_weights, read_json, save_weights, write_json


@dataclasses.dataclass
class SecretReader:
    """A secret classifier trained on clean records, with its clean validation accuracy."""

    model: AttackerModel
    architecture: str
    clean_val_acc: float
    from_cache: bool = False

    def read(self, records: torch.Tensor, z: torch.Tensor) -> dict[str, Any]:
        """Accuracy of the classifier on reconstructed records (N, C, H, W) whose secrets are ``z`` (N,),
        with the binomial standard error of that accuracy."""
        acc = _accuracy(self.model, records.float(), z)
        return {"acc": acc, "stderr": math.sqrt(acc * (1 - acc) / max(1, len(z))), "records": len(z),
                "classifier": self.architecture, "clean_val_acc": self.clean_val_acc, "from_cache": self.from_cache}


#: Classifiers tried on the clean records; the one with the best clean validation accuracy reads the secrets.
READERS = ("mlp", "cnn", "cnn-bn")


def train_secret_reader(
    task: Task,
    config: AttackConfig,
    *,
    architectures: tuple[str, ...] = READERS,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> SecretReader:
    """Train each of ``architectures`` (:func:`veil.evaluation.attack.build_attacker`) to read z from clean
    records; keep the one with the best clean validation accuracy (the test records are not looked at).

    Uses the attribute attack's records (:func:`attacker_splits` with ``config``'s sizes and seed): clean
    training records, clean validation records for early stopping. With ``cache_dir``, a classifier trained
    before on the same records with the same settings is loaded instead (module docstring), and the one
    trained here is saved there.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    tr, va, _ = attacker_splits(task, config.train_size, config.val_size, config.seed)
    folder = Path(cache_dir) if cache_dir is not None else None
    key = reader_key(tr.x, tr.z, va.x, va.z, task.num_secondary, config, architectures) if folder is not None else ""
    if folder is not None and (cached := _load_reader(folder, key, tr.x, va.x, va.z, task.num_secondary, config, log)) is not None:
        return cached
    log(f"[secret-readout] training secret classifiers {list(architectures)} on {len(tr)} clean records")
    best: SecretReader | None = None
    for name in architectures:
        model, rec = train_attacker(name, [tr.x], tr.z, va.x, va.z, task.num_secondary, config, log=log)
        if best is None or rec["val_acc"] > best.clean_val_acc:
            best = SecretReader(model, name, rec["val_acc"])
    assert best is not None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(folder / f"secret-reader-{key}.safetensors", best.model.state_dict())
        write_json(folder / f"secret-reader-{key}.json", {"key": key, "architecture": best.architecture, "clean_val_acc": best.clean_val_acc})
        log(f"[secret-readout] kept {best.architecture} in {folder} (key {key})")
    return best


#: Attack settings the secret readers do not depend on (they train on one clean view of the attack's
#: training records, whatever attackers, exposures, views or test records the attribute attack uses).
_NOT_READER_SETTINGS = ("device", "attackers", "exposures", "views", "averaging_k", "test_size")


def reader_key(
    x_train: torch.Tensor, z_train: torch.Tensor, x_val: torch.Tensor, z_val: torch.Tensor, num_classes: int, config: AttackConfig, architectures: tuple[str, ...]
) -> str:
    """Hash of everything the secret classifiers depend on: the clean records and labels, the number of
    secret classes, the attack settings that reach them and the architectures tried."""
    h = hashlib.sha256()
    for t in (x_train, z_train, x_val, z_val):
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    settings = {k: v for k, v in config.to_dict().items() if k not in _NOT_READER_SETTINGS}
    h.update(json.dumps({"settings": settings, "classes": num_classes, "architectures": list(architectures), "torch": torch.__version__}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _load_reader(
    folder: Path, key: str, x_train: torch.Tensor, x_val: torch.Tensor, z_val: torch.Tensor, num_classes: int, config: AttackConfig, log: Callable[[str], None]
) -> SecretReader | None:
    """The classifier kept under ``key`` in ``folder``, its clean validation accuracy measured again;
    ``None`` (and a line in the log) where there is none or it does not check out."""
    meta_path, weights_path = folder / f"secret-reader-{key}.json", folder / f"secret-reader-{key}.safetensors"
    if not (meta_path.is_file() and weights_path.is_file()):
        return None
    try:
        meta = read_json(meta_path)
        architecture, recorded = str(meta["architecture"]), float(meta["clean_val_acc"])
        model = make_attacker(architecture, x_train, num_classes, config).to(config.torch_device())
        model.load_state_dict(load_weights(weights_path), strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        log(f"[secret-readout] {weights_path}: not usable ({err}); training again")
        return None
    model.eval()
    acc = _accuracy(model, x_val, z_val)
    if abs(acc - recorded) > 1.5 / max(1, len(z_val)):  # the same to within one record (another device may round differently)
        log(f"[secret-readout] {weights_path}: clean val acc {acc:.4f}, recorded {recorded:.4f}; training again")
        return None
    log(f"[secret-readout] loaded {architecture} from {weights_path} (same clean records and settings): clean val acc {acc:.4f}")
    return SecretReader(model, architecture, acc, from_cache=True)


__all__ = ["SecretReader", "reader_key", "train_secret_reader"]
