"""Fisher-information bound on reconstruction (dFIL; Maeng et al., "Bounding the Invertibility of
Privacy-Preserving Instance Encoding", NeurIPS 2023) for defenses whose message is Gaussian given the record.

For a message m ~ N(mu(x), diag s(x)^2) (:func:`veil.evaluation.inversion.gaussian_message`) the Fisher
information of the record x (d entries) is

    I(x) = J_mu^T diag(1 / s^2) J_mu + J_s^T diag(2 / s^2) J_s         (d x d)

(J_mu, J_s: Jacobians of mu and s in x; the second term is the information in an x-dependent variance,
zero for fixed noise). By the Cramér-Rao bound any *unbiased* estimator x_hat(m) has

    E ||x_hat - x||^2 / d  >=  tr(I(x)^-1) / d        (``mse_bound``; infinite where I is singular)
                           >=  d / tr(I(x))           (``mse_bound_dfil`` = 1 / dFIL, Maeng et al. Eq. 4)

computed per record, exactly, with ``torch.func.jacrev`` on a subset of ``records`` test records (8x8
digits: d = 64; 40x40 canvases: d = 1600, one 1600 x 1600 eigendecomposition per record). Reported with
the PSNR ceiling they imply, ``10 log10(range^2 / bound)``: no unbiased attacker beats it on average.

Assumptions (stated in the result): the noise is Gaussian and independent per element given x (true of
``gaussian``, ``ani``, ``cloak`` and SCNL's Gaussian layer); the attacker is unbiased (a biased one, using a
prior, can do better; the inversion and decoder attacks are biased, so they are measured, not bounded);
and the message is differentiable in x. Discrete steps on the client (a sharpened selector's argmax, a
box choice) have zero derivative, so the information in *which* template was chosen is not counted: the
bound is then optimistic for the defense, and the measured attacks are the evidence.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch

from veil.data.tasks import Task
from veil.defenses.base import Defense
from veil.evaluation.attack_data import _subset

#: Relative eigenvalue below which a direction of the record is taken as carrying no information.
SINGULAR_RTOL = 1e-9


@dataclasses.dataclass(frozen=True)
class FisherConfig:
    """Settings of the Fisher bound.

    Attributes:
        records: Test records the bound is computed on (exactly, one Jacobian each).
        seed: Seed of the test subset (the reconstruction attack's subset when equal to its seed).
    """

    records: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.records, bool) or not isinstance(self.records, int) or not 1 <= self.records <= 10_000:
            raise ValueError(f"records must be an integer in [1, 10000], got {self.records!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fisher_information(mean_std: Any, x: torch.Tensor) -> torch.Tensor:
    """I(x) (d, d) for one record x (*record_shape) under m ~ N(mu(x), diag s(x)^2).

    ``mean_std``: a function of a batch (1, *record_shape) -> (mu, s), each (1, *message_shape).
    """
    def flat(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, s = mean_std(v[None])
        return mu.flatten(), s.flatten()

    (j_mu, j_s) = torch.func.jacrev(flat)(x.detach())  # each (d_out, *record_shape)
    d = x.numel()
    j_mu, j_s = j_mu.reshape(-1, d).double(), j_s.reshape(-1, d).double()
    with torch.no_grad():
        _, s = flat(x.detach())
    s = s.double()
    keep = s > 1e-6  # noiseless entries: a constant (Cloak's suppressed ones) or a deterministic leak, handled by the caller
    inv_var = torch.where(keep, 1.0 / s.clamp_min(1e-6).square(), torch.zeros_like(s))
    return j_mu.T @ (inv_var[:, None] * j_mu) + j_s.T @ ((2.0 * inv_var)[:, None] * j_s)


def mse_bounds(info: torch.Tensor) -> dict[str, Any]:
    """Cramér-Rao bounds per element from a Fisher matrix (d, d): exact ``tr(I^-1)/d`` (None if singular)
    and ``d / tr(I)`` (1 / dFIL), with the number of directions carrying no information."""
    d = info.shape[0]
    eig = torch.linalg.eigvalsh((info + info.T) / 2)
    top = float(eig.max()) if d else 0.0
    zero = int((eig <= SINGULAR_RTOL * max(top, 1e-300)).sum())
    trace = float(info.trace())
    return {
        "mse_bound": None if zero else float((1.0 / eig).sum()) / d,
        "mse_bound_dfil": None if trace <= 0 else d / trace,
        "dfil": trace / d,
        "uninformative_directions": zero,
    }


def fisher_bound(defense: Defense, task: Task, config: FisherConfig | None = None, *, test_size: int | None = None) -> dict[str, Any]:
    """The Fisher bound on ``config.records`` test records, or ``{"applicable": False, "reason": ...}``.

    Returns per-record means of ``mse_bound`` (over the records where I is invertible; ``singular_records``
    counts the others, where no unbiased estimator has finite error), ``mse_bound_dfil``, ``dfil``, their
    PSNR ceilings, the assumptions and the config.
    """
    from veil.evaluation.inversion import gaussian_message, message_model

    config = config or FisherConfig()
    if message_model(defense) != "gaussian-likelihood":
        from veil.evaluation.attack_data import is_deterministic

        det = is_deterministic(defense, task.val.x[:4])
        reason = ("the message is a deterministic function of the record: no noise, no bound above 0" if det
                  else "the message is not Gaussian given the record (no closed-form Fisher information here)")
        return {"applicable": False, "reason": reason, "config": config.to_dict()}
    t0 = time.time()
    client = copy.deepcopy(defense).eval().requires_grad_(False)
    te = _subset(task.test, test_size, config.seed + 2)
    te = te.subset(np.arange(min(config.records, len(te))))
    lo, hi = float(task.train.x.min()), float(task.train.x.max())
    data_range = (hi - lo) or 1.0
    per = [mse_bounds(fisher_information(lambda v: gaussian_message(client, v), x)) for x in te.x]
    exact = [p["mse_bound"] for p in per if p["mse_bound"] is not None]
    dfil_bound = [p["mse_bound_dfil"] for p in per if p["mse_bound_dfil"] is not None]

    def ceiling(mse: float | None) -> float | None:
        return None if mse is None or mse <= 0 else 10 * math.log10(data_range**2 / mse)

    mean_exact = float(np.mean(exact)) if exact else None
    mean_dfil = float(np.mean(dfil_bound)) if dfil_bound else None
    return {
        "applicable": True,
        "records": len(te),
        "dims": int(np.prod(task.input_shape)),
        "mse_bound": mean_exact,
        "singular_records": len(per) - len(exact),
        "uninformative_directions_mean": float(np.mean([p["uninformative_directions"] for p in per])),
        "mse_bound_dfil": mean_dfil,
        "dfil": float(np.mean([p["dfil"] for p in per])),
        "psnr_ceiling": ceiling(mean_exact),
        "psnr_ceiling_dfil": ceiling(mean_dfil),
        "data_range": data_range,
        "assumptions": "message ~ N(mu(x), diag s(x)^2), elementwise-independent Gaussian noise; unbiased estimator; "
                       "derivatives of discrete client steps (argmax selection) taken as 0",
        "seconds": round(time.time() - t0, 2),
        "config": config.to_dict(),
    }


__all__ = ["FisherConfig", "fisher_bound", "fisher_information", "mse_bounds"]
