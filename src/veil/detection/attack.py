"""Attacks on the objects of obfuscated scenes, and ``veil evaluate`` for detection runs.

* **Per-object attack**: the attacker crops the obfuscated scene at each ground-truth box (a square
  around the box, 15% margin, resampled to ``crop`` pixels) and predicts the object's digit. Attackers
  are veil's retrained ones (:func:`veil.evaluation.attack.train_attacker`: CNNs with and without batch
  norm, early-stopped on obfuscated validation objects, fresh obfuscations (``views``) of the training
  scenes cycled over epochs), trained on the held-out scenes the defense never trained on and scored on
  the test scenes. ``cnn-bn`` (six conv layers of 16-64 channels at the crop's resolution) is deeper and
  runs at a finer resolution than the detector's backbone. At the training exposure the attacker also
  receives the object's primary class, as the engine does.
* **Floor**: the best guess of the digit from the object's primary class (Bayes rule on the training
  objects), and the majority floor.
* **Averaging attack**: the mean of ``averaging_k`` obfuscations of each scene, attacked the same way.
* **Reconstruction**: a decoder from message to scene (:func:`veil.evaluation.reconstruction.build_decoder`),
  scored by PSNR/SSIM (scikit-image) against the mean-scene baseline.

* **What the answer itself reveals**: a detector's output is boxes, and a box's width and height say
  something about the digit inside (a "1" is narrow). ``answer_floor``: gradient boosting
  (scikit-learn) trained on the held-out scenes' true boxes and classes, scored on the test objects;
  no defense whose engine returns boxes can be expected below it.
* **Attack on detections** (``local``, which sends only its detections): the same classifier trained on
  each held-out object's best-matching detection (box, class, score; IoU >= 0.1 by pycocotools, else
  missing) and scored on the test objects' matched detections.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from veil.detection.scenes import Scenes, region_map
from veil.detection.tasks import DetectionTask
from veil.detection.train import messages, predict
from veil.io import write_json
from veil.noise import seed_everything

EXPOSURES = ("inference", "training")


@dataclasses.dataclass(frozen=True)
class ObjectAttackConfig:
    """How hard the object attacker tries (saved in ``privacy.json``).

    Attributes:
        attackers: Architectures (``cnn``, ``cnn-bn``, ``mlp``, ``linear``) trained on object crops.
        epochs, patience, lr, batch_size, width: Attacker training (see :class:`veil.evaluation.attack.AttackConfig`).
        views: Fresh obfuscations of the held-out scenes, cycled over epochs.
        averaging_k: Obfuscations averaged per scene by the averaging attack (0 or 1: off).
        crop: Side of the crops (pixels).
        train_scenes: Held-out scenes the attacker trains on (``None``: all).
        exposures: ``inference`` (no boxes given to the client) and/or ``training`` (per-object hard selection).
        recon_epochs: Epochs of the reconstruction decoder (0: skip).
        seed: Seed of everything the attack draws.
    """

    attackers: tuple[str, ...] = ("cnn", "cnn-bn")
    epochs: int = 15
    patience: int = 4
    lr: float = 1e-3
    batch_size: int = 128
    width: int = 16
    views: int = 3
    averaging_k: int = 8
    crop: int = 28
    train_scenes: int | None = None
    exposures: tuple[str, ...] = EXPOSURES
    recon_epochs: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for e in self.exposures:
            if e not in EXPOSURES:
                raise ValueError(f"unknown exposure {e!r}; valid: {', '.join(EXPOSURES)}")
        if not (8 <= int(self.crop) <= 128):
            raise ValueError(f"crop must lie in [8, 128], got {self.crop!r}")
        if self.recon_epochs < 0 or self.averaging_k < 0:
            raise ValueError("recon_epochs and averaging_k must be >= 0")
        self.attack_config()  # validates attackers, epochs, views, width

    def attack_config(self):
        from veil.evaluation.attack_config import AttackConfig

        return AttackConfig(attackers=tuple(self.attackers), epochs=self.epochs, patience=self.patience, lr=self.lr, batch_size=self.batch_size,
                            width=self.width, views=self.views, averaging_k=self.averaging_k, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def crop_objects(images: torch.Tensor, scenes: Scenes, size: int = 28, margin: float = 1.15) -> torch.Tensor:
    """Crops (M, C, size, size) of ``images`` (N, C, H, W) at every object's box of ``scenes``: the square
    of side ``margin * max(w, h)`` centred on the box, bilinearly resampled (zeros outside the image)."""
    n, c, h, w = images.shape
    if n != len(scenes):
        raise ValueError(f"one image per scene: got {n} images for {len(scenes)} scenes")
    b = scenes.boxes
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    side = margin * torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]).clamp(min=1)
    theta = torch.zeros(len(b), 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = side / w, 2 * cx / w - 1  # normalised coordinates, align_corners=False
    theta[:, 1, 1], theta[:, 1, 2] = side / h, 2 * cy / h - 1
    out = []
    for i in range(0, len(b), 1024):
        grid = F.affine_grid(theta[i : i + 1024], [len(theta[i : i + 1024]), c, size, size], align_corners=False)
        out.append(F.grid_sample(images[scenes.scene[i : i + 1024]], grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    return torch.cat(out) if out else torch.zeros(0, c, size, size)


def _object_messages(defense: nn.Module | None, scenes: Scenes, exposure: str, k: int, crop: int) -> torch.Tensor:
    """Crops of the mean of ``k`` fresh messages of every scene."""
    m = messages(defense, scenes, exposure=exposure)
    for _ in range(k - 1):
        m = m + messages(defense, scenes, exposure=exposure)
    return crop_objects(m / max(1, k), scenes, crop)


def object_attack(defense: nn.Module | None, task: DetectionTask, config: ObjectAttackConfig, *, exposure: str = "inference", k: int = 1,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the attackers on object crops of obfuscated held-out scenes; score the best (by validation
    accuracy) on the test scenes' objects. ``k`` > 1: the averaging attack."""
    from veil.evaluation.attacker_training import train_attacker

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    tr = _attack_scenes(task, config)
    va, te = task.val, task.test
    seed_everything(config.seed + 7)
    t0 = time.time()
    views = [_object_messages(defense, tr, exposure, k, config.crop) for _ in range(config.views)]
    m_va, m_te = (_object_messages(defense, s, exposure, k, config.crop) for s in (va, te))
    num_digits = int(max(int(s.secondary.max()) for s in (tr, va, te))) + 1
    given = exposure == "training"
    label_args = dict(y_train=tr.labels, y_val=va.labels, num_labels=task.num_classes) if given else {}
    acfg = config.attack_config()
    results, best = {}, None
    for name in config.attackers:
        model, rec = train_attacker(name, views, tr.secondary, m_va, va.secondary, num_digits, acfg, log=log, **label_args)
        with torch.no_grad():
            logits = torch.cat([model(m_te[i : i + 1024], te.labels[i : i + 1024] if given else None) for i in range(0, len(m_te), 1024)])
        rec["test_acc"] = float((logits.argmax(1) == te.secondary).float().mean())
        results[name] = rec
        if best is None or rec["val_acc"] > results[best]["val_acc"]:
            best = name
    acc = results[best]["test_acc"]
    log(f"[object attack/{exposure}{f'/avg{k}' if k > 1 else ''}] best attacker {best}: test acc {acc:.4f} on {len(te.secondary)} objects")
    return {"exposure": exposure, "averaged": k, "accuracy": acc, "best_attacker": best, "attackers": results,
            "train_objects": len(tr.secondary), "test_objects": len(te.secondary), "seconds": round(time.time() - t0, 1)}


