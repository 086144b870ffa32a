"""The one obfuscation interface every method in veil implements.

A defense is split at the trust boundary:

* ``encode(x, y=None)`` runs on the client; its output is *everything* that leaves the client, so
  attackers are trained on exactly this tensor. ``y`` is given only at the *training* point of exposure
  (the data owner knows the label and uses hard selection); ``y=None`` is the *inference* path.
* ``decode(m)`` runs on the server before the task model (identity except for methods that transmit
  something other than features, e.g. SVD coefficients).
* ``penalty()`` is the privacy term added to the task loss for the last ``encode`` call, already
  weighted by the method's knob.
* ``knob`` names the constructor argument that moves the privacy/utility trade-off, and
  ``knob_direction`` says which way is more private, so one sweep serves all methods.
* ``stages()`` lists the training stages; ``set_stage`` chooses which parameters train in each.
  One training loop (:func:`veil.training.loop.fit`, its epochs in :mod:`veil.training.epochs`) runs
  every method.
"""

from __future__ import annotations

import abc
import math
import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class Stage:
    """One phase of training a defense together with the server model.

    Attributes:
        name: Stage name, e.g. ``"joint"``, ``"hard"``, ``"soft"``.
        use_labels: Whether ``encode`` receives the primary label in this stage (hard selection).
        train_model: Whether the server model's parameters are updated in this stage.
        epoch_share: Fraction of the configured epochs spent in this stage (shares are normalised).
    """

    name: str
    use_labels: bool = False
    train_model: bool = True
    epoch_share: float = 1.0


OPTIMIZERS = ("adam", "sgd")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a defense's paper trains it (optimizer, learning rate, schedule); the one loop honours it.

    A defense without a recipe (``Defense.recipe = None``) trains with the run's own settings
    (``TrainConfig.lr`` and ``lr_schedule``, Adam). A recipe replaces those for every stage of that defense.

    Attributes:
        optimizer: ``"adam"`` or ``"sgd"``.
        lr: Initial learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 weight decay.
        schedule: ``"constant"`` or ``"cosine"`` (annealed to 0 over each stage's steps).
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")


class Defense(nn.Module, abc.ABC):
    """Base class of every obfuscation method (client-side ``encode``, server-side ``decode``).

    Subclasses take keyword-only constructor arguments; ``input_shape`` (C, H, W) and ``num_classes``
    (number of primary classes) are always passed by :func:`veil.defenses.create_defense`.
    """

    #: Registry name, e.g. ``"scnl"``.
    name: ClassVar[str] = ""
    #: Constructor argument that moves the trade-off (``"lambda_"``, ``"sigma"``, ``"epsilon"``, ...).
    knob: ClassVar[str] = ""
    #: +1 if a larger knob means more privacy (more noise), -1 if a smaller one does.
    knob_direction: ClassVar[int] = 1
    #: The constructor option that sizes the client network (``selector_width``, ``hidden``, ...), which
    #: ``--client-budget`` sets (:mod:`veil.defenses.budget`); "" where there is no client network to size.
    budget_option: ClassVar[str] = ""
    #: Whether ``encode`` takes ``mask=`` (B, 1, H, W): the sensitive region, where the data owner knows it
    #: (region selection). :meth:`encode_batch` hands it over; other defenses never see a mask.
    uses_mask: ClassVar[bool] = False
    #: Whether ``encode`` takes ``secret=`` (B,) int64: the secret's label where the data owner knows it, -1
    #: elsewhere (known-secret mode, ``uses = "y,z"``). The training loop hands it over for a fixed
    #: ``secret_fraction`` of the training records; it shapes the obfuscator's training, never the message.
    uses_secret: ClassVar[bool] = False
    #: Share of the training records whose secret the data owner gives such a defense (0 for all others).
    secret_fraction: float = 0.0
    #: What the client-side obfuscator learns from, beyond the records: ``"y"`` (the primary labels, through
    #: the task loss), ``"y,mask"`` (also the data owner's region masks), ``"mask"``, ``"y,z"`` (also the
    #: secret's labels for some records) or ``"none"`` (nothing is learnt on the client). Every result row
    #: carries it: a method that uses masks is compared with redaction, one that uses y with ``local``.
    uses: ClassVar[str] = "y"
    #: Whether the true region mask reaches ``encode`` at every exposure, inference included (a bound such as
    #: ``redact-oracle``, not a deployable client): callers hand it over through :meth:`mask_for`.
    oracle_mask: ClassVar[bool] = False
    #: The training recipe the method's paper prescribes (``None``: the run's own lr and schedule, Adam).
    recipe: ClassVar[Recipe | None] = None

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        if len(input_shape) != 3 or any(int(s) <= 0 for s in input_shape):
            raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape!r}")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self._stage: str | None = None
        # empty and not saved: it moves with ``.to(device)``, so a defense without parameters or buffers
        # of its own (``none``, ``gaussian``) still knows its device for the tensors it makes (``penalty``)
        self.register_buffer("_device_marker", torch.empty(0), persistent=False)

    # ----------------------------------------------------------------------------- the contract
    @abc.abstractmethod
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Obfuscate a batch on the client. (B, *input_shape) -> (B, *output_shape). Stochastic."""

    def encode_batch(
        self, x: torch.Tensor, y: torch.Tensor | None = None, mask: torch.Tensor | None = None, secret: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``encode(x, y)``, plus the region ``mask`` for defenses that use one (:attr:`uses_mask`) and the
        known secrets for those that use them (:attr:`uses_secret`).

        The one place the training loop, the attacks and the deployment path call: a mask or a secret is
        side information the data owner holds at the training exposure, never part of the message.
        """
        extra: dict[str, torch.Tensor] = {}
        if self.uses_mask and mask is not None:
            extra["mask"] = mask
        if self.uses_secret and secret is not None:
            extra["secret"] = secret
        return self.encode(x, y, **extra)  # type: ignore[call-arg]

    def mask_for(self, labelled: bool, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The region ``mask`` a caller hands to :meth:`encode_batch`: where the data owner knows the label
        (the training exposure), or always for an oracle (:attr:`oracle_mask`); else None."""
        return mask if (labelled or self.oracle_mask) else None

    def probe(self, x: torch.Tensor) -> torch.Tensor:
        """``encode`` on the inference path, for measuring its cost and message shape: an oracle gets an
        empty region mask (it is handed the true one at every exposure)."""
        mask = torch.zeros(len(x), 1, *x.shape[2:], device=x.device) if self.oracle_mask else None
        return self.encode_batch(x, None, mask)

    def decode(self, m: torch.Tensor) -> torch.Tensor:
        """Server-side step from the transmitted message to the task model's input. Identity here."""
        return m

    def penalty(self) -> torch.Tensor:
        """Privacy term (already multiplied by the knob) for the last ``encode``; added to the loss."""
        return torch.zeros((), device=self._device())

    def output_shape(self) -> tuple[int, ...]:
        """Shape of one decoded record (what the server model consumes). Default: the input shape."""
        return self.input_shape

    def client_parameter_count(self) -> int:
        """Numbers the client must hold to run ``encode`` (for the client-cost report).

        Default: every parameter of the defense. Methods whose defense object also holds a server-side
        part (SVD's first server layer W, applied in ``decode``) count only the client's share.
        """
        return sum(p.numel() for p in self.parameters())

    def server_parameter_count(self) -> int:
        """Numbers of this defense that live on the server (applied in ``decode``); 0 by default."""
        return 0

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-serialisable) that rebuild this defense."""
        return {}

    def stages(self) -> list[Stage]:
        """Training stages, in order. Default: one joint stage without labels (the inference path)."""
        return [Stage("joint")]

    def set_stage(self, name: str) -> None:
        """Enter a stage; subclasses choose which of their parameters train (``requires_grad``)."""
        valid = [s.name for s in self.stages()]
        if name not in valid:
            raise ValueError(f"unknown stage {name!r} for defense {self.name!r}; valid: {valid}")
        self._stage = name

    def setup(self, model: nn.Module, loader: Any) -> None:
        """Hook called at the start of every stage with the server model and the training loader.

        Methods that derive something from the server model (SVD: its first layer) or from data
        (sample-and-hold: its window length) do it here, and keep the result in buffers: a stage resumed
        from a checkpoint mid-way does not call ``setup`` again (the partly trained model would give another
        answer), it restores the buffers. Default: nothing.
        """

    # ----------------------------------------------------------------------------- helpers
    @property
    def stage(self) -> str | None:
        return self._stage

    def knob_value(self) -> float | None:
        """Current value of the knob (read from :meth:`config`)."""
        return None if not self.knob else self.config().get(self.knob)

    def check_input(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Validate a batch at the client boundary; raise ``ValueError`` naming the problem."""
        check_batch(x, y, self.input_shape, self.num_classes)

    def _device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")


