"""A defense saved on its own (the client side) and rebuilt from its file: a safetensors file whose metadata
names the method and its constructor arguments (the file helpers themselves: :mod:`veil.io`)."""

from __future__ import annotations

import json
import os

import torch

from veil.io import load_weights, save_weights


def save_obfuscator(path: str | os.PathLike, defense: "torch.nn.Module") -> None:
    """Save a defense on its own (the client side): ``path`` is a safetensors file whose metadata
    holds the method name, input shape, number of classes and constructor config."""
    meta = {
        "veil_defense": defense.name,
        "input_shape": json.dumps(list(defense.input_shape)),
        "num_classes": str(defense.num_classes),
        "config": json.dumps(defense.config()),
    }
    save_weights(path, defense.state_dict(), metadata=meta)


def load_obfuscator(path: str | os.PathLike) -> "torch.nn.Module":
    """Rebuild a defense saved with :func:`save_obfuscator`."""
    from safetensors import safe_open

    from veil.defenses import create_defense

    tensors = load_weights(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "veil_defense" not in meta:
        raise ValueError(f"{path}: not a veil obfuscator file (no 'veil_defense' metadata)")
    try:
        name = meta["veil_defense"]
        shape = json.loads(meta["input_shape"])
        num_classes = int(meta["num_classes"])
        options = json.loads(meta["config"])
        if not (isinstance(shape, list) and len(shape) == 3 and all(type(v) is int and 0 < v <= 4096 for v in shape)):
            raise ValueError(f"input_shape must be three positive sizes, got {meta['input_shape']!r}")
        if not 2 <= num_classes <= 100_000:
            raise ValueError(f"num_classes must lie in [2, 100000], got {num_classes}")
        if not isinstance(options, dict):
            raise ValueError(f"config must be a JSON object, got {meta['config']!r}")
    except (KeyError, TypeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}: damaged obfuscator metadata ({err})") from err
    try:
        defense = create_defense(name, input_shape=tuple(shape), num_classes=num_classes, **options)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: cannot rebuild its obfuscator ({err})") from err
    try:
        defense.load_state_dict(tensors, strict=True)
    except RuntimeError as err:  # missing, unexpected or differently shaped tensors
        raise ValueError(f"{path}: weights do not match defense {name!r} ({' '.join(str(err).split())[:300]})") from err
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{path}: weights hold NaN or infinite values ({', '.join(bad[:3])})")
    return defense