def reconstruction(defense: nn.Module | None, task: DetectionTask, config: ObjectAttackConfig, log: Callable[[str], None] | None = None) -> tuple[dict[str, Any], torch.Tensor]:
    """A decoder from inference messages back to scenes (held-out scenes, views cycled, early-stopped on
    validation MSE); PSNR/SSIM on the test scenes against the mean-scene baseline. Returns the record and
    the test reconstructions."""
    from veil.evaluation.attackers import Standardize
    from veil.evaluation.reconstruction import build_decoder, image_scores

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    tr = _attack_scenes(task, config)
    seed_everything(config.seed + 13)
    views = [messages(defense, tr) for _ in range(config.views)]
    m_va, m_te = messages(defense, task.val), messages(defense, task.test)
    x_tr, mean = tr.images, tr.images.mean(0)
    model = nn.Sequential(Standardize(views[0]), build_decoder(tuple(views[0].shape[1:]), task.input_shape, 2 * config.width))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    best, best_state = math.inf, None
    gen = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.recon_epochs):
        model.train()
        m_tr = views[epoch % len(views)]
        perm = torch.randperm(len(m_tr), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            if len(idx) < 2:
                continue
            loss = F.mse_loss(model(m_tr[idx]) + mean, x_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = float(F.mse_loss(model(m_va) + mean, task.val.images))
        if val < best:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        recon = torch.cat([model(m_te[i : i + 256]) + mean for i in range(0, len(m_te), 256)]).clamp(0, 1)
    orig = task.test.images.numpy().astype(np.float64)
    psnr, ssim = image_scores(orig, recon.numpy().astype(np.float64), 1.0)
    b_psnr, b_ssim = image_scores(orig, np.broadcast_to(mean.numpy().astype(np.float64), orig.shape), 1.0)
    log(f"[reconstruction] PSNR {psnr:.2f} dB, SSIM {ssim:.3f} (mean-scene baseline {b_psnr:.2f} dB, {b_ssim:.3f})")
    return {"psnr": psnr, "ssim": ssim, "baseline_psnr": b_psnr, "baseline_ssim": b_ssim, "val_mse": best, "train_scenes": len(tr)}, recon


def _box_features(boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor | None = None) -> np.ndarray:
    """(N, 4|5) features of boxes (x0, y0, x1, y1): width, height, aspect, class[, score]."""
    b = boxes.double().numpy()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    cols = [w, h, w / np.maximum(h, 1e-6), labels.double().numpy()] + ([scores.double().numpy()] if scores is not None else [])
    return np.stack(cols, 1) if len(b) else np.zeros((0, len(cols)))


def _matched_detection_features(preds: list[dict[str, torch.Tensor]], scenes: Scenes, min_iou: float = 0.1) -> np.ndarray:
    """Per ground-truth object, the features of the detection in its scene that overlaps it most (NaN where
    none reaches ``min_iou``): what an engine holding only the detections knows about each object."""
    from pycocotools import mask as coco_mask

    out = np.full((len(scenes.labels), 5), np.nan)
    for i, p in enumerate(preds):
        objs = torch.nonzero(scenes.scene == i).flatten()
        if len(objs) == 0 or len(p["boxes"]) == 0:
            continue
        xywh = lambda b: np.c_[b[:, :2], b[:, 2:] - b[:, :2]].astype(float)  # noqa: E731
        iou = coco_mask.iou(xywh(p["boxes"].numpy()), xywh(scenes.boxes[objs].numpy()), [0] * len(objs))  # (dets, objects)
        iou = np.asarray(iou).reshape(len(p["boxes"]), len(objs))
        feats = _box_features(p["boxes"], p["labels"], p["scores"])
        for j, o in enumerate(objs.tolist()):
            k = int(iou[:, j].argmax())
            if iou[k, j] >= min_iou:
                out[o] = feats[k]
    return out


def _classifier_attack(x_train: np.ndarray, z_train: np.ndarray, x_test: np.ndarray, z_test: np.ndarray, seed: int) -> float:
    from sklearn.ensemble import HistGradientBoostingClassifier

    if len(np.unique(z_train)) < 2:  # one digit among the training objects (a tiny data set): the guess is that digit
        return float(np.mean(z_test == z_train[0])) if len(z_train) else 0.0
    # early stopping on a held-back 15% (a few hundred objects overfit without it); its stratified split needs
    # every digit at least twice, so a tiny set trains without it
    stop = int(np.unique(z_train, return_counts=True)[1].min()) >= 2
    clf = HistGradientBoostingClassifier(random_state=seed, early_stopping=stop, validation_fraction=0.15).fit(x_train, z_train)
    return float(clf.score(x_test, z_test))


def answer_floor(task: DetectionTask, config: "ObjectAttackConfig") -> float:
    """The digit guessed from each object's true box and class (what a correct detection carries)."""
    tr = _attack_scenes(task, config)
    return _classifier_attack(_box_features(tr.boxes, tr.labels), tr.secondary.numpy(), _box_features(task.test.boxes, task.test.labels), task.test.secondary.numpy(), config.seed)


def detections_attack(model: nn.Module, task: DetectionTask, config: "ObjectAttackConfig", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The digit guessed from the on-device detector's detections matched to each object (``local``)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    tr = _attack_scenes(task, config)
    x_tr = _matched_detection_features(predict(None, model, tr), tr)
    x_te = _matched_detection_features(predict(None, model, task.test), task.test)
    acc = _classifier_attack(x_tr, tr.secondary.numpy(), x_te, task.test.secondary.numpy(), config.seed)
    log(f"[object attack/detections] gradient boosting on matched detections: test acc {acc:.4f} on {len(x_te)} objects "
        f"({float(np.isnan(x_te[:, 0]).mean()):.1%} of them without a detection)")
    return {"exposure": "detections", "accuracy": acc, "best_attacker": "gradient-boosting", "train_objects": len(x_tr), "test_objects": len(x_te),
            "missed_objects": float(np.isnan(x_te[:, 0]).mean())}


def _attack_scenes(task: DetectionTask, config: "ObjectAttackConfig") -> Scenes:
    return task.held_out if config.train_scenes is None else task.held_out.subset(np.arange(min(config.train_scenes, len(task.held_out))))


def evaluate_detection(run: str | Path, config: ObjectAttackConfig | None = None, *, png: str | Path | None = None,
                       log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``veil evaluate`` for a detection run: mAP, the per-object attack (each exposure, and averaged),
    the floors and the reconstruction into ``RUN/privacy.json``, and ``RUN/detection.png``."""
    from veil.detection.train import evaluate_map, load_detection_run

    config = config or ObjectAttackConfig()
    run = Path(run)
    cfg, task, defense, model = load_detection_run(run)
    seed_everything(config.seed)
    floor, majority = task.primary_only_floor(), task.majority_floor()
    out: dict[str, Any] = {"task": task.name, "defense": cfg.defense, "knob": None if defense is None else defense.knob_value(),
                           "map": evaluate_map(defense, model, task.test), "primary_only_floor": floor, "majority_floor": majority,
                           "attack": {}, "config": config.to_dict()}
    out["answer_floor"] = answer_floor(task, config)
    summary: dict[str, Any] = {"map_50": out["map"]["map_50"], "map": out["map"]["map"], "floor": floor, "majority_floor": majority, "answer_floor": out["answer_floor"]}
    recon = None
    if defense is None:
        out["attack"]["detections"] = detections_attack(model, task, config, log=log)
        acc = out["attack"]["detections"]["accuracy"]
        summary.update(attack_inference=acc, attack_training=acc, attack_averaging=acc)  # one deterministic message: the detections
    else:
        for exposure in config.exposures:
            if exposure == "training" and not defense.uses_mask:
                continue
            out["attack"][exposure] = object_attack(defense, task, config, exposure=exposure, log=log)
            summary[f"attack_{exposure}"] = out["attack"][exposure]["accuracy"]
        if config.averaging_k > 1:
            out["attack"]["averaging"] = object_attack(defense, task, dataclasses.replace(config, attackers=(config.attackers[-1],)), k=config.averaging_k, log=log)
            summary["attack_averaging"] = out["attack"]["averaging"]["accuracy"]
        if config.recon_epochs:
            out["reconstruction"], recon = reconstruction(defense, task, config, log)
            summary.update({k: out["reconstruction"][k] for k in ("psnr", "ssim", "baseline_psnr", "baseline_ssim")})
    out["summary"] = summary
    write_json(run / "privacy.json", out)
    save_picture(png or run / "detection.png", task, defense, model, recon, title=f"{cfg.defense} (knob {out['knob']}): mAP@0.5 {summary['map_50']:.3f}")
    return out


def save_picture(path: str | Path, task: DetectionTask, defense: nn.Module | None, model: nn.Module, recon: torch.Tensor | None, *, records: int = 6, title: str = "") -> None:
    """PNG, one column per test scene: the scene with true (green) and predicted (red, score > 0.3) boxes,
    the per-object hard selection, the message at inference, the attacker's reconstruction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from veil.io import atomic_path

    scenes = task.test.subset(np.arange(min(records, len(task.test))))
    preds = predict(defense, model, scenes)
    rows = [("scene + boxes", scenes.images), ("hard selection", region_map(scenes, 0, len(scenes)).float())]
    if defense is not None:
        rows.append(("message", messages(defense, scenes)))
    if recon is not None:
        rows.append(("reconstruction", recon[: len(scenes)]))
    fig, axes = plt.subplots(len(rows), len(scenes), figsize=(1.8 * len(scenes), 1.8 * len(rows)), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for i in range(len(scenes)):
            ax = axes[r, i]
            ax.imshow(imgs[i, 0].numpy(), cmap="tab10" if name == "hard selection" else "gray", vmin=0 if name == "hard selection" else None, vmax=9 if name == "hard selection" else None)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0:
                for box, lab in zip(scenes.boxes[scenes.scene == i].tolist(), scenes.labels[scenes.scene == i].tolist()):
                    ax.add_patch(Rectangle((box[0] - 0.5, box[1] - 0.5), box[2] - box[0], box[3] - box[1], fill=False, color="lime", lw=1))
                p = preds[i]
                for box, s, lab in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
                    if s > 0.3:
                        ax.add_patch(Rectangle((box[0] - 0.5, box[1] - 0.5), box[2] - box[0], box[3] - box[1], fill=False, color="red", lw=1))
                        ax.text(box[0], box[1] - 1, task.class_names[lab][:1], color="red", fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
