"""Mutual information I(X; X') between records and what leaves the client, normalised (seed 002 §5.2).

Three labelled numbers, never one unlabelled one (docs/design.md, "The attackers"):

* ``ksg``: the Kraskov-Stoegbauer-Grassberger k-nearest-neighbour estimate (``npeet_plus.mi``, nats) on a
  documented reduction: X and X' are each projected to their first ``dims`` principal components (PCA
  fitted on the train split: X on clean records, X' on obfuscated ones) and ``samples`` test pairs
  (x_i, x'_i) are used. By the data-processing inequality the reduced pair carries no more information
  than the full one, and KSG itself underestimates badly as the dimension grows (a Gaussian check here:
  true 5.55 nats at d=16, KSG 1.12), so this is a *low-dimensional proxy*, comparable only between
  defenses at identical settings.
* ``ksg_normalised``: I_KSG(X; X') / I_KSG(X; X). The denominator is the same estimator on the identity
  channel at the same settings (about psi(n) - psi(k), the most it can report from n samples); it plays
  the role of H(X) in seed 002 Fig. 4b, where H(X) of continuous pixels is not a usable normaliser.
* ``gaussian_bound``: where the message is x plus input-independent Gaussian noise N(0, sigma^2 I) (the
  ``gaussian`` defense), the closed form I(X; X + N) <= 1/2 sum_i log(1 + lambda_i / sigma^2) over the
  eigenvalues lambda_i of Cov(X) (Gaussian inputs maximise it), in full dimension and on the same PCA
  reduction (directly comparable with ``ksg``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy.special import digamma

from veil.data.tasks import Task
from veil.defenses.base import Defense
from veil.evaluation.attack_data import _messages, _subset
from veil.noise import seed_everything
from veil.training.run import EXPOSURES

KSG_WARNING = (
    "KSG (k-NN) estimates collapse in high dimension (Gaussian check: true 5.55 nats at d=16, KSG 1.12); "
    "this is a proxy on a PCA reduction, comparable only at identical settings. Attack accuracy comes first."
)


@dataclasses.dataclass(frozen=True)
class MIConfig:
    """Settings of the MI estimate (saved beside the number).

    Attributes:
        k: Neighbours in the KSG estimator.
        dims: Principal components kept for X and for X'.
        samples: Test pairs used (the estimator is O(n log n) per query; 2000 takes seconds).
        pca_fit_size: Train records the PCAs are fitted on.
        exposure: ``inference`` or ``training``.
        seed: Seed of the noise draws, the subsample and the estimator's tie-breaking jitter.
    """

    k: int = 3
    dims: int = 8
    samples: int = 2000
    pca_fit_size: int = 5000
    exposure: str = "inference"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k!r}")
        if self.dims < 1:
            raise ValueError(f"dims must be >= 1, got {self.dims!r}")
        if self.dims > 256:
            raise ValueError(f"dims must be <= 256, got {self.dims!r}")
        if self.samples <= self.k + 1:
            raise ValueError(f"samples must exceed k + 1 = {self.k + 1}, got {self.samples!r}")
        if self.k > 1000 or self.samples > 1_000_000:
            raise ValueError(f"k must be <= 1000 and samples <= 1000000, got {self.k!r}, {self.samples!r}")
        if self.pca_fit_size < 2:
            raise ValueError(f"pca_fit_size must be >= 2, got {self.pca_fit_size!r}")
        if self.exposure not in EXPOSURES:
            raise ValueError(f"unknown exposure {self.exposure!r}; valid: {', '.join(EXPOSURES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def ksg_mi(a: np.ndarray, b: np.ndarray, *, k: int = 3, seed: int = 0) -> float:
    """KSG estimate of I(A; B) in nats for paired samples (n, d_a), (n, d_b), by ``npeet_plus.mi``."""
    from npeet_plus import mi

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"a and b must hold the same number of samples, got {len(a)} and {len(b)}")
    if len(a) <= k + 1:
        raise ValueError(f"need more than k + 1 = {k + 1} samples, got {len(a)}")
    np.random.seed(seed % 2**32)  # npeet adds a tiny jitter from NumPy's global generator
    return float(mi(a.reshape(len(a), -1), b.reshape(len(b), -1), k=k, base=np.e))


def gaussian_channel_bound(cov_eigenvalues: np.ndarray, sigma: float) -> float:
    """Upper bound (nats) on I(X; X + N), N ~ N(0, sigma^2 I), for X of covariance with these eigenvalues.

    Equal to the mutual information when X is itself Gaussian: 1/2 sum_i log(1 + lambda_i / sigma^2).
    ``sigma = 0`` gives ``inf`` (a noiseless channel of a continuous input).
    """
    lam = np.clip(np.asarray(cov_eigenvalues, dtype=np.float64), 0.0, None)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma!r}")
    if sigma == 0:
        return float("inf")
    return float(0.5 * np.sum(np.log1p(lam / sigma**2)))


def _pca(fit: np.ndarray, dims: int, seed: int):
    from sklearn.decomposition import PCA

    dims = min(dims, fit.shape[0], fit.shape[1])
    return PCA(n_components=dims, random_state=seed).fit(fit)


def mutual_information(defense: Defense, task: Task, config: MIConfig | None = None) -> dict[str, Any]:
    """Estimate I(X; X') for ``defense`` on ``task`` (see the module docstring for every number).

    Returns ``ksg`` and ``ksg_identity`` (nats), ``ksg_normalised``, ``gaussian_bound`` (full and PCA,
    or ``None`` where the channel is not known to be Gaussian), the settings and the warning label.
    """
    config = config or MIConfig()
    seed_everything(config.seed + 17)
    fit = _subset(task.train, config.pca_fit_size, config.seed)
    te = _subset(task.test, config.samples, config.seed)
    x_fit = fit.x.reshape(len(fit), -1).numpy().astype(np.float64)
    m_fit = _messages(defense, fit, config.exposure).reshape(len(fit), -1).numpy().astype(np.float64)
    x_te = te.x.reshape(len(te), -1).numpy().astype(np.float64)
    m_te = _messages(defense, te, config.exposure).reshape(len(te), -1).numpy().astype(np.float64)
    pca_x, pca_m = _pca(x_fit, config.dims, config.seed), _pca(m_fit, config.dims, config.seed)
    a, b = pca_x.transform(x_te), pca_m.transform(m_te)
    # whiten each component: KSG uses the max-norm, so components on wildly different scales would be
    # dominated by the largest (MI itself is invariant to this per-coordinate rescaling)
    a = a / np.maximum(a.std(0), 1e-12)
    b = b / np.maximum(b.std(0), 1e-12)
    est = ksg_mi(a, b, k=config.k, seed=config.seed)
    ident = ksg_mi(a, a, k=config.k, seed=config.seed)
    out: dict[str, Any] = {
        "ksg": est,
        "ksg_identity": ident,
        "ksg_identity_closed_form": float(digamma(len(a)) - digamma(config.k)),
        "ksg_normalised": est / ident if ident > 0 else None,
        "unit": "nats",
        "estimator": "KSG (npeet_plus.mi, max-norm k-NN) on PCA-reduced, per-component standardised X and X'",
        "reduction": f"PCA to {pca_x.n_components_} dims, fitted on {len(fit)} train records (X clean, X' obfuscated); {len(te)} test pairs",
        "pca_explained_variance_x": float(np.sum(pca_x.explained_variance_ratio_)),
        "pca_explained_variance_message": float(np.sum(pca_m.explained_variance_ratio_)),
        "warning": KSG_WARNING,
        "gaussian_bound": None,
        "config": config.to_dict(),
    }
    sigma = getattr(defense, "sigma", None)
    if defense.name == "gaussian" and isinstance(sigma, float):
        eig_full = np.linalg.eigvalsh(np.cov(x_fit, rowvar=False))
        out["gaussian_bound"] = {
            "full": gaussian_channel_bound(eig_full, sigma),
            "pca": gaussian_channel_bound(pca_x.explained_variance_, sigma),
            "sigma": sigma,
            "note": "upper bound 1/2 sum log(1 + lambda_i / sigma^2) over eigenvalues of Cov(X) (train split); "
            "'pca' restricts to the same principal components as the KSG estimate",
        }
    return out


__all__ = ["KSG_WARNING", "MIConfig", "gaussian_channel_bound", "ksg_mi", "mutual_information"]
