"""Unsupervised SVD obfuscation for split inference (seed 003, Samragh et al.: §4, Theorem 1, §4.3).

The client runs a small model ``M_c`` (one conv block) to get a feature vector ``z`` in R^n, then keeps
only the part of ``z`` that the *first server layer* ``W`` (m x n, a fully connected layer) can see:

* **distortion-free** (Definition 2, Eq. 9): drop the null content of ``W``; ``W z' = W z`` exactly.
* **distortion-bounded** (Theorem 1, Eq. 8): also shrink/zero the coefficients of the smallest singular
  values, as long as ``||W z - W z'|| <= epsilon``.

Only the coefficients ``alpha'_k = v_k^T z`` (Eq. 7) of the kept directions leave the client; the server
holds the basis ``{v_k}`` and rebuilds ``z' = sum_k alpha'_k v_k`` in ``decode`` before applying ``W``.
Communication shrinks by ``m'/n`` (§4.3).

Who owns what. ``W`` runs on the server but its SVD defines the client's projection, so the defense owns
it (``server_layer``; ``decode`` applies it, then ReLU, and reshapes to :meth:`output_shape` for the
server model). Training follows §4.3 in two stages of the one veil loop:

1. ``pretrain``: client block, ``W`` and server model train together on the plain feature ``z`` (this is
   the service provider training on its own data; nothing is obfuscated yet), with the decorrelation
   term ``L_deCov`` of §4.3 (Cogswell et al.) on ``z`` so the coefficients are closer to Theorem 1's
   uncorrelated assumption.
2. ``finetune``: on entering, the SVD of the (now frozen) ``W`` is computed and stored as buffers; the
   obfuscation is on, and in training mode a random share of the signal content is removed from
   ``removal_prob`` of the batches ("various fractions of the signal content are removed", §4.3; m' drawn
   log-uniformly in [1, r]), so the server model is robust to the client's choice of ``m'``. The client
   block keeps training.

Not implemented from §4.3: forcing ``z`` towards a Gaussian with a VAE; the removal of signal content is
applied at the split layer only (not "one layer at a time" across every layer of the network).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from veil.defenses.base import Defense, Stage


# ------------------------------------------------------------------------------------------ pure functions
def svd_basis(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vectors and singular values of ``W`` (Definition 1).

    Args:
        weight: (m, n) first-layer weight.

    Returns:
        basis (r, n) with rows ``v_k`` sorted by decreasing singular value, and ``s`` (r,), r = min(m, n).
    """
    _, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return vh.to(weight.dtype), s.to(weight.dtype)


