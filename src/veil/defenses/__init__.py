"""Every obfuscation method, picked by name: ``create_defense(name, ...)``, ``list_defenses()``."""

from __future__ import annotations

import importlib
import inspect
import math
import typing
from typing import Any

import torch

from veil.defenses.base import Defense, Stage, check_batch

# name -> "module:Class". One line per method; the contract test covers every entry.
_REGISTRY: dict[str, str] = {
    "none": "veil.defenses.baselines:NoDefense",
    "local": "veil.defenses.local:LocalDecision",
    "gaussian": "veil.defenses.baselines:GaussianNoise",
    "ani": "veil.defenses.ani:AdaptiveNoiseInjection",
    "cloak": "veil.defenses.cloak:Cloak",
    "shredder": "veil.defenses.shredder:ShredderNoise",
    "svd": "veil.defenses.svd:SVDObfuscation",
    "svd-bounded": "veil.defenses.svd:SVDBoundedObfuscation",
    "sample-and-hold": "veil.defenses.sample_and_hold:SampleAndHold",
    "scnl": "veil.defenses.scnl:SCNL",
    "scnl-adaptive": "veil.defenses.scnl:SCNLAdaptive",
    "scnl-joint": "veil.defenses.scnl:SCNLJoint",
    "scnl-twostage": "veil.defenses.scnl:SCNLTwoStage",
    "scnl-private": "veil.defenses.scnl:SCNLPrivate",
    "scnl-region": "veil.defenses.region:SCNLRegion",
    "redact": "veil.defenses.redact:Redaction",
    "redact-oracle": "veil.defenses.redact:OracleRedaction",
    "scnl-gate": "veil.defenses.gate:SCNLGate",
    "scnl-gate-z": "veil.defenses.gate:SCNLGateSecret",
    "select-salient": "veil.defenses.salient:SalientSelection",
    "select-salient-z": "veil.defenses.salient:SalientSelectionSecret",
    "scnl-detect": "veil.detection.defense:SCNLDetect",
}


def list_defenses() -> list[str]:
    """Names of all registered defenses."""
    return sorted(_REGISTRY)


def defense_class(name: str) -> type[Defense]:
    """The class registered under ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown defense {name!r}; valid: {', '.join(list_defenses())}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create_defense(
    name: str, *, input_shape: tuple[int, ...], num_classes: int, **overrides: Any
) -> Defense:
    """Build defense ``name`` for records of ``input_shape`` and ``num_classes`` primary classes.

    ``overrides`` are the method's keyword arguments (e.g. ``lambda_=1.0``); unknown ones raise.
    """
    cls = defense_class(name)
    check_option_types(cls, overrides)
    build = lambda: cls(input_shape=tuple(input_shape), num_classes=num_classes, **overrides)  # noqa: E731
    try:
        _check_size(name, build, overrides)
        return build()
    except (MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "allocate" not in str(err):
            raise
        raise ValueError(f"defense {name!r} with these options does not fit in memory; lower its size options ({overrides})") from err
    except TypeError as err:  # unexpected keyword -> say which method and what it accepts
        params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "input_shape", "num_classes")]
        raise ValueError(f"bad options for defense {name!r}: {err}; accepted: {params}") from err


#: Most parameters a defense (a client-side obfuscator) may have: far above every method's default, far
#: below what would exhaust memory (a width of 100000 asks for hundreds of GB).
MAX_PARAMETERS = 50_000_000


def _check_size(name: str, build: Any, options: dict[str, Any]) -> None:
    """Build the defense on the meta device (no memory) and refuse it if it would be absurdly large."""
    try:
        with torch.device("meta"):
            probe = build()
    except (NotImplementedError, RuntimeError):
        return  # a constructor that computes on real data; it is built for real next
    n = sum(p.numel() for p in probe.parameters()) + sum(b.numel() for b in probe.buffers())
    if n > MAX_PARAMETERS:
        raise ValueError(f"defense {name!r} with these options would hold {n:,} parameters (more than {MAX_PARAMETERS:,}); lower its size options (given: {', '.join(f'{k}={v}' for k, v in options.items() if isinstance(v, (int, float)) and not isinstance(v, bool)) or 'none'})")


def check_option_types(cls: type[Defense], options: dict[str, Any]) -> None:
    """Refuse option values of the wrong type before they reach a constructor, naming the option:
    ``"abc"`` for a number, ``1.5`` for a count, ``1`` for a flag, NaN or infinity for a number."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: the constructor validates alone
        return
    for key, value in options.items():
        hint = hints.get(key)
        if hint is None:
            continue
        allowed = set(typing.get_args(hint)) or {hint}
        if value is None and type(None) in allowed:
            continue
        ok = (
            (bool in allowed and isinstance(value, bool))
            or (str in allowed and isinstance(value, str))
            or (float in allowed and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
            or (int in allowed and isinstance(value, int) and not isinstance(value, bool))
            or not allowed & {bool, str, float, int}
        )
        if not ok:
            want = " or ".join(sorted({bool: "true/false", str: "a string", float: "a finite number", int: "an integer"}[t] for t in allowed & {bool, str, float, int}))
            raise ValueError(f"option {key} of defense {cls.name!r} must be {want}, got {value!r}")


def with_knob(name: str, knob: float | None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``options`` with defense ``name``'s knob set to ``knob`` (what ``--lambda`` means for every method).

    ``knob=None`` keeps the method's default; a value for a method without a knob raises.
    """
    out = dict(options or {})
    if knob is not None:
        name_of_knob = defense_class(name).knob
        if not name_of_knob:
            raise ValueError(f"defense {name!r} has no knob; drop --lambda")
        out[name_of_knob] = knob
    return out


__all__ = ["Defense", "Stage", "check_batch", "create_defense", "defense_class", "list_defenses", "with_knob"]
