"""The ``veil`` command: a thin layer over the library (every command is a few library calls)."""

from __future__ import annotations

import errno
import functools
import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup


class _OneLineErrors(TyperGroup):
    """Click's usage errors (a bad or missing option, an unknown command) and the file system's refusals
    (permissions, a full disk, a read-only mount) as one line naming the option or file, exit code 2, like
    every other error of veil, instead of a usage block or a traceback."""

    def invoke(self, ctx: click.Context):  # noqa: D102
        from veil.cli_common import fail

        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            if isinstance(err, click.exceptions.NoArgsIsHelpError):
                raise
            where = err.ctx.command_path if err.ctx is not None else ctx.command_path
            fail(ValueError(f"{where}: {err.format_message()} (see '{where} --help')"))
        except OSError as err:
            if err.errno == errno.EPIPE:  # click's own handling of a closed pipe
                raise
            fail(err)


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="veil: obfuscated training and inference, with peer defenses and honest privacy evaluation.",
    pretty_exceptions_enable=False,
    cls=_OneLineErrors,
)
from veil.cli_common import config_option, console, fail as _fail, parse_options as _parse_options  # noqa: E402
from veil.training.loop import DEFAULT_DEVICE, TrainConfig  # noqa: E402  (the options' defaults are its fields')

#: What ``veil train --device`` takes (``cuda:N`` is the library's; under torchrun each process takes its own GPU).
TRAIN_DEVICES = ("cpu", "cuda", "auto")

TASK_HELP = "Task: digits-lt5 (built in), mnist-lt5, fashion-lt5, npz:PATH (arrays x, y, z) or idx:DIR; detection: mnist-scenes, digits-scenes, coco:IMAGES_DIR,ANNOTATIONS.json (with --model detector)."
DEFENSE_HELP = "Obfuscation method; 'veil list' shows them all."


