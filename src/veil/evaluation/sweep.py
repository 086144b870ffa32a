"""Evaluate a finished run (``RUN/privacy.json``) and sweep a defense's knob (train + evaluate a series).

A sweep writes one run folder per knob value, ``OUT/DEFENSE/knob=VALUE``; every result is written
atomically as soon as it exists, so an interrupted sweep keeps what it finished and, rerun with the same
arguments, skips runs whose ``privacy.json`` is there (``train_run`` resumes unfinished training).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from veil.data.readers import fingerprint
from veil.data.tasks import Task, load_task
from veil.defenses import defense_class
from veil.evaluation.attack import IMAGE_ATTACKERS, VECTOR_ATTACKERS, AttackConfig, attribute_attack
from veil.evaluation.fisher import FisherConfig, fisher_bound
from veil.evaluation.inversion import InversionConfig, inversion_attack
from veil.evaluation.mutual_information import MIConfig, mutual_information
from veil.evaluation.reconstruction import ReconstructionConfig, decoder_attack, save_rows
from veil.io import read_json, write_json
from veil.noise import seed_everything
from veil.training.loop import TrainConfig
from veil.training.run import build, check_data_unchanged, check_output_folder, config_matches, evaluate_primary, load_run, train_run

PRIVACY_FILE = "privacy.json"
RECONSTRUCTION_FILE = "reconstruction.png"
#: The strong preset's grid: records / messages / every reconstruction of the same test records.
ATTACKS_FILE = "attacks.png"
STRENGTHS = ("standard", "strong")

#: Every attribute attack of a privacy.json (the accuracy of reading the secret), all counted in the best
#: attack: the retrained attackers at each exposure, the averaging attack, and the secret read from each
#: reconstruction attack's records (the strong preset).
ATTACK_KEYS = (
    "attack_acc", "attack_acc_training", "attack_acc_training_time", "averaging_attack_acc",
    "secret_from_reconstruction_acc", "secret_from_prior_reconstruction_acc", "secret_from_inversion_acc",
)


def best_attack(row: dict[str, Any]) -> tuple[float | None, str | None]:
    """The strongest attribute attack in ``row`` (a privacy.json or a report row) and its key (:data:`ATTACK_KEYS`)."""
    found = [(float(row[k]), k) for k in ATTACK_KEYS if row.get(k) is not None]
    if not found:
        return None, None
    return max(found, key=lambda t: (t[0], -ATTACK_KEYS.index(t[1])))


def check_result_files(folder: Path, names: list[str]) -> None:
    """Refuse, before any work, result files that could not be written: a folder that is missing or not
    writable, a result name taken by a folder."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{folder}: the folder is not writable, so {', '.join(names)} could not be written")
    for name in names:
        if (folder / name).is_dir():
            raise ValueError(f"{folder / name}: is a folder; {name} is written there")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Everything that decides an evaluation (saved in ``privacy.json``).

    Attributes:
        attack: The attribute-inference attack's effort.
        reconstruction: The reconstruction attack (``None``: skipped).
        mi: The mutual-information estimate (``None``: skipped).
        prior: The decoder with a prior (``ReconstructionConfig`` with ``prior_epochs`` > 0; ``None``: skipped).
        inversion: The white-box input-optimisation inversion (``None``: skipped).
        fisher: The Fisher-information bound (``None``: skipped).
        secret_readout: Read the secret from every reconstruction attack's records with a classifier trained
            on clean records (:mod:`veil.evaluation.secret_readout`).
        strength: ``standard`` or ``strong`` (:func:`strong_preset`), recorded.
        reader_cache: Folder where the secret-readout classifiers are kept and reused across evaluations of
            one task (:func:`veil.evaluation.secret_readout.train_secret_reader`); ``None``: trained each time.
    """

    attack: AttackConfig = dataclasses.field(default_factory=AttackConfig)
    reconstruction: ReconstructionConfig | None = dataclasses.field(default_factory=ReconstructionConfig)
    mi: MIConfig | None = dataclasses.field(default_factory=MIConfig)
    prior: ReconstructionConfig | None = None
    inversion: InversionConfig | None = None
    fisher: FisherConfig | None = None
    secret_readout: bool = False
    strength: str = "standard"
    reader_cache: str | None = None

    def __post_init__(self) -> None:
        if self.strength not in STRENGTHS:
            raise ValueError(f"strength must be one of {', '.join(STRENGTHS)}, got {self.strength!r}")
        if self.prior is not None and not self.prior.prior_epochs:
            raise ValueError("prior: the decoder with a prior needs prior_epochs >= 1")

    def to_dict(self) -> dict[str, Any]:
        out = {
            "attack": self.attack.to_dict(),
            "reconstruction": None if self.reconstruction is None else self.reconstruction.to_dict(),
            "mi": None if self.mi is None else self.mi.to_dict(),
        }
        # the strong preset's parts only where set, so standard configs saved before them compare equal (sweep resumes)
        if self.strength != "standard" or self.prior or self.inversion or self.fisher or self.secret_readout:
            out.update({
                "prior": None if self.prior is None else self.prior.to_dict(),
                "inversion": None if self.inversion is None else self.inversion.to_dict(),
                "fisher": None if self.fisher is None else self.fisher.to_dict(),
                "secret_readout": self.secret_readout,
                "strength": self.strength,
            })
        if self.reader_cache is not None:
            out["reader_cache"] = self.reader_cache
        return out


#: The strong preset's attacker width: twice the server model's 32 channels.
STRONG_WIDTH = 64


def strong_preset(
    config: EvalConfig,
    *,
    prior_epochs: int = 10,
    inversion: InversionConfig | None = None,
    fisher: FisherConfig | None = None,
) -> EvalConfig:
    """``config`` made strong: every attacker architecture (the server's own among them) at
    :data:`STRONG_WIDTH` or more channels, at least 8 views and 16 averaged copies, the decoder with and
    without a prior, the input-optimisation inversion, the Fisher bound, and the secret read from every
    reconstruction. Epochs, patience and record counts stay as given."""
    a = config.attack
    attackers = tuple(dict.fromkeys((*a.attackers, *IMAGE_ATTACKERS, *VECTOR_ATTACKERS)))
    attack = dataclasses.replace(a, attackers=attackers, width=max(a.width, STRONG_WIDTH), views=max(a.views, 8), averaging_k=max(a.averaging_k, 16))
    recon = config.reconstruction or ReconstructionConfig(train_size=a.train_size, test_size=a.test_size, seed=a.seed)
    recon = dataclasses.replace(recon, views=max(recon.views, 8))
    return dataclasses.replace(
        config, attack=attack, reconstruction=recon, prior=dataclasses.replace(recon, prior_epochs=max(1, prior_epochs)),
        inversion=inversion or InversionConfig(seed=a.seed), fisher=fisher or FisherConfig(seed=a.seed), secret_readout=True, strength="strong",
    )


def evaluate_run(
    run: str | Path,
    config: EvalConfig | None = None,
    *,
    task: Task | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Attack a finished run folder and write ``RUN/privacy.json`` (atomically); return its content.

    Keys: ``primary_acc`` (measured here, on the weights attacked: the server's accuracy on inference
    messages, the accuracy a user gets; ``primary_acc_at_training`` is metrics.json's number) and
    ``label_readback_training_exposure`` (the server's accuracy on training-exposure messages, which
    carry the known label where the method hard-selects by it: a check, not an accuracy anyone gets),
    ``attack_acc`` / ``attack_acc_training`` / ``attack_acc_training_time`` (best attacker by validation
    accuracy, test accuracy, per exposure; the attackers include the run's own server model), ``attack``
    (every attacker at every exposure, averaging attack, floors, record counts), ``majority_floor``,
    ``primary_only_floor``, ``averaging_attack_acc*``, ``mi``, ``reconstruction`` (PSNR/SSIM; grid in
    ``RUN/reconstruction.png``), the client cost (FLOPs share) and both configs.
    """
    config = config or EvalConfig()
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    run = Path(run)
    train_cfg, task, defense, model = load_run(run, task=task)
    metrics = read_json(run / "metrics.json")
    check_result_files(run, [PRIVACY_FILE, RECONSTRUCTION_FILE, ATTACKS_FILE])  # before the attacks, not after them
    config.attack.torch_device()  # a device that is not there is named before any work
    seed_everything(config.attack.seed)
    measured = evaluate_primary(defense, model, task)  # measured now, on the weights being attacked
    t0 = time.time()
    log(f"[evaluate] {run}: defense {defense.name}, {defense.knob or 'no knob'}={defense.knob_value()}")
    attack = attribute_attack(defense, task, config.attack, server_model=train_cfg.model, log=log)
    out: dict[str, Any] = {
        "run": str(run),
        "task": train_cfg.task,
        "defense": defense.name,
        "knob": defense.knob or None,
        "knob_value": defense.knob_value(),
        "primary_acc": measured["primary_acc"],
        "label_readback_training_exposure": measured["label_readback_training_exposure"],
        "primary_acc_at_training": metrics.get("primary_acc"),
        "attack_acc": attack.get("inference", {}).get("attack_acc"),
        "attack_acc_training": attack.get("training", {}).get("attack_acc"),
        "attack_acc_training_time": attack.get("training-time", {}).get("attack_acc"),
        "best_attacker": attack.get("inference", {}).get("best"),
        "majority_floor": attack["majority_floor"],
        "primary_only_floor": attack["primary_only_floor"],
        "averaging_attack_acc": (attack.get("inference", {}).get("averaging") or {}).get("test_acc"),
        "averaging_attack_acc_training": (attack.get("training", {}).get("averaging") or {}).get("test_acc"),
        "averaging_attack_acc_training_time": (attack.get("training-time", {}).get("averaging") or {}).get("test_acc"),
        "attacker_records": (attack.get("inference") or attack.get("training") or attack.get("training-time") or {}).get("records"),
        # exposures whose best attacker sits clearly below the floor its inputs allow: no evidence of privacy there
        "under_trained_exposures": [e for e in ("inference", "training", "training-time") if (attack.get(e) or {}).get("under_trained")],
    }
    for key in ("client_flops_share", "client_flops", "server_flops", "client_params", "server_params"):
        out[key] = metrics.get(key)
    out["attack"] = attack
    if config.mi is not None:
        seed_everything(config.mi.seed)
        out["mi"] = mutual_information(defense, task, config.mi)
        log(f"[evaluate] MI (KSG, nats): {out['mi']['ksg']:.3f}, normalised {out['mi']['ksg_normalised']}")
    else:
        out["mi"] = None
    out.update(_reconstruction_attacks(defense, task, config, run, log))
    out["best_attack"], out["best_attack_name"] = best_attack(out)
    log(f"[evaluate] best attack: {out['best_attack_name']} = {out['best_attack']}")
    out["evaluation_config"] = config.to_dict()
    out["train_config"] = train_cfg.to_dict()
    out["seconds"] = round(time.time() - t0, 2)
    if (run / PRIVACY_FILE).exists():
        log(f"[evaluate] {run / PRIVACY_FILE}: replacing the earlier evaluation")
    write_json(run / PRIVACY_FILE, out)
    log(
        f"[evaluate] {run}: primary {out['primary_acc']:.4f}, attack {out['attack_acc']} "
        f"(floors: majority {out['majority_floor']:.4f}, primary-only {out['primary_only_floor']:.4f}) -> {run / PRIVACY_FILE}"
    )
    return out


def _reconstruction_attacks(defense: Any, task: Task, config: EvalConfig, run: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """The decoder (with and without a prior), the inversion, the Fisher bound and the secrets read from
    each reconstruction, as privacy.json keys; writes the grids (and removes grids this evaluation does not
    make, which would not match it)."""
    reader = None
    if config.secret_readout and (config.reconstruction or config.prior or config.inversion):
        from veil.evaluation.secret_readout import train_secret_reader

        reader = train_secret_reader(task, config.attack, cache_dir=config.reader_cache, log=log)
    out: dict[str, Any] = {"reconstruction": None}
    rows: list[tuple[str, Any]] = []
    if config.reconstruction is not None:
        out["reconstruction"], x, m, rec = decoder_attack(defense, task, config.reconstruction, grid_path=run / RECONSTRUCTION_FILE, secret_reader=reader, log=log)
        rows += [("record", x), ("message", m), (f"decoder {out['reconstruction']['psnr']:.1f} dB", rec)]
    else:
        (run / RECONSTRUCTION_FILE).unlink(missing_ok=True)
    if config.prior is not None:
        out["reconstruction_prior"], x, m, rec = decoder_attack(defense, task, config.prior, secret_reader=reader, log=log)
        rows = rows or [("record", x), ("message", m)]
        rows.append((f"decoder+prior {out['reconstruction_prior']['psnr']:.1f} dB", rec))
    if config.inversion is not None:
        test_size = (config.reconstruction or config.prior).test_size if (config.reconstruction or config.prior) else config.attack.test_size
        out["inversion"], te, m, rec = inversion_attack(defense, task, config.inversion, test_size=test_size, log=log)
        x = te.x
        if reader is not None:
            out["inversion"]["secret"] = reader.read(rec, te.z)
            log(f"[inversion] secret read from the estimates: {out['inversion']['secret']['acc']:.4f}")
        rows = rows or [("record", x), ("message", m)]
        rows.append((f"inversion {out['inversion']['psnr']:.1f} dB", rec))
    if config.fisher is not None:
        out["fisher"] = fisher_bound(defense, task, config.fisher)
        if out["fisher"].get("applicable"):
            f = out["fisher"]
            log(f"[fisher] MSE bound of unbiased attackers {f['mse_bound']} (PSNR ceiling {f['psnr_ceiling']}), 1/dFIL {f['mse_bound_dfil']}; "
                f"{f['singular_records']} of {f['records']} records with uninformative directions")
    for key, name in (("reconstruction", "secret_from_reconstruction_acc"), ("reconstruction_prior", "secret_from_prior_reconstruction_acc"), ("inversion", "secret_from_inversion_acc")):
        if config.secret_readout:
            out[name] = ((out.get(key) or {}).get("secret") or {}).get("acc")
    if config.strength == "strong" and rows:
        n = min(config.reconstruction.grid_records if config.reconstruction else 8, *(len(r) for _, r in rows))
        save_rows(run / ATTACKS_FILE, [(label, _numpy(t[:n])) for label, t in rows], title=f"{defense.name}: records, messages and reconstructions")
        out["attacks_grid"] = str(run / ATTACKS_FILE)
    else:
        (run / ATTACKS_FILE).unlink(missing_ok=True)
    return out


def _numpy(t: Any) -> Any:
    return t.detach().cpu().numpy()


def run_dir(out: str | Path, defense: str, knob: float | None) -> Path:
    """``OUT/DEFENSE/knob=VALUE`` (``knob=default`` when the method's default knob is used)."""
    return Path(out) / defense / ("knob=default" if knob is None else f"knob={knob:g}")


def sweep(
    task: str,
    defense: str,
    knobs: Iterable[float | None],
    out: str | Path,
    *,
    train: dict[str, Any] | None = None,
    evaluation: EvalConfig | None = None,
    data: Task | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train and evaluate ``defense`` on ``task`` at each knob value; return the privacy results.

    Args:
        knobs: Knob values (``None``: the method's default). For a method without a knob (``none``)
            only one run is made, whatever is given.
        train: Other :class:`~veil.training.TrainConfig` fields (``epochs``, ``train_size``, ``seed``, ...).
        evaluation: The evaluation's settings.
        data: The loaded task to use (default: ``load_task(task, seed, train_size)``), e.g. with a
            smaller validation split to save time; it must be ``task`` with the same seed and train size.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    evaluation = evaluation or EvalConfig()
    train = dict(train or {})
    for bad in ("task", "defense", "knob"):
        if bad in train:
            raise ValueError(f"train options must not set {bad!r}; pass it as an argument")
    cls = defense_class(defense)
    values = list(knobs)
    if not values:
        raise ValueError("knobs must hold at least one value")
    if not cls.knob:
        values = [None]
    # every run's config, the task, each defense and model are built (so validated) and the output
    # folder checked before anything is written or logged: a bad knob or option leaves nothing behind
    configs = [TrainConfig(task=task, defense=defense, knob=knob, **train) for knob in values]
    check_output_folder(Path(out))
    loaded: Task = data if data is not None else load_task(task, seed=configs[0].seed, train_size=configs[0].train_size)
    for config in configs:
        build(config, loaded)
    data = fingerprint(task)
    for knob in values:  # finished runs whose npz:/idx: data was replaced since are named, not skipped
        metrics = run_dir(out, defense, knob) / "metrics.json"
        if metrics.is_file():
            check_data_unchanged(task, data, read_json(metrics).get("data_sha256"), metrics.parent)
    results = []
    for i, (knob, config) in enumerate(zip(values, configs)):
        folder = run_dir(out, defense, knob)
        done = folder / PRIVACY_FILE
        if done.exists():
            old = read_json(done)
            if old.get("evaluation_config") == _as_json(evaluation.to_dict()) and config_matches(config, old.get("train_config")):
                log(f"[sweep] {folder}: already evaluated, skipped ({i + 1}/{len(values)})")
                results.append(old)
                continue
            log(f"[sweep] {folder}: privacy.json was made with other settings; evaluating again")
        log(f"[sweep] {defense} {cls.knob or ''}={knob if knob is not None else 'default'} ({i + 1}/{len(values)}) -> {folder}")
        train_run(config, folder, task=loaded, log=log)
        results.append(evaluate_run(folder, evaluation, task=loaded, log=log))
    return results


def _as_json(obj: Any) -> Any:
    """``obj`` as it reads back from a JSON file (tuples become lists), for comparing saved configs."""
    return json.loads(json.dumps(obj))


def parse_knobs(text: str) -> list[float | None]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]``; ``"default"`` stands for the method's default value."""
    values: list[float | None] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part == "default":
            values.append(None)
            continue
        try:
            value = float(part) + 0.0  # + 0.0 turns -0.0 into 0.0: one run folder, not two
        except ValueError:
            raise ValueError(f"knob values must be numbers separated by commas (or 'default'), got {part!r} in {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"knob values must be finite numbers, got {part!r} in {text!r}")
        if value in values:
            raise ValueError(f"knob value {part!r} is given twice in {text!r}")
        values.append(value)
    if not values:
        raise ValueError(f"no knob values in {text!r}; expected e.g. '0,0.5,1'")
    return values


__all__ = ["ATTACK_KEYS", "EvalConfig", "PRIVACY_FILE", "best_attack", "evaluate_run", "parse_knobs", "run_dir", "strong_preset", "sweep"]
