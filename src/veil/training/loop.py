"""Training on classification tasks: every defense runs through ``fit``, and so does the compute engine.

``fit`` takes either a :class:`~veil.data.tasks.Task` (clean records on the data owner's side: it walks
the defense's stages; in each, the loss is the task loss on the server model's output for
``decode(encode(x, y or None))`` plus ``defense.penalty()``) or :class:`Messages` (records already
encoded, as an untrusted engine receives them: the loss is the task loss on ``model(decode(m))``, with
screening and FedProx's proximal term as options). A defense decides which of its parameters train
(``set_stage``); it never brings a loop of its own. ``fit`` walks the stages and says what a batch and its
loss are; the epochs themselves run in the one epoch loop, :func:`veil.training.epochs.run_epochs`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import sys
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from veil.data.tasks import Split, Task
from veil.defenses.base import Defense, Recipe, Stage
from veil.noise import check_seed
from veil.training.epochs import LR_SCHEDULES, EarlyStopping, StagePlan, run_epochs
from veil.training.screening import Screening

#: Most epochs any training may ask for: a typo such as 10000000000 would otherwise run for ever.
MAX_EPOCHS = 10_000

#: Where training runs unless told otherwise. A runtime choice, not part of :class:`TrainConfig`: the config
#: is checked when a run resumes, and a run started on one device may resume on another.
DEFAULT_DEVICE = "cpu"


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` (``cpu``, ``cuda``, ``cuda:N`` or ``auto``: cuda where available) as a ``torch.device``.

    The one resolver: the attackers' ``AttackConfig.device`` goes through it too. CUDA asked for where there is none is a ``ValueError``
    naming it, before anything is built. A ``torch.device`` is taken as it is.
    """
    if isinstance(device, torch.device):
        return device
    if not (device in ("cpu", "auto", "cuda") or device.startswith("cuda:")):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA device is available")
    return torch.device(device)


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters (else buffers) are; the CPU for a module with neither."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


class OnDevice:
    """A loader whose batches arrive on ``device`` (the data stays on the CPU; one batch at a time moves)."""

    def __init__(self, batches: Any, device: torch.device) -> None:
        self.batches, self.device = batches, device

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        for batch in self.batches:
            yield [t.to(self.device) for t in batch]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (saved as ``RUN/config.json``).

    Attributes:
        task: Task name (``digits-lt5``, ``mnist-lt5``, ``fashion-lt5``, ``npz:PATH``, ``idx:DIR``).
        defense: Defense name (see ``veil.defenses.list_defenses()``).
        knob: Value for the defense's knob (``None`` keeps the method's default).
        defense_options: Other keyword arguments for the defense.
        model: Server model name (``cnn``, ``resnet`` or ``mlp``).
        epochs: Epochs in all, shared among the defense's stages.
        batch_size: Records per batch.
        lr: Adam learning rate (defenses that declare a :class:`~veil.defenses.base.Recipe`, such as ANI's
            SGD at 0.1 with cosine annealing, train with their recipe instead).
        seed: Seed for data order, initialisation and training noise.
        train_size: Keep only this many training records (``None``: all).
        lr_schedule: ``constant`` (Adam at ``lr`` throughout) or ``cosine`` (``lr`` decayed to 0 along a
            half cosine over each stage's steps; computed from the step index, so a resumed run follows
            the same schedule).
        client_budget: Client FLOPs allowed as a fraction of the server model's (``None``: the defense's
            own size). Sizes the defense's client network (:mod:`veil.defenses.budget`); a budget the
            defense cannot meet is refused.
        patience: Early stopping (``None``: off, every epoch runs). In the last stage (the one whose
            weights are deployed), training stops after ``patience`` epochs without a better validation
            accuracy on the inference path (no label, no mask), and the weights of the best epoch are kept. ``epochs`` is then the cap. Earlier
            stages of a multi-stage defense always run their share.
    """

    task: str = "digits-lt5"
    defense: str = "scnl"
    knob: float | None = None
    defense_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: str = "cnn"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    train_size: int | None = None
    lr_schedule: str = "constant"
    client_budget: float | None = None
    patience: int | None = None

    def __post_init__(self) -> None:
        check_seed(self.seed)
        if self.patience is not None and (isinstance(self.patience, bool) or not isinstance(self.patience, int) or not 1 <= self.patience <= MAX_EPOCHS):
            raise ValueError(f"patience must be an integer in [1, {MAX_EPOCHS}] (epochs without a better validation accuracy), got {self.patience!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.epochs > MAX_EPOCHS:
            raise ValueError(f"epochs must be <= {MAX_EPOCHS}, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.lr > 10:  # Adam moves each weight by about lr per step: 1e30 gives a silently broken model
            raise ValueError(f"lr must be a positive number of at most 10, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.knob is not None and not math.isfinite(self.knob):
            raise ValueError(f"knob must be a finite number, got {self.knob}")
        if self.client_budget is not None and not (math.isfinite(self.client_budget) and 0 < self.client_budget <= 1):
            raise ValueError(f"client_budget must be a fraction in (0, 1] of the server's FLOPs, got {self.client_budget}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return config_from_dict(cls, d)


def config_from_dict(cls: type, d: dict[str, Any], what: str = "config") -> Any:
    """``cls(**d)`` for a dataclass config, refusing keys that are none of its fields (``what`` names the
    config in the message)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(unknown)}; valid: {sorted(names)}")
    return cls(**d)


