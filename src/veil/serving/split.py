"""The server side of a run folder, loaded without the client's weights.

A defense is split at the trust boundary (:mod:`veil.defenses.base`): the client runs ``encode``, the
server runs ``decode`` and the task model. :data:`SPLITS` says, for every defense the service supports,
which of the defense's tensors belong to the server (``decode``'s part: SVD's first server layer W and the
basis it rebuilds z' from) and what one message looks like. Everything else in ``obfuscator.safetensors``
(the SCNL kernels, the selector, SVD's client conv block) is never read by the server.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from veil.defenses import Defense, create_defense
from veil.io import load_weights, read_json
from veil.models import create_model


@dataclasses.dataclass(frozen=True)
class Split:
    """How one defense is split between client and server.

    Attributes:
        server_keys: Prefixes of the defense's state-dict keys that ``decode`` needs (the server's share).
        message_shape: One message's shape (what ``encode`` sends per record), from the defense's config.
    """

    server_keys: tuple[str, ...]
    message_shape: Callable[[Defense], tuple[int, ...]]


def _identity_split() -> Split:
    # decode is the identity: the server holds nothing of the defense, the message is the model's input
    return Split((), lambda d: tuple(d.output_shape()))


#: Defenses the service can split. decode is the identity for all but SVD, whose server keeps W and the
#: basis (the client sends the first m' coefficients). Others are refused by name.
SPLITS: dict[str, Split] = {
    "none": _identity_split(),
    "gaussian": _identity_split(),
    "scnl": _identity_split(),
    "scnl-adaptive": _identity_split(),
    "scnl-joint": _identity_split(),
    "scnl-twostage": _identity_split(),
    "scnl-private": _identity_split(),
    "svd": Split(("server_layer.", "basis", "singular_values"), lambda d: (d.kept(),)),  # type: ignore[attr-defined]
}


def check_splittable(name: str) -> Split:
    """The :class:`Split` of defense ``name``; ``ValueError`` naming the supported ones otherwise."""
    if name not in SPLITS:
        raise ValueError(f"defense {name!r} cannot be served (its client/server split is not defined here); supported: {', '.join(SPLITS)}")
    return SPLITS[name]


class _NotOnServer(nn.Module):
    """Stands in for the client's part of a defense on the server: using it is a bug, so it raises."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the client's part of the defense is not loaded on the server")


@dataclasses.dataclass
class ServerSide:
    """What ``veil serve`` runs: ``model(decode(message))`` for a batch of messages.

    Attributes:
        defense: The defense's registry name.
        message_shape: Shape of one message (the request's per-record shape).
        num_classes: Primary classes (predictions lie in ``[0, num_classes)``).
        decoder: The defense holding only its server tensors (``None``: decode is the identity).
        model: The task model, in eval mode.
    """

    defense: str
    message_shape: tuple[int, ...]
    num_classes: int
    decoder: Defense | None
    model: nn.Module

    @torch.inference_mode()
    def predict(self, messages: torch.Tensor) -> torch.Tensor:
        """(B, *message_shape) float32 -> (B,) int64 primary predictions."""
        h = messages if self.decoder is None else self.decoder.decode(messages)
        return self.model(h).argmax(1)


def _defense_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: corrupt or not a safetensors file ({err})") from err
    if "veil_defense" not in meta:
        raise ValueError(f"{path}: not a veil obfuscator file (no 'veil_defense' metadata)")
    return meta


def _server_tensors(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Only the tensors of ``path`` whose names start with one of ``prefixes`` (nothing else is read)."""
    if not prefixes:
        return {}
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}


def load_server_side(run: str | Path) -> ServerSide:
    """Load the server's share of finished run ``run``: ``model.safetensors`` and decode's tensors.

    The client's weights in ``obfuscator.safetensors`` are not read (only its metadata, which names the
    defense and its config, and :data:`SPLITS`' server keys); the dataset is not loaded either.
    """
    run = Path(run)
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run}: not a run folder (no config.json)")
    if not (run / "metrics.json").is_file():
        raise FileNotFoundError(f"{run}: run has not finished (no metrics.json)")
    config = read_json(run / "config.json")
    path = run / "obfuscator.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    meta = _defense_metadata(path)
    name = meta["veil_defense"]
    split = check_splittable(name)
    try:
        defense = create_defense(name, input_shape=tuple(json.loads(meta["input_shape"])), num_classes=int(meta["num_classes"]), **json.loads(meta["config"]))
    except (KeyError, json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path}: damaged defense metadata ({err})") from err
    decoder: Defense | None = None
    if split.server_keys:
        tensors = _server_tensors(path, split.server_keys)
        missing, _ = defense.load_state_dict(tensors, strict=False)
        lacking = [k for k in missing if k.startswith(split.server_keys)]
        if lacking or not tensors:
            raise ValueError(f"{path}: lacks the server's tensors of defense {name!r} ({lacking or list(split.server_keys)})")
        for child in ("client", "layer"):  # what encode runs; never on the server
            if hasattr(defense, child):
                setattr(defense, child, _NotOnServer())
        decoder = defense.eval()
    model_name = config.get("model", "cnn") if isinstance(config, dict) else "cnn"
    model = create_model(model_name, defense.output_shape(), defense.num_classes)
    try:
        model.load_state_dict(load_weights(run / "model.safetensors"))
    except RuntimeError as err:
        raise ValueError(f"{run / 'model.safetensors'}: does not match model {model_name!r} ({err})") from err
    return ServerSide(name, tuple(int(s) for s in split.message_shape(defense)), defense.num_classes, decoder, model.eval())
