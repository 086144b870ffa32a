"""Training a detection defense with the server detector, and the on-device baseline (``local``).

``train_detection(config, out)`` writes a run folder like ``veil train`` does: ``config.json`` (with
``"kind": "detection"``), ``metrics.json`` (mAP at the inference exposure, and at the training exposure
where the defense takes regions), ``obfuscator.safetensors`` (the client) and ``model.safetensors`` (the
server detector; for ``local`` the client's own detector). Every file is written atomically.

The epochs run in the loop every workflow shares (:func:`veil.training.epochs.run_epochs`); detection
brings its batches (scenes with their boxes) and its loss. While it trains the folder also holds
``checkpoint.safetensors`` (:data:`veil.training.run.CHECKPOINT`), rewritten after every epoch: weights,
Adam state, the data order's generator, torch's random state, the progress and the config. A run that is
interrupted resumes after its last finished epoch (a reduced run takes tens of minutes on a CPU, too long
to lose); the finished run removes it. The file is the classification one
(:func:`~veil.training.run.save_checkpoint`), with the detection-only state (the data order's generator)
in its progress record.

The detection defense trains with the boxes the data owner holds (per-object region hard selection for
defenses with ``uses_mask``), the server detector on the messages; the loss is CenterNet's plus the
defense's ``penalty()``. ``local`` trains a tiny detector on the clean scenes and sends its detections.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from veil.defenses.saving import load_obfuscator, save_obfuscator
from veil.detection.detector import create_detector, decode, detection_loss, encode_targets
from veil.detection.metrics import mean_average_precision
from veil.detection.scenes import Scenes, region_map
from veil.detection.tasks import DetectionTask, is_detection_task, load_detection_task
from veil.io import load_weights, read_json, save_weights, write_json
from veil.noise import seed_everything

LOCAL = "local"


@dataclasses.dataclass(frozen=True)
class DetectionConfig:
    """One detection run (saved as ``config.json``).

    Attributes:
        task: ``mnist-scenes``, ``digits-scenes`` or ``coco:IMAGES_DIR,ANNOTATIONS.json``.
        defense: A registered defense (``scnl-detect`` is the detection one; ``none`` the reference) or
            ``local`` (the on-device detector; nothing but its detections leaves the client).
        knob: Value of the defense's knob (its default if ``None``).
        defense_options: Other defense options.
        model: Server detector (``detector``).
        width: Channels of the detector's first block.
        epochs, batch_size, lr, seed: Training settings (Adam, cosine decay to 0).
        train_size: Training scenes used (``None``: all).
        client_budget: Client FLOPs allowed as a fraction of the server detector's; sizes the defense's
            client network (``local``: the on-device detector's width).
        scale: Shrinks every split of a generated task (tests).
    """

    task: str = "mnist-scenes"
    defense: str = "scnl-detect"
    knob: float | None = None
    defense_options: dict = dataclasses.field(default_factory=dict)
    model: str = "detector"
    width: int = 16
    epochs: int = 8
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    train_size: int | None = None
    client_budget: float | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not is_detection_task(self.task):
            raise ValueError(f"{self.task!r} is not a detection task (mnist-scenes, digits-scenes, coco:IMAGES_DIR,ANNOTATIONS.json)")
        if self.model != "detector":
            raise ValueError(f"unknown detection model {self.model!r}; valid: detector")
        for key in ("width", "epochs", "batch_size"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 1):
                raise ValueError(f"{key} must be an integer >= 1, got {getattr(self, key)!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.knob is not None and not math.isfinite(self.knob):
            raise ValueError(f"knob must be a finite number, got {self.knob!r}")
        if self.client_budget is not None and not (0 < self.client_budget <= 1):
            raise ValueError(f"client budget must be a fraction in (0, 1], got {self.client_budget!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "detection", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DetectionConfig":
        return cls(**{k: v for k, v in d.items() if k != "kind"})


def is_detection_run(run: str | Path) -> bool:
    """Whether ``run`` is a detection run folder (its config says ``"kind": "detection"``)."""
    path = Path(run) / "config.json"
    try:
        return path.is_file() and read_json(path).get("kind") == "detection"
    except (ValueError, AttributeError):
        return False


# ----------------------------------------------------------------------------------------- building
def flops_share(client: Callable[[torch.Tensor], Any], server_flops: int, input_shape: tuple[int, ...]) -> float:
    from veil.models import count_flops

    return count_flops(client, input_shape) / max(1, server_flops)


def server_flops(config: DetectionConfig, message_shape: tuple[int, ...], num_classes: int) -> int:
    from veil.models import count_flops

    model = create_detector(config.model, message_shape, num_classes, config.width).eval()
    return count_flops(lambda m: model(m)["heat"], message_shape)


def build(config: DetectionConfig, task: DetectionTask) -> tuple[nn.Module | None, nn.Module, dict[str, Any]]:
    """(defense or None for ``local``, the detector that is trained, the client cost record)."""
    from veil.defenses import create_defense, defense_class

    shape, k = task.input_shape, task.num_classes
    if config.defense == LOCAL:
        width = 8
        full = server_flops(config, shape, k)
        if config.client_budget is not None:
            share_at = lambda w: flops_share(lambda x: create_detector("tiny", shape, k, w).eval()(x)["heat"], full, shape)  # noqa: E731
            if share_at(1) > config.client_budget:
                raise ValueError(f"the on-device detector cannot fit a client budget of {config.client_budget:.2%}: width 1 takes {share_at(1):.2%}")
            width = 1
            while width < 256 and share_at(width + 1) <= config.client_budget:
                width += 1
        model = create_detector("tiny", shape, k, width)
        share = flops_share(lambda x: create_detector("tiny", shape, k, width).eval()(x)["heat"], full, shape)
        return None, model, {"client_flops_share": share, "client_width": width, "server_flops": full}
    options = dict(config.defense_options)
    cls = defense_class(config.defense)
    if config.knob is not None:
        if not cls.knob:
            raise ValueError(f"defense {config.defense!r} has no knob")
        options[cls.knob] = config.knob
    if config.client_budget is not None and cls.budget_option:
        options = _fit_budget(config, task, options)
    defense = create_defense(config.defense, input_shape=shape, num_classes=k, **options)
    model = create_detector(config.model, defense.output_shape(), k, config.width)
    full = server_flops(config, defense.output_shape(), k)
    defense.eval()
    share = flops_share(lambda x: defense.encode(x), full, shape)
    defense.train()
    return defense, model, {"client_flops_share": share, "server_flops": full, "defense_options": defense.config()}


def _fit_budget(config: DetectionConfig, task: DetectionTask, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the defense's size option at the largest value within the client budget."""
    from veil.defenses import create_defense, defense_class

    key = defense_class(config.defense).budget_option
    shape, k = task.input_shape, task.num_classes

    def share_at(size: int) -> float:
        d = create_defense(config.defense, input_shape=shape, num_classes=k, **{**options, key: size}).eval()
        return flops_share(lambda x: d.encode(x), server_flops(config, d.output_shape(), k), shape)

    if share_at(1) > config.client_budget:
        raise ValueError(f"defense {config.defense!r} cannot fit a client budget of {config.client_budget:.2%}: {key}=1 takes {share_at(1):.2%}")
    size = 1
    while size < 256 and share_at(size + 1) <= config.client_budget:
        size += 1
    return {**options, key: size}


# ----------------------------------------------------------------------------------------- messages
def messages(defense: nn.Module | None, scenes: Scenes, *, exposure: str = "inference", batch_size: int = 256) -> torch.Tensor:
    """What leaves the client for every scene (eval mode): ``encode(x)`` at inference, ``encode(x, mask=
    regions)`` at the training exposure (region hard selection). ``None`` (no defense): the scenes."""
    if defense is None:
        return scenes.images
    was = defense.training
    defense.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(scenes), batch_size):
            x = scenes.images[i : i + batch_size]
            if exposure == "training" and getattr(defense, "uses_mask", False):
                out.append(defense.encode_batch(x, None, region_map(scenes, i, i + len(x))))
            else:
                out.append(defense.encode(x))
    defense.train(was)
    return torch.cat(out)


