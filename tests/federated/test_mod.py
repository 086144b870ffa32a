"""veil.ObfuscationMod (src/veil/federated/mod.py): what a ClientApp sends leaves as messages only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from veil.defenses import create_defense
from veil.federated.mod import ObfuscationMod
from veil.federated.simulation import InProcessGrid

SHAPE = (1, 8, 8)


def ask(mod: ObfuscationMod, arrays: dict[str, np.ndarray]) -> Message:
    """One query to a ClientApp behind ``mod`` that answers with ``arrays``; the reply as the server gets it."""
    app = ClientApp(mods=[mod])

    @app.query()
    def answer(msg: Message, context: Context) -> Message:
        return Message(content=RecordDict({"data": ArrayRecord({k: Array(v) for k, v in arrays.items()})}), reply_to=msg)

    grid = InProcessGrid(app, 1)
    node = next(iter(grid.get_node_ids()))
    return list(grid.send_and_receive([grid.create_message(RecordDict(), MessageType.QUERY, node, group_id="g")]))[0]


@pytest.fixture(scope="module")
def defense():
    torch.manual_seed(0)
    return create_defense("scnl-region", input_shape=SHAPE, num_classes=2)


def records(n=6):
    rng = np.random.default_rng(0)
    return rng.random((n, *SHAPE), dtype=np.float32), rng.integers(0, 2, n)


def test_records_leave_as_messages_labels_stay_masks_never_leave(defense):
    x, y = records()
    mask = np.zeros((len(x), 1, 8, 8), dtype=np.uint8)
    mask[:, :, :4] = 1
    reply = ask(ObfuscationMod(defense, exposure="training"), {"x": x, "y": y, "mask": mask})
    assert not reply.has_error()
    out = reply.content["data"]
    assert sorted(out.keys()) == ["x", "y"]  # the mask is the data owner's; it is used, not sent
    m = out["x"].numpy()
    assert m.shape == x.shape and not np.allclose(m, x)
    np.testing.assert_array_equal(out["y"].numpy(), y)
    again = ask(ObfuscationMod(defense, exposure="training"), {"x": x, "y": y, "mask": mask}).content["data"]["x"].numpy()
    assert not np.array_equal(m, again)  # fresh noise every reply


def test_reply_without_records_passes_unchanged(defense):
    weights = np.arange(12, dtype=np.float32).reshape(3, 4)
    reply = ask(ObfuscationMod(defense), {"layer.weight": weights})
    np.testing.assert_array_equal(reply.content["data"]["layer.weight"].numpy(), weights)


@pytest.mark.parametrize(
    "arrays, exposure, match",
    [
        ({"x": records()[0], "copy": records()[0]}, "inference", "in the clear"),
        ({"x": records()[0]}, "training", "needs the labels"),
        ({"x": np.zeros((2, 3, 8, 8), dtype=np.float32)}, "inference", "must be float"),
        ({"mask": np.zeros((2, 1, 8, 8), dtype=np.uint8)}, "inference", "masks never leave"),
    ],
)
def test_refuses_what_would_leak_or_does_not_fit(defense, arrays, exposure, match):
    reply = ask(ObfuscationMod(defense, exposure=exposure), arrays)
    assert reply.has_error() and match in reply.error.reason


def test_bad_arguments(defense, tmp_path):
    with pytest.raises(ValueError, match="exposure"):
        ObfuscationMod(defense, exposure="sometimes")
    with pytest.raises(FileNotFoundError):
        ObfuscationMod(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError):
        ObfuscationMod(42)
