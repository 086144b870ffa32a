"""The obfuscator as ONNX, for clients that do not run Python: ``veil export-client RUN --onnx client.onnx``.

The graph takes the records ``x`` (B, *input_shape) float32 and, for a noisy defense, ``noise``
(B, *noise_shape) float32 of standard normal draws, and outputs ``message`` (B, *message_shape), exactly
what ``defense.encode(x)`` sends when its ``torch.randn_like`` draw is ``noise``. The noise is an input,
not a random op in the graph: onnxruntime's RandomNormal ops draw from a generator seeded by a fixed
attribute or the clock, which a receiver could reproduce, so the client fills ``noise`` from its own
operating system's entropy at run time (:class:`OnnxObfuscator` does it here with a 128-bit seed from
``secrets``; other languages: seed a normal sampler from getrandom / BCryptGenRandom / SecRandomCopyBytes).
Nothing random is baked into the file, and the export refuses a graph with a random op in it.

The model's metadata (``metadata_props``) names the defense and the input, noise and message shapes.
"""

from __future__ import annotations

import json
import secrets
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import nn

from veil.defenses import Defense
from veil.io import write_bytes
from veil.serving.split import check_splittable

OPSET = 17
_RANDOM_OPS = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli")


class _Encode(nn.Module):
    """``defense.encode(x)`` with its one ``torch.randn_like`` draw replaced by the ``noise`` input."""

    def __init__(self, defense: Defense, with_noise: bool) -> None:
        super().__init__()
        self.defense = defense
        self.with_noise = with_noise

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if not self.with_noise:
            return self.defense.encode(x)
        with mock.patch.object(torch, "randn_like", lambda t, **_: noise.reshape(t.shape)):
            return self.defense.encode(x)


def _noise_draws(defense: Defense, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the ``torch.randn_like`` draws one inference ``encode`` makes."""
    shapes: list[tuple[int, ...]] = []
    real = torch.randn_like

    def counting(t: torch.Tensor, **kw: Any) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return real(t, **kw)

    with torch.no_grad(), mock.patch.object(torch, "randn_like", counting):
        defense.encode(x)
    return shapes


def export_client(defense: Defense, path: str | Path, *, opset: int = OPSET) -> dict[str, Any]:
    """Write ``defense``'s inference ``encode`` as an ONNX model at ``path`` (atomically).

    Returns the metadata written into the model (defense, input/noise/message shapes, noise source).
    Raises ``ValueError`` for a defense the service cannot split, or one whose noise is not a single
    standard normal draw (it would need a random op in the graph).
    """
    import onnx

    check_splittable(defense.name)
    defense.eval()
    x = torch.rand(2, *defense.input_shape)
    draws = _noise_draws(defense, x)
    if len(draws) > 1:
        raise ValueError(f"defense {defense.name!r} draws its noise {len(draws)} times per encode; the ONNX client supports one standard normal draw")
    with torch.no_grad():
        message_shape = tuple(defense.encode(x).shape[1:])
    noise_shape = draws[0][1:] if draws else None
    args: tuple[torch.Tensor, ...] = (x,) if noise_shape is None else (x, torch.randn(2, *noise_shape))
    names = ["x"] if noise_shape is None else ["x", "noise"]
    tmp = Path(path).with_name(f".{Path(path).name}.export.tmp")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer notes that input checks are traced as constants
            torch.onnx.export(
                _Encode(defense, noise_shape is not None), args, str(tmp), input_names=names, output_names=["message"],
                dynamic_axes={n: {0: "batch"} for n in [*names, "message"]}, opset_version=opset, dynamo=False,
            )
        model = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    random_ops = sorted({n.op_type for n in model.graph.node if n.op_type in _RANDOM_OPS})
    if random_ops:
        raise ValueError(f"defense {defense.name!r} exports with random ops {random_ops} (seeded by onnxruntime, not the OS); not supported")
    meta = {
        "veil_defense": defense.name,
        "input_shape": json.dumps(list(defense.input_shape)),
        "message_shape": json.dumps(list(message_shape)),
        "noise_shape": json.dumps(None if noise_shape is None else list(noise_shape)),
        "noise": "none (deterministic)" if noise_shape is None else "input 'noise': standard normal float32, to be drawn from the OS entropy for every call",
    }
    onnx.helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    write_bytes(path, model.SerializeToString())
    return {k: json.loads(v) if k.endswith("shape") else v for k, v in meta.items()}


def os_normal(shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 draws from a generator seeded with 128 bits of OS entropy, fresh per call."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128))).standard_normal(shape, dtype=np.float32)


class OnnxObfuscator:
    """Run an exported client with onnxruntime: records in, messages out, noise from the OS entropy.

    Args:
        path: The ``.onnx`` file from :func:`export_client`.
        threads: onnxruntime's intra-op threads (0: its default).
    """

    def __init__(self, path: str | Path, *, threads: int = 0) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ONNX client not found")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise ValueError(f"{path}: not a loadable ONNX model ({err})") from err
        props = self.session.get_modelmeta().custom_metadata_map
        if "veil_defense" not in props:
            raise ValueError(f"{path}: not a veil ONNX client (no 'veil_defense' metadata)")
        self.defense = props["veil_defense"]
        self.input_shape = tuple(json.loads(props["input_shape"]))
        self.message_shape = tuple(json.loads(props["message_shape"]))
        noise = json.loads(props["noise_shape"])
        self.noise_shape = None if noise is None else tuple(noise)

    def obfuscate(self, x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """Messages (B, *message_shape) for records ``x`` (B, *input_shape).

        ``noise`` (B, *noise_shape) is for tests only (the deterministic part is ``noise = 0``); by
        default it is drawn here from the OS entropy, fresh for every call.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.input_shape))}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("x contains NaN or infinite values")
        feeds = {"x": x}
        if self.noise_shape is not None:
            want = (len(x), *self.noise_shape)
            noise = os_normal(want) if noise is None else np.ascontiguousarray(noise, dtype=np.float32)
            if noise.shape != want:
                raise ValueError(f"noise must have shape {want}, got {noise.shape}")
            feeds["noise"] = noise
        return self.session.run(["message"], feeds)[0]
