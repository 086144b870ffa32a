"""Server models: every registered model on every message shape a defense may send, and the head fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from veil.data import load_task
from veil.defenses import create_defense, list_defenses
from veil.models import BasicBlock, count_flops, create_model, list_models
from veil.noise import seed_everything
from veil.training.loop import train_step


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 4, 4), (16, 7, 7), (2, 2, 2)])
def test_every_model_maps_any_message_shape_to_logits(name, shape):
    model = create_model(name, shape, 3)
    out = model(torch.rand(5, *shape))
    assert out.shape == (5, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_image_models_name_a_bad_shape(name):
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        create_model(name, (64,), 2)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="valid: .*resnet"):
        create_model("vgg", (1, 8, 8), 2)


def test_cnn_head_reads_the_whole_7x7_map_on_mnist():
    # the head that averaged the 7x7 map down to 4x4 held the undefended server at ~0.95 on mnist-lt5
    # (README: why the reference server was weak); the fix keeps every position of the map
    model = create_model("cnn", (1, 28, 28), 2)
    first_linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert first_linear.in_features == 64 * 7 * 7
    # a large map is still pooled to 7x7, so the head stays bounded for any message size
    big = create_model("cnn", (1, 64, 64), 2)
    assert next(m for m in big.modules() if isinstance(m, nn.Linear)).in_features == 64 * 7 * 7


def test_resnet_is_resnet20_like():
    model = create_model("resnet", (1, 28, 28), 2)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9  # 3 stages x 3 blocks + stem + head = 20 weighted layers
    assert [b.conv2.out_channels for b in blocks[::3]] == [16, 32, 64]
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # about twice the cnn's cost on mnist (stride-2 stem), not the 8x of a full-resolution stage 1
    assert count_flops(model, (1, 28, 28)) < 3 * count_flops(create_model("cnn", (1, 28, 28), 2), (1, 28, 28))


def test_residual_block_adds_its_input():
    block = BasicBlock(4, 4).eval()
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()  # the residual branch is now 0: the block is relu(x)
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(block(x), torch.relu(x))


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_models_learn_digits(name):
    task = load_task("digits-lt5")
    seed_everything(0)
    model = create_model(name, task.input_shape, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = task.train.loader(32, shuffle=True, seed=0)
    model.train()
    for _ in range(4):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(task.test.x).argmax(1) == task.test.y).float().mean())
    assert acc > 0.9


@pytest.mark.parametrize("defense_name", list_defenses())
@pytest.mark.parametrize("name", list_models())
def test_every_model_reads_every_defense_message(name, defense_name):
    torch.manual_seed(0)
    d = create_defense(defense_name, input_shape=(1, 8, 8), num_classes=2)
    model = create_model(name, d.output_shape(), 2)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 2, (8,))
    mask = (torch.rand(8, 1, 8, 8) > 0.7).float() if d.uses_mask else None  # region defenses and the oracle read one
    for stage in d.stages():
        d.set_stage(stage.name)
        loss, logits = train_step(d, model, x, y, stage, mask=mask)
        assert logits.shape == (8, 2) and torch.isfinite(loss)
