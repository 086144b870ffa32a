"""Federated training on Flower where each client obfuscates its own records before its local engine
trains (seed 000 §4.2). ``task`` is plain PyTorch; ``client_app``/``server_app`` are thin Flower apps;
``simulation`` runs them in one process or on Flower's Ray simulation engine."""

from veil.federated.task import FederatedConfig, partition_indices

__all__ = ["FederatedConfig", "partition_indices", "run_federated"]


def __getattr__(name: str):  # lazy: importing Flower's simulation machinery is slow
    if name == "run_federated":
        from veil.federated.simulation import run_federated

        return run_federated
    raise AttributeError(name)