@torch.no_grad()
def predict(defense: nn.Module | None, model: nn.Module, scenes: Scenes, *, exposure: str = "inference", batch_size: int = 256) -> list[dict[str, torch.Tensor]]:
    """Detections for every scene through the defense and the server detector (or the local one)."""
    model.eval()
    m = messages(defense, scenes, exposure=exposure)
    preds = []
    for i in range(0, len(m), batch_size):
        h = m[i : i + batch_size] if defense is None else defense.decode(m[i : i + batch_size])
        preds += decode(model(h))
    return preds


def evaluate_map(defense: nn.Module | None, model: nn.Module, scenes: Scenes, *, exposure: str = "inference") -> dict[str, float]:
    return mean_average_precision(predict(defense, model, scenes, exposure=exposure), scenes.targets(0, len(scenes)), scenes.num_classes)


# ----------------------------------------------------------------------------------------- training
class _NoDefense(nn.Module):
    """Stands in for the defense of a ``local`` run in the stage loop and the checkpoint code (the detector
    is the client's own): no weights and one stage, so :func:`fit`'s stages and
    :func:`~veil.training.run.save_checkpoint` and ``load_checkpoint`` apply as they are."""

    def stages(self) -> list[Any]:
        from veil.defenses import Stage

        return [Stage("joint")]


