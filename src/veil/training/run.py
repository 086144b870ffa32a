"""Run folders: train with checkpoints and resume, reload a finished run, export obfuscated records.

A run folder holds::

    config.json                 the full TrainConfig
    obfuscator.safetensors      the client side alone (defense weights + its config in metadata)
    model.safetensors           the server side (task model weights)
    metrics.json                primary accuracy (inference), label read-back (training exposure), client cost, history
    checkpoint.safetensors      while training: weights, optimizer state, progress and random state in one file (resume)
    best.safetensors            while training with early stopping (``patience``): the best epoch's weights
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from veil.data.readers import fingerprint
from veil.data.tasks import Task, load_task
from veil.defenses import Defense, create_defense, with_knob
from veil.defenses.saving import load_obfuscator, save_obfuscator
from veil.io import load_weights, read_json, save_npz, save_weights, write_json
from veil.models import count_flops, count_parameters, create_model
from veil.noise import OS_ENTROPY, REPRODUCIBLE, private_noise, seed_everything
from veil.training.loop import DEFAULT_DEVICE, TrainConfig, accuracy, fit, module_device, resolve_device, training_state

EXPOSURES = ("inference", "training")


def build(config: TrainConfig, task: Task | None = None) -> tuple[Task, Defense, nn.Module]:
    """Task, defense and server model for ``config`` (seeded, untrained)."""
    task = task or load_task(config.task, seed=config.seed, train_size=config.train_size)
    seed_everything(config.seed)
    options = with_knob(config.defense, config.knob, config.defense_options)
    if config.client_budget is not None:
        from veil.defenses.budget import fit_client_budget

        options, _ = fit_client_budget(config.defense, config.client_budget, options, input_shape=task.input_shape, num_classes=task.num_primary, model=config.model)
    defense = create_defense(config.defense, input_shape=task.input_shape, num_classes=task.num_primary, **options)
    stages = len(defense.stages())
    if config.epochs < stages:  # --epochs is "in all": each stage needs one
        raise ValueError(f"--epochs {config.epochs}: defense {config.defense!r} trains in {stages} stages and needs at least {stages} epochs in all")
    model = create_model(config.model, defense.output_shape(), task.num_primary)
    return task, defense, model


_state = training_state


def _load_state(path: Path, defense: Defense, model: nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> None:
    tensors = load_weights(path) if tensors is None else tensors
    d = {k[8:]: v for k, v in tensors.items() if k.startswith("defense.")}
    m = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        defense.load_state_dict(d)
        model.load_state_dict(m)
    except RuntimeError as err:
        raise ValueError(f"{path}: checkpoint does not match this run's defense/model ({err})") from err


def client_cost(defense: Defense, model: nn.Module) -> dict[str, Any]:
    """Client-side FLOPs and parameters of ``encode`` (inference path) against the server's; moves
    ``defense`` and ``model`` to the CPU.

    The client counts ``encode`` only; the server counts ``decode`` (SVD's first layer W there) and the
    task model, run on one message of the shape the client sends. Parameters follow the defense's own
    split (:meth:`~veil.defenses.base.Defense.client_parameter_count` / ``server_parameter_count``).
    """
    was = defense.training
    # counted on the CPU (the probe records are made there); a count does not depend on the device
    defense.cpu()
    model.cpu()
    defense.eval()
    client = count_flops(defense.probe, defense.input_shape)
    with torch.no_grad():
        message_shape = tuple(defense.probe(torch.rand(1, *defense.input_shape)).shape[1:])
    server = count_flops(lambda m: model(defense.decode(m)), message_shape)
    defense.train(was)
    return {
        "client_flops": client,
        "server_flops": server,
        "client_flops_share": client / server if server else None,
        "client_params": defense.client_parameter_count(),
        "server_params": count_parameters(model) + defense.server_parameter_count(),
    }


def config_matches(config: Any, saved: Any) -> bool:
    """Whether ``saved`` (a config read back from a run folder) is ``config``, a config dataclass with
    ``from_dict`` (TrainConfig, IncrementalConfig, FederatedConfig). Fields added to the class since the
    folder was written take their defaults; anything unreadable does not match."""
    try:
        return type(config).from_dict(saved) == config
    except (TypeError, ValueError):
        return False


def open_run_folder(
    out: Path,
    config: Any,
    result: str,
    *,
    what: str = "run",
    log: Callable[[str], None],
) -> dict[str, Any] | None:
    """Prepare run folder ``out`` for ``config`` (a config dataclass); shared by every resumable command.

    A folder holding a different config is refused (:func:`config_matches`). If ``out/result`` exists the
    run is finished and its result is returned; otherwise ``config.json`` is written and ``None`` returned
    (the caller trains, resuming from whatever state it keeps there).
    """
    check_output_folder(out)
    cfg_path = out / "config.json"
    if cfg_path.exists():
        if not config_matches(config, read_json(cfg_path)):
            raise ValueError(f"{out} holds a{'n' if what[0] in 'aeiou' else ''} {what} with a different config; choose another --out or delete it")
        if (out / result).exists():
            log(f"{out}: {what} already finished; results in {out / result}")
            return read_json(out / result)
    make_output_folder(out)
    write_json(cfg_path, config.to_dict())
    return None


def check_output_folder(out: Path, option: str = "--out") -> None:
    """Refuse an output folder that cannot hold a run, before anything is computed or written (nothing is
    created here): the current directory (an empty ``--out``), a name over 255 bytes, an existing file, a
    path under a file, a folder (or the nearest existing parent) that cannot be written."""
    out = Path(out)
    if str(out) in ("", ".") or out.resolve() == Path.cwd().resolve():
        raise ValueError(f"{option} must name a run folder, not the current directory")
    for part in out.parts:
        if len(part.encode()) > 255:
            raise ValueError(f"{option} {out}: a name in it is longer than 255 bytes")
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option} {out}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{option} {out}: {'the folder' if parent == out else parent} is not writable")
            break


def make_output_folder(out: Path, option: str = "--out") -> None:
    """Create ``out`` (after :func:`check_output_folder` and validation); an OS refusal as one line."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{option} {out}: cannot create the folder ({err.strerror or err})") from err


