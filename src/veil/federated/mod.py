"""A Flower ClientApp mod that obfuscates the records a client sends (in the style of Flower's ``LocalDpMod``).

::

    from flwr.clientapp import ClientApp
    import veil

    app = ClientApp(mods=[veil.ObfuscationMod("client.safetensors")])

    @app.train()                  # or @app.query(), @app.evaluate(): any reply
    def train(msg, context):
        ...                       # reply with ArrayRecord({"x": Array(records), "y": Array(labels)})

After the ClientApp has answered, and before the answer leaves the client, the mod replaces the array
``x`` (records, (N, *input_shape) float) of every ``ArrayRecord`` in the reply by its messages,
``encode(x)`` with fresh noise from the operating system's entropy (:func:`veil.training.run.obfuscate`,
inside :func:`veil.noise.private_noise`): the server receives messages, never a record, whatever the
ClientApp does. With ``exposure="training"`` (the server trains on what it receives) the labels ``y`` of
the same record reach ``encode`` (hard selection) and travel with the messages, and a region ``mask``
there is used and removed (the data owner's side information never leaves).

Fail closed: a reply that carries another float array shaped like records (N, *input_shape) under
another key is refused with an error reply (it would leave in the clear), as is a record array of the
wrong shape. Replies without records (model weights alone) pass unchanged.
"""

from __future__ import annotations

import copy
from logging import ERROR, INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from veil.defenses import Defense
from veil.defenses.saving import load_obfuscator
from veil.training.run import obfuscate

EXPOSURES = ("inference", "training")


class ObfuscationMod:
    """Replace the records in a client's reply by their obfuscation before the reply is sent.

    Args:
        client: The obfuscator: a :class:`veil.PrivateClient`, a Defense (a CPU copy of it is taken), or
            the file ``client.save(...)`` / ``veil train`` (``obfuscator.safetensors``) wrote.
        exposure: ``inference`` (the message alone; labels are not used) or ``training`` (labels ``y``
            are used by ``encode`` and must be in the same ArrayRecord).
        records_key, labels_key, mask_key: Names of the arrays in an ArrayRecord: the records (replaced
            by their messages), their primary labels, the region masks (used at the training exposure,
            always removed).
    """

    def __init__(self, client: object, *, exposure: str = "inference", records_key: str = "x", labels_key: str = "y", mask_key: str = "mask") -> None:
        if exposure not in EXPOSURES:
            raise ValueError(f"exposure must be one of {', '.join(EXPOSURES)}, got {exposure!r}")
        # a CPU copy: the records arrive as NumPy arrays, and a client trained further later is not this one
        self.defense = copy.deepcopy(_defense(client)).cpu().eval()
        self.exposure, self.records_key, self.labels_key, self.mask_key = exposure, records_key, labels_key, mask_key

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        """Run the ClientApp (``call_next``), then obfuscate the records in its reply."""
        out = call_next(msg, ctxt)
        if out.has_error():
            return out
        replaced = {}
        for name, record in out.content.array_records.items():
            try:
                new = self.obfuscate_record(record)
            except ValueError as err:
                return _error(msg, f"ObfuscationMod: ArrayRecord {name!r}: {err}")
            if new is not None:
                replaced[name] = new
        for name, record in replaced.items():
            out.content[name] = record
        if replaced:
            log(INFO, "ObfuscationMod: records of %s obfuscated by %s (%s exposure, OS-entropy noise)", sorted(replaced), self.defense.name, self.exposure)
        return out

    def obfuscate_record(self, record: ArrayRecord) -> ArrayRecord | None:
        """``record`` with its records replaced by messages (``None``: it holds no records).

        ``ValueError`` for records of the wrong shape, missing labels at the training exposure, or
        another array that looks like records."""
        shape = tuple(self.defense.input_shape)
        arrays = {k: record[k].numpy() for k in record.keys()}
        for key, a in arrays.items():
            if key not in (self.records_key, self.mask_key) and a.dtype.kind == "f" and a.ndim == len(shape) + 1 and tuple(a.shape[1:]) == shape:
                raise ValueError(f"array {key!r} of shape {a.shape} looks like records and would leave in the clear; name it {self.records_key!r} or reshape it")
        if self.records_key not in arrays:
            if self.mask_key in arrays:
                raise ValueError(f"a region mask {self.mask_key!r} without records {self.records_key!r}; masks never leave the client")
            return None
        x = arrays[self.records_key]
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape or x.dtype.kind != "f":
            raise ValueError(f"records {self.records_key!r} must be float (N, {', '.join(map(str, shape))}), got {x.dtype} {x.shape}")
        y = mask = None
        if self.exposure == "training":
            if self.labels_key not in arrays:
                raise ValueError(f"the training exposure needs the labels {self.labels_key!r} beside the records")
            y = torch.as_tensor(arrays[self.labels_key]).long()
            if self.mask_key in arrays:
                mask = torch.as_tensor(arrays[self.mask_key])
        xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
        self.defense.check_input(xt, y)
        messages = obfuscate(self.defense, xt, y, mask=mask).numpy()
        kept = {k: (Array(messages) if k == self.records_key else record[k]) for k in record.keys() if k != self.mask_key}
        return ArrayRecord(kept)


def _defense(client: object) -> Defense:
    if isinstance(client, Defense):
        return client
    inner = getattr(client, "defense", None)  # a veil.PrivateClient
    if isinstance(inner, Defense):
        return inner
    if isinstance(client, (str, Path)):
        path = Path(client)
        path = path / "obfuscator.safetensors" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no obfuscator file")
        return load_obfuscator(path)
    raise TypeError(f"ObfuscationMod needs a veil.PrivateClient, a Defense or an obfuscator file, got {type(client).__name__}")


def _error(msg: Message, reason: str) -> Message:
    log(ERROR, reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


__all__ = ["ObfuscationMod"]
