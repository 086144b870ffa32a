"""The front door: obfuscated training with your own model, optimizer and loop, then a leakage report.

The whole user path, in the style of Opacus' ``PrivacyEngine``::

    import veil

    engine = veil.Obfuscation(defense="scnl-region", client_budget=0.01, lambda_=0.1)
    client, model, optimizer, loader = engine.make_private(model=model, optimizer=optimizer, data_loader=loader, epochs=4)
    for epoch in range(4):
        for x, y, *side in loader:                       # side: the region mask, for defenses that use one
            loss = engine.loss(model(client(x, y, *side)), y)
            optimizer.zero_grad(); loss.backward(); optimizer.step()

    client.eval()                                        # deployment: no label, fresh OS-entropy noise
    report = veil.leakage(client, secret_loader, model=model)   # retrained attackers on held-out records
    print(report)                                        # primary, each attacker, floor, gap to floor
    client.save("client.safetensors"); veil.export_onnx(client, "client.onnx")

Everything here is built on the objects the CLI uses: the defense comes from
:func:`veil.defenses.create_defense` (sized by :func:`veil.defenses.budget.fit_client_budget`), one batch
goes through ``encode_batch`` / ``decode`` / ``penalty`` exactly as :func:`veil.training.loop.train_step`
runs it, stages are split among epochs by :func:`veil.training.loop.stage_epochs`, deployment messages
come from :func:`veil.training.run.obfuscate` (inside :func:`veil.noise.private_noise`), the attackers
are :func:`veil.evaluation.attack.attack_exposure`'s, and the ONNX file is
:func:`veil.serving.onnx_client.export_client`'s.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from veil.data.tasks import Split, Task
from veil.defenses import Defense, check_option_types, create_defense, defense_class, with_knob
from veil.defenses.base import Stage
from veil.defenses.saving import load_obfuscator, save_obfuscator
from veil.noise import seed_everything
from veil.training.loop import OnDevice, _trainable, accuracy, module_device, stage_epochs
from veil.training.run import obfuscate

#: Attacker presets for :func:`leakage` (``attackers="..."``). ``strong`` is what ``veil evaluate`` runs
#: by default (:class:`~veil.evaluation.attack.AttackConfig`'s defaults); ``fast`` is for a quick look
#: during development (two attackers, few epochs: a lower bound on the leakage, never a claim of privacy).
ATTACKER_PRESETS: dict[str, dict[str, Any]] = {
    "strong": {},
    "fast": {"attackers": ("linear", "mlp"), "epochs": 15, "patience": 4, "views": 2, "averaging_k": 0},
}


def _on_cpu(defense: Defense) -> Defense:
    """``defense`` where it is on the CPU, else a CPU copy (files, ONNX and the attacks work there)."""
    return defense if defense._device().type == "cpu" else copy.deepcopy(defense).cpu()


def _has_decode(defense: Defense) -> bool:
    return type(defense).decode is not Defense.decode


def _unwrap(client: "PrivateClient | Defense") -> Defense:
    if isinstance(client, PrivateClient):
        return client.defense
    if isinstance(client, Defense):
        return client
    raise TypeError(f"expected a veil.PrivateClient or a Defense, got {type(client).__name__}")


# ------------------------------------------------------------------------------------------ client side
class PrivateClient(nn.Module):
    """The client side: records in, messages out. All that leaves the data owner is its output.

    ``client(x, y=None, mask=None)``: x (B, *input_shape) -> messages (B, *message_shape).

    * In training mode (as :meth:`Obfuscation.make_private` returns it), the current stage's
      ``encode``: the label ``y`` (and the region ``mask``) reach it where the stage uses them (hard
      selection), as :func:`veil.training.loop.train_step` does; gradients flow; the noise comes from
      PyTorch's generator (seed it for reproducible training).
    * In eval mode (``client.eval()``), what the client sends at deployment: the inference exposure
      (``y`` and ``mask`` are ignored: no label leaves), no gradients, and the noise drawn from the
      operating system's entropy, fresh for every call (:func:`veil.noise.private_noise`), so that
      nobody who knows the seed can regenerate it.

    Attributes:
        defense: The underlying :class:`~veil.defenses.base.Defense` (``veil.Client``, ``veil serve``'s
            client, takes it or the file :meth:`save` writes).
    """

    def __init__(self, defense: Defense) -> None:
        super().__init__()
        if not isinstance(defense, Defense):
            raise TypeError(f"PrivateClient wraps a veil Defense, got {type(defense).__name__}")
        self.defense = defense

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.defense.input_shape

    def stage(self) -> Stage:
        """The defense's current training stage (its first until :meth:`Obfuscation` moves it on)."""
        stages = self.defense.stages()
        return next((s for s in stages if s.name == self.defense.stage), stages[0])

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training:
            return self.obfuscate(x)
        use = self.stage().use_labels
        return self.defense.encode_batch(x, y if use else None, mask if use else None)

    def obfuscate(
        self, x: torch.Tensor, y: torch.Tensor | None = None, *, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Deployment messages for ``x`` (N, *input_shape): :func:`veil.training.run.obfuscate`.

        ``y`` (and ``mask``) give the training exposure (hard selection by the known label: what a
        client sends to an engine that trains on its records); leave them out for inference. Noise from
        the OS entropy unless ``generator`` (a research opt-in: reproducible by whoever holds it). Puts
        the client in eval mode.
        """
        self.eval()
        device = self.defense._device()
        x, y, mask = (None if t is None else t.to(device) for t in (x, y, mask))
        self.defense.check_input(x, y)
        return obfuscate(self.defense, x, y, mask=mask, generator=generator)

    def save(self, path: str | Path) -> None:
        """Write the client side alone as safetensors (weights + the defense's config in the metadata),
        the file ``veil query``, :class:`veil.Client` and ``veil export-client`` read."""
        save_obfuscator(path, _on_cpu(self.defense))

    @classmethod
    def load(cls, path: str | Path) -> "PrivateClient":
        """A client from a file :meth:`save` (or ``veil train``'s ``obfuscator.safetensors``) wrote; in eval mode."""
        return cls(load_obfuscator(path)).eval()

    def extra_repr(self) -> str:
        return f"defense={self.defense.name!r}, input_shape={self.defense.input_shape}, stage={self.stage().name!r}"


class DecodedModel(nn.Module):
    """The user's model behind the defense's server-side ``decode``: ``model(defense.decode(m))``.

    Returned by :meth:`Obfuscation.make_private` only for defenses whose ``decode`` is not the identity
    (SVD, which sends coefficients); the defense's parameters are not registered here (they belong to the
    client, and to the optimizer once). Attributes not found here are looked up on ``module``.
    """

    def __init__(self, module: nn.Module, defense: Defense) -> None:
        super().__init__()
        self.module = module
        self._defense = (defense,)  # a tuple: not a submodule, so its parameters are not counted twice

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return self.module(self._defense[0].decode(m))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


# ------------------------------------------------------------------------------------------ the engine
class _StagedLoader:
    """The user's data loader, unchanged, except that starting an epoch (``iter``) tells the engine, which
    moves the defense to the stage that epoch belongs to."""

    def __init__(self, loader: Iterable, engine: "Obfuscation") -> None:
        self.loader, self.engine = loader, engine

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        self.engine._start_epoch()
        return iter(self.loader)

    def __getattr__(self, name: str) -> Any:  # batch_size, dataset, ... of the user's loader
        return getattr(self.__dict__["loader"], name)


class Obfuscation:
    """Make a PyTorch training setup private: the records leave only as a defense's messages.

    The user path, start to end (each step has its own docstring):

    1. ``engine = veil.Obfuscation(defense="scnl", lambda_=1.0)``: pick a method by name
       (``veil.defenses.list_defenses()``; ``veil list`` describes them) and its options; ``knob=`` sets
       the method's trade-off knob under any name, ``client_budget=`` sizes its client network to a share
       of your model's FLOPs.
    2. ``client, model, optimizer, loader = engine.make_private(model=..., optimizer=..., data_loader=...,
       epochs=N)``: builds the defense for your records (their shape is read from the first batch) and
       model (the number of classes from its output), adds the defense's parameters to *your*
       optimizer, and returns the client side (:class:`PrivateClient`), the model the server runs
       (yours; for SVD, yours behind its ``decode``), the optimizer, and the loader.
    3. Your own loop, unchanged but for two calls::

           for epoch in range(N):
               for x, y, *side in loader:
                   loss = engine.loss(model(client(x, y, *side)), y)   # task loss + the defense's penalty
                   optimizer.zero_grad(); loss.backward(); optimizer.step()

       ``side`` is the region mask (B, 1, H, W) for defenses that use one (``scnl-region``); other
       defenses need loaders of (x, y). With your own loss: ``my_loss + engine.penalty()``.
       Multi-stage defenses (``cloak``, ``shredder``, ``svd``, ``sample-and-hold``, ``scnl-twostage``)
       switch stage by themselves: each pass over ``loader`` is one epoch, and the ``epochs`` given to
       ``make_private`` are split among the stages as ``veil train`` splits them. Without ``epochs``,
       call :meth:`stage_done` when a stage has trained enough. Which parameters train in a stage is the
       defense's choice; the others get no gradient, so your optimizer leaves them alone.
    4. ``client.eval()``: from here on ``client(x)`` is the deployment path (no label; noise from the
       operating system's entropy, :func:`veil.noise.private_noise`).
    5. ``report = veil.leakage(client, secret_loader, model=model)``: attackers retrained on the messages
       of records with a secret label ``z`` (batches of (x, y, z)), scored on held-out ones, beside the
       floor (what guessing reaches) and your model's primary accuracy: :class:`LeakageReport`.
       :class:`Leakage` is the same as a metric (``update`` / ``compute``).
    6. ``client.save("client.safetensors")`` (for ``veil query`` / :class:`veil.Client` against a
       ``veil serve`` service) and ``veil.export_onnx(client, "client.onnx")`` (clients without Python;
       for the defenses ``veil serve`` splits, region selection not among them yet).
    7. Federated clients on Flower: ``ClientApp(mods=[veil.ObfuscationMod(client)])`` replaces the records
       in every reply by their messages before it leaves (:mod:`veil.federated.mod`).

    Most methods send messages of the records' shape, so the model you have for the records reads them.
    SVD sends coefficients and the model reads its ``decode`` (the first server layer's output): build
    the model for ``veil.create_defense("svd", input_shape=..., num_classes=...).output_shape()`` and
    pass ``num_classes=`` here.

    Differences from ``veil train``: the optimizer, its learning rate and schedule are yours (a method's
    paper recipe, such as ANI's SGD at 0.1 with cosine annealing, is not applied; a warning says so), and
    one optimizer serves every stage (``veil train`` starts a fresh one per stage).

    Args:
        defense: The method's registry name.
        knob: Value of the method's knob (``lambda_``, ``sigma``, ...; ``None``: its default or the
            option given by name).
        client_budget: Client FLOPs allowed, as a fraction in (0, 1] of *your* model's (``None``: the
            method's own size). A budget the method cannot meet is refused, naming the smallest share.
        num_classes: Primary classes (``None``: read from the model's output on the first batch).
        **options: The method's own keyword arguments (``lambda_=0.1``, ``selector_width=4``, ...);
            unknown ones are refused, listing the accepted ones.
    """

    def __init__(self, defense: str = "scnl", *, knob: float | None = None, client_budget: float | None = None, num_classes: int | None = None, **options: Any) -> None:
        self.name = defense
        # what can be checked before the records are seen is checked now: the name (ValueError listing the
        # valid ones), the knob, the options' types
        check_option_types(defense_class(defense), options)
        self.options = with_knob(defense, knob, options)
        if client_budget is not None and not (isinstance(client_budget, (int, float)) and math.isfinite(client_budget) and 0 < client_budget <= 1):
            raise ValueError(f"client_budget must be a fraction in (0, 1] of the server's FLOPs, got {client_budget!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.client_budget, self.num_classes = client_budget, num_classes
        self.defense: Defense | None = None
        self.client: PrivateClient | None = None
        self.client_share: float | None = None
        self._model: nn.Module | None = None
        self._loader: Iterable | None = None
        self._stages: list[Stage] = []
        self._counts: list[int] | None = None
        self._stage_index = -1
        self._epoch = 0

    # ---------------------------------------------------------------------------------- make_private
    def make_private(
        self, *, model: nn.Module, optimizer: torch.optim.Optimizer, data_loader: Iterable, epochs: int | None = None
    ) -> tuple[PrivateClient, nn.Module, torch.optim.Optimizer, Iterable]:
        """Build the defense for ``model`` and ``data_loader``; return (client, model, optimizer, loader).

        Args:
            model: Your server model, reading the defense's messages (for most methods they have the
                records' shape, (B, *input_shape)); it outputs (B, num_classes) logits.
            optimizer: Your optimizer over ``model``'s parameters; the defense's parameters are added to
                it as a new parameter group (its defaults: lr, weight decay, ...).
            data_loader: Batches ``(x, y)`` or ``(x, y, mask)``: x (B, C, H, W) float, y (B,) int64
                primary labels, mask (B, 1, H, W) 0/1 on the sensitive region (region defenses).
            epochs: Passes over the loader you will make; splits a multi-stage defense's stages among
                them (``None``: stages move on only at :meth:`stage_done`).

        Returns:
            ``client`` (:class:`PrivateClient`, in training mode, at the first stage), ``model`` (yours;
            :class:`DecodedModel` around it where the method has a server-side ``decode``),
            ``optimizer`` (yours, with the defense's parameters added) and ``loader`` (yours; iterating
            it starts an epoch, which moves the stages on).
        """
        if self.defense is not None:
            raise ValueError("make_private was already called on this engine; make a new veil.Obfuscation for another model")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be a positive integer or None, got {epochs!r}")
        x, y, side = _first_batch(data_loader)
        device = module_device(model)
        num_classes = self.num_classes or _output_classes(model, x.to(device))
        options = dict(self.options)
        if self.client_budget is not None:
            from veil.defenses.budget import fit_client_budget

            # counted on a CPU copy in eval mode: the user's model (its batch-norm statistics) is not touched
            probe_model = copy.deepcopy(model).cpu().eval()
            options, self.client_share = fit_client_budget(self.name, self.client_budget, options, input_shape=tuple(x.shape[1:]), num_classes=num_classes, model=probe_model)
        defense = create_defense(self.name, input_shape=tuple(x.shape[1:]), num_classes=num_classes, **options).to(device)
        defense.check_input(x, y)
        if defense.uses_mask and not side:
            raise ValueError(f"defense {self.name!r} learns from the sensitive region's masks: give a loader of (x, y, mask) batches")
        server = DecodedModel(model, defense) if _has_decode(defense) else model
        _check_model_reads_messages(defense, server, x.to(device), num_classes)
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = list(defense.parameters())
        if any(id(p) in ids for p in params):
            raise ValueError("the optimizer already holds the defense's parameters; give it the model's parameters only")
        if params:
            optimizer.add_param_group({"params": params})
        if defense.recipe is not None:
            warnings.warn(f"defense {self.name!r}'s paper trains it with {defense.recipe}; the front door trains with your optimizer as it is", stacklevel=2)
        self.defense, self.client, self._model, self._loader = defense, PrivateClient(defense), model, data_loader
        self._stages = defense.stages()
        if epochs is not None:
            if epochs < len(self._stages):
                raise ValueError(f"epochs={epochs}: defense {self.name!r} trains in {len(self._stages)} stages and needs at least {len(self._stages)} epochs")
            self._counts = stage_epochs(self._stages, epochs)
        self._enter(0)
        return self.client, server, optimizer, _StagedLoader(data_loader, self)

    # ---------------------------------------------------------------------------------- the loop's calls
    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Task loss plus the privacy term: ``cross_entropy(logits, y) + penalty()`` (as ``veil train``).

        Call it after the ``client(x, y)`` of the same batch (the penalty belongs to that ``encode``).
        """
        return F.cross_entropy(logits, y) + self.penalty()

    def penalty(self) -> torch.Tensor:
        """The defense's privacy term for the last ``client(...)`` call, already weighted by its knob; add
        it to your own loss."""
        return self._require().penalty()

    @property
    def stage(self) -> Stage:
        """The stage training is in (``veil.defenses.base.Stage``: name, use_labels, train_model)."""
        self._require()
        return self._stages[self._stage_index]

    def stage_done(self) -> Stage:
        """End the current stage and enter the next; returns it. ``ValueError`` after the last one.

        Needed only when ``make_private`` had no ``epochs`` (otherwise iterating the loader does it).
        """
        self._require()
        if self._stage_index + 1 >= len(self._stages):
            raise ValueError(f"defense {self.name!r} is in its last stage ({self.stage.name!r}); there is no next stage")
        self._enter(self._stage_index + 1)
        return self.stage

    # ---------------------------------------------------------------------------------- internals
    def _require(self) -> Defense:
        if self.defense is None:
            raise ValueError("call engine.make_private(model=..., optimizer=..., data_loader=...) first")
        return self.defense

    def _start_epoch(self) -> None:
        """Called when the loader starts a pass: enter the stage that epoch belongs to."""
        if self._counts is not None:
            bounds = np.cumsum(self._counts)  # epoch e belongs to the first stage whose bound exceeds it
            target = int(np.searchsorted(bounds, self._epoch, side="right"))
            if target >= len(self._stages):
                if self._epoch == bounds[-1]:
                    warnings.warn(f"epoch {self._epoch + 1} is beyond the {int(bounds[-1])} given to make_private; training goes on in the last stage", stacklevel=3)
                target = len(self._stages) - 1
            while self._stage_index < target:
                self._enter(self._stage_index + 1)
        self._epoch += 1

    def _enter(self, index: int) -> None:
        """Enter stage ``index`` as :func:`veil.training.loop.fit` does: the defense picks what trains,
        the model trains where the stage says, and the defense's ``setup`` runs on the training data."""
        defense, model = self._require(), self._model
        assert model is not None and self.client is not None
        stage = self._stages[index]
        defense.set_stage(stage.name)
        self.client.train()
        _trainable(defense, model, stage)
        for p in [*defense.parameters(), *model.parameters()]:
            if not p.requires_grad:
                p.grad = None  # a gradient left from the last stage would keep moving a frozen weight (momentum)
        defense.setup(model, OnDevice(self._loader, module_device(model)))
        self._stage_index = index


def _first_batch(loader: Iterable) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(x, y, side) of the loader's first batch, checked: x (B, C, H, W) float, y (B,) integer labels."""
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise ValueError("data_loader yields no batches") from None
    except TypeError:
        raise TypeError(f"data_loader must be an iterable of (x, y) batches, got {type(loader).__name__}") from None
    if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not all(isinstance(t, torch.Tensor) for t in batch):
        raise ValueError("data_loader must yield (x, y) or (x, y, mask) batches of tensors")
    x, y, *side = batch
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
    if y.dtype not in (torch.int64, torch.int32) or y.shape != (len(x),):
        raise ValueError(f"y must be integer labels of shape ({len(x)},), got {y.dtype} {tuple(y.shape)}")
    return x, y, side


@torch.no_grad()
def _output_classes(model: nn.Module, x: torch.Tensor) -> int:
    """Number of classes the model outputs on records ``x`` (run in eval mode; its state is not changed)."""
    was = model.training
    model.eval()
    try:
        out = model(x[:2])
    except Exception as err:  # noqa: BLE001 - any failure means: tell us the number of classes
        raise ValueError(f"could not read the number of classes from the model's output on the records ({type(err).__name__}: {err}); pass num_classes=") from err
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < 2:
        raise ValueError(f"the model must output (B, num_classes) logits with num_classes >= 2, got {getattr(out, 'shape', type(out).__name__)}")
    return int(out.shape[1])


@torch.no_grad()
def _check_model_reads_messages(defense: Defense, server: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    """One eval-mode pass ``server(encode(x))``: a model that cannot read the messages is said now."""
    was = defense.training, server.training
    defense.eval()
    server.eval()
    try:
        out = server(defense.encode(x[:2]))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"the model cannot read defense {defense.name!r}'s messages of shape {tuple(defense.output_shape())} ({type(err).__name__}: {err})") from err
    finally:
        defense.train(was[0])
        server.train(was[1])
    if tuple(out.shape) != (len(x[:2]), num_classes):
        raise ValueError(f"the model outputs {tuple(out.shape)} on the messages, expected (B, {num_classes})")


# ------------------------------------------------------------------------------------------ leakage
@dataclasses.dataclass(frozen=True)
class LeakageReport:
    """What an attacker reads of the secret from the messages, beside what guessing reaches.

    Attributes:
        exposure: ``inference`` (the message alone), ``training`` (hard selection by the label; the
            attacker reads y beside the message, as the engine does) or ``training-time``.
        attack: Test accuracy on the secret of the attacker with the best validation accuracy (the
            headline number; lower is more private).
        best: That attacker's architecture.
        attackers: Every attacker's test accuracy, by architecture.
        floor: What an attacker reaches without the message: the majority class of the secret, or (when
            it reads y) the best guess of the secret from the primary label.
        gap: ``attack - floor``: the leakage the messages add (0 is the best any defense can do).
        primary: Your model's primary accuracy on the same test records' messages at this exposure
            (``None`` where no model was given).
        averaging: Accuracy of the best architecture on the mean of k obfuscations of each record (an
            engine that receives a record k times), ``None`` where off.
        under_trained: The best attacker is clearly below the floor: its number is no evidence of privacy.
        records: Attacker train / val / test record counts.
        details: :func:`veil.evaluation.attack.attack_exposure`'s full result.
    """

    exposure: str
    attack: float
    best: str
    attackers: dict[str, float]
    floor: float
    gap: float
    primary: float | None
    averaging: float | None
    under_trained: bool
    records: dict[str, int]
    details: dict[str, Any] = dataclasses.field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready numbers (without ``details``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "details"}

    def __str__(self) -> str:
        rows = [f"leakage at the {self.exposure} exposure ({self.records['test']} test records)"]
        if self.primary is not None:
            rows.append(f"  primary accuracy      {self.primary:.4f}")
        rows.append(f"  attack (best: {self.best:<7}) {self.attack:.4f}   floor {self.floor:.4f}   gap to floor {self.gap:+.4f}")
        rows += [f"    {name:<20} {acc:.4f}" for name, acc in self.attackers.items()]
        if self.averaging is not None:
            rows.append(f"  averaging attack      {self.averaging:.4f}")
        if self.under_trained:
            rows.append("  WARNING: the best attacker is below the floor: under-trained, no evidence of privacy")
        return "\n".join(rows)


class Leakage:
    """Leakage of a client as a metric: ``update`` with batches of records, ``compute`` the report.

    ::

        metric = veil.Leakage(client, model=model)
        for x, y, z in secret_loader:          # z: the secret label; records the client never trained on
            metric.update(x, y, z)
        report = metric.compute()              # LeakageReport

    ``compute`` splits the records 60/20/20 (seeded) into the attackers' training, early-stopping and
    test records, obfuscates them with the client's defense (fresh noise per view, from a seeded
    generator so the measurement reproduces) and trains each attacker from scratch
    (:func:`veil.evaluation.attack.attack_exposure`, the attack of ``veil evaluate``). A lower
    ``attack`` is better (``higher_is_better = False``); ``reset`` empties the records.

    Args:
        client: The :class:`PrivateClient` (or a Defense).
        model: Your server model, to report its primary accuracy on the test records (optional).
        attackers: ``"strong"`` (``veil evaluate``'s five architectures, 40 epochs, 4 views, averaging),
            ``"fast"`` (linear + MLP, 15 epochs; a lower bound only), or a sequence of architecture
            names (``linear``, ``mlp``, ``mlp-bn``, ``cnn``, ``cnn-bn``, ``server``).
        exposure: ``inference`` (default: what a deployed client sends), ``training`` or ``training-time``.
        config: A full :class:`~veil.evaluation.attack.AttackConfig` (replaces ``attackers``; its
            exposures are replaced by ``exposure``).
        num_secret: Classes of the secret (``None``: the largest z seen + 1).
        seed: Seed of the split, the attackers and the noise of the measurement.
        log: Where the attackers' progress goes (default: nowhere).
    """

    higher_is_better: ClassVar[bool] = False
    #: Shares of the records for the attackers' training, early stopping and test.
    fractions: ClassVar[tuple[float, float, float]] = (0.6, 0.2, 0.2)

    def __init__(
        self,
        client: PrivateClient | Defense,
        *,
        model: nn.Module | None = None,
        attackers: str | Sequence[str] = "strong",
        exposure: str = "inference",
        config: Any = None,
        num_secret: int | None = None,
        seed: int = 0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        from veil.evaluation.attack import ATTACK_EXPOSURES, AttackConfig

        self.defense = _unwrap(client)
        if exposure not in ATTACK_EXPOSURES:
            raise ValueError(f"unknown exposure {exposure!r}; valid: {', '.join(ATTACK_EXPOSURES)}")
        if config is None:
            if isinstance(attackers, str):
                if attackers not in ATTACKER_PRESETS:
                    raise ValueError(f"unknown attacker preset {attackers!r}; valid: {', '.join(ATTACKER_PRESETS)}, or a list of architectures")
                config = AttackConfig(**ATTACKER_PRESETS[attackers], seed=seed)
            else:
                config = AttackConfig(attackers=tuple(attackers), seed=seed)
        elif not isinstance(config, AttackConfig):
            raise TypeError(f"config must be a veil.evaluation.attack.AttackConfig, got {type(config).__name__}")
        self.config = dataclasses.replace(config, exposures=(exposure,))
        self.exposure, self.model, self.num_secret, self.seed = exposure, model, num_secret, seed
        self.log = log or (lambda s: None)
        self.reset()

    def reset(self) -> None:
        """Forget every record given to :meth:`update`."""
        self._parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def update(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add records: x (B, *input_shape) float, y (B,) primary labels, z (B,) secret labels, and the
        region mask (B, 1, H, W) for region defenses at the training exposure."""
        if not isinstance(z, torch.Tensor) or z.dtype not in (torch.int64, torch.int32) or z.shape != (len(x),):
            raise ValueError(f"z must be integer secret labels of shape ({len(x)},), got {getattr(z, 'dtype', type(z).__name__)} {tuple(getattr(z, 'shape', ()))}")
        if z.numel() and int(z.min()) < 0:
            raise ValueError("secret labels z must be >= 0")
        self.defense.check_input(x, y)
        if mask is not None and (mask.shape != (len(x), 1, *x.shape[2:])):
            raise ValueError(f"mask must have shape ({len(x)}, 1, {x.shape[2]}, {x.shape[3]}), got {tuple(mask.shape)}")
        self._parts.append((x.detach().cpu().float(), y.detach().cpu().long(), z.detach().cpu().long(), None if mask is None else mask.detach().cpu()))

    def compute(self) -> LeakageReport:
        """Train the attackers on the records so far and report (minutes with ``strong``).

        The caller's PyTorch random state is left as it was (the measurement seeds its own)."""
        return self._report(self._task())

    def _report(self, task: Task) -> LeakageReport:
        from veil.evaluation.attack import attack_exposure

        was = self.defense.training
        with torch.random.fork_rng(devices=[]):
            # the attack draws its messages on the CPU (its attackers train on config.device)
            result = attack_exposure(_on_cpu(self.defense), task, self.exposure, self.config, log=self.log)
            primary = None
            if self.model is not None:
                model = self.model.module if isinstance(self.model, DecodedModel) else self.model
                seed_everything(self.seed + 13)
                primary = accuracy(self.defense, model, task.test, use_labels=self.exposure != "inference")
        self.defense.train(was)
        avg = result["averaging"]
        return LeakageReport(
            exposure=self.exposure, attack=result["attack_acc"], best=result["best"],
            attackers={n: r["test_acc"] for n, r in result["attackers"].items()},
            floor=result["reachable_floor"], gap=result["attack_acc"] - result["reachable_floor"], primary=primary,
            averaging=None if avg is None else avg["test_acc"], under_trained=bool(result["under_trained"]),
            records={"train": result["train_records"], "val": result["val_records"], "test": result["test_records"]}, details=result,
        )

    def _task(self) -> Task:
        """The records so far as a :class:`~veil.data.tasks.Task`: 60/20/20 split, the attackers' training
        part doubling as ``held_out`` (records the client is declared not to have trained on)."""
        if not self._parts:
            raise ValueError("no records: call update(x, y, z) first")
        x, y, z = (torch.cat([p[i] for p in self._parts]) for i in range(3))
        masks = [p[3] for p in self._parts]
        mask = torch.cat(masks) if all(m is not None for m in masks) else None
        n = len(x)
        if n < 10:
            raise ValueError(f"need at least 10 records to train and score attackers, got {n}")
        num_secret = self.num_secret or int(z.max()) + 1
        if int(z.max()) >= num_secret:
            raise ValueError(f"secret labels reach {int(z.max())}, but num_secret is {num_secret}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        a, b = int(self.fractions[0] * n), int((self.fractions[0] + self.fractions[1]) * n)
        whole = Split(x, y, z, mask)
        tr, va, te = (whole.subset(perm[i:j].sort().values) for i, j in ((0, a), (a, b), (b, n)))
        return Task("secret", tr, va, te, num_primary=self.defense.num_classes, num_secondary=num_secret, held_out=tr)


def leakage(client: PrivateClient | Defense, data: Iterable | Task, **options: Any) -> LeakageReport:
    """The leakage report of ``client`` on ``data``: :class:`Leakage` updated with every batch, computed.

    Args:
        client: The :class:`PrivateClient` (or a Defense).
        data: Batches ``(x, y, z)`` or ``(x, y, z, mask)`` of records the client did *not* train on, with
            their secret label ``z``; or a :class:`veil.data.Task` (its own splits are then used as they
            are, as ``veil evaluate`` uses them: held-out train records for the attackers' training).
        **options: :class:`Leakage`'s (``model``, ``attackers``, ``exposure``, ``config``, ``num_secret``,
            ``seed``, ``log``).
    """
    metric = Leakage(client, **options)
    if isinstance(data, Task):
        return metric._report(data)
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) not in (3, 4):
            raise ValueError("leakage needs batches (x, y, z) or (x, y, z, mask), z the secret label")
        metric.update(*batch)
    return metric.compute()


def export_onnx(client: PrivateClient | Defense, path: str | Path) -> dict[str, Any]:
    """Write the client's deployment ``encode`` as ONNX (:func:`veil.serving.onnx_client.export_client`):
    inputs ``x`` and, for a noisy defense, ``noise`` (drawn from the OS entropy at run time by
    :class:`veil.serving.onnx_client.OnnxObfuscator`); output ``message``. Returns the file's metadata."""
    from veil.serving.onnx_client import export_client

    return export_client(_on_cpu(_unwrap(client)), path)


__all__ = ["ATTACKER_PRESETS", "DecodedModel", "Leakage", "LeakageReport", "Obfuscation", "PrivateClient", "export_onnx", "leakage"]