def train_run(
    config: TrainConfig,
    out: str | Path,
    *,
    task: Task | None = None,
    log: Callable[[str], None] | None = None,
    device: str | torch.device = DEFAULT_DEVICE,
) -> dict[str, Any]:
    """Train ``config`` into run folder ``out``; resume from its checkpoint if one is there.

    ``device`` (:func:`~veil.training.loop.resolve_device`) is where the training and the evaluation run;
    it is no part of the config, so a run may resume on another device than it started on (the files are
    written from CPU copies and read onto the CPU first). The one used is recorded in the metrics.

    Returns the metrics (also written to ``out/metrics.json``). A finished run is not retrained, unless its
    weights (:data:`WEIGHT_FILES`) are gone: then it is trained again from the start.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(out)
    device = resolve_device(device)  # CUDA asked for and absent: said before anything is built or written
    check_output_folder(out)
    # everything the config names (task, defense, options, model) is built, and so validated, before
    # the first file is written: a bad command leaves no config.json behind to block the corrected one
    task, defense, model = build(config, task)
    data = fingerprint(config.task)
    fresh, created = not (out / "config.json").exists(), not out.exists()
    done = out / "metrics.json"
    if done.is_file() and (out / "config.json").is_file() and config_matches(config, read_json(out / "config.json")):
        previous = read_json(done)
        check_data_unchanged(config.task, data, previous.get("data_sha256"), out)  # before "already finished"
        missing = [name for name in WEIGHT_FILES if not (out / name).is_file()]
        if missing:  # results kept without their weights (weights are not committed, say): train it again
            log(f"{out}: finished run without its weights ({', '.join(missing)}); training it again (it had primary "
                f"accuracy {previous.get('primary_acc')}; an evaluation made from the earlier weights describes those)")
            done.unlink()
    finished = open_run_folder(out, config, "metrics.json", log=log)
    if finished is not None:
        return finished

    start, opt_state, history = (0, 0), None, []
    ckpt, best = out / CHECKPOINT, out / BEST
    for stale in ("progress.json", "optimizer.pt"):  # the checkpoint set of earlier versions
        if (out / stale).exists():
            raise ValueError(f"{out}: holds a checkpoint in an older format ({stale}); delete {out} and train again")
    if ckpt.exists():
        start, opt_state, history = load_checkpoint(ckpt, defense, model, config, data_sha256=data, device=device)
        log(f"{out}: resuming at stage {start[0] + 1}, epoch {start[1] + 1}")
    elif best.exists():  # a best epoch's weights without the checkpoint they belong to: from a run that never saved one
        best.unlink()
    best_state = load_weights(best) if (config.patience is not None and best.exists()) else None

    def checkpoint(si: int, next_epoch: int, opt: torch.optim.Optimizer, rec: dict) -> None:
        check_finite_weights(defense, model)  # a diverged epoch is never saved
        history.append(rec)
        if rec.get("best"):  # before the checkpoint that names this epoch the best, so a resume finds its weights
            save_weights(best, _state(defense, model))
        save_checkpoint(ckpt, defense, model, opt, {"stage": si, "epoch": next_epoch, "history": history, "config": config.to_dict(), "data_sha256": data})

    t0 = time.time()
    try:
        fit(defense, model, task, config, start=start, optimizer_state=opt_state, on_epoch_end=checkpoint, log=log, device=device,
            past=list(history), best_state=best_state)
        if config.patience is not None and best.exists():  # also where a resume found the last stage already stopped
            _load_state(best, defense, model)
        check_finite_weights(defense, model)
    except BaseException:
        if fresh and not ckpt.exists():  # failed before its first checkpoint: nothing to resume, leave nothing
            (out / "config.json").unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()
        raise
    metrics = evaluate_primary(defense, model, task, device=device)
    metrics.update(client_cost(defense, model))
    metrics.update({"defense": defense.name, "knob": defense.knob, "knob_value": defense.knob_value(), "device": str(device), "train_seconds": round(time.time() - t0, 2), "history": history})
    metrics.update({"uses": defense.uses, "epochs_run": len(history), **_best_epoch(defense, history, config)})
    # what the weights were trained on, checked by load_run (export, evaluate): config.json edited (its
    # seed picks the split) or the data file replaced afterwards is refused, not silently used
    metrics.update({"config": config.to_dict(), "data_sha256": data})
    save_obfuscator(out / "obfuscator.safetensors", defense)
    save_weights(out / "model.safetensors", model.state_dict())
    write_json(out / "metrics.json", metrics)
    ckpt.unlink(missing_ok=True)
    best.unlink(missing_ok=True)
    return metrics


def _best_epoch(defense: Defense, history: list[dict], config: TrainConfig) -> dict[str, Any]:
    """With early stopping: which epoch of the last stage was kept, and whether training stopped early."""
    if config.patience is None:
        return {}
    last = [r for r in history if r.get("stage") == defense.stages()[-1].name and "val_acc_inference" in r]
    if not last:
        return {}
    best = max(range(len(last)), key=lambda i: (last[i]["val_acc_inference"], -i))
    return {"best_epoch": best + 1, "best_val_acc": last[best]["val_acc_inference"], "stopped_early": bool(last[-1].get("stopped"))}


def check_finite_weights(defense: Defense, model: nn.Module) -> None:
    """``FloatingPointError`` if training left NaN or infinite weights (a step can break them after the
    last finite loss); such weights are never saved, reported or exported."""
    bad = [k for k, v in _state(defense, model).items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(f"training diverged: the weights hold NaN or infinite values ({', '.join(bad[:3])}); lower --lr or the knob")


#: What a finished run keeps for reloading (:func:`load_run`): without them the run is trained again.
WEIGHT_FILES = ("obfuscator.safetensors", "model.safetensors")
#: The one checkpoint file of a run folder: weights, optimizer state, progress and random state together,
#: written atomically, so a kill at any moment leaves either the previous epoch's set or the new one.
CHECKPOINT = "checkpoint.safetensors"
#: With early stopping: the best epoch's weights (defense and model), kept beside the checkpoint until the run ends.
BEST = "best.safetensors"


def save_checkpoint(path: Path, defense: Defense, model: nn.Module, opt: torch.optim.Optimizer, progress: dict[str, Any]) -> None:
    """Write defense and model weights, the optimizer state, ``progress`` (stage, next epoch, history) and
    PyTorch's random state (the CPU's, and the CUDA device's where the model is on one) into one
    safetensors file, atomically. Tensors are written from CPU copies, so the file is the same whatever
    device trained."""
    tensors = _state(defense, model)
    state = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    tensors["rng"] = torch.get_rng_state()
    device = module_device(model)
    if device.type == "cuda":  # the defenses draw their noise from the generator of the device they run on
        tensors["rng_cuda"] = torch.cuda.get_rng_state(device)
    meta = {"progress": json.dumps(progress), "param_groups": json.dumps(state["param_groups"]), "optim_scalars": json.dumps(scalars)}
    save_weights(path, tensors, metadata=meta)


def load_checkpoint(
    path: Path,
    defense: Defense,
    model: nn.Module,
    config: TrainConfig,
    *,
    data_sha256: str | None = None,
    device: torch.device | None = None,
) -> tuple[tuple[int, int], dict, list]:
    """Restore weights and random state from :func:`save_checkpoint`'s file; return ((stage, epoch),
    optimizer state, history). The progress it records is checked against ``config``'s stages and epochs,
    and the config and data fingerprint it records (where it records them) against ``config`` and
    ``data_sha256``: a checkpoint that does not fit this run is refused, never silently trained on.

    Tensors are read onto the CPU (safetensors' ``map_location``) and copied into ``defense`` and
    ``model`` wherever they are; the optimizer state follows its parameters when the optimizer loads it.
    ``device``: where training goes on; a CUDA device takes the CUDA random state back where the
    checkpoint holds one (a run moved between the CPU and CUDA draws other noise from there on)."""
    from safetensors import safe_open

    from veil.training.loop import stage_epochs

    tensors = load_weights(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        progress, groups, scalars = (json.loads(meta[k]) for k in ("progress", "param_groups", "optim_scalars"))
        stage, epoch, history = int(progress["stage"]), int(progress["epoch"]), list(progress["history"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a veil checkpoint, or its progress record is damaged ({err}); delete it to start over") from err
    if "config" in progress and not config_matches(config, progress["config"]):
        raise ValueError(f"{path}: was written for another config than {path.parent / 'config.json'} holds now; delete it to start over")
    if progress.get("data_sha256") != data_sha256 and "data_sha256" in progress:
        raise ValueError(f"{config.task[4:]}: the data changed since {path} was written; delete {path.parent} to train on the new data")
    counts = stage_epochs(defense.stages(), config.epochs)
    expected = sum(counts[:stage]) + epoch
    # a stage ended early (patience) is recorded as complete with fewer epochs of history
    stopped = bool(history) and isinstance(history[-1], dict) and history[-1].get("stopped") is True and epoch == counts[stage]
    if not (0 <= stage < len(counts) and 1 <= epoch <= counts[stage]) or not (len(history) == expected or (stopped and len(history) < expected)):
        raise ValueError(
            f"{path}: records stage {stage + 1}, epoch {epoch} with {len(history)} epochs of history, which this run "
            f"({len(counts)} stage(s) of {counts} epochs) cannot have reached; delete it to start over"
        )
    _load_state(path, defense, model, tensors)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, entry in scalars.items():
        state.setdefault(int(pid), {}).update(entry)
    if "rng" not in tensors:
        raise ValueError(f"{path}: checkpoint has no random state; delete it to start over")
    torch.set_rng_state(tensors["rng"])
    if device is not None and device.type == "cuda" and "rng_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng_cuda"], device)
    # an epoch that ended a stage restarts the next stage from its beginning (a fresh optimizer)
    if epoch == counts[stage]:
        return (stage + 1, 0), {}, history
    return (stage, epoch), {"state": state, "param_groups": groups}, history


def evaluate_primary(defense: Defense, model: nn.Module, task: Task, *, device: str | torch.device = DEFAULT_DEVICE) -> dict[str, float]:
    """Test-split accuracies of the server model on the primary label, computed on ``device`` (where
    ``defense`` and ``model`` are moved).

    Returns:
        ``primary_acc``: on inference messages (``encode(x)``, no label on the client), the accuracy a
        user gets. ``label_readback_training_exposure``: on training-exposure messages
        (``encode(x, y)``). Where a method hard-selects by the known label (SCNL), the server reads that
        label back from the template: this checks that it learnt the training-exposure messages and is
        not an accuracy of anything a user gets (for methods that ignore the label it equals
        ``primary_acc`` up to noise).
    """
    device = resolve_device(device)
    defense.to(device)
    model.to(device)
    return {
        "primary_acc": accuracy(defense, model, task.test, use_labels=False),
        "label_readback_training_exposure": accuracy(defense, model, task.test, use_labels=True),
    }


def check_data_unchanged(task: str, now: str | None, recorded: str | None, run: Path) -> None:
    """Refuse a run whose ``npz:``/``idx:`` data no longer has the fingerprint recorded at training."""
    if recorded is not None and now != recorded:
        raise ValueError(f"{task[4:]}: the data changed since {run} was trained (sha256 {recorded[:12]} then, {str(now)[:12]} now); train a new run on it")


def load_run(run: str | Path, *, task: Task | None = None) -> tuple[TrainConfig, Task, Defense, nn.Module]:
    """Reload a finished run: its config, task, trained defense and trained server model."""
    run = Path(run)
    if not (run / "config.json").exists():
        raise FileNotFoundError(f"{run}: not a run folder (no config.json)")
    for marker, what in (("federated.json", "federated"), ("rounds.json", "federated"), ("incremental.json", "incremental"), ("state.json", "incremental")):
        if (run / marker).exists() and not (run / "metrics.json").exists():
            raise ValueError(f"{run}: a {what} run folder ({marker}), not a 'veil train' run; export and evaluate read runs of 'veil train'")
    if not (run / "metrics.json").exists():
        raise FileNotFoundError(f"{run}: run has not finished (no metrics.json); rerun 'veil train' with the same --out to resume")
    raw, metrics = read_json(run / "config.json"), read_json(run / "metrics.json")
    if not isinstance(metrics, dict):
        raise ValueError(f"{run / 'metrics.json'}: not a run's metrics (expected a JSON object)")
    recorded = metrics.get("config")
    if recorded is not None and recorded != raw:
        changed = sorted(k for k in set(recorded) | set(raw) if recorded.get(k) != raw.get(k)) if isinstance(raw, dict) else ["the whole file"]
        raise ValueError(f"{run / 'config.json'}: changed since the run was trained ({', '.join(changed)}); the weights belong to the config recorded in metrics.json")
    try:
        config = TrainConfig.from_dict(raw)
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{run / 'config.json'}: not a valid run config ({err})") from err
    if task is None:
        check_data_unchanged(config.task, fingerprint(config.task), metrics.get("data_sha256"), run)
        task = load_task(config.task, seed=config.seed, train_size=config.train_size)
    defense = load_obfuscator(run / "obfuscator.safetensors")
    if tuple(defense.input_shape) != tuple(task.input_shape) or defense.num_classes != task.num_primary:
        raise ValueError(f"{run / 'obfuscator.safetensors'}: obfuscator for records {tuple(defense.input_shape)} with {defense.num_classes} classes, the run's task has {tuple(task.input_shape)} and {task.num_primary}")
    model = create_model(config.model, defense.output_shape(), task.num_primary)
    try:
        model.load_state_dict(load_weights(run / "model.safetensors"))
    except RuntimeError as err:
        raise ValueError(f"{run / 'model.safetensors'}: does not match model {config.model!r} ({err})") from err
    defense.eval()
    model.eval()
    return config, task, defense, model


@torch.no_grad()
def obfuscate(
    defense: Defense,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    batch_size: int = 512,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """What the untrusted side receives for records ``x``: the deployment path of the Python API.

    Noise comes from the operating system's entropy, fresh for every call (:func:`veil.noise.private_noise`):
    neither the run's seed nor anything else the receiver knows can regenerate it, and the caller's own
    random state is left as it was.

    Args:
        defense: The client's obfuscator (put in eval mode).
        x: Records (N, *defense.input_shape).
        y: Primary labels (N,) for the training exposure (hard selection); None: inference exposure.
        mask: Region masks (N, 1, H, W) the data owner knows, for region-selection defenses at the
            training exposure (ignored by the others; never part of the message).
        batch_size: Records encoded at a time.
        generator: Research opt-in: draw the noise from this seeded generator instead, so that it is
            reproducible (by anyone holding the seed). Measurements may use it; deployment must not.

    Returns:
        Messages (N, *defense.output_shape()).
    """
    if y is not None and len(y) != len(x):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    defense.eval()
    with private_noise(generator):
        parts = [
            defense.encode_batch(x[i : i + batch_size], None if y is None else y[i : i + batch_size], None if mask is None else mask[i : i + batch_size])
            for i in range(0, len(x), batch_size)
        ]
    return torch.cat(parts) if parts else torch.empty(0, *defense.output_shape())


def check_export_target(target: Path, run: Path, *, force: bool) -> None:
    """Refuse an export target that is a folder, lies under a file, is one of a run folder's own files
    (``config.json``, weights, results: replacing one destroys the run), or exists (unless ``force``)."""
    if len(target.name.encode()) > 255:
        raise ValueError(f"--out {target}: the file name is longer than 255 bytes")
    if target.is_dir():
        raise ValueError(f"--out {target} is a folder; name the .npz file to write")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {target}: {parent} is a file, not a folder")
            break
    own = target.parent.resolve() == run.resolve() or (target.parent / "config.json").is_file()
    if own and target.exists():
        raise ValueError(f"--out {target} is a file of the run folder {target.parent}; export elsewhere")
    if target.exists() and not force:
        raise ValueError(f"--out {target} exists; pass --force to replace it")
    if target.exists() and not target.stat().st_mode & 0o222:
        raise ValueError(f"--out {target} is read-only; make it writable to replace it")


def labels_path(out: str | Path) -> Path:
    """Where ``export_run(..., with_labels=True)`` writes the labels: ``OUT.labels.npz`` beside ``OUT``."""
    out = Path(out)
    stem = out.name[: -len(".npz")] if out.name.endswith(".npz") else out.name
    return out.with_name(stem + ".labels.npz")


def export_run(
    run: str | Path,
    out: str | Path,
    *,
    split: str = "test",
    mode: str = "inference",
    with_labels: bool = False,
    noise_seed: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write the obfuscated records of ``split`` to ``out`` (.npz): exactly what the untrusted side receives.

    ``out`` holds the message only: ``x`` float32 (N, D), one row per record in dataset order; ``y``
    (N,) the primary labels, at the training exposure only (the engine trains on them); ``shape`` the
    per-record message shape; ``metadata`` a JSON string (mode, split, records, message shape, noise
    source). Never the secondary label ``z`` nor the record.

    Args:
        run: A finished run folder.
        out: The message file.
        split: ``train``, ``val`` or ``test``.
        mode: ``inference`` (no label, soft/adaptive selection) or ``training`` (hard selection by y).
        with_labels: Also write ``y``, ``z`` and ``index`` to a separate file (:func:`labels_path`),
            for evaluation on the trusted side; it must not travel with the message.
        noise_seed: Research opt-in: reproducible noise from this seed (recorded in the metadata).
            None (the default): OS entropy, fresh for every export.
        force: Replace an existing ``out`` (a run folder's own files are never replaced).

    Returns:
        A summary: records, message_shape, mode, split, noise, out (and labels).
    """
    if mode not in EXPOSURES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(EXPOSURES)}")
    if noise_seed is not None and (isinstance(noise_seed, bool) or not isinstance(noise_seed, int) or not 0 <= noise_seed < 2**63):
        raise ValueError(f"noise_seed must be a non-negative integer or None, got {noise_seed!r}")
    targets = [Path(out), *([labels_path(out)] if with_labels else [])]
    for target in targets:
        check_export_target(target, Path(run), force=force)
    _, task, defense, _ = load_run(run)
    s = task.split(split)
    generator = None if noise_seed is None else torch.Generator().manual_seed(noise_seed)
    training = mode == "training"
    m = obfuscate(defense, s.x, s.y if training else None, mask=defense.mask_for(training, s.mask), generator=generator)
    noise: dict[str, Any] = {"noise": OS_ENTROPY} if noise_seed is None else {"noise": REPRODUCIBLE, "noise_seed": noise_seed}
    info: dict[str, Any] = {"records": len(s), "message_shape": list(m.shape[1:]), "mode": mode, "split": split, **noise}
    message = {"x": m.reshape(len(s), -1).numpy().astype(np.float32), "shape": np.asarray(m.shape[1:], dtype=np.int64)}
    if mode == "training":
        message["y"] = s.y.numpy()
    save_npz(out, **message, metadata=np.asarray(json.dumps(info)))
    info["out"] = str(out)
    if with_labels:
        labels = labels_path(out)
        save_npz(labels, y=s.y.numpy(), z=s.z.numpy(), index=np.arange(len(s)), metadata=np.asarray(json.dumps({**info, "out": labels.name, "labels_of": Path(out).name})))
        info["labels"] = str(labels)
    return info
