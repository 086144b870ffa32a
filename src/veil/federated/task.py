"""Plain PyTorch side of federated training: the config, client data splits, client obfuscators,
the local step, and evaluation. ``client_app.py`` and ``server_app.py`` are thin Flower adapters.

Where a client's obfuscator comes from (``obfuscator_training``, decided here):

* ``federated`` (default): the obfuscator is trained like the model. Every round each client (the data
  owner of one partition) receives the global model *and* the global obfuscator, trains the obfuscator
  jointly with the global model on a trusted fraction of its records (``trusted_fraction``, through the
  defense's stages, :func:`veil.training.loop.fit`: the trusted step; the model sees only messages
  there), hands that model and all its records, obfuscated by the updated obfuscator, to its engine,
  and sends the updated obfuscator back beside the model its engine trained; the strategy aggregates
  both (FedAvg averages them), so one shared obfuscator emerges and the global model learns to read one
  convention. (Measured on mnist-lt5, IID: with the jointly trained model discarded instead of handed to
  the engine, the global model still predicted the majority class after 4 rounds.) The
  obfuscator's weights are no secret (the attacker is assumed to hold them anyway); like the model's,
  they are an update computed from the client's records, which is what every federated client sends.
* ``local``: each client trains its **own** obfuscator once, on its trusted fraction, with a throw-away
  local model; no obfuscator weights travel. Measured on mnist-lt5: the global model then has to read
  five private conventions and loses 20-25 points against unobfuscated federated training (README).
* ``obfuscator=PATH``: every client loads one shared, pre-trained obfuscator (``RUN/obfuscator.safetensors``
  from ``veil train``), which each data owner received out of band.

Then, every round, each client obfuscates *all* its training records with hard selection (labels are
known: the training point of exposure) with fresh noise from the operating system's entropy (never from
the config, the round or the partition id, which the server knows), and only the obfuscated tensor and
the primary labels are handed to the local compute engine (:func:`local_train`), which never sees a clean
record nor the secondary label.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from veil.data.tasks import Split, Task, load_task
from veil.defenses import Defense, create_defense, defense_class, with_knob
from veil.defenses.saving import load_obfuscator
from veil.models import create_model
from veil.noise import check_seed, seed_everything
from veil.training.incremental import default_defense
from veil.training.loop import MAX_EPOCHS, Messages, TrainConfig, config_from_dict, fit, model_accuracy
from veil.training.run import obfuscate
from veil.training.screening import SCREEN_MODES, Screening

PARTITIONS = ("iid", "noniid")
#: Bounds on the size options, checked before anything runs (1e9 rounds would never end).
MAX_CLIENTS, MAX_ROUNDS = 10_000, 10_000
OBFUSCATOR_TRAINING = ("federated", "local")
#: Key prefixes of the global state that travels: the model's, and (``federated`` obfuscators) the obfuscator's.
MODEL, OBFUSCATOR = "model.", "obfuscator."
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian")


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
    """Everything that decides a federated run (saved as ``RUN/config.json``; sent to the clients).

    Attributes:
        task: Task name. clients: Number of clients (partitions of the training split). rounds: Rounds.
        partition: ``iid`` or ``noniid`` (label skew: per-client shares of each secondary class, e.g.
            each digit, drawn from Dirichlet(``alpha``)).
        alpha: Dirichlet concentration for ``noniid`` (smaller = more skewed).
        defense: Client obfuscator (default ``scnl-private``, veil's most private working defense;
            ``none`` trains on clean records: the baseline).
        knob, defense_options: The defense's knob value and other options.
        obfuscator: Path of a shared pre-trained obfuscator (safetensors from ``veil train``); None:
            the clients train it (``obfuscator_training``).
        obfuscator_training: ``federated`` (every round, on each client's trusted fraction, jointly with
            the global model, aggregated by the strategy like the model) or ``local`` (each client its
            own, once). See the module docstring.
        trusted_fraction: Share of each client's records its data owner trains the obfuscator on (a fresh
            draw every round in ``federated`` training).
        obfuscator_epochs: Epochs for that (per round in ``federated`` training; shared among the
            defense's stages).
        local_epochs: Local epochs per round on the obfuscated records.
        screen_ratio, screen_mode: Screening of the obfuscated records at every local iteration.
        strategy: Flower strategy (fedavg, fedprox, fedadam, fedyogi, fedadagrad, fedmedian).
        proximal_mu: FedProx's mu. server_lr: Server learning rate (eta) of the FedOpt strategies.
        model, batch_size, lr, seed, train_size: As in ``veil train``. eval_size: Test records used
            (None: all), split among the clients for federated evaluation.
        attack_epochs: After every round, attack what the clients' engines saw that round (each client's
            obfuscator of the round, training exposure with y: :mod:`veil.evaluation.attack`'s attackers,
            every architecture, early-stopped) with at most this many epochs per attacker (0: no attack).
        attack_clients: How many clients' obfuscators are attacked per round (the first by node id).
        attack_size: Records each attacker trains on (held-out records no client holds; None: as many
            as the clients hold together).
        attack_device: Where the attackers train (``cpu``, ``cuda``, ``auto``); the server's side only.
    """

    task: str = "digits-lt5"
    clients: int = 3
    rounds: int = 3
    partition: str = "iid"
    alpha: float = 0.5
    defense: str = dataclasses.field(default_factory=default_defense)
    knob: float | None = None
    defense_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    obfuscator: str | None = None
    obfuscator_training: str = "federated"
    trusted_fraction: float = 0.1
    obfuscator_epochs: int = 2
    local_epochs: int = 1
    screen_ratio: float = 0.0
    screen_mode: str = "rect"
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    model: str = "cnn"
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    train_size: int | None = None
    eval_size: int | None = None
    attack_epochs: int = 0
    attack_clients: int = 1
    attack_size: int | None = None
    attack_device: str = "cpu"

    def __post_init__(self) -> None:
        check_seed(self.seed)
        for name, most in (("clients", MAX_CLIENTS), ("rounds", MAX_ROUNDS)):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
            if getattr(self, name) > most:
                raise ValueError(f"{name} must be <= {most}, got {getattr(self, name)!r}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if not 0.0 < self.trusted_fraction <= 1.0:
            raise ValueError(f"trusted_fraction must lie in (0, 1], got {self.trusted_fraction!r}")
        if not 0.0 <= self.screen_ratio < 1.0:
            raise ValueError(f"screen_ratio must lie in [0, 1), got {self.screen_ratio!r}")
        if self.screen_mode not in SCREEN_MODES:
            raise ValueError(f"screen_mode must be one of {SCREEN_MODES}, got {self.screen_mode!r}")
        for name in ("obfuscator_epochs", "local_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("obfuscator_epochs", "local_epochs", "attack_epochs"):
            if getattr(self, name) > MAX_EPOCHS:
                raise ValueError(f"{name} must be <= {MAX_EPOCHS}, got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (math.isfinite(self.proximal_mu) and math.isfinite(self.server_lr)) or self.proximal_mu < 0 or self.server_lr <= 0:
            raise ValueError(f"proximal_mu must be >= 0 and server_lr > 0, got {self.proximal_mu!r}, {self.server_lr!r}")
        if self.obfuscator_training not in OBFUSCATOR_TRAINING:
            raise ValueError(f"obfuscator_training must be one of {', '.join(OBFUSCATOR_TRAINING)}, got {self.obfuscator_training!r}")
        if self.attack_epochs < 0 or not 1 <= self.attack_clients <= self.clients:
            raise ValueError(f"attack_epochs must be >= 0 and attack_clients in [1, clients={self.clients}], got {self.attack_epochs!r}, {self.attack_clients!r}")
        if self.attack_size is not None and self.attack_size < 10:
            raise ValueError(f"attack_size must be >= 10 or None, got {self.attack_size!r}")
        if self.eval_size is not None and self.eval_size < self.clients:
            raise ValueError(f"eval_size must be at least the number of clients ({self.clients}), got {self.eval_size!r}")
        if self.obfuscator is None:
            defense_class(self.defense)  # unknown name -> ValueError listing the valid ones

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FederatedConfig":
        return config_from_dict(cls, d, "federated config")

    @classmethod
    def from_json(cls, text: str) -> "FederatedConfig":
        return cls.from_dict(json.loads(text))


# ----------------------------------------------------------------------------------------- data
def partition_indices(labels: np.ndarray, clients: int, partition: str, *, alpha: float = 0.5, seed: int = 0) -> list[np.ndarray]:
    """Split record indices among ``clients``.

    ``iid``: a random equal split. ``noniid``: for every class of ``labels``, its records are shared
    among the clients in proportions drawn from Dirichlet(alpha) (label skew); redrawn until every
    client holds at least two records.
    """
    n = len(labels)
    if clients > n:
        raise ValueError(f"more clients ({clients}) than training records ({n}); use fewer clients or more data")
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {', '.join(PARTITIONS)}, got {partition!r}")
    rng = np.random.default_rng(seed)
    if partition == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), clients)]
    minimum = min(2, n // clients)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k] += chunk.tolist()
        if min(len(p) for p in parts) >= minimum:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"could not draw a non-IID split with at least {minimum} records per client; raise alpha or lower clients")


@functools.lru_cache(maxsize=4)
def _task(name: str, seed: int, train_size: int | None) -> Task:
    return load_task(name, seed=seed, train_size=train_size)


def load_federated_task(config: FederatedConfig) -> Task:
    """The task (cached per process: every client in one process shares the arrays)."""
    return _task(config.task, config.seed, config.train_size)


def test_split(config: FederatedConfig, task: Task) -> Split:
    s = task.test
    return s if config.eval_size is None or config.eval_size >= len(s) else s.subset(np.arange(config.eval_size))


def client_data(config: FederatedConfig, partition_id: int, task: Task | None = None) -> tuple[Split, Split]:
    """The training records and the test shard held by client ``partition_id`` (clean: trusted side)."""
    if not 0 <= partition_id < config.clients:
        raise ValueError(f"partition-id must lie in [0, {config.clients - 1}], got {partition_id!r}")
    task = task or load_federated_task(config)
    parts = partition_indices(task.train.z.numpy(), config.clients, config.partition, alpha=config.alpha, seed=config.seed)
    test = test_split(config, task)
    shards = partition_indices(test.z.numpy(), config.clients, "iid", seed=config.seed + 1)
    return task.train.subset(parts[partition_id]), test.subset(shards[partition_id])


# ----------------------------------------------------------------------------------------- models
def new_model(config: FederatedConfig, task: Task | None = None) -> nn.Module:
    """The server model, seeded (the round-0 global model)."""
    task = task or load_federated_task(config)
    seed_everything(config.seed)
    return create_model(config.model, task.input_shape, task.num_primary)


def new_obfuscator(config: FederatedConfig, task: Task | None = None, *, seed: int | None = None) -> Defense:
    """An untrained obfuscator of ``config.defense``, seeded (default: the round-0 global obfuscator)."""
    task = task or load_federated_task(config)
    seed_everything(config.seed if seed is None else seed)
    options = with_knob(config.defense, config.knob, config.defense_options)
    return create_defense(config.defense, input_shape=task.input_shape, num_classes=task.num_primary, **options)


def aggregates_obfuscator(config: FederatedConfig) -> bool:
    """Whether the obfuscator travels with the model and is aggregated (``federated`` training of a
    defense that has something to train)."""
    if config.obfuscator is not None or config.obfuscator_training != "federated":
        return False
    return _trains(config.to_json())


@functools.lru_cache(maxsize=8)
def _trains(config_json: str) -> bool:
    config = FederatedConfig.from_json(config_json)
    with torch.random.fork_rng(devices=[]):  # building the probe must not move anyone's random state
        states = np.random.get_state(), random.getstate()
        trains = any(p.requires_grad for p in new_obfuscator(config).parameters())
        np.random.set_state(states[0])
        random.setstate(states[1])
    return trains


def pack(model: nn.Module, defense: Defense | None) -> dict[str, torch.Tensor]:
    """The global state that travels: the model's tensors (``model.*``) and, where it is aggregated, the
    obfuscator's (``obfuscator.*``)."""
    state = {MODEL + k: v for k, v in model.state_dict().items()}
    if defense is not None:
        state.update({OBFUSCATOR + k: v for k, v in defense.state_dict().items()})
    return state


