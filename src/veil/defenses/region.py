"""Region selection: an SCNL whose "classes" are regions of the record (seed 000 §2.2, per-pixel selection).

For a secret that sits *beside* the task's content (a tag next to a garment, a licence plate on a car, a
face in a scene) sending the task's decision cannot work: the engine must see the content. The seed's
detection embodiment gives the tool: hard selection by *region* in training (pixel p passes through region
r's kernels where the region mask says so) and a trained per-pixel selection at inference, when the
regions are unknown.

Here there are two regions, ``content`` (0) and ``sensitive`` (1), and one additive SCNL with a gain,
template and scale tensor per region::

    h = bound·tanh( sum_r pi_r ⊙ (gain_r ⊙ x + offset_r) / bound ) + softplus( sum_r pi_r ⊙ scale_r ) ⊙ eps

The content region starts open (gain 1, little noise), the sensitive one closed (gain 0, more noise). ``pi`` is

* the region mask, one-hot per pixel, where the data owner knows it (``encode(x, y, mask=...)``; the
  training exposure; in training mode a random ``hard_fraction`` of the batch, the rest through the
  selector, so that the server never relies on perfect masks);
* otherwise ``pi(x)``, a per-pixel softmax from a small client CNN (the selector) trained with the masks
  only (per-pixel cross-entropy, weight ``selector_weight``: first alone in ``setup``, then beside the
  joint stage; the task loss does not reach it, since what the task pays for is letting everything
  through); with ``sharpen`` each pixel takes its argmax region at inference, so the selector's confidence
  is not sent.

Knob ``lambda_`` (larger = more private): the VIB charge ``lambda_ · mean KL(q(h|x) || N(0, 1))`` over the
whole output, which closes whatever the task does not pay for (``content_charge`` < 1 charges the pixels
selected as content less than the sensitive ones). Client: selector + elementwise layer.
Server: nothing (it reads h).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from veil.defenses.base import Defense, Stage
from veil.layers.learning_rate import scale_learning_rate
from veil.layers.scnl import SCNLAdditive
from veil.layers.selection import PixelSelection, best_box, check_region_mask, train_pixel_selector

REGIONS = 2  # content, sensitive
#: The selector's cross-entropy weights per region: the sensitive region is the smaller one (about 1/8 of the
#: pixels on fashion-tag), weighed up so that the selector errs toward hiding.
SELECTOR_CE_WEIGHT = (1.0, 4.0)


class SCNLRegion(Defense):
    """SCNL with per-pixel region selection (mask in training, a pixel selector at inference).

    Args:
        lambda_: Weight of the VIB charge; larger = more private. >= 0.
        selector_width: Channels of the pixel selector (its client cost).
        hard_fraction: In training mode with masks, the share of each batch selected by the true mask.
        selector_weight: Weight of the selector's per-pixel cross-entropy against the masks.
        init_scale: Initial noise scale. bound, min_scale: the output distribution's mean bound and
            least scale. lr_scale: the client layers learn this many times faster than the server model.
        sharpen: At inference without a mask, each pixel takes its argmax region.
        content_scale: Initial noise scale of the content region (``None``: ``init_scale``, as the sensitive
            region's). Little noise on content keeps the task (fashion-tag, 1% budget, 3000 records x 4:
            0.730 at 0.05 against 0.665 at 0.5); the content noise also covers the tag pixels the selector
            misses, so a low one needs a selector that finds the tag (``selector_epochs``,
            ``train_selector_alone``; tag attack 0.143 with them, 0.87 without).
        dilate: Pixels by which the sensitive region the selector picks is grown (a max filter of side
            ``2 * dilate + 1`` over its probability, in training and at inference): the selector errs toward
            hiding at the tag's border, where its misses are.
        train_selector_alone: The selector learns from the region masks only (its cross-entropy); the task
            loss and the charge do not reach it. Measured on fashion-tag at a 1% budget (3000 records x 4
            epochs): with their gradient the selector found 33% of the tag's pixels (and 2.5% when the content
            noise starts low: the task pays for letting everything through), so what hid the tag was the
            noise on *all* pixels, which cost the garment too.
        selector_epochs: Passes over the training records in which the selector alone learns the masks at
            the start of training (``setup``; a few seconds: it is 1% of the server's cost), before the joint
            stage goes on training it. 4 joint epochs alone left it finding 81% of the tag's pixels at 55%
            precision; 20 passes first: about 90% at 75% (fashion-tag, 1% budget, 3000 records).
        content_charge: Weight of the VIB charge on pixels selected as content, relative to the sensitive
            region's (1: the whole output charged alike; 0: only the sensitive region is charged, so the
            content the task needs passes as the task trains it, and what hides the secret is the sensitive
            region's closed gain, its charge, and the selector's errs-toward-hiding weighting).
        box: Side (pixels) of the sensitive region where it is known to be one square box per record (a tag,
            a plate of known size): the selector's per-pixel log-odds are summed over every box position and
            the best box is hidden, whole, in training and at inference (0: per-pixel selection). Needs
            ``train_selector_alone`` (an argmax has no gradient). fashion-tag (tag side 14) at a 1% budget,
            3000 records x 4: primary 0.748 and tag attack 0.117 with ``box=14``, against 0.732 / 0.143
            per pixel (undefended 0.754): the per-pixel selector found 90% of the tag's ink, the box 94%.
    """

    uses: ClassVar[str] = "y,mask"
    name: ClassVar[str] = "scnl-region"
    knob: ClassVar[str] = "lambda_"
    knob_direction: ClassVar[int] = 1
    budget_option: ClassVar[str] = "selector_width"
    #: ``encode`` takes the sensitive region's mask where the data owner knows it.
    uses_mask: ClassVar[bool] = True

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        lambda_: float = 1.0,
        selector_width: int = 8,
        hard_fraction: float = 0.5,
        selector_weight: float = 1.0,
        init_scale: float = 0.5,
        bound: float = 3.0,
        min_scale: float = 0.01,
        lr_scale: float = 5.0,
        sharpen: bool = True,
        content_charge: float = 1.0,
        content_scale: float | None = 0.05,
        dilate: int = 0,
        train_selector_alone: bool = True,
        selector_epochs: int = 20,
        box: int = 0,
    ) -> None:
        super().__init__(input_shape=input_shape, num_classes=num_classes)
        if not (isinstance(lambda_, (int, float)) and math.isfinite(lambda_) and lambda_ >= 0):
            raise ValueError(f"lambda_ must be a finite number >= 0, got {lambda_!r}")
        if not (isinstance(selector_width, int) and 1 <= selector_width <= 256):
            raise ValueError(f"selector_width must be an integer in [1, 256], got {selector_width!r}")
        if not 0 <= float(hard_fraction) <= 1:
            raise ValueError(f"hard_fraction must lie in [0, 1], got {hard_fraction!r}")
        if not float(selector_weight) >= 0:
            raise ValueError(f"selector_weight must be >= 0, got {selector_weight!r}")
        for key, value in (("sharpen", sharpen), ("train_selector_alone", train_selector_alone)):
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false, got {value!r}")
        if not (isinstance(lr_scale, (int, float)) and lr_scale > 0):
            raise ValueError(f"lr_scale must be a number > 0, got {lr_scale!r}")
        if isinstance(content_charge, bool) or not (isinstance(content_charge, (int, float)) and 0 <= content_charge <= 1):
            raise ValueError(f"content_charge must be a number in [0, 1], got {content_charge!r}")
        if content_scale is not None and not (isinstance(content_scale, (int, float)) and not isinstance(content_scale, bool) and min_scale < content_scale <= 10):
            raise ValueError(f"content_scale must be a number in (min_scale, 10] or None, got {content_scale!r}")
        if isinstance(selector_epochs, bool) or not (isinstance(selector_epochs, int) and 0 <= selector_epochs <= 1000):
            raise ValueError(f"selector_epochs must be an integer in [0, 1000], got {selector_epochs!r}")
        if isinstance(dilate, bool) or not (isinstance(dilate, int) and 0 <= dilate <= 8):
            raise ValueError(f"dilate must be an integer in [0, 8], got {dilate!r}")
        if isinstance(box, bool) or not (isinstance(box, int) and 0 <= box <= min(self.input_shape[1:])):
            raise ValueError(f"box must be an integer in [0, {min(self.input_shape[1:])}] (0: per-pixel selection), got {box!r}")
        if box and not train_selector_alone:
            raise ValueError("box selection takes the selector's best box (an argmax, no gradient): it needs train_selector_alone=true")
        self.options = dict(
            lambda_=float(lambda_), selector_width=int(selector_width), hard_fraction=float(hard_fraction),
            selector_weight=float(selector_weight), init_scale=float(init_scale), bound=float(bound),
            min_scale=float(min_scale), lr_scale=float(lr_scale), sharpen=sharpen, content_charge=float(content_charge),
            content_scale=None if content_scale is None else float(content_scale), dilate=int(dilate),
            train_selector_alone=train_selector_alone, selector_epochs=int(selector_epochs), box=int(box),
        )
        self.lambda_ = float(lambda_)
        layer = SCNLAdditive(self.input_shape, REGIONS, "gaussian", init_scale=float(init_scale), bound=float(bound), min_scale=float(min_scale))
        with torch.no_grad():
            layer.gain[1].zero_()  # the sensitive region starts closed
            if content_scale is not None and layer.scale is not None:
                layer.scale[0].fill_(math.log(math.expm1(float(content_scale) - float(min_scale))))
        layer.selector = PixelSelection(self.input_shape[0], REGIONS, int(selector_width))
        self.layer = scale_learning_rate(layer, float(lr_scale))
        self._last_penalty: torch.Tensor | None = None

    def config(self) -> dict[str, Any]:
        return dict(self.options)

    def stages(self) -> list[Stage]:
        """One joint stage in which the data owner's knowledge (labels, region masks) reaches ``encode``."""
        return [Stage("joint", use_labels=True)]

    def check_mask(self, mask: torch.Tensor, batch: int) -> torch.Tensor:
        """Validate a (B, 1, H, W) 0/1 region mask; return it as float."""
        return check_region_mask(mask, batch, self.input_shape[1:])

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Client side. x (B, C, H, W) [+ mask (B, 1, H, W)] -> h (B, C, H, W), a fresh sample.

        ``y`` is not used by the selection (the regions do not depend on the task's label); it is validated
        like every defense's.
        """
        self.check_input(x, y)
        b = x.shape[0]
        logits = self.layer.selector(x)  # (B, REGIONS, H, W)
        chosen = logits.detach() if self.options["train_selector_alone"] else logits  # what selects; the CE below trains it
        if mask is not None:
            m = self.check_mask(mask, b)
            onehot = torch.cat([1 - m, m], 1)  # (B, REGIONS, H, W)
            if self.training and self.options["hard_fraction"] < 1:
                hard = (torch.rand(b, device=x.device) < self.options["hard_fraction"]).view(b, 1, 1, 1)
                pi = torch.where(hard, onehot, self._selected(chosen))
            else:
                pi = onehot
        elif self.options["sharpen"] and not self.training and not self.options["box"]:  # a box is one-hot already
            pi = self._dilated(F.one_hot(logits.argmax(1), REGIONS).permute(0, 3, 1, 2).to(x.dtype))
        else:
            pi = self._selected(chosen)
        params = self.layer.distribution.constrain(self.layer.raw(x, pi=pi.unsqueeze(2)))
        h = self.layer.distribution.rsample(params)
        kl = self.layer.kl(params)  # (B, C, H, W)
        if self.options["content_charge"] < 1:
            # each pixel charged by its selection: content pixels at content_charge, sensitive ones in full
            kl = kl * (self.options["content_charge"] * pi[:, :1] + pi[:, 1:])  # (B, 1, H, W) broadcasts over C
        penalty = self.lambda_ * kl.mean()
        if mask is not None and self.training and self.options["selector_weight"] > 0:
            weight = torch.tensor(SELECTOR_CE_WEIGHT, device=x.device)
            penalty = penalty + self.options["selector_weight"] * F.cross_entropy(logits, m[:, 0].long(), weight=weight)
        self._last_penalty = penalty
        return h

    def setup(self, model: torch.nn.Module, loader: Any) -> None:
        """Train the selector alone on the region masks (``selector_epochs`` passes of ``loader``, whose
        batches end with the mask), so that the joint stage starts from a selector that finds the tag."""
        if self.options["selector_epochs"]:
            train_pixel_selector(self.layer.selector, loader, epochs=self.options["selector_epochs"], lr=self.options["lr_scale"] * 1e-3,
                                 weight=torch.tensor(SELECTOR_CE_WEIGHT), check=self.check_mask)

    def _selected(self, logits: torch.Tensor) -> torch.Tensor:
        """The selector's soft selection (B, REGIONS, H, W), or with ``box`` its best box, one-hot."""
        if self.options["box"]:
            box = best_box(logits[:, 1:] - logits[:, :1], self.options["box"])  # log-odds summed over each box
            return self._dilated(torch.cat([1 - box, box], 1))
        return self._dilated(torch.softmax(logits, 1))

    def _dilated(self, pi: torch.Tensor) -> torch.Tensor:
        """``pi`` (B, REGIONS, H, W) with the sensitive region grown by ``dilate`` pixels (a max filter)."""
        d = self.options["dilate"]
        if d == 0:
            return pi
        sensitive = F.max_pool2d(pi[:, 1:], 2 * d + 1, stride=1, padding=d)
        return torch.cat([1 - sensitive, sensitive], 1)

    def penalty(self) -> torch.Tensor:
        """``lambda_ * mean KL`` of the last encode (+ the selector's cross-entropy where masks were given)."""
        if self._last_penalty is None:
            return torch.zeros((), device=self._device())
        return self._last_penalty