@app.command("list")
def list_cmd() -> None:
    """List tasks, defenses (with their knobs) and server models."""
    from veil.data import list_tasks
    from veil.defenses import defense_class, list_defenses
    from veil.models import list_models

    table = Table(title="defenses")
    table.add_column("name", no_wrap=True)
    table.add_column("knob")
    table.add_column("more private when knob is")
    table.add_column("client learns from")
    table.add_column("what it is")
    for name in list_defenses():
        cls = defense_class(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        table.add_row(name, cls.knob or "-", ("larger" if cls.knob_direction > 0 else "smaller") if cls.knob else "-", cls.uses, doc)
    Console().print(table)
    Console().print(f"tasks: {', '.join(list_tasks())}, npz:PATH, idx:DIR")
    from veil.detection.tasks import DETECTION_TASKS

    Console().print(f"detection tasks (--model detector): {', '.join(DETECTION_TASKS)}, coco:IMAGES_DIR,ANNOTATIONS.json")
    Console().print(f"server models: {', '.join(list_models())}")


@app.command()
def train(
    task: str = config_option(TrainConfig, "task", "--task", "-t", help=TASK_HELP),
    defense: str = config_option(TrainConfig, "defense", "--defense", "-d", help=DEFENSE_HELP),
    lam: Optional[float] = config_option(TrainConfig, "knob", "--lambda", "-l", help="Value of the defense's privacy knob (its default if omitted)."),
    epochs: int = config_option(TrainConfig, "epochs", "--epochs", "-e", min=1, help="Training epochs in all (shared among the defense's stages)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: config.json, metrics.json, weights (safetensors). Rerun to resume."),
    model: str = config_option(TrainConfig, "model", help="Server task model: cnn, resnet (ResNet-20-like, batch norm) or mlp; detector for detection tasks."),
    batch_size: int = config_option(TrainConfig, "batch_size", min=1, help="Records per batch."),
    lr: float = config_option(TrainConfig, "lr", help="Adam learning rate."),
    lr_schedule: str = config_option(TrainConfig, "lr_schedule", help="constant, or cosine (decay to 0 over each training stage)."),
    client_budget: Optional[float] = config_option(TrainConfig, "client_budget", help="Client FLOPs allowed, as a fraction of the server model's (e.g. 0.01): sizes the defense's client network; refused if it cannot fit."),
    patience: Optional[int] = config_option(TrainConfig, "patience", help="Early stopping: stop the last training stage after this many epochs without a better validation accuracy and keep the best epoch's weights (--epochs is then the cap). Off by default."),
    seed: int = config_option(TrainConfig, "seed", help="Seed for data order, initialisation and training noise."),
    train_size: Optional[int] = config_option(TrainConfig, "train_size", min=1, help="Use only this many training records."),
    option: Optional[List[str]] = typer.Option(None, "--option", help="Extra defense option KEY=VALUE (JSON value), repeatable."),
    device: str = typer.Option(DEFAULT_DEVICE, "--device", help="Where to train: cpu, cuda or auto (cuda when available). Not part of the run's config: a run may resume on another device. Under torchrun, cuda puts one GPU under each process (nccl)."),
) -> None:
    """Train a defense together with the server task model; write the run folder."""
    from veil.training import train_run
    from veil.training.loop import resolve_device

    try:
        if device not in TRAIN_DEVICES:
            raise ValueError(f"--device must be one of {', '.join(TRAIN_DEVICES)}, got {device!r}")
        where = resolve_device(device)  # CUDA asked for and absent: one line, before anything is built
    except ValueError as err:
        _fail(err)
    if _is_detection(task, model):  # mnist-scenes, digits-scenes, coco:...; --model detector
        if device == "cuda":  # auto falls back to the CPU here
            _fail(ValueError("--device cuda: detection tasks train on the CPU only"))
        if patience is not None:
            _fail(ValueError("--patience: early stopping applies to classification tasks; detection trains every epoch"))
        from veil.detection.commands import train_cmd as train_detection

        try:
            _print_metrics(train_detection(task=task, defense=defense, knob=lam, options=_parse_options(option), model=model, epochs=epochs, batch_size=batch_size,
                                           lr=lr, seed=seed, train_size=train_size, client_budget=client_budget, out=out))
        except (ValueError, FileNotFoundError, FloatingPointError) as err:
            _fail(err)
        return
    try:
        config = TrainConfig(task=task, defense=defense, knob=lam, defense_options=_parse_options(option), model=model, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, train_size=train_size, lr_schedule=lr_schedule, client_budget=client_budget, patience=patience)
        from veil.training.distributed import launched, train_run_distributed

        # under torchrun (WORLD_SIZE > 1) every process trains its share; rank 0 writes and prints
        distributed = launched()
        metrics = train_run_distributed(config, out, device=where) if distributed else train_run(config, out, device=where)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        _fail(err)
    if metrics is not None:
        _print_metrics(metrics)
    if distributed:
        _exit_after_distributed_run()


def _exit_after_distributed_run() -> None:
    """End a torchrun worker whose run has finished (rank 0 wrote every file before the final barrier;
    the process group is destroyed) without the interpreter's finalisation: there, gloo's C++ threads
    sometimes still hold tensors whose release aborts the process ("terminate called without an active
    exception", measured on about one resumed two-process run in six here), which would fail a finished job."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _is_detection(task: str, model: str) -> bool:
    from veil.detection.tasks import is_detection_task

    return is_detection_task(task) or model == "detector"


def _print_metrics(metrics: dict) -> None:
    shown = {k: v for k, v in metrics.items() if k != "history"}
    Console().print_json(json.dumps(shown))


@app.command()
def export(
    run: Path = typer.Argument(..., help="A finished run folder (from 'veil train')."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .npz holding only the message: x (float32, one row per record, dataset order), shape, metadata; and y with --mode training. Never z."),
    split: str = typer.Option("test", "--split", help="train, val or test."),
    mode: str = typer.Option("inference", "--mode", help="inference: obfuscated without the label (soft/adaptive selection); training: with the known label (hard selection), and y goes with the message."),
    with_labels: bool = typer.Option(False, "--with-labels", help="Also write y, z and index to a separate OUT.labels.npz for evaluation on your side; do not send it."),
    reproducible_noise: Optional[int] = typer.Option(None, "--reproducible-noise", min=0, metavar="SEED", help="Research only: draw the noise from SEED so the export can be repeated exactly (recorded in the metadata). Anyone holding SEED can remove the noise. Default: OS entropy, fresh every export."),
    force: bool = typer.Option(False, "--force", help="Replace OUT (and OUT.labels.npz) if it exists. A run folder's own files are never replaced."),
) -> None:
    """Write records obfuscated exactly as the untrusted side receives them (the message, nothing else).

    The noise comes from the operating system's entropy, fresh for every export: nothing in the run
    folder (its seed included) can regenerate it. Labels for your own evaluation go to a separate file
    (--with-labels).
    """
    from veil.detection.train import is_detection_run
    from veil.training import export_run

    if is_detection_run(run):
        from veil.detection.commands import export_cmd as export_detection

        try:
            Console().print_json(json.dumps(export_detection(run, out, split=split, mode=mode, force=force)))
        except (ValueError, FileNotFoundError) as err:
            _fail(err)
        return
    try:
        info = export_run(run, out, split=split, mode=mode, with_labels=with_labels, noise_seed=reproducible_noise, force=force)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    Console().print_json(json.dumps(info))


DEMO_DEFENSES = ("none", "local", "scnl")


@app.command()
def demo(
    epochs: int = typer.Option(8, "--epochs", min=1, help="Training epochs per defense."),
    attack_epochs: int = typer.Option(15, "--attack-epochs", min=1, help="Most epochs per retrained attacker."),
    out: Path = typer.Option(Path("veil-demo"), "--out", help="Folder for the three runs, demo.json and demo.png."),
) -> None:
    """On digits-lt5: no defense, the on-device baseline and SCNL; primary accuracy beside a retrained attack (~1 min)."""
    from veil.evaluation.demo import run_demo

    try:
        result = run_demo(out, epochs=epochs, attack_epochs=attack_epochs, defenses=DEMO_DEFENSES)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    table = Table(title=f"veil demo: {result['task']} (primary y: digit < 5; secret z: the digit), test split")
    for col in ("defense", "primary acc", "attack acc on z (retrained)", "primary-only floor", "client FLOPs / server"):
        table.add_column(col)
    for name, row in result["rows"].items():
        share = row["client_flops_share"]
        table.add_row(name, f"{row['primary_acc']:.3f}", f"{row['attack_acc']:.3f}", f"{result['primary_only_floor']:.3f}", "-" if share is None else f"{share:.1%}")
    Console().print(table)
    Console().print(
        "attack: the best of several attackers trained on what leaves the client, scored on unseen test records; "
        "no defense that keeps the primary task can push it below the floor."
    )
    Console().print(f"written: {out}/demo.json, {out}/demo.png (records next to what leaves the client), runs in {out}/<defense>/")


# -- commands from other parts of veil are registered below (one line each) --
from veil.federated.commands import federated_cmd  # noqa: E402
from veil.workflows.commands import incremental_cmd  # noqa: E402

app.command("incremental")(incremental_cmd)
app.command("federated")(federated_cmd)
from veil.evaluation.commands import evaluate_cmd as _evaluate_classification, report_cmd, sweep_cmd  # noqa: E402


@functools.wraps(_evaluate_classification)
def evaluate_cmd(run: Path, **options: Any) -> None:
    """``veil evaluate``: a detection run goes to :mod:`veil.detection` (mAP + the per-object attack), as
    ``train`` and ``export`` dispatch above; any other run to :mod:`veil.evaluation`, which knows nothing
    of detection (no import from evaluation up to detection)."""
    from veil.detection.train import is_detection_run

    if not is_detection_run(run):
        return _evaluate_classification(run, **options)
    from veil.detection.commands import evaluate_cmd as evaluate_detection

    if options.get("strength", "standard") != "standard":
        _fail(ValueError(f"--strength {options['strength']}: the strong preset applies to classification runs; {run} is a detection run"))
    keep = ("attack_epochs", "patience", "attack_train_size", "attack_width", "attackers", "views", "averaging_k", "exposures", "recon_epochs", "eval_seed")
    try:
        Console().print_json(json.dumps(evaluate_detection(run, **{k: options[k] for k in keep})))
    except (ValueError, FileNotFoundError) as err:
        _fail(err)


app.command("evaluate")(evaluate_cmd)
app.command("sweep")(sweep_cmd)
app.command("report")(report_cmd)
from veil.serving.commands import export_client_cmd, query_cmd, serve_cmd  # noqa: E402

app.command("serve")(serve_cmd)
app.command("query")(query_cmd)
app.command("export-client")(export_client_cmd)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