def _save_checkpoint(path: Path, defense: nn.Module | None, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                     config: DetectionConfig, stage: int, epoch: int, history: list[dict[str, Any]]) -> None:
    """The classification checkpoint plus what only detection keeps: the data order's generator (drawn
    from once per epoch, so it cannot be re-derived from the epoch)."""
    from veil.training.run import check_finite_weights, save_checkpoint

    client = defense if defense is not None else _NoDefense()
    check_finite_weights(client, model)  # a diverged epoch is never saved
    progress = {"stage": stage, "epoch": epoch, "history": history, "config": config.to_dict(),
                "gen": base64.b64encode(gen.get_state().numpy().tobytes()).decode()}
    save_checkpoint(path, client, model, opt, progress)


def _load_checkpoint(path: Path, defense: nn.Module | None, model: nn.Module, config: DetectionConfig,
                     gen: torch.Generator) -> tuple[tuple[int, int], dict[str, Any], list[dict[str, Any]]]:
    """Restore weights, torch's random state and the data order's generator from ``path``; return
    ((stage index, epoch within stage), optimizer state (empty at a stage's end), history). A checkpoint
    of another config, one further than this config's epochs, or a damaged one is a ``ValueError``
    naming the file. (A checkpoint of earlier versions also records the schedule's step, which the
    epoch now gives: it resumes as it is.)"""
    from safetensors import safe_open

    from veil.training.run import load_checkpoint

    start, opt_state, history = load_checkpoint(path, defense if defense is not None else _NoDefense(), model, config)
    try:
        with safe_open(str(path), framework="pt") as f:
            progress = json.loads((f.metadata() or {})["progress"])
        gen.set_state(torch.frombuffer(bytearray(base64.b64decode(progress["gen"], validate=True)), dtype=torch.uint8))
    except (KeyError, TypeError, ValueError, RuntimeError, binascii.Error) as err:
        raise ValueError(f"{path}: not a detection checkpoint, or its progress record is damaged ({err}); delete it to start over") from err
    return start, opt_state, history


class _SceneBatches:
    """(scenes, region maps) batches in a fixed order, re-iterable (a defense's ``setup`` reads them)."""

    def __init__(self, images: torch.Tensor, regions: torch.Tensor, order: torch.Tensor, batch_size: int) -> None:
        self.images, self.regions, self.order, self.batch_size = images, regions, order, batch_size

    def __iter__(self) -> Any:
        for i in range(0, len(self.order), self.batch_size):
            idx = self.order[i : i + self.batch_size]
            yield self.images[idx], self.regions[idx].long()


