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

import math
import sys
from typing import Any, Callable

import numpy as np

from veil.data.tasks import Task
from veil.defenses.base import Defense
from veil.evaluation.attack_config import (
    ATTACK_EXPOSURES,
    IMAGE_ATTACKERS,
    LABELLED_EXPOSURES,
    VECTOR_ATTACKERS,
    AttackConfig,
)
from veil.evaluation.attack_data import (
    _concat,
    _encode,
    _last_stage,
    _messages,
    _subset,
    attacker_splits,
    common_width,
    ignores_label,
    is_deterministic,
    training_time_copy,
    training_time_differs,
)
from veil.evaluation.attacker_training import _accuracy, _on, train_attacker
from veil.evaluation.attackers import (
    AttackerModel,
    Standardize,
    _Decode,
    _has_decode,
    attackers_for,
    build_attacker,
    make_attacker,
    with_label,
)
from veil.noise import seed_everything

# The pieces live by concept (configuration, architectures, training one attacker, records and messages);
# this module runs the attack and keeps every name importable from here.


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