def stage_epochs(stages: list[Stage], epochs: int) -> list[int]:
    """Split ``epochs`` among stages by their ``epoch_share``; the counts sum to ``epochs`` exactly.

    Largest-remainder apportionment: each stage gets the floor of its quota ``epochs * share / total``,
    the epochs left over go to the largest remainders (earlier stage first on ties), and a stage left
    with 0 takes one from the stage with the most, so every stage runs. With fewer epochs than stages
    every stage gets one epoch (the sum is then ``len(stages)``; :func:`fit` says so in its log).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not stages:
        raise ValueError("a defense must have at least one stage")
    shares = [float(s.epoch_share) for s in stages]
    if any(not (sh > 0 and math.isfinite(sh)) for sh in shares):
        raise ValueError(f"epoch_share must be a positive number for every stage, got {shares}")
    if epochs <= len(stages):
        return [1] * len(stages)
    quotas = [epochs * sh / sum(shares) for sh in shares]
    counts = [int(math.floor(q)) for q in quotas]
    by_remainder = sorted(range(len(stages)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: epochs - sum(counts)]:
        counts[i] += 1
    for i, n in enumerate(counts):
        if n == 0:
            donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
            counts[donor] -= 1
            counts[i] = 1
    return counts


@dataclasses.dataclass(frozen=True)
class Messages:
    """Records exactly as the compute engine receives them (already encoded on the client), with their
    primary labels: what :func:`fit` trains the server model on at the untrusted side.

    Attributes:
        x: (N, ...) the messages (records the data owner chose to send in the clear count as messages too).
        y: (N,) primary labels.
        screened: (N,) bool, the records that get a fresh screen every batch (None: none).
    """

    x: torch.Tensor
    y: torch.Tensor
    screened: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.x) == 0:
            raise ValueError("no records to train on")
        if len(self.x) != len(self.y):
            raise ValueError(f"x and y must have the same length, got {len(self.x)} and {len(self.y)}")
        if self.screened is not None and len(self.screened) != len(self.x):
            raise ValueError(f"screened must flag every record: {len(self.screened)} flags for {len(self.x)} records")

    def __len__(self) -> int:
        return len(self.x)

    def loader(self, batch_size: int, *, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Batches of (messages, y, screened flags) in an order drawn from ``seed``."""
        flags = torch.zeros(len(self.x), dtype=torch.bool) if self.screened is None else self.screened.bool()
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(seed))
        return [(self.x[i], self.y[i], flags[i]) for i in (order[j : j + batch_size] for j in range(0, len(order), batch_size))]


#: The one stage of training on :class:`Messages`: the engine trains the model; nothing of the client's does.
ENGINE_STAGE = Stage("engine", use_labels=False, train_model=True)