def unpack(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(model state, obfuscator state or None) from :func:`pack`'s layout."""
    model = {k[len(MODEL):]: v for k, v in state.items() if k.startswith(MODEL)}
    obf = {k[len(OBFUSCATOR):]: v for k, v in state.items() if k.startswith(OBFUSCATOR)}
    if len(model) + len(obf) != len(state):
        raise ValueError(f"global state keys must start with {MODEL!r} or {OBFUSCATOR!r}, got {sorted(set(state))[:3]}...")
    return model, (obf or None)


def initial_state(config: FederatedConfig) -> dict[str, torch.Tensor]:
    """The round-0 global state: the seeded model, and the seeded obfuscator where it is aggregated."""
    return pack(new_model(config), new_obfuscator(config) if aggregates_obfuscator(config) else None)


def global_obfuscator(config: FederatedConfig, state: dict[str, torch.Tensor]) -> Defense:
    """The obfuscator held in a global state (:func:`pack`), in eval mode."""
    _, obf = unpack(state)
    if obf is None:
        raise ValueError("this global state carries no obfuscator (it is aggregated only in federated obfuscator training)")
    defense = new_obfuscator(config)
    defense.load_state_dict(obf)
    defense.eval()
    return defense


def trusted_records(config: FederatedConfig, partition_id: int, train: Split, *, draw: int = 0) -> Split:
    """The ``trusted_fraction`` of client ``partition_id``'s records its data owner trains the obfuscator
    on (draw ``draw``: a fresh choice every round in federated training)."""
    n = max(2, int(round(config.trusted_fraction * len(train))))
    keep = np.sort(np.random.default_rng(config.seed + partition_id + 7 * draw).permutation(len(train))[:n])
    return train.subset(keep)


def train_obfuscator(defense: Defense, model: nn.Module, trusted: Split, config: FederatedConfig, *, seed: int, task: Task | None = None) -> None:
    """The trusted step: ``defense`` and ``model`` trained jointly (in place) on ``trusted`` through the
    defense's stages. The model sees only ``decode(encode(x))`` there, as the engine does."""
    task = task or load_federated_task(config)
    local = Task(task.name, trusted, trusted, trusted, task.num_primary, task.num_secondary)
    tc = TrainConfig(task=task.name, defense=config.defense, epochs=config.obfuscator_epochs, batch_size=config.batch_size, lr=config.lr, seed=seed)
    fit(defense, model, local, tc, log=lambda s: None)
    defense.eval()


def client_obfuscator(config: FederatedConfig, partition_id: int, train: Split, task: Task | None = None) -> Defense:
    """The obfuscator of client ``partition_id`` where it is not aggregated (``local`` training, a shared
    pre-trained one, or a defense with nothing to train). Trusted side."""
    task = task or load_federated_task(config)
    if config.obfuscator is not None:
        defense = load_obfuscator(config.obfuscator)
        if tuple(defense.input_shape) != tuple(task.input_shape) or defense.num_classes != task.num_primary:
            raise ValueError(f"{config.obfuscator}: obfuscator is for records {defense.input_shape} with {defense.num_classes} classes, task {task.name!r} has {task.input_shape} and {task.num_primary}")
        defense.eval()
        return defense
    defense = new_obfuscator(config, task, seed=config.seed + 7919 * (partition_id + 1))
    if any(p.requires_grad for p in defense.parameters()):
        train_obfuscator(defense, create_model(config.model, task.input_shape, task.num_primary), trusted_records(config, partition_id, train), config, seed=config.seed + partition_id, task=task)
    defense.eval()
    return defense


def obfuscate_for_engine(defense: Defense, split: Split, *, use_labels: bool = True) -> torch.Tensor:
    """The trusted step: records as the compute engine receives them (hard selection when ``use_labels``).

    The noise is drawn from the operating system's entropy, fresh for every call
    (:func:`veil.training.run.obfuscate`). There is deliberately no seed argument: the config, the round
    and the partition id all come from (or are known to) the server, so noise seeded by any of them
    could be redrawn and subtracted by it.
    """
    return obfuscate(defense, split.x, split.y if use_labels else None)


def local_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FederatedConfig, *, seed: int, proximal_mu: float = 0.0) -> list[dict[str, float]]:
    """The untrusted compute engine's step: train ``model`` on already-obfuscated records."""
    tc = TrainConfig(task=config.task, defense=config.defense, epochs=config.local_epochs, batch_size=config.batch_size, lr=config.lr, seed=seed)
    screening = Screening(config.screen_ratio, config.screen_mode) if config.screen_ratio > 0 else None
    return fit(None, model, Messages(x, y, torch.ones(len(x), dtype=torch.bool)), tc, screening=screening, proximal_mu=proximal_mu, log=lambda s: None, name="client")


def evaluate_model(model: nn.Module, defense: Defense, split: Split) -> dict[str, float]:
    """Accuracy on ``split`` obfuscated at both points of exposure (fresh OS-entropy noise), and on the
    clean records."""
    return {
        "acc_training_exposure": model_accuracy(model, obfuscate_for_engine(defense, split), split.y),
        "acc_inference": model_accuracy(model, obfuscate_for_engine(defense, split, use_labels=False), split.y),
        "acc_clean": model_accuracy(model, split.x, split.y),
    }
