"""White-box input-optimisation inversion (SIMBA's "input optimization" attack) through the known client.

The attacker holds the client: ``veil export-client`` is the file that goes onto every device, so the
server operator knows the obfuscator's weights and its noise model; only the noise draws are secret. For
each test message m it searches for the record x_hat that best explains m:

    x_hat = argmin_x  D(m, x) + tv_weight * TV(x),    x in [lo, hi]^d (the records' range)

with Adam steps on x_hat (projected onto the range), several restarts (the mean public record first,
then uniform random records), the restart with the lowest objective kept per record (the attacker never
sees the true record), all records in one batch, and a time cap. ``D`` depends on what the client's
noise model allows (:func:`message_model` names the path each defense takes):

* ``gaussian-likelihood``: the message is Gaussian given the record, m ~ N(mu(x), diag s(x)^2), and
  ``D`` is the negative log-likelihood per element, mean of ``(m - mu)^2 / (2 s^2) + log s``
  (:func:`gaussian_message` gives mu and s, differentiable in x). Defenses: ``gaussian``
  (mu = x, s = sigma), ``ani`` (mu = w(x) x, s = 1 - w(x), Eq. 5 of the ANI paper), ``cloak``
  (mu = x b + mu_c, s = sigma b; suppressed entries carry nothing and are left out), and every SCNL
  defense whose layer draws from the ``gaussian`` distribution (``scnl*``, ``scnl-region``): mu and s
  are the layer's own constrained parameters, taken from the defense's own ``encode`` (its selection,
  sharpening and bounds included) by intercepting the sample it draws.
* ``distance``: every other defense (``none``, ``shredder``, ``svd``, ``sample-and-hold``, ``local``,
  SCNL with non-Gaussian distributions): ``D`` is the mean squared distance between m and
  ``encode(x_hat)``, averaged over ``noise_draws`` fresh draws of the noise (one where ``encode`` is
  deterministic). Where ``encode`` has no gradient in x (``local`` sends the template of an argmax) the
  estimate stays at its start, and the scores say so.

The prior's weight is chosen by the attacker on its own records (the attribute attack's validation
records, never the test records): it obfuscates them with the client, inverts them at each weight of
``tv_weights`` and keeps the weight with the best PSNR. Scored with PSNR and SSIM (scikit-image) on the
test records; the caller reads the secret from the estimates (:mod:`veil.evaluation.secret_readout`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from veil.data.tasks import Split, Task
from veil.defenses.base import Defense
from veil.evaluation.attack_data import _encode, _subset, attacker_splits, is_deterministic
from veil.evaluation.reconstruction import image_scores
from veil.noise import seed_everything

MESSAGE_MODELS = ("gaussian-likelihood", "distance")


@dataclasses.dataclass(frozen=True)
class InversionConfig:
    """Settings of the input-optimisation inversion (saved beside its numbers).

    Attributes:
        records: Test records inverted (the first of the reconstruction attack's test records).
        steps: Adam steps per restart.
        lr: Adam learning rate (in units of the records' range; cosine-decayed to a tenth).
        restarts: Starts per record: the mean public record, then uniform random records.
        tv_weights: Weights of the total-variation prior tried on the attacker's own records.
        tune_records: Attacker's (validation) records used to choose the prior's weight.
        noise_draws: Fresh noise draws averaged per step on the ``distance`` path.
        time_cap: Seconds for the whole attack (tuning included); the steps stop there, the estimates kept.
        seed: Seed of the restarts and of the messages' noise.
    """

    records: int = 256
    steps: int = 300
    lr: float = 0.05
    restarts: int = 2
    tv_weights: tuple[float, ...] = (0.0, 0.01, 0.1, 1.0)
    tune_records: int = 64
    noise_draws: int = 4
    time_cap: float = 300.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, least, most in (("records", 1, 100_000), ("steps", 1, 100_000), ("restarts", 1, 64), ("tune_records", 1, 10_000), ("noise_draws", 1, 64)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not least <= v <= most:
                raise ValueError(f"{name} must be an integer in [{least}, {most}], got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.time_cap, (int, float)) and math.isfinite(self.time_cap) and self.time_cap > 0):
            raise ValueError(f"time_cap must be a positive number of seconds, got {self.time_cap!r}")
        weights = tuple(float(w) for w in self.tv_weights)
        if not weights or any(not (math.isfinite(w) and w >= 0) for w in weights):
            raise ValueError(f"tv_weights must be one or more finite numbers >= 0, got {self.tv_weights!r}")
        object.__setattr__(self, "tv_weights", weights)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------- noise models
class _Intercept:
    """Within the block, the SCNL layer's ``rsample`` returns the mean and keeps the parameters it was given.

    Why intercept rather than recompute: the parameters then come from the defense's own ``encode`` path
    (selection, sharpening, region dilation, bounds), so the likelihood is of exactly what the client sends.
    """

    def __init__(self, distribution: Any) -> None:
        self.distribution, self.params = distribution, None

    def __enter__(self) -> "_Intercept":
        def grab(params: tuple[torch.Tensor, ...]) -> torch.Tensor:
            self.params = params
            return params[0]

        self.distribution.rsample = grab  # an instance attribute shadows the method
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.distribution.rsample


def _scnl_distribution(defense: Defense) -> Any:
    from veil.layers.distributions import Gaussian

    dist = getattr(getattr(defense, "layer", None), "distribution", None)
    return dist if isinstance(dist, Gaussian) else None


def message_model(defense: Defense) -> str:
    """``gaussian-likelihood`` where the inference message is Gaussian given the record (see
    :func:`gaussian_message`), ``distance`` otherwise."""
    from veil.defenses.ani import AdaptiveNoiseInjection
    from veil.defenses.baselines import GaussianNoise
    from veil.defenses.cloak import Cloak

    if isinstance(defense, GaussianNoise):
        return "gaussian-likelihood" if defense.sigma > 0 else "distance"
    if isinstance(defense, AdaptiveNoiseInjection):
        return "gaussian-likelihood"
    if isinstance(defense, Cloak):
        return "distance" if defense.stage == "pretrain" else "gaussian-likelihood"  # pretrain sends x itself
    return "gaussian-likelihood" if _scnl_distribution(defense) is not None else "distance"


def gaussian_message(defense: Defense, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the inference message given the record (eval mode, no label).

    x (B, *input_shape) -> (mu, s), each (B, *message_shape), differentiable in x. ``ValueError`` for a
    defense whose message is not Gaussian given x (:func:`message_model` says ``distance``).
    """
    from veil.defenses.ani import AdaptiveNoiseInjection
    from veil.defenses.baselines import GaussianNoise
    from veil.defenses.cloak import Cloak

    if message_model(defense) != "gaussian-likelihood":
        raise ValueError(f"defense {defense.name!r}: its message is not Gaussian given the record")
    defense.check_input(x)
    if isinstance(defense, GaussianNoise):
        return x, torch.full_like(x, defense.sigma)
    if isinstance(defense, AdaptiveNoiseInjection):
        w = defense.f_psi(x)  # (B, C, H, W) in (0, 1): Eq. 5, x' = w x + (1 - w) v, v ~ N(0, I)
        return w * x, 1.0 - w
    if isinstance(defense, Cloak):
        b, sigma = defense.mask(), defense.sigma()  # (C, H, W): Eq. 2, x' = (x + v) b + mu, v ~ N(0, sigma^2)
        return x * b + defense.mu, (sigma * b).expand_as(x)
    with _Intercept(_scnl_distribution(defense)) as grab:
        m = defense.encode(x)
    loc, scale = grab.params  # type: ignore[misc]
    return loc.reshape(m.shape), scale.reshape(m.shape)


# --------------------------------------------------------------------------------------- objective
def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation per record, the mean absolute difference of neighbours: (B, C, H, W) -> (B,)."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1) if x.shape[-2] > 1 else x.new_zeros(len(x))
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1) if x.shape[-1] > 1 else x.new_zeros(len(x))
    return dh + dw


def _data_term(defense: Defense, path: str, x: torch.Tensor, m: torch.Tensor, draws: int) -> torch.Tensor:
    """D(m, x) per record (B,) for ``path`` (see the module docstring)."""
    if path == "gaussian-likelihood":
        mu, s = gaussian_message(defense, x)
        keep = s > 1e-6  # entries without noise carry a constant (Cloak's suppressed ones): no term
        s = s.clamp_min(1e-6)
        nll = 0.5 * ((m - mu) / s).square() + torch.log(s)
        return (nll * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp_min(1)
    total = 0.0
    for _ in range(draws):
        total = total + (defense.encode(x).float().reshape(m.shape) - m).square().flatten(1).mean(1)
    return total / draws


def invert(
    defense: Defense,
    messages: torch.Tensor,
    *,
    record_shape: tuple[int, ...],
    lo: float,
    hi: float,
    start: torch.Tensor,
    tv_weight: float,
    config: InversionConfig,
    deadline: float,
    restarts: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Optimise record estimates for ``messages`` (N, *message_shape) through ``defense`` (eval mode).

    Args:
        record_shape: (C, H, W) of a record. lo, hi: the records' range (estimates are kept in it).
        start: (C, H, W) first restart (the mean public record). tv_weight: weight of the TV prior.
        deadline: ``time.time()`` past which the steps stop. restarts: overrides ``config.restarts``.

    Returns (estimates (N, *record_shape), record: path, steps run, objective, whether the cap stopped it).
    """
    path = message_model(defense)
    draws = 1 if (path == "gaussian-likelihood" or is_deterministic(defense, start[None].expand(2, *record_shape).contiguous())) else config.noise_draws
    n = len(messages)
    best_x = start[None].expand(n, *record_shape).clone()
    best_obj = torch.full((n,), math.inf)
    steps_run, capped = 0, False
    for r in range(restarts or config.restarts):
        x0 = start[None].expand(n, *record_shape) if r == 0 else lo + (hi - lo) * torch.rand(n, *record_shape)
        x = x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=config.lr * (hi - lo))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps, eta_min=0.1 * config.lr * (hi - lo))
        for _ in range(config.steps):
            if time.time() > deadline:
                capped = True
                break
            obj = _data_term(defense, path, x, messages, draws) + tv_weight * total_variation(x)
            opt.zero_grad(set_to_none=True)
            obj.sum().backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(lo, hi)
            steps_run += 1
        with torch.no_grad():  # the attacker keeps, per record, the restart that explains its message best
            final = _data_term(defense, path, x, messages, draws) + tv_weight * total_variation(x)
            better = final < best_obj
            best_x[better], best_obj[better] = x.detach()[better], final[better]
        if capped:
            break
    return best_x, {"path": path, "noise_draws": draws, "steps_run": steps_run, "objective": float(best_obj.mean()), "time_capped": capped}


def inversion_attack(
    defense: Defense,
    task: Task,
    config: InversionConfig | None = None,
    *,
    test_size: int | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], Split, torch.Tensor, torch.Tensor]:
    """Invert inference messages of test records through the known client; score PSNR/SSIM.

    Args:
        test_size: The reconstruction attack's test subset (the first ``config.records`` of it are inverted,
            so the grids show the same records).

    Returns (result, the test records inverted (a Split), their messages, estimates (N, C, H, W)); result holds ``psnr``,
    ``ssim``, ``mse``, the mean-record baseline, ``path`` (:data:`MESSAGE_MODELS`), ``tv_weight`` (chosen)
    with the tuning PSNRs, steps, time and config. Secrets are read by the caller.
    """
    config = config or InversionConfig()
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.time()
    deadline = t0 + config.time_cap
    client = copy.deepcopy(defense).eval().requires_grad_(False)  # only the estimate x_hat is optimised
    tr, va, _ = attacker_splits(task, None, None, config.seed)
    te = _subset(task.test, test_size, config.seed + 2)
    te = te.subset(np.arange(min(config.records, len(te))))
    tune = va.subset(np.arange(min(config.tune_records, len(va))))
    lo, hi = float(tr.x.min()), float(tr.x.max())
    data_range = (hi - lo) or 1.0
    start = tr.x.mean(0)  # the mean public record, the attacker's first guess
    seed_everything(config.seed + 17)
    m_tune, m_te = _encode(client, tune.x, None), _encode(client, te.x, None)
    path = message_model(client)
    log(f"[inversion] path {path}; choosing the TV weight on {len(tune)} of the attacker's own records from {config.tv_weights}")
    tuning = {}
    share = config.time_cap / (2 * len(config.tv_weights))  # half the cap for tuning, half for the attack
    for w in config.tv_weights:
        est, _ = invert(client, m_tune, record_shape=task.input_shape, lo=lo, hi=hi, start=start, tv_weight=w, config=config,
                        deadline=min(deadline, time.time() + share), restarts=1)
        tuning[w] = image_scores(tune.x.numpy().astype(np.float64), est.numpy().astype(np.float64), data_range)[0]
    tv = max(tuning, key=lambda w: (tuning[w], -w))
    est, rec = invert(client, m_te, record_shape=task.input_shape, lo=lo, hi=hi, start=start, tv_weight=tv, config=config, deadline=deadline)
    orig, out_np = te.x.numpy().astype(np.float64), est.numpy().astype(np.float64)
    psnr, ssim = image_scores(orig, out_np, data_range)
    b_psnr, b_ssim = image_scores(orig, np.broadcast_to(start.numpy().astype(np.float64), orig.shape), data_range)
    result = {
        "path": path, "psnr": psnr, "ssim": ssim, "mse": float(np.mean((orig - out_np) ** 2)),
        "baseline_psnr": b_psnr, "baseline_ssim": b_ssim, "baseline": "the mean public record for every input",
        "tv_weight": tv, "tuning_psnr": {f"{w:g}": p for w, p in tuning.items()}, "tuning_records": len(tune),
        "data_range": data_range, "test_records": len(te), **{k: v for k, v in rec.items() if k != "path"},
        "seconds": round(time.time() - t0, 2), "config": config.to_dict(),
    }
    log(f"[inversion] PSNR {psnr:.2f} dB, SSIM {ssim:.3f} (mean-record baseline {b_psnr:.2f} dB), TV weight {tv:g}, "
        f"{rec['steps_run']} steps{' (time cap reached)' if rec['time_capped'] else ''}, {result['seconds']}s")
    return result, te, m_te, est


__all__ = ["InversionConfig", "MESSAGE_MODELS", "gaussian_message", "invert", "inversion_attack", "message_model", "total_variation"]