def make_optimizer(params: list[nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    """The optimizer ``recipe`` names over ``params`` (its learning rate is set per step by :func:`fit`)."""
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def training_recipe(defense: Defense, config: "TrainConfig") -> Recipe:
    """The defense's own recipe where its paper prescribes one, else Adam at the run's lr and schedule."""
    if defense.recipe is not None:
        return defense.recipe
    return Recipe(optimizer="adam", lr=config.lr, schedule=config.lr_schedule)


def train_step(
    defense: Defense, model: nn.Module, x: torch.Tensor, y: torch.Tensor, stage: Stage, mask: torch.Tensor | None = None,
    secret: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and logits for one batch in ``stage`` (encode on the client, decode + model on the server).

    ``mask``: the records' region masks, handed to region-selection defenses in stages that use labels
    (what the data owner knows), ignored otherwise. ``secret``: the records' secret labels (-1 where
    unknown), handed likewise to known-secret defenses.
    """
    known = stage.use_labels
    m = defense.encode_batch(x, y if known else None, defense.mask_for(known, mask), secret if known else None)
    logits = model(defense.decode(m))
    loss = F.cross_entropy(logits, y) + defense.penalty()
    return loss, logits


@torch.no_grad()
def model_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512) -> float:
    """Accuracy of ``model`` on records ``x`` exactly as given (clean, or messages already decoded); the
    records go batch by batch to the device the model is on."""
    was = model.training
    model.eval()
    device = module_device(model)
    correct = sum(int((model(x[i : i + batch_size].to(device)).argmax(1) == y[i : i + batch_size].to(device)).sum()) for i in range(0, len(x), batch_size))
    model.train(was)
    return correct / max(1, len(x))


@torch.no_grad()
def accuracy(defense: Defense, model: nn.Module, split: Split, *, use_labels: bool = False, batch_size: int = 512) -> float:
    """Primary accuracy of ``model`` on ``split`` obfuscated by ``defense``.

    ``use_labels=False`` is the inference path (no label on the client); ``True`` the training exposure.
    The records go batch by batch to the device the model is on.
    """
    was = defense.training, model.training
    defense.eval()
    model.eval()
    device = module_device(model)
    correct = 0
    for i in range(0, len(split), batch_size):
        x, y = split.x[i : i + batch_size].to(device), split.y[i : i + batch_size].to(device)
        mask = split.mask[i : i + batch_size].to(device) if split.mask is not None else None
        logits = model(defense.decode(defense.encode_batch(x, y if use_labels else None, defense.mask_for(use_labels, mask))))
        correct += int((logits.argmax(1) == y).sum())
    defense.train(was[0])
    model.train(was[1])
    return correct / max(1, len(split))


def known_secrets(split: Split, fraction: float, seed: int) -> Split:
    """``split`` with ``z`` kept for a fixed random ``fraction`` of its records (drawn from ``seed``, the same
    in every epoch: the records whose secret the data owner knows) and -1 for the rest."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"secret_fraction must lie in [0, 1], got {fraction!r}")
    keep = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed + 31))[: round(fraction * len(split))]
    z = torch.full_like(split.z, -1)
    z[keep] = split.z[keep]
    return Split(split.x, split.y, z, split.mask)


