"""Privacy evaluation: attribute-inference attack, reconstruction attack, mutual information, sweeps
and trade-off reports (DESIGN part 9)."""

from veil.evaluation.attack import AttackConfig, attribute_attack, attack_exposure, build_attacker

__all__ = ["AttackConfig", "attack_exposure", "attribute_attack", "build_attacker"]