def fit(defense: nn.Module | None, model: nn.Module, task: DetectionTask, config: DetectionConfig, log: Callable[[str], None],
        *, checkpoint: Path | None = None) -> list[dict[str, Any]]:
    """Train defense and detector together (Adam, cosine to 0 over each stage's steps) in the one epoch
    loop (:func:`veil.training.epochs.run_epochs`); the defense's stages share the epochs.

    ``checkpoint``: the file written after every epoch and, where it exists, resumed from. Everything the
    next epoch draws from is restored (weights, Adam state, data order, torch's random state; the schedule
    follows from the epoch), so a defense without training noise continues exactly as if never interrupted.
    """
    from veil.defenses.base import Recipe, Stage
    from veil.training.epochs import StagePlan, run_epochs
    from veil.training.loop import make_optimizer, stage_epochs

    train = task.train
    regions = region_map(train, 0, len(train)).to(torch.uint8)
    targets = train.targets(0, len(train))
    client = defense if defense is not None else _NoDefense()
    stages = client.stages()
    counts = stage_epochs(stages, config.epochs)
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = []
    out_hw = tuple(model(torch.zeros(2, *(defense.output_shape() if defense is not None else task.input_shape)))["heat"].shape[-2:])
    start, opt_state = (0, 0), {}
    if checkpoint is not None and checkpoint.exists():  # after the probe above: its state is overwritten here
        start, opt_state, history = _load_checkpoint(checkpoint, defense, model, config, gen)
        if start[0] < len(counts):
            log(f"[{config.defense}] {checkpoint.parent}: resuming at stage {start[0] + 1}, epoch {start[1] + 1}")
        else:
            log(f"[{config.defense}] {checkpoint.parent}: all {len(history)} epochs trained; evaluating")
    recipe = Recipe(optimizer="adam", lr=config.lr, schedule="cosine")

    def batches(epoch: int) -> list[torch.Tensor]:
        # a fresh order from gen every epoch (its state is checkpointed); a batch of one scene is left out
        return [idx for idx in torch.randperm(len(train), generator=gen).split(config.batch_size) if len(idx) >= 2]

    def step(idx: torch.Tensor, stage: Stage) -> tuple[torch.Tensor, int, None]:
        x = train.images[idx]
        if defense is None:
            h = x
        else:
            mask = regions[idx].long() if (defense.uses_mask and stage.use_labels) else None
            h = defense.decode(defense.encode_batch(x, None, mask))
        out = model(h)
        tg = encode_targets([targets[j]["boxes"] for j in idx.tolist()], [targets[j]["labels"] for j in idx.tolist()], task.num_classes, out_hw)
        loss = detection_loss(out, tg)
        if defense is not None:
            loss = loss + defense.penalty()
        return loss, len(idx), None

    def epoch_end(si: int, next_epoch: int, opt: torch.optim.Optimizer, rec: dict[str, Any]) -> None:
        history.append(rec)
        if checkpoint is not None:
            _save_checkpoint(checkpoint, defense, model, opt, gen, config, si, next_epoch, history)

    for si, (stage, epochs) in enumerate(zip(stages, counts)):
        if si < start[0]:
            continue
        first = start[1] if si == start[0] else 0
        params = list(model.parameters())
        if defense is not None:
            defense.set_stage(stage.name)
            params += [p for p in defense.parameters() if p.requires_grad]
            # a region defense's setup (its selector on the region maps) at a stage's start, not again when resumed
            # mid-stage; other defenses' setup calibrates against a classifier's output, which a detector has not
            if first == 0 and defense.uses_mask:
                order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed + 1000 * si))
                defense.setup(model, _SceneBatches(train.images, regions, order, config.batch_size))
        opt = make_optimizer(params, recipe)
        if first:  # mid-stage: Adam's moments
            opt.load_state_dict(opt_state)
        model.train()
        client.train()
        plan = StagePlan(config.defense, stage.name, si, len(stages), epochs, recipe.lr, recipe.schedule, first)
        run_epochs(plan, opt, batches, functools.partial(step, stage=stage), log=log, on_epoch_end=epoch_end)
    return history