def _trainable(defense: Defense, model: nn.Module, stage: Stage) -> list[nn.Parameter]:
    params = [p for p in defense.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(stage.train_model)
    if stage.train_model:
        params += list(model.parameters())
    return params


def training_state(defense: Defense, model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the defense's and the model's weights (``defense.`` / ``model.`` prefixes)."""
    out = {f"defense.{k}": v.detach().cpu().clone() for k, v in defense.state_dict().items()}
    out.update({f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()})
    return out


def load_training_state(state: dict[str, torch.Tensor], defense: Defense, model: nn.Module) -> None:
    """Put :func:`training_state`'s weights back (onto wherever ``defense`` and ``model`` are)."""
    for prefix, module in (("defense.", defense), ("model.", model)):
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def fit(
    defense: Defense | None,
    model: nn.Module,
    data: Task | Messages,
    config: TrainConfig,
    *,
    screening: Screening | None = None,
    proximal_mu: float = 0.0,
    start: tuple[int, int] = (0, 0),
    optimizer_state: dict | None = None,
    on_epoch_end: Callable[[int, int, torch.optim.Optimizer, dict], None] | None = None,
    log: Callable[[str], None] | None = None,
    name: str | None = None,
    device: str | torch.device = DEFAULT_DEVICE,
    past: list[dict[str, Any]] | None = None,
    best_state: dict[str, torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` (and ``defense``, on clean records) on ``data``.

    Args:
        defense: The obfuscator. With a :class:`Task` it encodes every batch and trains through its
            stages. With :class:`Messages` it only decodes (the server's step) and never trains; None
            there means messages the model reads as they are.
        data: A :class:`Task` (the data owner's clean records; validation accuracy after every epoch) or
            :class:`Messages` (the engine's already-encoded records: one ``engine`` stage, model only).
        screening: Messages only: screen the flagged records afresh in every batch (seed 000 §4.1).
        proximal_mu: Adds FedProx's ``mu / 2 * ||w - w_start||^2`` over the model's parameters.
        start: (stage index, epoch within stage) to resume from.
        optimizer_state: Optimizer state to restore when resuming mid-stage.
        on_epoch_end: Called as ``(stage_index, next_epoch, optimizer, record)`` after every epoch
            (checkpointing lives there).
        log: Where progress lines go (default: stderr).
        name: Label of the log lines (default: the defense's name, or ``engine``).
        device: Where to train (:func:`resolve_device`). ``defense`` and ``model`` are moved there and
            stay there; the records stay on the CPU and go over one batch at a time. Screens and the
            data order are drawn on the CPU whatever the device, the defenses' noise on the device.
        past: With ``config.patience`` and a resume: the records of the epochs already run (early stopping
            goes on counting from them).
        best_state: With ``config.patience`` and a resume: the weights of the best epoch so far
            (:func:`training_state`), restored if no later epoch beats it.

    Returns:
        One record per epoch: stage, epoch, train loss, train accuracy, validation accuracy (Task only);
        with ``config.patience`` the last stage's records say ``best`` (a new best validation accuracy:
        the caller may keep these weights) and the last one ``stopped`` where training stopped early.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    engine = isinstance(data, Messages)
    if defense is None and not engine:
        raise ValueError("fit on a Task needs the defense that encodes its records")
    if screening is not None and not engine:
        raise ValueError("screening applies to records already encoded: pass Messages")
    if not (proximal_mu >= 0 and math.isfinite(proximal_mu)):
        raise ValueError(f"proximal_mu must be a number >= 0, got {proximal_mu!r}")
    name = name or ("engine" if engine or defense is None else defense.name)
    device = resolve_device(device)
    model.to(device)
    if defense is not None:
        defense.to(device)
    stages = [ENGINE_STAGE] if engine else defense.stages()
    counts = [config.epochs] if engine else stage_epochs(stages, config.epochs)
    if sum(counts) != config.epochs:
        log(f"[{name}] {config.epochs} epoch(s) for {len(stages)} stages: each stage runs 1 epoch ({sum(counts)} in all)")
    recipe = Recipe(optimizer="adam", lr=config.lr, schedule=config.lr_schedule) if engine or defense is None else training_recipe(defense, config)
    if not engine and defense.recipe is not None:
        log(
            f"[{name}] trains with its paper's recipe: {recipe.optimizer} lr {recipe.lr} momentum {recipe.momentum} "
            f"weight decay {recipe.weight_decay}, {recipe.schedule} schedule (the run's lr and lr_schedule are not used)"
        )
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    screen_gen = torch.Generator().manual_seed(config.seed + 17)  # screens: a fresh draw every batch

    def batches(si: int, epoch: int) -> OnDevice:
        seed = config.seed + 1000 * si + epoch  # a different but reproducible order every epoch, also after a resume
        if engine:
            return OnDevice(data.loader(config.batch_size, seed=seed), device)
        secrets = defense.uses_secret  # batches (x, y, z or -1, [mask]) for a known-secret defense
        train = known_secrets(data.train, defense.secret_fraction, config.seed) if secrets else data.train
        return OnDevice(train.loader(config.batch_size, shuffle=True, seed=seed, with_secondary=secrets, with_mask=defense.uses_mask), device)

    def step(batch: list[torch.Tensor], stage: Stage) -> tuple[torch.Tensor, int, int]:
        x, y, *extra = batch
        if engine:
            m = screening(x, extra[0], screen_gen) if screening is not None else x
            logits = model(defense.decode(m) if defense is not None else m)
            loss = F.cross_entropy(logits, y)
        else:
            secret = extra.pop(0) if defense.uses_secret else None
            loss, logits = train_step(defense, model, x, y, stage, extra[0] if extra else None, secret)
        if anchor is not None:
            loss = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
        return loss, len(y), int((logits.argmax(1) == y).sum())

    def validate(stage: Stage, early_stopping: bool) -> dict[str, float]:
        scores = {"val_acc": accuracy(defense, model, data.val, use_labels=stage.use_labels)}
        if early_stopping:
            # chosen on the inference path (no label, no mask): a stage that hands labels to encode would
            # otherwise pick by what hard selection reads back (scnl-private: 0.999 on mnist-lt5)
            scores["val_acc_inference"] = scores["val_acc"] if not stage.use_labels else accuracy(defense, model, data.val, use_labels=False)
        return scores

    history: list[dict[str, Any]] = []
    for si, (stage, n_epochs) in enumerate(zip(stages, counts)):
        if si < start[0]:
            continue
        if engine and defense is not None:
            defense.eval()  # the server's decode only; the client's parameters are not the engine's to train
        elif not engine:
            defense.set_stage(stage.name)
            defense.train()
        model.train()
        first = start[1] if si == start[0] else 0
        if first == 0 and not engine:
            # what setup derives (SVD's basis, sample-and-hold's windows) lives in the defense's buffers, so
            # a stage resumed mid-way keeps it instead of recalibrating on a partly trained model
            masks = defense.uses_mask and data.train.mask is not None  # a region defense learns its selector from them
            secrets = defense.uses_secret  # batches (x, y, z or -1, [mask]): the same known records as in training
            setup_split = known_secrets(data.train, defense.secret_fraction, config.seed) if secrets else data.train
            derives = type(defense).setup is not Defense.setup  # say so where setup does work (it can take minutes)
            if derives:
                log(f"[{name}] stage {stage.name}: setup on {len(setup_split.y)} training records")
            began = time.perf_counter()
            defense.setup(model, OnDevice(setup_split.loader(config.batch_size, shuffle=True, seed=config.seed + 1000 * si, with_secondary=secrets,
                                                             with_mask=masks), device))
            if derives:
                log(f"[{name}] stage {stage.name}: setup done ({time.perf_counter() - began:.1f}s)")
        params = list(model.parameters()) if engine else _trainable(defense, model, stage)
        if not params:
            raise ValueError(f"stage {stage.name!r} of defense {name!r} has nothing to train")
        opt = make_optimizer(params, recipe)
        if first and optimizer_state:
            opt.load_state_dict(optimizer_state)
        stopper = EarlyStopping(
            config.patience, [r for r in (past or []) if r.get("stage") == stage.name], best_state, metric="val_acc_inference",
            what="validation accuracy", save=lambda: training_state(defense, model), load=lambda s: load_training_state(s, defense, model),
        ) if config.patience is not None and not engine and si == len(stages) - 1 else None
        plan = StagePlan(name, stage.name, si, len(stages), n_epochs, recipe.lr, recipe.schedule, first)
        history += run_epochs(plan, opt, functools.partial(batches, si), functools.partial(step, stage=stage), log=log,
                              validate=None if engine else functools.partial(validate, stage, stopper is not None), stopper=stopper, on_epoch_end=on_epoch_end)
    if defense is not None:
        defense.eval()
    model.eval()
    return history
