"""Oracle tests written from the papers' equations, independent of the code paths they check.

Each oracle recomputes the message from the method's equation with plain torch functions applied to the
defense's trained tensors (never through the defense's own helpers), replays the noise from the same
random state, and compares with ``encode``.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from veil.defenses import create_defense

SHAPE = (2, 8, 8)  # two channels, so per-channel mistakes show
C = 3


def _perturb(d) -> None:
    """Move every parameter off its initialisation so that structured inits cannot hide a wrong formula."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------ ANI, Eq. 5-6
def test_ani_message_is_eq5_with_w_from_the_wconv2_architecture():
    torch.manual_seed(0)
    d = create_defense("ani", input_shape=SHAPE, num_classes=2)
    _perturb(d)
    d.eval()
    x = torch.rand(5, *SHAPE)
    f = d.f_psi
    # Table 2, WConv-2: Conv 3x3, 8 - (ReLU) - Maxpool /2 - Linear (per position) - Upscale x2 - Conv 3x3, C - Exp - Tanh
    h = F.relu(F.conv2d(x, f.enc.weight, f.enc.bias, padding=1))
    h = F.max_pool2d(h, 2)
    h = torch.einsum("bihw,oi->bohw", h, f.linear.weight[:, :, 0, 0]) + f.linear.bias[None, :, None, None]
    h = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    w = torch.tanh(torch.exp(F.conv2d(h, f.dec.weight, f.dec.bias, padding=1)))
    state = torch.get_rng_state()
    got = d.encode(x)
    torch.set_rng_state(state)
    v = torch.randn(5, *SHAPE)  # Eq. 6: v ~ N(0, I), the draw encode made
    torch.testing.assert_close(got, w * x + (1 - w) * v, atol=1e-5, rtol=1e-5)
    assert 0.05 < float(w.detach().std()), "the oracle needs a w that varies"


# ------------------------------------------------------------------------------------------ SVD, Eq. 7
@pytest.mark.parametrize("keep", [0.25, 1.0])
def test_svd_coefficients_are_projections_on_ws_right_singular_vectors(keep):
    torch.manual_seed(0)
    d = create_defense("svd", input_shape=SHAPE, num_classes=2, keep=keep)
    with torch.no_grad():
        d.server_layer.weight.normal_()
    d.set_stage("finetune")  # computes the basis of the (frozen) W
    d.eval()
    x = torch.rand(6, *SHAPE)
    conv = d.client[0]
    z = F.max_pool2d(F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1)), 2).flatten(1)  # M_c(x), (B, n)
    W = d.server_layer.weight.detach().double()
    _, s, vh = torch.linalg.svd(W, full_matrices=False)  # Definition 1, singular values descending
    m = max(1, round(keep * len(s)))
    alpha = z.double() @ vh[:m].T  # Eq. 7: alpha_k = v_k^T z for the m' largest singular values
    got = d.encode(x).double()
    assert got.shape == (6, m)
    # singular vectors are defined up to sign: align each column's sign, then compare values
    sign = torch.sign((got * alpha).sum(0))
    torch.testing.assert_close(got * sign, alpha, atol=1e-4, rtol=1e-4)
    # the server's W z' with z' = V_m' alpha (sign-free): W applied to the projection of z
    proj = z.double() @ vh[:m].T @ vh[:m]
    pre = proj @ W.T + d.server_layer.bias.detach().double()
    torch.testing.assert_close(d.decode(d.encode(x)).double().flatten(1), F.relu(pre), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ SCNL, Eq. 5-7
def _gaussian(raw_mu: torch.Tensor, raw_sigma: torch.Tensor, eps: torch.Tensor, bound: float = 3.0, min_scale: float = 0.01) -> torch.Tensor:
    """Eq. 7 through the documented constraints: mean = bound tanh(raw/bound), sigma = softplus(raw) + min_scale."""
    return bound * torch.tanh(raw_mu / bound) + (F.softplus(raw_sigma) + min_scale) * eps


@pytest.mark.parametrize("name", ["scnl-adaptive", "scnl-joint"])
def test_scnl_training_exposure_is_the_label_class_formula(name):
    """Hard selection: h = mu_y + sigma_y * eps with mu_y = x * k_mu_y (Eq. 5), sigma_y from x * k_sigma_y (Eq. 6)."""
    torch.manual_seed(0)
    d = create_defense(name, input_shape=SHAPE, num_classes=C)
    _perturb(d)
    d.eval()  # in eval mode the known label selects every record (no mixing with the selector)
    x, y = torch.rand(5, *SHAPE), torch.tensor([0, 2, 1, 2, 0])
    layer = d.layer
    co = SHAPE[0]
    state = torch.get_rng_state()
    got = d.encode(x, y)
    torch.set_rng_state(state)
    eps = torch.randn(5, co, 8, 8)
    rows = []
    for i in range(5):
        c = int(y[i])
        k, b = layer.weight[c], layer.bias[c]  # (2*Co, Ci, 3, 3): the Co mean kernels, then the Co scale kernels
        raw_mu = F.conv2d(x[i : i + 1], k[:co], b[:co], padding=1)
        raw_sigma = F.conv2d(x[i : i + 1], k[co:], b[co:], padding=1)
        rows.append(_gaussian(raw_mu, raw_sigma, eps[i : i + 1]))
    torch.testing.assert_close(got, torch.cat(rows), atol=1e-5, rtol=1e-5)


def test_scnl_soft_selection_follows_the_documented_formula():
    """Input incarnation (seed §2.1.1): raw = sum_c k_c * (pi_c ⊙ x) + pi̅_c b_c, pi_c = sigmoid(w_c) per input
    pixel and channel, pi̅_c its mean over input channels (the selection at each output pixel)."""
    torch.manual_seed(0)
    d = create_defense("scnl-joint", input_shape=SHAPE, num_classes=C)
    _perturb(d)
    d.eval()
    x = torch.rand(4, *SHAPE)
    layer = d.layer
    co = SHAPE[0]
    pi = torch.sigmoid(layer.selector.logits)  # (C, Ci, H, W), the same for every record
    raw = torch.zeros(4, 2 * co, 8, 8)
    for c in range(C):
        raw = raw + F.conv2d(pi[c] * x, layer.weight[c], padding=1)
        raw = raw + pi[c].mean(0)[None, None] * layer.bias[c][None, :, None, None]
    state = torch.get_rng_state()
    got = d.encode(x)
    torch.set_rng_state(state)
    eps = torch.randn(4, co, 8, 8)
    torch.testing.assert_close(got, _gaussian(raw[:, :co], raw[:, co:], eps), atol=1e-5, rtol=1e-5)
