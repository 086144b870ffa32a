"""SCNL layers: shapes, real noise, gradients, and oracle tests (hard selection = the naive per-class
computation = the selection formulas with pi = one_hot(label)); region masks; cost flat in C."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from veil.layers import (
    AdaptiveSelection,
    ConditionalStochastic,
    SCNLAdditive,
    SCNLConv2d,
    SCNLLinear,
    SoftSelection,
    hard_selection,
)
from veil.layers.learning_rate import scale_learning_rate

C = 4
B = 6


def labels() -> torch.Tensor:
    return torch.tensor([0, 3, 1, 2, 3, 0])


def make(kind: str, incarnation: str = "input", distribution: str = "gaussian", **kw):
    torch.manual_seed(0)
    if kind == "conv":
        return SCNLConv2d(2, 3, 3, C, distribution, incarnation=incarnation, **kw), torch.randn(B, 2, 5, 5)
    if kind == "linear":
        return SCNLLinear(7, 5, C, distribution, incarnation=incarnation, **kw), torch.randn(B, 7)
    if kind == "additive":
        layer = SCNLAdditive((2, 5, 5), C, distribution, incarnation=incarnation, **kw)
        with torch.no_grad():  # distinct per-class gains/templates so a wrong class would show
            layer.gain.normal_()
            layer.offset.normal_()
        return layer, torch.randn(B, 2, 5, 5)
    if kind == "gru":
        return ConditionalStochastic(lambda: nn.GRU(3, 8, batch_first=True), C, distribution, incarnation=incarnation), torch.randn(B, 4, 3)
    raise AssertionError(kind)


KINDS = ["conv", "linear", "additive", "gru"]


def naive_hard(layer, x, y):
    """The obvious way: for every record, compute its own class's raw parameters alone."""
    rows = []
    for i in range(len(y)):
        c = int(y[i])
        xi = x[i : i + 1]
        if isinstance(layer, SCNLConv2d):
            r = F.conv2d(xi, layer.weight[c], layer.bias[c], padding=layer.padding).unflatten(1, (layer.num_params, layer.out_channels))
        elif isinstance(layer, SCNLLinear):
            r = F.linear(xi, layer.weight[c], layer.bias[c]).unflatten(1, (layer.num_params, layer.out_features))
        elif isinstance(layer, SCNLAdditive):
            loc = layer.gain[c] * xi + layer.offset[c]
            r = torch.cat([loc.unsqueeze(1), layer.scale[c].unsqueeze(0)], 1)
        else:
            out = layer.branches[c](xi)[0]
            r = out.unflatten(-1, (layer.num_params, out.shape[-1] // layer.num_params)).movedim(-2, 1)
        rows.append(r)
    return torch.cat(rows)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("incarnation", ["input", "output"])
def test_hard_selection_equals_naive_and_one_hot_formula(kind, incarnation):
    if kind == "gru" and incarnation == "input":
        pytest.skip("the generic wrapper's input incarnation equals hard selection only when f(0) = 0")
    layer, x = make(kind, incarnation)
    y = labels()
    fast = layer.raw(x, y)
    torch.testing.assert_close(fast, naive_hard(layer, x, y), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, layer.raw(x, pi=hard_selection(y, C)), atol=1e-5, rtol=1e-5)


def naive_soft(layer, x, pi, incarnation):
    """sum_c k_c * (pi_c ⊙ x) + pi_c b_c  or  sum_c pi_c ⊙ (k_c * x + b_c), one class at a time."""
    total = 0
    for c in range(C):
        p = pi[:, c]
        if isinstance(layer, SCNLConv2d):
            if incarnation == "input":
                r = F.conv2d(p * x, layer.weight[c], padding=layer.padding) + p.mean(1, keepdim=True) * layer.bias[c][None, :, None, None]
            else:
                r = p.mean(1, keepdim=True) * F.conv2d(x, layer.weight[c], layer.bias[c], padding=layer.padding)
            total = total + r.unflatten(1, (layer.num_params, layer.out_channels))
        else:  # linear
            if incarnation == "input":
                r = F.linear(p * x, layer.weight[c]) + p.mean(1, keepdim=True) * layer.bias[c]
            else:
                r = p.mean(1, keepdim=True) * F.linear(x, layer.weight[c], layer.bias[c])
            total = total + r.unflatten(1, (layer.num_params, layer.out_features))
    return total


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("incarnation", ["input", "output"])
def test_soft_selection_equals_naive_formula(kind, incarnation):
    layer, x = make(kind, incarnation)
    g = torch.Generator().manual_seed(3)
    if incarnation == "input":  # per-pixel/feature pi on the input
        pi = torch.rand(1, C, *x.shape[1:], generator=g)
    else:  # per-record pi on the outputs (the naive formula above broadcasts it)
        pi = torch.rand(B, C, generator=g)
        pi_e = pi.reshape(B, C, *([1] * (x.dim() - 1)))
    fast = layer.raw(x, pi=pi)
    ref = naive_soft(layer, x, pi if incarnation == "input" else pi_e.expand(B, C, *x.shape[1:]), incarnation)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_region_mask_selection_is_per_pixel_hard_selection():
    layer, x = make("conv", "input")
    mask = torch.zeros(B, C, 5, 5)
    mask[:, 1, :, :2] = 1  # left columns: class 1
    mask[:, 2, :, 2:] = 1  # the rest: class 2
    got = layer.raw(x, mask)
    k = layer.padding
    ref = 0
    for c in range(C):  # pixel p passes through class c's kernels where mask[c, p] = 1
        m = mask[:, c : c + 1]
        ref = ref + F.conv2d(m * x, layer.weight[c], padding=k) + m * layer.bias[c][None, :, None, None]
    torch.testing.assert_close(got, ref.unflatten(1, (2, 3)), atol=1e-5, rtol=1e-5)
    # a mask that selects class y everywhere is hard selection by y
    y = labels()
    full = F.one_hot(y, C).float()[:, :, None, None].expand(B, C, 5, 5)
    torch.testing.assert_close(layer.raw(x, full), layer.raw(x, y), atol=1e-5, rtol=1e-5)


def test_region_mask_bad_values_and_shape_raise():
    layer, x = make("conv")
    with pytest.raises(ValueError, match="0 or 1"):
        layer(x, torch.full((B, C, 5, 5), 0.5))
    with pytest.raises(ValueError, match="shape"):
        layer(x, torch.ones(B, C, 4, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_noise_and_gradients(kind):
    layer, x = make(kind, "output" if kind == "gru" else "input")
    layer.selector = SoftSelection(C, ())
    y = labels()
    h1, h2 = layer(x, y), layer(x, y)
    assert h1.shape == h2.shape and h1.shape[0] == B
    assert not torch.equal(h1, h2), "two calls gave the same sample: no noise"
    loss = layer(x, y).square().mean() + layer(x).square().mean()  # hard path + soft (selector) path
    loss.backward()
    for n, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {n}"


@pytest.mark.parametrize("distribution", ["gaussian", "laplace", "bernoulli", "binomial", "categorical", "multinomial"])
def test_every_distribution_samples_and_backpropagates(distribution):
    trials = 3 if distribution in ("binomial", "multinomial") else 1
    layer, x = make("conv", distribution=distribution, trials=trials)
    h = layer(x, labels())
    assert h.shape == (B, 3, 5, 5) and torch.isfinite(h).all()
    if distribution in ("bernoulli", "binomial", "categorical", "multinomial"):
        assert h.min() >= 0 and h.max() <= trials + 1e-5
    if distribution in ("categorical", "multinomial"):  # relaxed one-hot over channels sums to trials
        torch.testing.assert_close(h.sum(1), torch.full((B, 5, 5), float(trials)), atol=1e-4, rtol=1e-4)
    h.sum().backward()
    assert layer.weight.grad.abs().sum() > 0


def test_sigma_positive_and_mean_bounded_even_for_huge_kernels():
    layer, x = make("conv", bound=2.0, min_scale=0.05)
    with torch.no_grad():
        layer.weight.mul_(1e4)
    mu, sigma = layer.params(x, labels())
    assert mu.abs().max() <= 2.0 + 1e-5, "the mean escaped its bound"
    assert sigma.min() >= 0.05 - 1e-6


def test_cost_is_flat_in_the_number_of_classes():
    """Hard selection touches only the selected kernels: FLOPs do not grow with C."""
    from veil.models import count_flops

    flops = {}
    for c in (2, 100):
        layer = SCNLConv2d(1, 4, 3, c)
        y = torch.zeros(1, dtype=torch.int64)
        flops[c] = count_flops(lambda x: layer.raw(x, y), (1, 16, 16))
    assert flops[100] == flops[2] > 0


def test_transformer_block_wrapper():
    torch.manual_seed(0)
    make_block = lambda: nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0), nn.Linear(8, 16))
    layer = ConditionalStochastic(make_block, 3, selector=SoftSelection(3, ()))
    x, y = torch.randn(5, 4, 8), torch.tensor([0, 2, 1, 1, 0])
    h = layer(x, y)
    assert h.shape == (5, 4, 8)
    torch.testing.assert_close(layer.raw(x, y), layer.raw(x, pi=hard_selection(y, 3)), atol=1e-5, rtol=1e-5)
    assert layer(x).shape == (5, 4, 8)


def test_bad_inputs_raise_clear_errors():
    layer, x = make("conv")
    with pytest.raises(ValueError, match="labels must lie"):
        layer(x, torch.full((B,), C))
    with pytest.raises(ValueError, match="no selector"):
        layer(x)
    with pytest.raises(ValueError, match=r"shape \(B, 2, H, W\)"):
        layer(torch.randn(B, 3, 5, 5), labels())
    with pytest.raises(ValueError, match="odd"):
        SCNLConv2d(1, 1, 2, C)
    with pytest.raises(ValueError, match="incarnation"):
        SCNLLinear(3, 3, C, incarnation="middle")
    with pytest.raises(ValueError, match="distribution"):
        SCNLLinear(3, 3, C, "poisson")


def test_scale_learning_rate_keeps_values_and_speeds_adam():
    torch.manual_seed(0)
    layer = SCNLAdditive((1, 4, 4), 2)
    layer.selector = AdaptiveSelection(2, (1, 4, 4))
    x = torch.rand(3, 1, 4, 4)
    before = layer.gain.detach().clone()
    torch.manual_seed(1)
    a = layer.raw(x)
    scale_learning_rate(layer, 5.0)
    torch.manual_seed(1)
    torch.testing.assert_close(layer.raw(x), a)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    layer.raw(x, torch.tensor([0, 1, 0]))[:, 0].sum().backward()
    opt.step()
    step = (layer.gain.detach() - before).abs().max()
    assert 4e-3 < step < 6e-3, f"expected an effective step of 5 * lr, got {step}"


# ------------------------------------------------------------------ torch-style geometry (issue #9 part 6)
GEOMETRIES = [
    dict(padding=1),
    dict(stride=2, padding=1),
    dict(padding=0),
    dict(padding=2, dilation=2),
    dict(stride=(2, 1), padding=(0, 1)),
    dict(padding=1, groups=2),
    dict(stride=2, padding="valid", groups=2),
]


def test_the_issue_example_takes_conv2d_arguments():
    layer = SCNLConv2d(3, 16, kernel_size=3, padding=1, num_classes=10)
    h = layer(torch.randn(2, 3, 8, 8), torch.tensor([0, 9]))
    assert h.shape == (2, 16, 8, 8)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_geometry_gives_nn_conv2d_output_size(geometry):
    torch.manual_seed(0)
    layer = SCNLConv2d(4, 6, 3, C, **geometry)
    ref = nn.Conv2d(4, 6, 3, **geometry)
    x = torch.randn(B, 4, 9, 7)
    h = layer(x, labels())
    assert h.shape == ref(x).shape
    assert layer(x, pi=hard_selection(labels(), C)).shape == h.shape


@pytest.mark.parametrize("geometry", [g for g in GEOMETRIES if "groups" not in g], ids=str)
def test_hard_selection_with_geometry_is_the_class_convolution(geometry):
    """Eq. 5-6 per record with torch's own convolution: raw_c = conv(x, k_c) + b_c, split (P, C_out)."""
    torch.manual_seed(0)
    layer = SCNLConv2d(2, 3, 3, C, **geometry)
    x, y = torch.randn(B, 2, 9, 7), labels()
    conv = nn.Conv2d(2, 2 * 3, 3, **geometry)
    rows = []
    for i in range(B):
        with torch.no_grad():
            conv.weight.copy_(layer.weight[int(y[i])])
            conv.bias.copy_(layer.bias[int(y[i])])
        rows.append(conv(x[i : i + 1]).unflatten(1, (2, 3)))
    torch.testing.assert_close(layer.raw(x, y), torch.cat(rows).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("incarnation", ["input", "output"])
def test_hard_selection_equals_one_hot_formula_with_geometry(geometry, incarnation):
    torch.manual_seed(0)
    layer = SCNLConv2d(4, 6, 3, C, incarnation=incarnation, **geometry)
    x, y = torch.randn(B, 4, 9, 7), labels()
    torch.testing.assert_close(layer.raw(x, y), layer.raw(x, pi=hard_selection(y, C)), atol=1e-5, rtol=1e-5)
    if incarnation == "input":  # a region mask selecting the label everywhere is hard selection too
        mask = F.one_hot(y, C).float()[:, :, None, None].expand(B, C, 9, 7)
        torch.testing.assert_close(layer.raw(x, mask), layer.raw(x, y), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["hard", "pi"])
def test_groups_keep_each_output_group_on_its_input_group(path):
    """With groups=2, input channels 0-1 feed output channels 0-2 (mean and scale) only, 2-3 feed 3-5."""
    torch.manual_seed(0)
    layer = SCNLConv2d(4, 6, 3, C, groups=2, incarnation="output")
    x, y = torch.randn(B, 4, 6, 6), labels()
    sel = dict(labels=y) if path == "hard" else dict(pi=torch.rand(B, C))
    base = layer.raw(x, **sel)
    x2 = x.clone()
    x2[:, :2] += torch.randn(B, 2, 6, 6)  # change input group 0 only
    diff = (layer.raw(x2, **sel) - base).abs().amax(dim=(0, 3, 4))  # (P, C_out)
    assert (diff[:, :3] > 1e-4).all(), "output group 0 ignored its input group"
    assert (diff[:, 3:] < 1e-6).all(), "output group 1 read input group 0"


def test_identity_init_with_groups_starts_near_the_input():
    torch.manual_seed(0)
    layer = SCNLConv2d(4, 4, 3, C, groups=2, init="identity", init_scale=0.5)
    x = torch.randn(B, 4, 6, 6)
    mu, sigma = layer.params(x, labels())
    assert (mu - 3 * torch.tanh(x / 3)).abs().mean() < 0.15
    torch.testing.assert_close(sigma.mean(), torch.tensor(0.5), atol=0.05, rtol=0)


def test_unknown_or_foreign_keywords_name_the_layer():
    with pytest.raises(TypeError, match="SCNLConv2d.*padding_typo"):
        SCNLConv2d(1, 2, 3, C, padding_typo=1)
    with pytest.raises(TypeError, match="SCNLAdditive.*kernel_size"):
        SCNLAdditive((1, 4, 4), C, kernel_size=3)
    with pytest.raises(TypeError, match="SCNLLinear.*padding"):
        SCNLLinear(3, 3, C, padding=1)
    with pytest.raises(TypeError, match="ConditionalStochastic.*hidden"):
        ConditionalStochastic(lambda: nn.Linear(2, 4), C, hidden=3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(stride=0), "stride"),
        (dict(dilation=(1, 0)), "dilation"),
        (dict(padding=-1), "padding"),
        (dict(padding="full"), "padding"),
        (dict(groups=3), "groups"),
        (dict(stride=2), "same"),  # default padding 'same' needs stride 1
        (dict(bias="yes"), "bias"),
    ],
)
def test_bad_geometry_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=f"SCNLConv2d.*{match}"):
        SCNLConv2d(4, 6, 3, C, **kwargs)