def theorem1(alpha: torch.Tensor, s: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distortion-bounded coefficients of Theorem 1 (Eq. 8), one budget per record.

    ``alpha'_k = alpha_k`` for ``k < m'``, ``alpha_k - gamma sign(alpha_k)`` for ``k = m'``, 0 beyond, where
    ``m'`` is the smallest k with ``eps_k = sqrt(sum_{i>k} alpha_i^2 s_i^2) <= eps`` and
    ``gamma = sqrt(eps^2 - eps_{m'}^2) / s_{m'}``; then ``||W(z - z')|| = eps`` exactly (Lemma 4), or
    ``||W z|| < eps`` when ``m' = 0`` (everything dropped).

    Args:
        alpha: (B, r) coefficients sorted by decreasing singular value.
        s: (r,) singular values.
        eps: (B,) absolute distortion budgets (>= 0).

    Returns:
        alpha' (B, r) and m' (B,) int64 (number of non-zero coefficients that are transmitted).
    """
    b, r = alpha.shape
    with torch.no_grad():
        e = (alpha.detach() * s) ** 2  # (B, r) distortion of dropping each coefficient
        tail = torch.flip(torch.cumsum(torch.flip(e, [1]), 1), [1])  # tail[:, j] = sum_{i >= j} e_i
        eps_sq_k = torch.cat([tail, tail.new_zeros(b, 1)], 1)  # (B, r+1): eps_k^2, k = 0..r
        ok = eps_sq_k <= (eps.detach() ** 2)[:, None] * (1 + 1e-9) + 1e-30
        m_prime = ok.to(torch.int64).argmax(1)  # first k that meets the budget (k = r always does)
        idx = torch.arange(r, device=alpha.device)
        keep = idx[None, :] < (m_prime[:, None] - 1)  # 0-based indices below m'-1 are kept as they are
        at = idx[None, :] == (m_prime[:, None] - 1)  # the m'-th coefficient is shrunk
        rem = (eps.detach() ** 2 - eps_sq_k.gather(1, m_prime[:, None]).squeeze(1)).clamp(min=0)
        s_m = s[(m_prime - 1).clamp(min=0)]
        gamma = torch.where(m_prime > 0, rem.sqrt() / s_m.clamp(min=1e-30), torch.zeros_like(rem))
    shrunk = alpha - gamma[:, None] * torch.sign(alpha.detach())
    out = torch.where(keep, alpha, torch.where(at, shrunk, torch.zeros_like(alpha)))
    return out, m_prime


def decov_penalty(z: torch.Tensor) -> torch.Tensor:
    """``L_deCov = 1/2 (||C||_F^2 - ||diag(C)||_2^2)`` (§4.3, Cogswell et al. 2015). (B, n) -> scalar."""
    zc = z - z.mean(0, keepdim=True)
    c = zc.T @ zc / max(1, z.shape[0])  # (n, n) covariance of activation pairs
    return 0.5 * (c.pow(2).sum() - torch.diagonal(c).pow(2).sum())


# ------------------------------------------------------------------------------------------ the defense
class SVDObfuscation(Defense):
    """Distortion-free / top-m' SVD obfuscation of the split feature (seed 003 §4.2, Eq. 7-9).

    Client: conv block ``M_c`` (B, C, H, W) -> z (B, n), then ``alpha = V_{m'}^T z`` (B, m'): only these
    ``m'`` coefficients leave the client. Server (``decode``): ``z' = V_{m'} alpha`` (B, n), then its first
    layer ``relu(W z' + b)`` reshaped to ``output_shape()`` = (server_channels, H', W'), then the server model.

    Knob: ``keep``, the fraction of the signal content kept, ``m' = max(1, round(keep * r))`` with r =
    rank(W) = min(m, n). ``keep = 1`` is distortion-free (Eq. 9: the server layer's output is unchanged);
    **smaller is more private** (less content, lower entropy of z') and less accurate. Communication ratio
    ``m'/n`` (§4.3): :meth:`communication_ratio`.

    Deterministic by design: ``g`` is a deterministic function of z (§4.1 uses ``H(z'|z) = 0``), so
    ``deterministic = True`` and the contract's noise test is skipped. Random removal of signal content
    happens only while training (``finetune`` stage, training mode).

    Args:
        keep: Fraction in (0, 1] of the r signal directions kept (knob).
        client_channels: Channels of the client conv block (0: the split is at the input, z = x).
        server_channels: Channels of the first server layer's output map (m = server_channels*H'*W').
        decorrelation: Weight of ``L_deCov`` on z while the client trains (0 turns it off).
        removal_prob: Share of training batches (``finetune``) whose kept content is drawn at random.
    """

    name = "svd"
    knob = "keep"
    knob_direction = -1
    budget_option = "client_channels"
    deterministic = True

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        keep: float = 1.0,
        client_channels: int = 4,
        server_channels: int = 4,
        decorrelation: float = 1e-3,
        removal_prob: float = 0.5,
    ) -> None:
        super().__init__(input_shape=input_shape, num_classes=num_classes)
        if not (0 < float(keep) <= 1):
            raise ValueError(f"keep must be a fraction of the signal content in (0, 1], got {keep!r}")
        if int(client_channels) < 0 or int(client_channels) != client_channels:
            raise ValueError(f"client_channels must be an integer >= 0, got {client_channels!r}")
        if int(server_channels) < 1 or int(server_channels) != server_channels:
            raise ValueError(f"server_channels must be an integer >= 1, got {server_channels!r}")
        if not (float(decorrelation) >= 0):
            raise ValueError(f"decorrelation must be >= 0, got {decorrelation!r}")
        if not (0 <= float(removal_prob) <= 1):
            raise ValueError(f"removal_prob must lie in [0, 1], got {removal_prob!r}")
        self.keep = float(keep)
        self.client_channels = int(client_channels)
        self.server_channels = int(server_channels)
        self.decorrelation = float(decorrelation)
        self.removal_prob = float(removal_prob)

        c, h, w = self.input_shape
        if self.client_channels:
            pool = 2 if min(h, w) >= 4 else 1
            self.client = nn.Sequential(
                nn.Conv2d(c, self.client_channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(pool) if pool == 2 else nn.Identity()
            )
            self.feature_shape = (self.client_channels, h // pool, w // pool)
        else:
            self.client = nn.Identity()
            self.feature_shape = self.input_shape
        self.n = math.prod(self.feature_shape)
        self._out_shape = (self.server_channels, max(2, h // 4), max(2, w // 4))
        self.m = math.prod(self._out_shape)
        self.rank = min(self.m, self.n)
        self.server_layer = nn.Linear(self.n, self.m)  # W: runs on the server (decode)
        # V^T rows and singular values of W; the server keeps them, the client needs the first m' rows
        self.register_buffer("basis", torch.zeros(self.rank, self.n))
        self.register_buffer("singular_values", torch.zeros(self.rank))
        self.refresh_basis()
        self._last_z: torch.Tensor | None = None
        self.last_kept: torch.Tensor | None = None  # (B,) coefficients sent per record by the last encode

    # -------------------------------------------------------------------------------- helpers
    def refresh_basis(self) -> None:
        """Recompute the SVD of the first server layer (done on entering ``finetune``)."""
        vh, s = svd_basis(self.server_layer.weight)
        self.basis.copy_(vh)
        self.singular_values.copy_(s)

    def kept(self) -> int:
        """m': number of coefficients sent per record at the current knob."""
        return max(1, min(self.rank, round(self.keep * self.rank)))

    def communication_ratio(self) -> float:
        """Numbers sent per record over the raw feature size: ``m'/n`` (§4.3)."""
        if self.last_kept is not None:
            return float(self.last_kept.float().mean()) / self.n
        return self.kept() / self.n

    def client_parameter_count(self) -> int:
        """The client holds its conv block and the m' basis rows it projects on (not W: that is the server's)."""
        return sum(p.numel() for p in self.client.parameters()) + self.kept() * self.n

    def server_parameter_count(self) -> int:
        """W and its bias (the first server layer, applied in ``decode``)."""
        return sum(p.numel() for p in self.server_layer.parameters())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Client model ``M_c``: (B, C, H, W) -> z (B, n)."""
        return self.client(x).flatten(1)

    @property
    def _raw(self) -> bool:
        # the pretrain stage sends z itself: the provider training on its own data, before any SVD exists
        return self._stage == "pretrain"

    # -------------------------------------------------------------------------------- the contract
    def stages(self) -> list[Stage]:
        return [Stage("pretrain", epoch_share=0.5), Stage("finetune", epoch_share=0.5)]

    def set_stage(self, name: str) -> None:
        super().set_stage(name)
        if name == "finetune":
            # W is frozen from here on, so its SVD (the client's basis) stays valid; bias may still adapt
            self.refresh_basis()
            self.server_layer.weight.requires_grad_(False)
        else:
            self.server_layer.weight.requires_grad_(True)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Client: (B, C, H, W) -> (B, m') coefficients ``alpha_k = v_k^T z`` (Eq. 7), all that is sent.

        In the ``pretrain`` stage only: (B, n), the plain feature z (server-side training, no SVD yet).
        """
        self.check_input(x, y)
        z = self.features(x)  # (B, n)
        self._last_z = z if (self.training and torch.is_grad_enabled() and self.decorrelation > 0) else None
        if self._raw:
            self.last_kept = torch.full((len(x),), self.n, dtype=torch.int64, device=z.device)
            return z
        return self._obfuscate(z)

    def _obfuscate(self, z: torch.Tensor) -> torch.Tensor:
        k = self.kept()
        if self.training and self._stage == "finetune" and self.removal_prob > 0:
            if float(torch.rand(())) < self.removal_prob:  # remove a random share of the signal content
                # log-uniform m' in [1, r]: small m' (the private settings) are trained as often as large
                k = max(1, min(self.rank, round(math.exp(float(torch.rand(())) * math.log(self.rank)))))
        self.last_kept = torch.full((len(z),), k, dtype=torch.int64, device=z.device)
        return z @ self.basis[:k].T  # (B, m'): the client computes only the m' coefficients it sends

    def decode(self, m: torch.Tensor) -> torch.Tensor:
        """Server: coefficients (B, m') -> ``relu(W z' + b)`` (B, *output_shape), ``z' = V_{m'} alpha``."""
        width = self.n if self._raw else self.rank
        if m.dim() != 2 or m.shape[1] > width or m.shape[1] < 1:
            raise ValueError(f"message must have shape (B, k) with 1 <= k <= {width}, got {tuple(m.shape)}")
        z = m if self._raw else m @ self.basis[: m.shape[1]]  # (B, n): z' in the original coordinates
        return F.relu(self.server_layer(z)).view(len(m), *self._out_shape)

    def penalty(self) -> torch.Tensor:
        if self._last_z is None:
            return torch.zeros((), device=self._device())
        return self.decorrelation * decov_penalty(self._last_z)

    def output_shape(self) -> tuple[int, ...]:
        return self._out_shape

    def config(self) -> dict[str, Any]:
        return {
            "keep": self.keep,
            "client_channels": self.client_channels,
            "server_channels": self.server_channels,
            "decorrelation": self.decorrelation,
            "removal_prob": self.removal_prob,
        }


class SVDBoundedObfuscation(SVDObfuscation):
    """Distortion-bounded SVD obfuscation: Theorem 1 (Eq. 8) per record, budget relative to ``||W z||``.

    Client: conv block -> z (B, n) -> ``alpha = V^T z`` (B, r) -> Theorem 1 with the record's own budget
    ``eps = epsilon * ||W z||`` -> (B, r) message whose first m' entries are non-zero and the rest are 0
    (only the m' non-zero coefficients need to be sent; :attr:`last_kept` holds m' per record). Server:
    as :class:`SVDObfuscation` (``||W z' - W z|| <= eps`` is guaranteed, Lemma 4).

    Knob: ``epsilon`` in [0, 1], the distortion budget as a share of the record's own first-layer output
    norm; 0 = distortion-free, 1 = nothing kept. **Larger is more private** (fewer, smaller coefficients)
    and less accurate. Theorem 1 states an absolute budget; making it relative keeps one knob meaningful
    across records and across trained weights (the bound holds per record with that record's ``eps``).
    Deterministic by design (see :class:`SVDObfuscation`).
    """

    name = "svd-bounded"
    knob = "epsilon"
    knob_direction = 1
    budget_option = "client_channels"

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        epsilon: float = 0.3,
        client_channels: int = 4,
        server_channels: int = 4,
        decorrelation: float = 1e-3,
        removal_prob: float = 0.5,
    ) -> None:
        if not (0 <= float(epsilon) <= 1):
            raise ValueError(f"epsilon must be a relative budget in [0, 1], got {epsilon!r}")
        super().__init__(
            input_shape=input_shape,
            num_classes=num_classes,
            keep=1.0,
            client_channels=client_channels,
            server_channels=server_channels,
            decorrelation=decorrelation,
            removal_prob=removal_prob,
        )
        self.epsilon = float(epsilon)

    def client_parameter_count(self) -> int:
        """Conv block and all r basis rows (Theorem 1 needs every coefficient to pick m' per record)."""
        return sum(p.numel() for p in self.client.parameters()) + self.rank * self.n

    def budget(self, alpha: torch.Tensor) -> torch.Tensor:
        """Absolute budget per record: ``epsilon * ||W z_S||`` = ``epsilon * ||s * alpha||``. (B, r) -> (B,)."""
        return self.epsilon * (alpha.detach() * self.singular_values).norm(dim=1)

    def _obfuscate(self, z: torch.Tensor) -> torch.Tensor:
        alpha = z @ self.basis.T  # (B, r), Eq. 7
        eps = self.budget(alpha)
        if self.training and self._stage == "finetune" and self.removal_prob > 0:
            if float(torch.rand(())) < self.removal_prob:
                eps = float(torch.rand(())) * (alpha.detach() * self.singular_values).norm(dim=1)
        out, m_prime = theorem1(alpha, self.singular_values, eps)
        self.last_kept = m_prime
        return out

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        del cfg["keep"]
        return {"epsilon": self.epsilon, **cfg}
