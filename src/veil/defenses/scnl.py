"""The SCNL defense: a stochastic conditional noise layer plus a selection layer on the client.

Client (``encode``): ``h ~ q(h | x, selection)`` from an SCNL (:mod:`veil.layers.scnl`); only h leaves.

* ``encode(x, y)`` -- the *training* exposure: hard selection by the known label (seed §3.1.1).
* ``encode(x)`` -- the *inference* path: the soft selection (seed §2.1.1) or the input-adaptive selector
  pi(x) combines the per-class kernels.

Server: the task model on h (``decode`` is the identity).

Knob ``lambda_`` (larger = more private). ``penalty() = lambda_ * mean KL(q(h|x) || r(h))``, the
variational-information-bottleneck charge (Alemi et al., ICLR 2017) per output element, an upper bound
on I(X; H) / dim. r is N(0, 1) for the Gaussian layer (Laplace(0, 1), Binomial(n, 1/2), uniform
categorical for the others). Why this and not "minus the injected entropy" (mean log sigma): it was
measured (docs/design.md, "The knob") that an entropy bonus lets the layer put large noise on the background and small noise on
the strokes, so the *variance map* draws the digit and a CNN attacker reads it (95%). The KL charges the
mean *and* every input-dependent variance pattern, relative to a fixed reference, and the mean is bounded
(``bound·tanh``) and the scale softplus-positive, so the layer can neither escape its noise by growing the
signal nor be paid for noise that carries information.

The hard/soft gap (docs/design.md, "Pitfalls": a server trained only on hard-selected records reads *which* kernels
were applied and fails on soft-selected ones) is closed in two ways:

* joint training (``training="joint"``) mixes modes inside every batch: a random ``hard_fraction`` of the
  records is hard-selected by label, the rest goes through the selector, so the server learns both;
* two-stage training (``training="twostage"``: stage ``hard`` then stage ``soft``, seed §3.1) mixes the
  same way in the hard stage (the frozen, untrained selector gives an even mixture of the class kernels,
  which forces the kernels to keep the content readable) and keeps the server training in the soft stage
  while the selector learns with the SCNL frozen.

With the adaptive selector and a known label (training), ``penalty()`` also carries
``selector_weight * cross_entropy(selector logits, y)``: the client supervises its own selector with the
labels it owns (they never leave the client).

Registry entries (thin option sets over :class:`SCNLDefense`):

* ``scnl`` (recommended): additive SCNL (per-class template + gain-controlled content channel +
  scale) mixed by the input-adaptive selector, joint training. The output depends on x through pi(x) and
  through a content channel that the knob closes.
* ``scnl-adaptive``: convolutional SCNL with the adaptive selector, joint training.
* ``scnl-joint``: convolutional SCNL with the seed's soft selection (fixed pi), joint training.
* ``scnl-twostage``: convolutional SCNL, soft selection, the seed's two-stage training.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from veil.defenses.base import Defense, Stage
from veil.layers.learning_rate import scale_learning_rate
from veil.layers.scnl import INCARNATIONS, SCNLAdditive, SCNLBase, SCNLConv2d, SCNLLinear
from veil.layers.distributions import list_distributions
from veil.layers.selection import AdaptiveSelection, SoftSelection

LAYERS = ("additive", "conv", "linear")
SELECTIONS = ("adaptive", "soft")
TRAININGS = ("joint", "twostage")


#: Options that only some configurations read: (option, whether it applies, where it applies). Given
#: where it does nothing, it is refused rather than silently ignored (kernel_size=2 on the additive layer).
_SCOPED_OPTIONS: tuple[tuple[str, Callable[[dict[str, Any]], bool], str], ...] = (
    ("kernel_size", lambda o: o["layer"] == "conv", "the conv layer"),
    ("out_channels", lambda o: o["layer"] == "conv", "the conv layer"),
    ("incarnation", lambda o: o["layer"] in ("conv", "linear"), "the conv and linear layers"),
    ("selector_width", lambda o: o["selection"] == "adaptive", "the adaptive selection"),
    ("soft_share", lambda o: o["training"] == "twostage", "two-stage training"),
)


class SCNLDefense(Defense):
    """Stochastic conditional noise layer + selection layer (seed 000 §1-3). Knob lambda_ (larger = more private).

    Args:
        input_shape: Record shape (C, H, W).
        num_classes: Number of primary classes (one kernel set per class).
        lambda_: Weight of the VIB charge ``mean KL(q(h|x) || prior)``; larger = more private. >= 0.
        layer: ``additive`` (per-class gain/template/scale), ``conv`` (SCNLConv2d) or ``linear`` (SCNLLinear
            on the flattened record, reshaped back).
        selection: ``adaptive`` (pi(x) from a tiny client CNN) or ``soft`` (trainable pi in [0, 1], seed).
        incarnation: ``input`` (pi multiplies x before the kernels) or ``output`` (pi multiplies the
            per-class outputs); additive layers are elementwise, where both coincide.
        training: ``joint`` (one stage, hard/selector modes mixed per batch) or ``twostage``
            (``hard`` stage: SCNL + server, labels; ``soft`` stage: selector + server, SCNL frozen).
        distribution: ``gaussian``, ``laplace``, ``bernoulli``/``binomial``, ``categorical``/``multinomial``.
        hard_fraction: In joint training, the share of each batch hard-selected by label (rest: selector).
        selector_weight: Weight of the selector's own cross-entropy when labels are known (adaptive only).
        selector_width: Channels of the adaptive selector's first conv (its client cost).
        out_channels: Output channels of the conv layer (default: the input's).
        kernel_size: Conv kernel size (odd).
        bound: |mean| (and |logit|) bound of the layer's output distribution.
        min_scale: Lower bound of the scale.
        init_scale: Initial noise scale (additive and conv layers; the conv layer starts as x + noise).
        temperature: Relaxation temperature of the discrete distributions.
        trials: Number of trials of binomial/multinomial.
        soft_share: Share of the epochs given to the ``soft`` stage in two-stage training.
        lr_scale: The client-side layers learn this many times faster than the server model
            (:func:`veil.layers.learning_rate.scale_learning_rate`), so that they converge within a few epochs.
        sharpen: At inference (eval mode, no label) replace the adaptive selector's pi(x) by the one-hot
            of its argmax, so the output reveals the predicted class but not the selector's confidence.
        init_gain: Initial content gain of the additive layer (1: the content channel starts open and
            the knob closes it; 0: it starts closed and opens only as far as the task pays for it).
    """

    name: ClassVar[str] = "scnl-custom"
    knob: ClassVar[str] = "lambda_"
    knob_direction: ClassVar[int] = 1
    budget_option: ClassVar[str] = "selector_width"
    #: Option defaults of this registry entry; None in the signature means "take it from here".
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "lambda_": 1.0,
        "layer": "additive",
        "selection": "adaptive",
        "incarnation": "input",
        "training": "joint",
        "distribution": "gaussian",
        "hard_fraction": 0.5,
        "selector_weight": 1.0,
        "selector_width": 8,
        "out_channels": None,
        "kernel_size": 3,
        "bound": 3.0,
        "min_scale": 0.01,
        "init_scale": 0.5,
        "temperature": 0.5,
        "trials": 1,
        "soft_share": 0.5,
        "lr_scale": 5.0,
        "sharpen": False,
        "init_gain": 1.0,
    }

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        lambda_: float | None = None,
        layer: str | None = None,
        selection: str | None = None,
        incarnation: str | None = None,
        training: str | None = None,
        distribution: str | None = None,
        hard_fraction: float | None = None,
        selector_weight: float | None = None,
        selector_width: int | None = None,
        out_channels: int | None = None,
        kernel_size: int | None = None,
        bound: float | None = None,
        min_scale: float | None = None,
        init_scale: float | None = None,
        temperature: float | None = None,
        trials: int | None = None,
        soft_share: float | None = None,
        lr_scale: float | None = None,
        sharpen: bool | None = None,
        init_gain: float | None = None,
    ) -> None:
        super().__init__(input_shape=input_shape, num_classes=num_classes)
        given = dict(
            lambda_=lambda_, layer=layer, selection=selection, incarnation=incarnation, training=training,
            distribution=distribution, hard_fraction=hard_fraction, selector_weight=selector_weight,
            selector_width=selector_width, out_channels=out_channels, kernel_size=kernel_size, bound=bound,
            min_scale=min_scale, init_scale=init_scale, temperature=temperature, trials=trials, soft_share=soft_share,
            lr_scale=lr_scale, sharpen=sharpen, init_gain=init_gain,
        )
        o = {k: (self.DEFAULTS[k] if v is None else v) for k, v in given.items()}
        self._validate(o)
        for key, applies, what in _SCOPED_OPTIONS:
            if given[key] is not None and given[key] != self.DEFAULTS[key] and not applies(o):
                raise ValueError(f"{key} has no effect here: it applies to {what} (this defense: layer {o['layer']!r}, selection {o['selection']!r}, training {o['training']!r})")
        self.options = o
        self.lambda_ = float(o["lambda_"])
        self.layer = scale_learning_rate(self._build_layer(o), float(o["lr_scale"]))
        self._last_penalty: torch.Tensor | None = None
        self.last_stats: dict[str, float] = {}

    # ----------------------------------------------------------------------------- construction
    def _validate(self, o: dict[str, Any]) -> None:
        def choice(key: str, valid: tuple[str, ...]) -> None:
            if o[key] not in valid:
                raise ValueError(f"{key} must be one of {', '.join(valid)}; got {o[key]!r}")

        choice("layer", LAYERS)
        choice("selection", SELECTIONS)
        choice("incarnation", INCARNATIONS)
        choice("training", TRAININGS)
        choice("distribution", tuple(list_distributions()))
        if not (isinstance(o["lambda_"], (int, float)) and math.isfinite(o["lambda_"]) and o["lambda_"] >= 0):
            raise ValueError(f"lambda_ must be a finite number >= 0, got {o['lambda_']!r}")
        for key in ("hard_fraction", "soft_share"):
            if not 0 <= float(o[key]) <= 1:
                raise ValueError(f"{key} must lie in [0, 1], got {o[key]!r}")
        if float(o["selector_weight"]) < 0:
            raise ValueError(f"selector_weight must be >= 0, got {o['selector_weight']!r}")
        if o["training"] == "twostage" and not 0 < float(o["soft_share"]) < 1:
            raise ValueError(f"two-stage training needs 0 < soft_share < 1, got {o['soft_share']!r}")
        if not isinstance(o["sharpen"], bool):
            raise ValueError(f"sharpen must be true or false, got {o['sharpen']!r}")
        if not (isinstance(o["lr_scale"], (int, float)) and o["lr_scale"] > 0):
            raise ValueError(f"lr_scale must be a number > 0, got {o['lr_scale']!r}")
        if int(o["kernel_size"]) < 1:
            raise ValueError(f"kernel_size must be >= 1, got {o['kernel_size']!r}")
        if o["out_channels"] is not None and int(o["out_channels"]) < 1:
            raise ValueError(f"out_channels must be >= 1, got {o['out_channels']!r}")

    def _build_layer(self, o: dict[str, Any]) -> SCNLBase:
        c, h, w = self.input_shape
        dist = dict(bound=float(o["bound"]), min_scale=float(o["min_scale"]), temperature=float(o["temperature"]), trials=int(o["trials"]))
        if o["layer"] == "additive":
            layer: SCNLBase = SCNLAdditive(self.input_shape, self.num_classes, o["distribution"], init_scale=float(o["init_scale"]), init_gain=float(o["init_gain"]), **dist)
            out_shape = self.input_shape
        elif o["layer"] == "conv":
            co = int(o["out_channels"] or c)
            layer = SCNLConv2d(c, co, int(o["kernel_size"]), self.num_classes, o["distribution"], incarnation=o["incarnation"], init="identity", init_scale=float(o["init_scale"]), **dist)
            out_shape = (co, h, w)
        else:
            d = c * h * w
            layer = SCNLLinear(d, d, self.num_classes, o["distribution"], incarnation=o["incarnation"], **dist)
            out_shape = self.input_shape
        self._out_shape = tuple(out_shape)
        if o["selection"] == "adaptive":
            layer.selector = AdaptiveSelection(self.num_classes, self.input_shape, width=int(o["selector_width"]))
        else:
            flat = o["layer"] == "linear"
            shape = (c * h * w,) if flat else (self.input_shape if o["incarnation"] == "input" else self._out_shape)
            layer.selector = SoftSelection(self.num_classes, shape)
        return layer

    @property
    def selector(self) -> nn.Module:
        return self.layer.selector  # type: ignore[return-value]

    # ----------------------------------------------------------------------------- the contract
    def output_shape(self) -> tuple[int, ...]:
        return self._out_shape

    def config(self) -> dict[str, Any]:
        return dict(self.options)

    def stages(self) -> list[Stage]:
        if self.options["training"] == "twostage":
            share = float(self.options["soft_share"])
            return [Stage("hard", use_labels=True, train_model=True, epoch_share=1 - share), Stage("soft", use_labels=False, train_model=True, epoch_share=share)]
        return [Stage("joint", use_labels=True, train_model=True)]

    def set_stage(self, name: str) -> None:
        """``joint``: everything trains; ``hard``: the SCNL kernels (selector frozen); ``soft``: the selector
        (SCNL frozen). The server model trains in every stage (the loop handles it)."""
        super().set_stage(name)
        for n, p in self.named_parameters():
            is_selector = n.startswith("layer.selector.")
            p.requires_grad_(name == "joint" or (name == "hard") != is_selector)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Client side. x (B, *input_shape) [+ y (B,) int64] -> h (B, *output_shape), a fresh sample.

        With y: hard selection (in training mode a random ``hard_fraction`` of the batch is hard-selected
        and the rest goes through the selector, in the joint and the hard stage alike, so that the server
        never learns to rely on the class fingerprint alone). Without y: the selector (inference).
        """
        self.check_input(x, y)
        xin = x.flatten(1) if self.options["layer"] == "linear" else x
        b = x.shape[0]
        sel_logits = None
        mixing = y is not None and self.training and float(self.options["hard_fraction"]) < 1
        if y is not None and not mixing:
            raw = self.layer.raw(xin, y)  # hard selection: only the selected class's kernels
        else:
            pi, sel_logits = self._selection(xin)
            hard = torch.rand(b, device=x.device) < float(self.options["hard_fraction"]) if mixing else None
            if not mixing:
                raw = self.layer.raw(xin, pi=pi)
            elif pi.dim() == 2 and pi.shape[0] == b:
                # per-record selection: one call with pi = one_hot(y) on the hard records (the oracle
                # identity: hard selection equals the selection formula with one-hot pi)
                pi_mix = torch.where(hard[:, None], F.one_hot(y, self.num_classes).to(pi.dtype), pi)
                raw = self.layer.raw(xin, pi=pi_mix)
            else:  # a selection shared by the batch (soft): hard records take the fast path
                ih, isoft = hard.nonzero(as_tuple=True)[0], (~hard).nonzero(as_tuple=True)[0]
                parts = []
                if len(ih):
                    parts.append((ih, self.layer.raw(xin[ih], y[ih])))
                if len(isoft):
                    parts.append((isoft, self.layer.raw(xin[isoft], pi=pi[isoft] if pi.shape[0] == b else pi)))
                raw = torch.cat([p for _, p in parts])[torch.argsort(torch.cat([i for i, _ in parts]))]
        params = self.layer.distribution.constrain(raw)
        h = self.layer.distribution.rsample(params)
        kl = self.layer.kl(params)
        penalty = self.lambda_ * kl.mean()
        if sel_logits is not None and y is not None and float(self.options["selector_weight"]) > 0 and self.training:
            penalty = penalty + float(self.options["selector_weight"]) * F.cross_entropy(sel_logits, y)
        self._last_penalty = penalty
        with torch.no_grad():
            self.last_stats = {"kl": float(kl.mean()), "noise_scale": float(self.layer.distribution.noise_scale(params).mean())}
        return h.reshape(b, *self._out_shape)

    def penalty(self) -> torch.Tensor:
        """``lambda_ * mean KL`` of the last encode (+ the selector's cross-entropy when labels were known)."""
        if self._last_penalty is None:
            return torch.zeros((), device=self._device())
        return self._last_penalty

    # ----------------------------------------------------------------------------- helpers
    def _selection(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(self.selector, AdaptiveSelection):
            logits = self.selector.logits(x)
            if self.options["sharpen"] and not self.training:
                return F.one_hot(logits.argmax(1), self.num_classes).to(logits.dtype), logits
            return torch.softmax(logits, dim=1), logits
        return self.selector(x), None

    @torch.no_grad()
    def noise_stats(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, float]:
        """Mean KL (nats per element) and mean noise scale of ``encode(x, y)`` (no gradients)."""
        was = self.training
        self.eval()
        self.encode(x, y)
        self.train(was)
        return dict(self.last_stats)


class SCNL(SCNLDefense):
    """SCNL (recommended): additive per-class template/content/scale layer, adaptive selector, joint."""

    name = "scnl"
    #: lambda_ = 3, the knee of the mnist-lt5 sweep (10k train, 3 epochs, CNN attacker on the digit):
    #: attack 0.375 (0.917 at lambda 0, 0.350 at 10), primary 0.965 (0.971 at 0, 0.964 at 10).
    DEFAULTS = {**SCNLDefense.DEFAULTS, "lambda_": 3.0}


class SCNLAdaptive(SCNLDefense):
    """SCNL: convolutional layer mixed by the input-adaptive selector pi(x), joint training."""

    name = "scnl-adaptive"
    DEFAULTS = {**SCNLDefense.DEFAULTS, "layer": "conv"}


class SCNLJoint(SCNLDefense):
    """SCNL: convolutional layer with the seed's soft selection (trainable pi in [0,1]), joint training."""

    name = "scnl-joint"
    DEFAULTS = {**SCNLDefense.DEFAULTS, "layer": "conv", "selection": "soft"}
    budget_option = ""  # the soft selection has no client network to size


class SCNLTwoStage(SCNLDefense):
    """SCNL: convolutional layer, soft selection, the seed's two-stage training (hard, then soft)."""

    name = "scnl-twostage"
    budget_option = ""
    DEFAULTS = {**SCNLDefense.DEFAULTS, "layer": "conv", "selection": "soft", "training": "twostage"}


class SCNLPrivate(SCNLDefense):
    """SCNL, privacy end: additive layer whose content channel starts closed, adaptive selector, joint.

    ``init_gain=0``: the output depends on x only through pi(x) until the task pays for content, and
    lambda_ = 10 charges every bit of it. ``sharpen=True``: at inference the selector's one-hot argmax
    picks the template, so the server reads the selector's decision instead of a noisy soft mixture (on
    fashion-lt5 the soft mixture lost 1.1-1.3 points against the selector's own accuracy; sharpened, the
    loss is 0.2-0.3) and the selector's confidence is not sent. Needs enough data to train the selector
    (collapses on the 1k-record digits-lt5 task; on mnist-lt5 see the README's headline numbers).
    """

    name = "scnl-private"
    DEFAULTS = {**SCNLDefense.DEFAULTS, "lambda_": 10.0, "init_gain": 0.0, "sharpen": True}
