"""One contract test over every registered defense: a newly registered method is tested here without
anyone writing a new test (shapes, finiteness, real noise, gradients, save/load, bad input)."""

from __future__ import annotations

import pytest
import torch

from veil.defenses import Defense, create_defense, defense_class, list_defenses
from veil.defenses.saving import load_obfuscator, save_obfuscator
from veil.models import create_model
from veil.training.loop import train_step

SHAPE = (1, 8, 8)
C = 2


def make(name: str) -> Defense:
    torch.manual_seed(0)
    return create_defense(name, input_shape=SHAPE, num_classes=C)


def batch(n: int = 16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, *SHAPE, generator=g), torch.randint(0, C, (n,), generator=g)


def region_mask(n: int) -> torch.Tensor:
    mask = torch.zeros(n, 1, *SHAPE[1:], dtype=torch.uint8)
    mask[:, :, 2:5, 2:5] = 1
    return mask


def encode(d: Defense, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """``encode_batch`` as the loop and the attacks call it: an oracle gets the true mask at every exposure."""
    return d.encode_batch(x, y, d.mask_for(y is not None, region_mask(len(x)) if d.uses_mask else None))


@pytest.mark.parametrize("name", list_defenses())
def test_encode_decode_shapes_and_finite(name):
    d = make(name)
    x, y = batch()
    for labels in (None, y):
        m = encode(d, x, labels)
        assert m.shape[0] == len(x)
        assert torch.isfinite(m).all()
        out = d.decode(m)
        assert tuple(out.shape[1:]) == tuple(d.output_shape())


@pytest.mark.parametrize("name", list_defenses())
def test_noise_is_real(name):
    d = make(name)
    if name == "none" or getattr(d, "deterministic", False):
        pytest.skip(f"{name} is deterministic by design")
    d.eval()
    x, _ = batch()
    assert not torch.equal(encode(d, x), encode(d, x)), "two calls gave the same output: no noise"


@pytest.mark.parametrize("name", list_defenses())
def test_gradients_reach_every_trainable_tensor(name):
    d = make(name)
    model = create_model("cnn", d.output_shape(), C)
    x, y = batch()
    mask = None
    if d.uses_mask:  # as in training: the data owner's region masks (a selector may learn from them alone)
        mask = region_mask(len(x))
    secret = None
    if d.uses_secret:  # as in training: the secret's label where the data owner knows it, -1 elsewhere
        secret = torch.arange(len(x)) % 10
        secret[::2] = -1
    for stage in d.stages():
        d.set_stage(stage.name)
        d.train()
        trainable = [(n, p) for n, p in d.named_parameters() if p.requires_grad]
        d.zero_grad(set_to_none=True)
        loss, _ = train_step(d, model, x, y, stage, mask, secret)
        loss.backward()
        for n, p in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}/{stage.name}: no gradient for {n}"
            assert p.grad.abs().sum() > 0, f"{name}/{stage.name}: zero gradient for {n}"


@pytest.mark.parametrize("name", list_defenses())
def test_save_load_round_trip(name, tmp_path):
    d = make(name)
    path = tmp_path / "obf.safetensors"
    save_obfuscator(path, d)
    d2 = load_obfuscator(path)
    assert type(d2) is type(d) and d2.config() == d.config()
    for (k, a), (k2, b) in zip(sorted(d.state_dict().items()), sorted(d2.state_dict().items())):
        assert k == k2 and torch.equal(a, b)


@pytest.mark.parametrize("name", list_defenses())
def test_bad_input_is_named(name):
    d = make(name)
    x, y = batch()
    with pytest.raises(ValueError, match="shape"):
        d.encode(torch.rand(4, 3, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        d.encode(torch.full((2, *SHAPE), float("nan")))
    with pytest.raises(ValueError, match="labels"):
        d.encode(x, torch.full_like(y, C))
    with pytest.raises(ValueError, match="floating"):
        d.encode(torch.zeros(2, *SHAPE, dtype=torch.int64))


@pytest.mark.parametrize("name", list_defenses())
def test_knob_is_a_constructor_argument(name):
    cls = defense_class(name)
    if not cls.knob:
        pytest.skip(f"{name} has no knob")
    assert cls.knob in make(name).config(), f"knob {cls.knob!r} missing from config()"


def test_unknown_defense_lists_valid_names():
    with pytest.raises(ValueError, match="valid: .*none"):
        create_defense("nope", input_shape=SHAPE, num_classes=C)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="gaussian"):
        create_defense("gaussian", input_shape=SHAPE, num_classes=C, bogus=1)
