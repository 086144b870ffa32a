"""Reconstruction (inversion) attack: a decoder trained to turn obfuscated records back into the originals.

The attacker holds the obfuscator, so it trains a decoder on pairs (``encode(x)``, ``x``) of records the
defense did not train on (the attribute attack's records, :func:`veil.evaluation.attack.attacker_splits`),
several fresh obfuscations (``views``) of each cycled over epochs, early-stops on the validation records'
mean squared error, and is scored on the test split with PSNR and SSIM (scikit-image). Inference exposure
(``encode(x, None)``) unless told otherwise.

Decoders: image-shaped messages with the record's spatial size get a convolutional decoder that keeps the
resolution; every other message (vectors such as SVD coefficients, or maps of another size) gets a fully
connected layer to the record's size followed by the same convolutional refinement.
"""

from __future__ import annotations

import copy
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

from veil.data.tasks import Task
from veil.defenses.base import Defense
from veil.evaluation.attack_data import _messages, _subset, attacker_splits
from veil.evaluation.attackers import Standardize
from veil.noise import seed_everything
from veil.training.run import EXPOSURES


@dataclasses.dataclass(frozen=True)
class ReconstructionConfig:
    """Settings of the reconstruction attack (saved beside its numbers).

    Attributes:
        epochs: Most epochs for the decoder.
        patience: Stop after this many epochs without a lower validation MSE.
        batch_size: Records per batch.
        lr: Adam learning rate.
        width: Channels of the convolutional decoder.
        train_size: Training records used, disjoint from the defense's (``None``: as many as the defense had).
        test_size: Test records scored, and validation records for early stopping (``None``: the whole split).
        views: Independent obfuscations of the training records, cycled over epochs (fresh noise).
        exposure: ``inference`` or ``training``.
        grid_records: Test records drawn in the PNG grid.
        seed: Seed of initialisation, order and noise.
        prior_epochs: Epochs of pretraining on clean records before the decoder meets any message (the
            attacker's public-data prior, as SIMBA's decoder attack assumes): an autoencoder of the clean
            training records whose weights start the decoder (all of them where the message has the
            record's shape; otherwise its convolutional refinement stage). 0: no pretraining.
    """

    epochs: int = 30
    patience: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    width: int = 64
    train_size: int | None = None
    test_size: int | None = None
    exposure: str = "inference"
    grid_records: int = 8
    views: int = 4
    seed: int = 0
    prior_epochs: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "patience", "batch_size", "width", "grid_records", "views"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 <= int(self.prior_epochs) <= 10_000:
            raise ValueError(f"prior_epochs must lie in [0, 10000], got {self.prior_epochs!r}")
        for name, most in (("width", 1024), ("epochs", 10_000), ("views", 64), ("grid_records", 64)):
            if int(getattr(self, name)) > most:
                raise ValueError(f"{name} must be <= {most}, got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("train_size", "test_size"):
            v = getattr(self, name)
            if v is not None and v < 2:
                raise ValueError(f"{name} must be >= 2 or None, got {v!r}")
        if self.exposure not in EXPOSURES:
            raise ValueError(f"unknown exposure {self.exposure!r}; valid: {', '.join(EXPOSURES)}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not self.prior_epochs:  # configs saved before the prior existed compare equal (sweep resumes)
            del out["prior_epochs"]
        return out


def build_decoder(message_shape: tuple[int, ...], record_shape: tuple[int, int, int], width: int = 64) -> nn.Module:
    """Decoder (B, *message_shape) -> (B, *record_shape)."""
    c, h, w = record_shape
    refine = nn.Sequential(
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, c, 3, padding=1),
    )
    if len(message_shape) == 3 and tuple(message_shape[1:]) == (h, w):
        return nn.Sequential(nn.Conv2d(message_shape[0], width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), refine)
    d = int(np.prod(message_shape))
    return nn.Sequential(
        nn.Flatten(), nn.Linear(d, 512), nn.ReLU(), nn.Linear(512, width * h * w), nn.Unflatten(1, (width, h, w)), nn.ReLU(), refine
    )


def image_scores(original: np.ndarray, recon: np.ndarray, data_range: float) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM over records (N, C, H, W), by scikit-image."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    h, w = original.shape[2:]
    win = min(7, h, w)
    win -= 1 - win % 2  # odd window no larger than the image
    psnr, ssim = [], []
    for a, b in zip(original, recon):
        psnr.append(peak_signal_noise_ratio(a, b, data_range=data_range))
        ssim.append(structural_similarity(a, b, data_range=data_range, channel_axis=0, win_size=win))
    psnr_arr = np.asarray(psnr, dtype=np.float64)
    # identical images give +inf PSNR; cap at 100 dB so the mean stays a number
    return float(np.mean(np.minimum(psnr_arr, 100.0))), float(np.mean(ssim))


def save_grid(path: str | Path, original: np.ndarray, message: np.ndarray, recon: np.ndarray, title: str = "") -> None:
    """PNG grid, one column per record: originals / obfuscated messages / reconstructions."""
    save_rows(path, [("original", original), ("obfuscated", message), ("reconstructed", recon)], title)


def save_rows(path: str | Path, rows: list[tuple[str, np.ndarray]], title: str = "") -> None:
    """PNG grid, one labelled row per array (N, C, H, W) or (N, m) (a vector is drawn as a strip), one column per record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from veil.io import atomic_path

    n = min(len(imgs) for _, imgs in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.4 * len(rows)), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for i in range(n):
            ax = axes[r][i]
            img = np.asarray(imgs[i])
            if img.ndim == 3:
                img = img[0] if img.shape[0] == 1 else np.moveaxis(img[:3], 0, -1)
            elif img.ndim == 1:  # a coefficient vector: draw it as a strip
                img = img[None, :]
            ax.imshow(img, cmap="gray", aspect="auto" if img.shape[0] == 1 else "equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def reconstruction_attack(
    defense: Defense,
    task: Task,
    config: ReconstructionConfig | None = None,
    *,
    grid_path: str | Path | None = None,
    secret_reader: Any = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train a decoder on obfuscated records the defense did not train on, score it on obfuscated test records.

    Returns ``psnr`` and ``ssim`` (test means), ``mse``, ``baseline_psnr``/``baseline_ssim`` (predicting
    the mean training record for every input: what a decoder that learnt nothing reaches), the decoder's
    training record, ``records`` (counts and sources), ``data_range`` and the config; writes the PNG grid
    to ``grid_path`` if given. With a ``secret_reader`` (:class:`veil.evaluation.secret_readout.SecretReader`)
    also ``secret`` (its accuracy on the reconstructed test records).
    """
    out, _, _, _ = decoder_attack(defense, task, config, grid_path=grid_path, secret_reader=secret_reader, log=log)
    return out


def _fit(model: nn.Module, views: list[torch.Tensor], x_tr: torch.Tensor, m_va: torch.Tensor, x_va: torch.Tensor,
         config: ReconstructionConfig, epochs: int) -> tuple[float, int, int]:
    """Train ``model`` on (view, x_tr) pairs, the views cycled over epochs, keeping the weights with the lowest
    validation MSE; return (best validation MSE, best epoch, epochs run)."""
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    best, best_state, best_epoch, stall, epoch = math.inf, None, 0, 0, 0
    for epoch in range(1, epochs + 1):
        m_tr = views[(epoch - 1) % len(views)]
        model.train()
        perm = torch.randperm(len(m_tr), generator=gen)
        for i in range(0, len(perm), config.batch_size):
            idx = perm[i : i + config.batch_size]
            if len(idx) < 2:
                continue
            loss = F.mse_loss(model(m_tr[idx]), x_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val = _mse(model, m_va, x_va)
        if val < best:
            best, best_epoch, stall, best_state = val, epoch, 0, copy.deepcopy(model.state_dict())
        else:
            stall += 1
            if stall >= config.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return best, best_epoch, epoch


def _pretrain_prior(decoder: nn.Module, message_shape: tuple[int, ...], tr: Any, va: Any, record_shape: tuple[int, int, int],
                    config: ReconstructionConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """Autoencode the clean records (the attacker's public data) and start ``decoder`` from the result: all
    weights where the message has the record's shape, else the shared refinement stage (the last module)."""
    auto = build_decoder(record_shape, record_shape, config.width)
    model = nn.Sequential(Standardize(tr.x), auto, _AddMean(tr.x.mean(0)))
    val, best_epoch, ran = _fit(model, [tr.x], tr.x, va.x, va.x, config, config.prior_epochs)
    same = tuple(message_shape) == tuple(record_shape)
    (decoder if same else decoder[-1]).load_state_dict((auto if same else auto[-1]).state_dict())
    log(f"[reconstruction/prior] autoencoder of {len(tr)} clean records: val MSE {val:.5f} (epoch {best_epoch}/{ran}); "
        f"starts {'the whole decoder' if same else 'the refinement stage'}")
    return {"val_mse": val, "best_epoch": best_epoch, "epochs_run": ran, "transferred": "all" if same else "refinement"}


def decoder_attack(
    defense: Defense,
    task: Task,
    config: ReconstructionConfig | None = None,
    *,
    grid_path: str | Path | None = None,
    secret_reader: Any = None,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`reconstruction_attack`, also returning the test records (N, C, H, W), their messages and the
    reconstructions (N, C, H, W), for the caller's grid and secret readout."""
    config = config or ReconstructionConfig()
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    tr, va, records = attacker_splits(task, config.train_size, config.test_size, config.seed)
    te = _subset(task.test, config.test_size, config.seed + 2)
    seed_everything(config.seed + 13)
    views = [_messages(defense, tr, config.exposure) for _ in range(config.views)]
    m_va, m_te = _messages(defense, va, config.exposure), _messages(defense, te, config.exposure)
    m_tr = views[0]
    x_tr = tr.x
    lo, hi = float(x_tr.min()), float(x_tr.max())
    data_range = (hi - lo) or 1.0
    t0 = time.time()
    decoder = build_decoder(tuple(m_tr.shape[1:]), task.input_shape, config.width)
    prior = _pretrain_prior(decoder, tuple(m_tr.shape[1:]), tr, va, task.input_shape, config, log) if config.prior_epochs else None
    # predict the residual over the mean training record, so the decoder starts at the baseline
    model = nn.Sequential(Standardize(m_tr), decoder, _AddMean(x_tr.mean(0)))
    tag = "reconstruction/prior" if prior else "reconstruction"
    log(f"[{tag}/{config.exposure}] message shape {tuple(m_tr.shape[1:])} -> record {task.input_shape}; {len(tr)} train records x {len(views)} views")
    best, best_epoch, epoch = _fit(model, views, x_tr, m_va, va.x, config, config.epochs)
    with torch.no_grad():
        recon = torch.cat([model(m_te[i : i + 512]) for i in range(0, len(m_te), 512)]).clamp(lo, hi)
    orig = te.x.numpy().astype(np.float64)
    rec = recon.numpy().astype(np.float64)
    psnr, ssim = image_scores(orig, rec, data_range)
    mean_img = np.broadcast_to(x_tr.mean(0).numpy().astype(np.float64), orig.shape)
    b_psnr, b_ssim = image_scores(orig, mean_img, data_range)
    out = {
        "exposure": config.exposure,
        "psnr": psnr,
        "ssim": ssim,
        "mse": float(np.mean((orig - rec) ** 2)),
        "baseline_psnr": b_psnr,
        "baseline_ssim": b_ssim,
        "baseline": "the mean training record for every input",
        "data_range": data_range,
        "val_mse": best,
        "best_epoch": best_epoch,
        "epochs_run": epoch,
        "seconds": round(time.time() - t0, 2),
        "test_records": len(te),
        "records": records,
        "config": config.to_dict(),
    }
    if prior is not None:
        out["prior"] = prior
    log(f"[{tag}/{config.exposure}] PSNR {psnr:.2f} dB, SSIM {ssim:.3f} (mean-image baseline {b_psnr:.2f} dB, {b_ssim:.3f})")
    if secret_reader is not None:
        out["secret"] = secret_reader.read(recon, te.z)
        log(f"[{tag}] secret read from the reconstructions: {out['secret']['acc']:.4f}")
    if grid_path is not None:
        n = min(config.grid_records, len(te))
        save_grid(grid_path, orig[:n], m_te[:n].numpy(), rec[:n], title=f"{defense.name}: PSNR {psnr:.1f} dB, SSIM {ssim:.2f}")
        out["grid"] = str(grid_path)
    return out, te.x, m_te, recon


class _AddMean(nn.Module):
    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mean


@torch.no_grad()
def _mse(model: nn.Module, m: torch.Tensor, x: torch.Tensor) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(m), 512):
        total += float(F.mse_loss(model(m[i : i + 512]), x[i : i + 512], reduction="sum"))
    return total / max(1, x.numel())


__all__ = ["ReconstructionConfig", "build_decoder", "decoder_attack", "image_scores", "reconstruction_attack", "save_grid", "save_rows"]
