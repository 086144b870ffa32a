"""veil: obfuscated training and inference with stochastic conditional noise layers.

The front door (:mod:`veil.api`; ``help(veil.Obfuscation)`` walks through the whole path)::

    import veil

    engine = veil.Obfuscation(defense="scnl", lambda_=1.0)
    client, model, optimizer, loader = engine.make_private(model=model, optimizer=optimizer, data_loader=loader, epochs=5)
    for epoch in range(5):
        for x, y, *side in loader:
            loss = engine.loss(model(client(x, y, *side)), y)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
    client.eval()                                   # deployment: no label, OS-entropy noise
    print(veil.leakage(client, secret_loader, model=model))
    client.save("client.safetensors"); veil.export_onnx(client, "client.onnx")

Also here: :class:`veil.Client` (query a ``veil serve`` service with messages alone) and
:class:`veil.ObfuscationMod` (a Flower ClientApp mod that obfuscates the records a client sends).
The building blocks: :mod:`veil.defenses` (``create_defense``, ``list_defenses``), :mod:`veil.training`
(``TrainConfig``, ``fit``, run folders), :mod:`veil.evaluation` (the attacks). Names are imported on
first use, so ``veil --help`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Obfuscation": "veil.api",
    "PrivateClient": "veil.api",
    "Leakage": "veil.api",
    "LeakageReport": "veil.api",
    "leakage": "veil.api",
    "export_onnx": "veil.api",
    "Client": "veil.serving.client",
    "ObfuscationMod": "veil.federated.mod",
    "create_defense": "veil.defenses",
    "list_defenses": "veil.defenses",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'veil' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