def number_option(key: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """``value`` as a float if it is a finite number in [lo, hi] ((lo, hi] with ``lo_open``); else ``ValueError`` naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (lo < value if lo_open else lo <= value) or value > hi:
        raise ValueError(f"{key} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")
    return float(value)


def check_secret(secret: torch.Tensor, batch: int, classes: int) -> None:
    """Raise ``ValueError`` unless ``secret`` is (batch,) integer labels in [0, classes), -1 where unknown
    (known-secret mode: the data owner's secret labels for some training records)."""
    if not isinstance(secret, torch.Tensor) or secret.dtype not in (torch.int64, torch.int32) or tuple(secret.shape) != (batch,):
        raise ValueError(f"secret must be an integer tensor of shape ({batch},), got {getattr(secret, 'dtype', type(secret))} {tuple(getattr(secret, 'shape', ()))}")
    if secret.numel() and (int(secret.min()) < -1 or int(secret.max()) >= classes):
        raise ValueError(f"secret labels must lie in [0, {classes - 1}] (-1: unknown), got range [{int(secret.min())}, {int(secret.max())}]")


def check_batch(
    x: torch.Tensor, y: torch.Tensor | None, input_shape: tuple[int, ...], num_classes: int
) -> None:
    """Raise ``ValueError`` if ``x``/``y`` do not match what a defense or model expects."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"x must have shape (B, {', '.join(map(str, input_shape))}), got {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"y must be an integer tensor of labels, got {getattr(y, 'dtype', type(y))}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes - 1}], got range [{int(y.min())}, {int(y.max())}]"
            )