def train_detection(config: DetectionConfig, out: str | Path, *, task: DetectionTask | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train and write the run folder; a finished run with the same config is not retrained, an
    interrupted one resumes from its checkpoint, a folder holding another config is refused."""
    from veil.training.run import CHECKPOINT, check_output_folder, open_run_folder

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(out)
    check_output_folder(out)
    finished = (out / "metrics.json").is_file() and (out / "config.json").is_file()
    if not finished:  # build (and so validate) before the first file is written; a finished run needs neither
        task = task or load_detection_task(config.task, seed=config.seed, train_size=config.train_size, scale=config.scale)
        seed_everything(config.seed)
        defense, model, cost = build(config, task)
    fresh, created = not (out / "config.json").exists(), not out.exists()
    done = open_run_folder(out, config, "metrics.json", what="detection run", log=log)
    if done is not None:
        return done
    ckpt = out / CHECKPOINT
    t0 = time.time()
    try:
        history = fit(defense, model, task, config, log, checkpoint=ckpt)
    except BaseException:
        if fresh and not ckpt.exists():  # stopped before its first epoch ended: nothing to resume, leave nothing
            (out / "config.json").unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()
        raise
    seed_everything(config.seed + 1)
    metrics: dict[str, Any] = {"task": task.name, "defense": config.defense, "knob": None if defense is None else defense.knob_value(),
                               "inference": evaluate_map(defense, model, task.test)}
    if defense is not None and defense.uses_mask:
        metrics["training_exposure"] = evaluate_map(defense, model, task.test, exposure="training")
    metrics.update(cost)
    metrics.update({"train_scenes": len(task.train), "test_scenes": len(task.test), "seconds": round(time.time() - t0, 1), "history": history})
    meta = {"veil_detector": json.dumps({"model": "tiny" if defense is None else config.model, "width": cost.get("client_width", config.width)})}
    save_weights(out / "model.safetensors", model.state_dict(), metadata=meta)
    if defense is not None:
        save_obfuscator(out / "obfuscator.safetensors", defense)
    write_json(out / "metrics.json", metrics)
    ckpt.unlink(missing_ok=True)
    log(f"[{config.defense}] test mAP@0.5 {metrics['inference']['map_50']:.4f}, mAP@[.5:.95] {metrics['inference']['map']:.4f} (inference exposure)")
    return metrics


def load_detection_run(run: str | Path, *, task: DetectionTask | None = None) -> tuple[DetectionConfig, DetectionTask, nn.Module | None, nn.Module]:
    """(config, task, defense or None for ``local``, detector) of a finished run folder."""
    run = Path(run)
    if not (run / "metrics.json").is_file():
        raise FileNotFoundError(f"{run}: not a finished detection run (no metrics.json); train it first")
    config = DetectionConfig.from_dict(read_json(run / "config.json"))
    task = task or load_detection_task(config.task, seed=config.seed, train_size=config.train_size, scale=config.scale)
    defense = None if config.defense == LOCAL else load_obfuscator(run / "obfuscator.safetensors")
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("veil_detector", "{}"))
    shape = task.input_shape if defense is None else defense.output_shape()
    model = create_detector(meta.get("model", config.model), shape, task.num_classes, int(meta.get("width", config.width)))
    model.load_state_dict(load_weights(run / "model.safetensors"))
    model.eval()
    return config, task, defense, model


def export_detection(run: str | Path, out: str | Path, *, split: str = "test", mode: str = "inference", force: bool = False) -> dict[str, Any]:
    """Write the messages of ``split`` (exactly what leaves the client, fresh OS-entropy noise) to ``out``
    (.npz: x, shape, metadata; with ``--mode training`` also the boxes and primary classes, which the
    engine needs to train). For ``local``: the detections."""
    from veil.io import save_npz
    from veil.noise import OS_ENTROPY, private_noise
    from veil.training.run import check_export_target

    if mode not in ("inference", "training"):
        raise ValueError(f"unknown mode {mode!r}; valid: inference, training")
    check_export_target(Path(out), Path(run), force=force)
    config, task, defense, model = load_detection_run(run)
    scenes = task.split(split)
    meta = {"mode": mode, "split": split, "records": len(scenes), "noise": OS_ENTROPY, "task": config.task}
    if defense is None:
        preds = predict(None, model, scenes)
        rows = [[i, *p["boxes"][j].tolist(), float(p["scores"][j]), int(p["labels"][j])] for i, p in enumerate(preds) for j in range(len(p["scores"]))]
        save_npz(out, detections=np.asarray(rows, np.float32).reshape(-1, 7), metadata=np.asarray(json.dumps({**meta, "columns": "scene,x0,y0,x1,y1,score,label"})))
        return meta
    with private_noise():
        m = messages(defense, scenes, exposure=mode)
    arrays = {"x": m.numpy().astype(np.float32), "shape": np.asarray(m.shape[1:]), "metadata": np.asarray(json.dumps({**meta, "message_shape": list(m.shape[1:])}))}
    if mode == "training":
        arrays.update(boxes=scenes.boxes.numpy(), labels=scenes.labels.numpy(), scene=scenes.scene.numpy())
    save_npz(out, **arrays)
    return {**meta, "message_shape": list(m.shape[1:])}
