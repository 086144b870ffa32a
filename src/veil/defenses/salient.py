"""Mask-free selection from the task's own saliency: keep what the task looks at, close the rest.

Where the secret sits beside the task's content (a tag beside a garment) and nobody marks where it is, the
client must learn from the task which parts of a record the task needs. Learning that through the task loss
fails: the task pays for letting everything through, so a selector trained by the task's gradient opens
everything, and an L0 price on the gates (``scnl-gate``) makes them bistable (all open or all closed).
Here the task says where its evidence is in a form a small client network can learn directly: a reference
server model, trained on the data owner's clean records, is probed by **occlusion** (Zeiler & Fergus, ECCV
2014): a patch of the record is blanked and the change of the model's predicted distribution,
``KL(p(y|x) || p(y|x with the patch blanked))``, is credited to the patch's pixels. Pixels whose removal
leaves the answer unchanged (background, and whatever is independent of y, such as the tag) score low.
The top ``keep`` share of each training record's pixels becomes its *keep map*; a per-pixel selector within
the client budget (:class:`veil.layers.selection.PixelSelection`) learns those maps in ``setup`` and is then
frozen. The client sends::

    k = selector(x) says keep (per pixel, or the best square box of side ``keep_box``)
    m = k * x + (1 - k) * fill                       # fill: zeros, fresh noise, or a blur

No region mask and no secret reaches this defense: it learns from y alone (through the reference). The
assumption, the same as ``local``'s ``distill_from``: the reference was trained on records the data owner
may use; it runs only while the data owner trains (``setup``), never on the device and never at the engine.
Where no reference run is given, ``setup`` trains one from the server's architecture on the training
records (``reference_epochs`` passes).

Knob ``keep`` (smaller = more private): the share of each record's pixels the keep maps open.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from veil.defenses.base import Defense, Stage, check_secret, number_option
from veil.defenses.local import load_reference
from veil.defenses.redact import FILLS, FillsRegion, redact
from veil.layers.gates import ObjectReader, shifted
from veil.layers.learning_rate import scale_learning_rate
from veil.layers.selection import PixelSelection, best_box, train_pixel_selector

#: A pixel scoring under this share of its record's highest occlusion score is never kept.
RELATIVE_FLOOR = 0.01
#: Records per forward pass while the occlusion maps are computed.
OCCLUSION_BATCH = 256


@torch.no_grad()
def occlusion_saliency(model: nn.Module, x: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """Per-pixel occlusion saliency of ``model`` on records ``x`` (B, C, H, W) -> (B, 1, H, W), >= 0.

    For every ``patch`` x ``patch`` window (step ``stride``, the last row/column of windows flush with the
    border), the window is set to 0 and ``KL(p(.|x) || p(.|x occluded))`` is added to each of its pixels; each
    pixel's total is divided by the number of windows that cover it. No label is needed: the score is how much
    the model's answer depends on the pixel's neighbourhood.

    A window that is already all zero in a record leaves that record unchanged (its divergence is 0), so only
    the records with something inside the window are passed again: on sparse records (a garment and a tag on
    a black canvas) this halves the forward passes. ``model`` must answer each record on its own (it is put
    in eval mode here, so batch norm uses its running statistics).
    """
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    b, _, h, w = x.shape
    if not (isinstance(patch, int) and 1 <= patch <= min(h, w)) or not (isinstance(stride, int) and stride >= 1):
        raise ValueError(f"patch must be an integer in [1, {min(h, w)}] and stride >= 1, got {patch!r}, {stride!r}")
    rows = sorted(set(range(0, h - patch + 1, stride)) | {h - patch})
    cols = sorted(set(range(0, w - patch + 1, stride)) | {w - patch})
    total = torch.zeros(b, 1, h, w, device=x.device)
    count = torch.zeros(1, 1, h, w, device=x.device)
    for r in rows:
        for c in cols:
            count[..., r : r + patch, c : c + patch] += 1
    was_training = model.training
    model.eval()
    try:
        for i in range(0, b, OCCLUSION_BATCH):
            xb = x[i : i + OCCLUSION_BATCH]
            log_p = F.log_softmax(model(xb), 1)
            for r in rows:
                for c in cols:
                    inked = xb[..., r : r + patch, c : c + patch].flatten(1).ne(0).any(1).nonzero().squeeze(1)
                    if len(inked) == 0:
                        continue
                    xo = xb[inked].clone()
                    xo[..., r : r + patch, c : c + patch] = 0
                    lp = log_p[inked]
                    kl = (lp.exp() * (lp - F.log_softmax(model(xo), 1))).sum(1).clamp(min=0)
                    total[i + inked, :, r : r + patch, c : c + patch] += kl.view(-1, 1, 1, 1)
    finally:
        model.train(was_training)
    return total / count


def keep_maps(saliency: torch.Tensor, keep: float) -> torch.Tensor:
    """(B, 1, H, W) saliency -> (B, 1, H, W) 0/1 maps with the top ``keep`` share of each record's pixels,
    less those scoring under :data:`RELATIVE_FLOOR` of the record's highest score (a pixel the answer hardly
    depends on is not kept to fill the share)."""
    flat = saliency.flatten(1)
    k = max(1, int(round(keep * flat.shape[1])))
    threshold = flat.topk(k, dim=1).values[:, -1:]
    floor = RELATIVE_FLOOR * flat.max(dim=1, keepdim=True).values
    return ((flat >= threshold) & (flat > floor)).view_as(saliency).to(saliency.dtype)


def fit_frozen(net: nn.Module, passes: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], epochs: int, *, lr: float,
               weight_decay: float = 0.0) -> nn.Module:
    """``net`` trained by Adam on the cross-entropy of the (input, label) batches ``passes()`` yields, once
    per epoch; returned frozen, in eval mode (the data owner's models that only ``setup`` uses)."""
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        for x, target in passes():
            loss = F.cross_entropy(net(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def train_reference(model: nn.Module, batches: Any, epochs: int, lr: float = 1e-3) -> nn.Module:
    """A copy of the server model trained on the clean ``batches`` of (x, y) (the data owner's reference),
    frozen, in eval mode. The model passed in is left as it was."""
    return fit_frozen(copy.deepcopy(model), lambda: ((b[0], b[1]) for b in batches), epochs, lr=lr)


class SalientSelection(FillsRegion, Defense):
    """Keep the pixels a reference server's answer depends on; close the rest. Learns from y alone.

    Args:
        keep: Share of each record's pixels the keep maps open (the knob; smaller = more private).
        selector_width: The selector's channels (what ``--client-budget`` sets).
        fill: What a closed pixel shows: ``zero``, ``noise`` (fresh Gaussian noise), ``blur`` or ``inpaint`` (the open pixels around it).
        keep_box: Where the task's content is one square object of known side, keep the best box of that
            side by the selector's scores instead of a per-pixel map (0: per pixel).
        saliency_from: A finished ``none`` run folder whose server model is the reference. Without it,
            ``setup`` trains the reference from the server's architecture for ``reference_epochs`` passes.
        reference_epochs: Passes of that in-setup reference training.
        patch, stride: Occlusion window side and step in pixels (0: a quarter of the record's side, half that).
        selector_epochs: Passes in which the selector learns the keep maps in ``setup``.
        lr_scale: The selector's step size over the loop's learning rate.
    """

    name: ClassVar[str] = "select-salient"
    knob: ClassVar[str] = "keep"
    knob_direction: ClassVar[int] = -1
    budget_option: ClassVar[str] = "selector_width"
    uses: ClassVar[str] = "y"

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        keep: float = 0.3,
        selector_width: int = 8,
        fill: str = "zero",
        keep_box: int = 0,
        saliency_from: str | None = None,
        reference_epochs: int = 5,
        patch: int = 0,
        stride: int = 0,
        selector_epochs: int = 20,
        lr_scale: float = 5.0,
    ) -> None:
        super().__init__(input_shape=input_shape, num_classes=num_classes)
        side = min(self.input_shape[1:])
        if isinstance(keep, bool) or not (isinstance(keep, (int, float)) and math.isfinite(keep) and 0 < keep <= 1):
            raise ValueError(f"keep must be a share in (0, 1], got {keep!r}")
        if isinstance(selector_width, bool) or not (isinstance(selector_width, int) and 1 <= selector_width <= 256):
            raise ValueError(f"selector_width must be an integer in [1, 256], got {selector_width!r}")
        if fill not in FILLS:
            raise ValueError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
        for key, value, lo, hi in (("keep_box", keep_box, 0, side), ("reference_epochs", reference_epochs, 0, 1000), ("patch", patch, 0, side),
                                   ("stride", stride, 0, side), ("selector_epochs", selector_epochs, 0, 1000)):
            if isinstance(value, bool) or not (isinstance(value, int) and lo <= value <= hi):
                raise ValueError(f"{key} must be an integer in [{lo}, {hi}], got {value!r}")
        if saliency_from is not None and (not isinstance(saliency_from, str) or not saliency_from):
            raise ValueError(f"saliency_from must be a run folder, got {saliency_from!r}")
        if saliency_from is None and reference_epochs == 0:
            raise ValueError("select-salient needs a reference: saliency_from=RUN or reference_epochs >= 1")
        if isinstance(lr_scale, bool) or not (isinstance(lr_scale, (int, float)) and math.isfinite(lr_scale) and lr_scale > 0):
            raise ValueError(f"lr_scale must be a number > 0, got {lr_scale!r}")
        patch = patch or max(1, side // 4)
        self.options: dict[str, Any] = dict(
            keep=float(keep), selector_width=int(selector_width), fill=fill, keep_box=int(keep_box), saliency_from=saliency_from,
            reference_epochs=int(reference_epochs), patch=int(patch), stride=int(stride or max(1, patch // 2)),
            selector_epochs=int(selector_epochs), lr_scale=float(lr_scale),
        )
        self.selector = scale_learning_rate(PixelSelection(self.input_shape[0], 2, int(selector_width)), float(lr_scale))

    def stages(self) -> list[Stage]:
        """One joint stage; the selector learnt its maps in ``setup`` and stays fixed (no task gradient)."""
        return [Stage("joint")]

    def set_stage(self, name: str) -> None:
        """The joint stage trains nothing of the client: the selector learns in ``setup`` only."""
        super().set_stage(name)
        self.selector.requires_grad_(False)

    def kept(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in {0, 1}: 1 where the record is kept."""
        logits = self.selector(x)
        if self.options["keep_box"]:
            return best_box((logits[:, 1:] - logits[:, :1]).detach(), self.options["keep_box"])
        return (logits.argmax(1, keepdim=True) == 1).to(x.dtype)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Client side. x (B, C, H, W) -> the record with every pixel outside its keep map replaced."""
        self.check_input(x, y)
        with torch.no_grad():
            region = 1 - self.kept(x)
        return redact(x, region, self.options["fill"])

    def reference(self, model: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> nn.Module:
        """The reference server: the ``saliency_from`` run's model, or one trained here on the clean batches."""
        if self.options["saliency_from"] is not None:
            return load_reference(self.options["saliency_from"], self.input_shape, self.num_classes, "saliency_from").to(self._device())
        return train_reference(model, batches, self.options["reference_epochs"])

    def keep_maps(self, model: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
        """Each batch's (B, 1, H, W) keep maps: the top ``keep`` share of the reference's occlusion saliency."""
        ref = self.reference(model, [tuple(b[:2]) for b in batches])
        o = self.options
        return [keep_maps(occlusion_saliency(ref, b[0], o["patch"], o["stride"]), o["keep"]) for b in batches]

    def setup(self, model: nn.Module, loader: Any) -> None:
        """Compute the training records' keep maps from the reference by occlusion; train the selector on
        them (``selector_epochs`` passes); freeze it."""
        batches = [tuple(b) for b in loader]
        if not batches:
            raise ValueError(f"{self.name}'s setup needs training records")
        maps = self.keep_maps(model, batches)
        o = self.options
        self.selector.requires_grad_(True)
        try:
            if o["selector_epochs"]:
                train_pixel_selector(self.selector, [(b[0], k) for b, k in zip(batches, maps)], epochs=o["selector_epochs"],
                                     lr=o["lr_scale"] * 1e-3, weight=torch.ones(2), check=lambda m, b: m)
        finally:
            self.selector.requires_grad_(False)


def train_secret_model(x: torch.Tensor, z: torch.Tensor, classes: int, epochs: int, *, width: int = 32, lr: float = 2e-3,
                       batch_size: int = 32, max_shift: int = 6) -> nn.Module:
    """A reader of the secret (:class:`veil.layers.gates.ObjectReader`) trained on the clean records ``x``
    whose secret ``z`` the data owner knows, with random shifts of up to ``max_shift`` pixels; frozen, in
    eval mode."""

    def shuffled() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(x), device=x.device).split(batch_size)
        return ((shifted(x[i], max_shift), z[i]) for i in order if len(i) >= 2)  # batch norm needs two records

    return fit_frozen(ObjectReader(x.shape[1], classes, width).to(x.device), shuffled, epochs, lr=lr, weight_decay=1e-4)


class SalientSelectionSecret(SalientSelection):
    """``select-salient`` that also closes what a model of the known secrets reads (known-secret mode).

    Where the data owner knows the secret for some training records (``secret_fraction``, the same records
    throughout), ``setup`` trains a small CNN (:class:`veil.layers.gates.ObjectReader`, global max pool,
    random shifts) to read the secret from those clean records and probes it by
    occlusion on every training record; pixels whose secret saliency reaches ``secret_close`` of the
    record's highest are removed from the keep map before the selector learns it. The y-reference decides
    what the task needs, the secret model what gives the secret away; the selector learns the difference,
    and the secret never shapes a message (``encode`` validates it and ignores it).

    Args (beyond :class:`SalientSelection`'s):
        secret_fraction: Share of the training records whose secret the data owner hands over.
        secret_classes: Number of the secret's classes.
        secret_epochs: Passes of the secret model's training over the known records.
        secret_close: A pixel whose secret saliency is at least this share of its record's highest is closed.
        task_selection: False: start from the whole record instead of the y-reference's keep maps and close
            only what the secret model reads (``keep``, ``saliency_from`` and ``reference_epochs`` are then
            unused: no reference is trained or loaded). For a secret drawn over the content, with
            ``fill=inpaint`` and a small ``patch``: the strokes are replaced by the content around them and
            everything else is sent as it is.
    """

    name: ClassVar[str] = "select-salient-z"
    uses: ClassVar[str] = "y,z"
    uses_secret: ClassVar[bool] = True

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int, secret_fraction: float = 0.1, secret_classes: int = 10,
                 secret_epochs: int = 60, secret_close: float = 0.1, task_selection: bool = True, **options: Any) -> None:
        if not isinstance(task_selection, bool):
            raise ValueError(f"task_selection must be true or false, got {task_selection!r}")
        super().__init__(input_shape=input_shape, num_classes=num_classes, **options)
        if isinstance(secret_classes, bool) or not (isinstance(secret_classes, int) and 2 <= secret_classes <= 100_000):
            raise ValueError(f"secret_classes must be an integer >= 2, got {secret_classes!r}")
        if isinstance(secret_epochs, bool) or not (isinstance(secret_epochs, int) and 1 <= secret_epochs <= 1000):
            raise ValueError(f"secret_epochs must be an integer in [1, 1000], got {secret_epochs!r}")
        self.secret_fraction = number_option("secret_fraction", secret_fraction, 0, 1, lo_open=True)
        self.options.update(secret_fraction=self.secret_fraction, secret_classes=int(secret_classes), secret_epochs=int(secret_epochs),
                            secret_close=number_option("secret_close", secret_close, 0, 1, lo_open=True), task_selection=task_selection)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None, *, secret: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`SalientSelection.encode`; a known ``secret`` (B,) (-1 where unknown) is validated and
        never used: the secret shaped the selector in ``setup``, not the message."""
        if secret is not None:
            check_secret(secret, x.shape[0], self.options["secret_classes"])
        return super().encode(x, y)

    def keep_maps(self, model: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
        """The y-reference's keep maps less every pixel the secret model's occlusion saliency reaches
        ``secret_close`` of its record's highest score on."""
        if any(len(b) < 3 for b in batches):
            raise ValueError(f"{self.name}'s setup needs batches of (x, y, z) with z = -1 where the secret is unknown")
        o = self.options
        for b in batches:
            check_secret(b[2], b[0].shape[0], o["secret_classes"])
        known = [(b[2] >= 0).nonzero().squeeze(1) for b in batches]
        x = torch.cat([b[0][i] for b, i in zip(batches, known)])
        z = torch.cat([b[2][i] for b, i in zip(batches, known)]).long()
        if len(z) < 2:
            raise ValueError(f"{self.name} was handed {len(z)} known secret(s), too few to learn from: raise secret_fraction (now {o['secret_fraction']})")
        secret_model = train_secret_model(x, z, o["secret_classes"], o["secret_epochs"])
        maps = super().keep_maps(model, batches) if o["task_selection"] else [torch.ones_like(b[0][:, :1]) for b in batches]
        out = []
        for b, k in zip(batches, maps):
            s = occlusion_saliency(secret_model, b[0], o["patch"], o["stride"])
            closed = s >= o["secret_close"] * s.flatten(1).max(1).values.clamp(min=1e-12).view(-1, 1, 1, 1)
            out.append(k * (~closed).to(k.dtype))
        return out
