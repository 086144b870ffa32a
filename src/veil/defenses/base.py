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
  One training loop (:mod:`veil.training.loop`) runs every method.
"""

from __future__ import annotations

import abc
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

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        if len(input_shape) != 3 or any(int(s) <= 0 for s in input_shape):
            raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape!r}")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self._stage: str | None = None

    # ----------------------------------------------------------------------------- the contract
    @abc.abstractmethod
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Obfuscate a batch on the client. (B, *input_shape) -> (B, *output_shape). Stochastic."""

    def decode(self, m: torch.Tensor) -> torch.Tensor:
        """Server-side step from the transmitted message to the task model's input. Identity here."""
        return m

    def penalty(self) -> torch.Tensor:
        """Privacy term (already multiplied by the knob) for the last ``encode``; added to the loss."""
        return torch.zeros((), device=self._device())

    def output_shape(self) -> tuple[int, ...]:
        """Shape of one decoded record (what the server model consumes). Default: the input shape."""
        return self.input_shape

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
        (sample-and-hold: its window length) do it here. Default: nothing.
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
