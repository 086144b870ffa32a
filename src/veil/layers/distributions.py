"""Output distributions of a stochastic conditional noise layer (seed 000/001 §1.1.3, Eq. 7).

A layer's kernels produce *raw* parameters ``(B, P, *out)`` (``P`` = :attr:`Distribution.num_params`).
A distribution turns them into constrained parameters (:meth:`Distribution.constrain`), draws a
reparameterised, differentiable sample (:meth:`Distribution.rsample`) and gives, per output element,
the KL divergence of q(h | x) from a fixed prior (:meth:`Distribution.kl`), the privacy charge of the
variational information bottleneck (Alemi et al., ICLR 2017): E_x KL(q(h|x) || r(h)) >= I(X; H).

Constraints that keep the privacy knob meaningful (docs/design.md, "Pitfalls"):

* scales stay positive: ``scale = softplus(raw) + min_scale``;
* locations and logits are bounded: ``loc = bound * tanh(raw / bound)``, so a layer cannot escape its
  noise by growing the signal.

Everything here runs on the client.
"""

from __future__ import annotations

import abc
import math
from typing import Callable

import torch
from torch import distributions as D
from torch.nn import functional as F


class Distribution(abc.ABC):
    """A reparameterisable output distribution with a fixed prior (the VIB marginal r(h))."""

    #: Registry name.
    name: str = ""
    #: Number of raw parameter maps the kernels must produce per output element.
    num_params: int = 1

    def __init__(self, *, bound: float = 3.0, min_scale: float = 1e-2, temperature: float = 0.5, trials: int = 1) -> None:
        if not bound > 0:
            raise ValueError(f"bound must be > 0, got {bound!r}")
        if not min_scale >= 0:
            raise ValueError(f"min_scale must be >= 0, got {min_scale!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if int(trials) < 1:
            raise ValueError(f"trials must be >= 1, got {trials!r}")
        self.bound = float(bound)
        self.min_scale = float(min_scale)
        self.temperature = float(temperature)
        self.trials = int(trials)

    def split(self, raw: torch.Tensor) -> list[torch.Tensor]:
        """(B, P, *out) -> P tensors (B, *out); checks P."""
        if raw.dim() < 2 or raw.shape[1] != self.num_params:
            raise ValueError(f"{self.name}: raw parameters must have shape (B, {self.num_params}, ...), got {tuple(raw.shape)}")
        return list(raw.unbind(1))

    @abc.abstractmethod
    def constrain(self, raw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Raw kernel outputs (B, P, *out) -> constrained parameters, each (B, *out)."""

    @abc.abstractmethod
    def rsample(self, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """A reparameterised sample (B, *out), differentiable w.r.t. ``params``."""

    @abc.abstractmethod
    def kl(self, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """KL(q(h|x) || prior) per output element, (B, *out), in nats (>= 0)."""

    def noise_scale(self, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """A per-element measure of the injected noise (the scale, or the sample's std for discrete)."""
        return params[-1]

    def _loc(self, raw: torch.Tensor) -> torch.Tensor:
        return self.bound * torch.tanh(raw / self.bound)

    def _scale(self, raw: torch.Tensor) -> torch.Tensor:
        return F.softplus(raw) + self.min_scale


class _LocationScale(Distribution):
    """Two raw maps: a bounded location and a positive scale."""

    num_params = 2

    def constrain(self, raw):
        loc, scale = self.split(raw)
        return self._loc(loc), self._scale(scale)


class Gaussian(_LocationScale):
    """h = mu + sigma * eps, eps ~ N(0, 1) (Eq. 7 of seed 000). Prior N(0, 1):
    KL = 0.5 (mu^2 + sigma^2 - 1) - log sigma."""

    name = "gaussian"
    num_params = 2

    def rsample(self, params):
        loc, scale = params
        return loc + scale * torch.randn_like(loc)

    def kl(self, params):
        loc, scale = params
        return 0.5 * (loc.square() + scale.square() - 1.0) - torch.log(scale)


class Laplace(_LocationScale):
    """h = mu + b * l, l ~ Laplace(0, 1). Prior Laplace(0, 1):
    KL = -log b + |mu| + b exp(-|mu| / b) - 1."""

    name = "laplace"
    num_params = 2

    def rsample(self, params):
        loc, scale = params
        return D.Laplace(loc, scale).rsample()

    def kl(self, params):
        loc, scale = params
        a = loc.abs()
        return -torch.log(scale) + a + scale * torch.exp(-a / scale) - 1.0

    def noise_scale(self, params):
        return params[1] * math.sqrt(2.0)  # std of Laplace(mu, b)


class Bernoulli(Distribution):
    """Binomial(trials, p) through ``trials`` relaxed Bernoulli draws (torch RelaxedBernoulli, a
    Concrete/Gumbel-sigmoid sample at ``temperature``), summed. One raw map: the logit of p (bounded).
    Prior Binomial(trials, 1/2): KL = trials * (p log 2p + (1 - p) log 2(1 - p)). ``trials=1`` is Bernoulli."""

    name = "bernoulli"
    num_params = 1

    def constrain(self, raw):
        (logit,) = self.split(raw)
        return (self._loc(logit),)

    def rsample(self, params):
        (logit,) = params
        t = torch.tensor(self.temperature, dtype=logit.dtype, device=logit.device)
        draws = D.RelaxedBernoulli(t, logits=logit.expand(self.trials, *logit.shape)).rsample()
        return draws.sum(0)

    def kl(self, params):
        (logit,) = params
        p = torch.sigmoid(logit)
        logp, log1mp = F.logsigmoid(logit), F.logsigmoid(-logit)
        return self.trials * (p * (logp + math.log(2.0)) + (1 - p) * (log1mp + math.log(2.0)))

    def noise_scale(self, params):
        p = torch.sigmoid(params[0])
        return torch.sqrt(self.trials * p * (1 - p))


class Categorical(Distribution):
    """Multinomial(trials, softmax(logits)) over the *channel* axis (dim 1 of the sample) through
    ``trials`` relaxed one-hot draws (torch RelaxedOneHotCategorical), summed; ``trials=1`` is a
    relaxed one-hot categorical sample. Prior: uniform over the K channels,
    KL = trials * (sum_k p_k log p_k + log K), reported per element as that value / K."""

    name = "categorical"
    num_params = 1

    def constrain(self, raw):
        (logit,) = self.split(raw)
        if logit.dim() < 2 or logit.shape[1] < 2:
            raise ValueError(f"categorical needs at least 2 channels to choose among, got sample shape {tuple(logit.shape)}")
        return (self._loc(logit),)

    def rsample(self, params):
        (logit,) = params
        moved = logit.movedim(1, -1)  # categories last, as torch.distributions expects
        t = torch.tensor(self.temperature, dtype=logit.dtype, device=logit.device)
        draws = D.RelaxedOneHotCategorical(t, logits=moved.expand(self.trials, *moved.shape)).rsample()
        return draws.sum(0).movedim(-1, 1)

    def kl(self, params):
        (logit,) = params
        logp = F.log_softmax(logit, dim=1)
        k = logit.shape[1]
        per_record = self.trials * ((logp.exp() * logp).sum(1, keepdim=True) + math.log(k))
        return (per_record / k).expand_as(logit)

    def noise_scale(self, params):
        p = torch.softmax(params[0], dim=1)
        return torch.sqrt(self.trials * p * (1 - p))


_DISTRIBUTIONS: dict[str, Callable[..., Distribution]] = {
    "gaussian": Gaussian,
    "laplace": Laplace,
    "bernoulli": Bernoulli,
    "binomial": Bernoulli,  # with trials > 1
    "categorical": Categorical,
    "multinomial": Categorical,  # with trials > 1
}


def list_distributions() -> list[str]:
    """Names accepted by :func:`create_distribution`."""
    return sorted(_DISTRIBUTIONS)


def create_distribution(name: str, **options: float) -> Distribution:
    """Distribution ``name`` (``gaussian``, ``laplace``, ``bernoulli``/``binomial``,
    ``categorical``/``multinomial``) with ``bound``, ``min_scale``, ``temperature``, ``trials``."""
    if name not in _DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {name!r}; valid: {', '.join(list_distributions())}")
    dist = _DISTRIBUTIONS[name](**options)
    dist.name = name
    return dist
