"""Every obfuscation method, picked by name: ``create_defense(name, ...)``, ``list_defenses()``."""

from __future__ import annotations

import importlib
from typing import Any

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
    try:
        return cls(input_shape=tuple(input_shape), num_classes=num_classes, **overrides)
    except TypeError as err:  # unexpected keyword -> say which method and what it accepts
        import inspect

        params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "input_shape", "num_classes")]
        raise ValueError(f"bad options for defense {name!r}: {err}; accepted: {params}") from err


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
