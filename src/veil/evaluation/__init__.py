"""Privacy evaluation (docs/design.md, "The attackers"; docs/evaluation.md): attribute-inference attack, reconstruction
attacks (decoder, decoder with a prior, white-box inversion), secrets read from reconstructions, the Fisher bound,
mutual information, sweeps over a defense's knob and trade-off reports.

Names are imported on first use, so ``veil --help`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AttackConfig": "attack",
    "attribute_attack": "attack",
    "attack_exposure": "attack",
    "build_attacker": "attack",
    "attacker_splits": "attack",
    "ReconstructionConfig": "reconstruction",
    "reconstruction_attack": "reconstruction",
    "MIConfig": "mutual_information",
    "mutual_information": "mutual_information",
    "ksg_mi": "mutual_information",
    "gaussian_channel_bound": "mutual_information",
    "EvalConfig": "sweep",
    "evaluate_run": "sweep",
    "strong_preset": "sweep",
    "best_attack": "sweep",
    "InversionConfig": "inversion",
    "inversion_attack": "inversion",
    "FisherConfig": "fisher",
    "fisher_bound": "fisher",
    "train_secret_reader": "secret_readout",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"veil.evaluation.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'veil.evaluation' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
