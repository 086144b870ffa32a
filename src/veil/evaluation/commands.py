"""CLI commands ``veil evaluate``, ``veil sweep`` and ``veil report`` (registered in :mod:`veil.cli`).

Each builds the library's configs from its options and makes one library call. Option defaults are read
from the config dataclasses (``AttackConfig``, ``ReconstructionConfig``, ``MIConfig``), never restated.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from veil.cli_common import config_default, config_option
from veil.evaluation.attack import AttackConfig
from veil.evaluation.fisher import FisherConfig
from veil.evaluation.inversion import InversionConfig
from veil.evaluation.mutual_information import MIConfig
from veil.evaluation.reconstruction import ReconstructionConfig

# shared option declarations; every default is read from the config dataclasses (written once, there)
_ATTACK_EPOCHS = config_option(AttackConfig, "epochs", "--attack-epochs", min=1, help="Most epochs per attacker (early stopping on obfuscated validation records).")
_PATIENCE = config_option(AttackConfig, "patience", "--patience", min=1, help="Attacker early-stopping patience (epochs without a better validation accuracy).")
_MIN_EPOCHS = config_option(AttackConfig, "min_epochs", "--attack-min-epochs", min=0, help="Attackers never stop before this epoch (capped at --attack-epochs): noisy messages can look unreadable for a few epochs before an attacker starts to read them.")
_ATTACK_TRAIN = config_option(AttackConfig, "train_size", "--attack-train-size", min=2, help="Obfuscated training records the attacker uses, disjoint from the defense's (default: as many as the defense trained on, where that many exist).")
_ATTACK_TEST = config_option(AttackConfig, "test_size", "--attack-test-size", min=2, help="Obfuscated test records scored by the attacks (default: the whole test split).")
_ATTACK_VAL = config_option(AttackConfig, "val_size", "--attack-val-size", min=2, help="Obfuscated validation records the attackers early-stop on (default: the whole validation split; the benchmarks use 500).")
_ATTACK_WIDTH = config_option(AttackConfig, "width", "--attack-width", min=1, help="Channels of the CNN attackers' first layer (doubling per block).")
_RECON_WIDTH = config_option(ReconstructionConfig, "width", "--recon-width", min=1, help="Channels of the reconstruction decoder.")
_ATTACKERS = typer.Option(",".join(config_default(AttackConfig, "attackers")), "--attackers", help="Comma-separated attacker architectures: linear, mlp, mlp-bn, cnn, cnn-bn (CNNs only for image-shaped messages), server (the run's own server model).")
_VIEWS = config_option(AttackConfig, "views", "--views", min=1, help="Fresh obfuscations of the attacker's training set, cycled over epochs.")
_AVG_K = config_option(AttackConfig, "averaging_k", "--averaging-k", min=0, help="Copies averaged by the averaging attack (0 or 1: off).")
_EXPOSURES = typer.Option(",".join(config_default(AttackConfig, "exposures")), "--exposures", help="Comma-separated points of exposure to attack: inference, training (attacker given y), training-time (messages sent in train mode, where they differ).")
_RECON_EPOCHS = config_option(ReconstructionConfig, "epochs", "--recon-epochs", min=0, help="Most epochs of the reconstruction decoder (0: skip the reconstruction attack).")
_MI_DIMS = config_option(MIConfig, "dims", "--mi-dims", min=0, help="PCA dimensions for the KSG mutual-information estimate (0: skip MI).")
_MI_K = config_option(MIConfig, "k", "--mi-k", min=1, help="Neighbours in the KSG estimator.")
_MI_SAMPLES = config_option(MIConfig, "samples", "--mi-samples", min=5, help="Test pairs used by the KSG estimator.")
_EVAL_SEED = config_option(AttackConfig, "seed", "--eval-seed", help="Seed of the attackers, decoder and MI estimate.")
_STRENGTH = typer.Option("standard", "--strength", help="standard: the attacks above. strong: also every attacker architecture at twice the server's width, 8+ views, 16+ averaged copies, the decoder with a clean-data prior, white-box input-optimisation inversion through the known client, the Fisher-information bound, and the secret read from every reconstruction (RUN/attacks.png).")
_PRIOR_EPOCHS = typer.Option(10, "--prior-epochs", min=1, help="Strong preset: epochs of the clean autoencoder that starts the decoder with a prior.")
_INV_RECORDS = config_option(InversionConfig, "records", "--inversion-records", min=1, help="Strong preset: test records inverted by input optimisation.")
_INV_STEPS = config_option(InversionConfig, "steps", "--inversion-steps", min=1, help="Strong preset: optimisation steps per restart of the inversion.")
_INV_RESTARTS = config_option(InversionConfig, "restarts", "--inversion-restarts", min=1, help="Strong preset: restarts per record (the mean record, then random ones).")
_INV_CAP = config_option(InversionConfig, "time_cap", "--inversion-time-cap", min=1.0, help="Strong preset: seconds for the whole inversion (tuning of its prior included).")
_FISHER_RECORDS = config_option(FisherConfig, "records", "--fisher-records", min=1, help="Strong preset: test records the Fisher bound is computed on (one Jacobian each).")
_READER_CACHE = typer.Option(
    None, "--reader-cache", file_okay=False,
    help="Strong preset: keep the clean secret-readout classifiers in this folder and reuse them for later evaluations of the same task "
         "(same clean records and attack settings, checked by a hash; they do not depend on the defense).",
)
_ATTACK_DEVICE = config_option(AttackConfig, "device", "--attack-device", help="Where the attackers train: cpu, cuda, cuda:N or auto (cuda when available).")


def _split(text: str, what: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if not items:
        raise ValueError(f"{what} must list at least one name, got {text!r}")
    return items


def build_eval_config(
    *,
    attack_epochs: int,
    patience: int,
    attack_train_size: Optional[int],
    attack_test_size: Optional[int],
    attack_val_size: Optional[int] = None,
    attack_min_epochs: int = config_default(AttackConfig, "min_epochs"),
    attack_width: int,
    attackers: str,
    views: int,
    averaging_k: int,
    exposures: str,
    recon_epochs: int,
    recon_width: int,
    mi_dims: int,
    mi_k: int,
    mi_samples: int,
    eval_seed: int,
    attack_device: str,
) -> "EvalConfig":
    """The :class:`~veil.evaluation.sweep.EvalConfig` the CLI options describe (bad values raise ``ValueError``)."""
    from veil.evaluation.sweep import EvalConfig

    attack = AttackConfig(
        attackers=_split(attackers, "--attackers"), epochs=attack_epochs, patience=patience, min_epochs=attack_min_epochs, train_size=attack_train_size,
        test_size=attack_test_size, val_size=attack_val_size, width=attack_width, views=views, averaging_k=averaging_k, exposures=_split(exposures, "--exposures"), seed=eval_seed,
        device=attack_device,
    )
    recon = None if recon_epochs == 0 else ReconstructionConfig(
        epochs=recon_epochs, patience=min(config_default(ReconstructionConfig, "patience"), recon_epochs), width=recon_width, train_size=attack_train_size, test_size=attack_test_size, views=views, seed=eval_seed
    )
    mi = None if mi_dims == 0 else MIConfig(dims=mi_dims, k=mi_k, samples=mi_samples, seed=eval_seed)
    return EvalConfig(attack=attack, reconstruction=recon, mi=mi)


from veil.cli_common import fail as _fail, parse_options as _parse_options  # noqa: E402


def _summary(p: dict) -> dict:
    keys = ("run", "defense", "knob", "knob_value", "primary_acc", "attack_acc", "best_attacker", "attack_acc_training",
            "attack_acc_training_time", "averaging_attack_acc", "majority_floor", "primary_only_floor", "client_flops_share")
    out = {k: p.get(k) for k in keys}
    out["mi_normalised"] = (p.get("mi") or {}).get("ksg_normalised")
    out["psnr"] = (p.get("reconstruction") or {}).get("psnr")
    for key in ("best_attack", "best_attack_name", "secret_from_reconstruction_acc", "secret_from_prior_reconstruction_acc", "secret_from_inversion_acc"):
        if key in p:
            out[key] = p[key]
    if p.get("inversion"):
        out["inversion_psnr"] = p["inversion"]["psnr"]
    if p.get("fisher") and p["fisher"].get("applicable"):
        out["fisher_psnr_ceiling"] = p["fisher"]["psnr_ceiling"]
    return out


def evaluate_cmd(
    run: Path = typer.Argument(..., help="A finished run folder (from 'veil train'); RUN/privacy.json is written."),
    attack_epochs: int = _ATTACK_EPOCHS,
    patience: int = _PATIENCE,
    attack_min_epochs: int = _MIN_EPOCHS,
    attack_train_size: Optional[int] = _ATTACK_TRAIN,
    attack_test_size: Optional[int] = _ATTACK_TEST,
    attack_val_size: Optional[int] = _ATTACK_VAL,
    attack_width: int = _ATTACK_WIDTH,
    attackers: str = _ATTACKERS,
    views: int = _VIEWS,
    averaging_k: int = _AVG_K,
    exposures: str = _EXPOSURES,
    recon_epochs: int = _RECON_EPOCHS,
    recon_width: int = _RECON_WIDTH,
    mi_dims: int = _MI_DIMS,
    mi_k: int = _MI_K,
    mi_samples: int = _MI_SAMPLES,
    eval_seed: int = _EVAL_SEED,
    attack_device: str = _ATTACK_DEVICE,
    strength: str = _STRENGTH,
    prior_epochs: int = _PRIOR_EPOCHS,
    inversion_records: int = _INV_RECORDS,
    inversion_steps: int = _INV_STEPS,
    inversion_restarts: int = _INV_RESTARTS,
    inversion_time_cap: float = _INV_CAP,
    fisher_records: int = _FISHER_RECORDS,
    reader_cache: Optional[Path] = _READER_CACHE,
) -> None:
    """Attack a trained run: attribute inference (several retrained attackers, both exposures), MI, reconstruction
    (``--strength strong``: also inversion through the known client, a decoder with a prior, the Fisher bound)."""
    from veil.evaluation.sweep import evaluate_run

    try:
        config = build_eval_config(attack_epochs=attack_epochs, patience=patience, attack_min_epochs=attack_min_epochs, attack_train_size=attack_train_size, attackers=attackers,
                                   attack_test_size=attack_test_size, attack_val_size=attack_val_size, attack_width=attack_width, recon_width=recon_width,
                                   views=views, averaging_k=averaging_k, exposures=exposures, recon_epochs=recon_epochs, mi_dims=mi_dims,
                                   mi_k=mi_k, mi_samples=mi_samples, eval_seed=eval_seed, attack_device=attack_device)
        # The strong preset's options are checked whatever --strength says: a bad value is refused, never ignored.
        inversion = InversionConfig(records=inversion_records, steps=inversion_steps, restarts=inversion_restarts, time_cap=inversion_time_cap, seed=eval_seed)
        fisher = FisherConfig(records=fisher_records, seed=eval_seed)
        ReconstructionConfig(prior_epochs=prior_epochs)
        if strength == "strong":
            from veil.evaluation.sweep import strong_preset

            config = strong_preset(config, prior_epochs=prior_epochs, inversion=inversion, fisher=fisher)
        elif strength != "standard":
            raise ValueError(f"--strength must be standard or strong, got {strength!r}")
        if reader_cache is not None:  # a file given as the folder is refused by the option itself (file_okay=False)
            config = dataclasses.replace(config, reader_cache=str(reader_cache))
        result = evaluate_run(run, config)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    Console().print_json(json.dumps(_summary(result)))


def sweep_cmd(
    task: str = typer.Option("digits-lt5", "--task", "-t", help="Task: digits-lt5, mnist-lt5, fashion-lt5, npz:PATH or idx:DIR."),
    defense: str = typer.Option(..., "--defense", "-d", help="Defense whose knob is swept ('veil list' shows them)."),
    lambdas: str = typer.Option("default", "--lambdas", "--knobs", help="Comma-separated knob values, e.g. 0,0.5,1 ('default': the method's own)."),
    out: Path = typer.Option(..., "--out", "-o", help="Sweep folder; one run folder per knob value: OUT/DEFENSE/knob=VALUE. Rerun to resume."),
    epochs: int = typer.Option(10, "--epochs", "-e", min=1, help="Training epochs per run."),
    train_size: Optional[int] = typer.Option(None, "--train-size", min=1, help="Use only this many training records (defense and attacker)."),
    model: str = typer.Option("cnn", "--model", help="Server task model: cnn (default), resnet (ResNet-20-like, batch norm) or mlp."),
    batch_size: int = typer.Option(128, "--batch-size", min=1, help="Records per training batch."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate for training."),
    seed: int = typer.Option(0, "--seed", help="Training seed."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="Extra defense option KEY=VALUE (JSON value), repeatable."),
    attack_epochs: int = _ATTACK_EPOCHS,
    patience: int = _PATIENCE,
    attack_min_epochs: int = _MIN_EPOCHS,
    attack_train_size: Optional[int] = _ATTACK_TRAIN,
    attack_test_size: Optional[int] = _ATTACK_TEST,
    attack_val_size: Optional[int] = _ATTACK_VAL,
    attack_width: int = _ATTACK_WIDTH,
    attackers: str = _ATTACKERS,
    views: int = _VIEWS,
    averaging_k: int = _AVG_K,
    exposures: str = _EXPOSURES,
    recon_epochs: int = _RECON_EPOCHS,
    recon_width: int = _RECON_WIDTH,
    mi_dims: int = _MI_DIMS,
    mi_k: int = _MI_K,
    mi_samples: int = _MI_SAMPLES,
    eval_seed: int = _EVAL_SEED,
    attack_device: str = _ATTACK_DEVICE,
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS", help="Run each knob value as a Ray task: 'local' starts Ray on this machine's cores; 'auto' or HOST:PORT uses a running Ray cluster (OUT must then be a folder every node sees)."),
) -> None:
    """Train and evaluate a defense at each knob value (resumable); then 'veil report OUT'."""
    from veil.evaluation.sweep import parse_knobs, sweep

    try:
        config = build_eval_config(attack_epochs=attack_epochs, patience=patience, attack_min_epochs=attack_min_epochs, attack_train_size=attack_train_size, attackers=attackers,
                                   attack_test_size=attack_test_size, attack_val_size=attack_val_size, attack_width=attack_width, recon_width=recon_width,
                                   views=views, averaging_k=averaging_k, exposures=exposures, recon_epochs=recon_epochs, mi_dims=mi_dims,
                                   mi_k=mi_k, mi_samples=mi_samples, eval_seed=eval_seed, attack_device=attack_device)
        train = {"epochs": epochs, "train_size": train_size, "model": model, "batch_size": batch_size, "lr": lr, "seed": seed,
                 "defense_options": _parse_options(option)}
        if ray is None:
            results = sweep(task, defense, parse_knobs(lambdas), out, train=train, evaluation=config)
        else:
            from veil.evaluation.ray_sweep import ray_sweep

            results = ray_sweep(task, defense, parse_knobs(lambdas), out, train=train, evaluation=config, address=None if ray == "local" else ray)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        _fail(err)
    Console().print_json(json.dumps([_summary(r) for r in results]))


def report_cmd(
    dirs: List[Path] = typer.Argument(..., help="Folders searched (recursively) for privacy.json files, e.g. sweep folders."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder: results.csv, results.md, tradeoff_*.png."),
) -> None:
    """Draw trade-off curves (primary vs attack accuracy, primary vs MI) and write markdown/CSV tables."""
    from veil.evaluation.report import report

    try:
        info = report(dirs, out)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    Console().print_json(json.dumps(info))
