import pytest
import torch
from torch.nn import functional as F

from veil.defenses import create_defense
from veil.detection.scenes import region_map
from veil.layers import SCNLConv2d


def test_per_pixel_hard_selection_equals_the_per_object_loop(small_task):
    """The defense's message parameters under the boxes equal, box by box, those of the same layer with
    the whole record hard-selected to the box's class (the background: region 0)."""
    s = small_task.test.subset(range(6))
    torch.manual_seed(0)
    d = create_defense("scnl-detect", input_shape=s.image_shape, num_classes=s.num_classes)
    with torch.no_grad():  # make the regions differ (the stored parameters behind the lr parametrisation)
        for p in d.layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    regions = region_map(s, 0, len(s))  # (B, 1, H, W)
    onehot = F.one_hot(regions[:, 0], d.regions).permute(0, 3, 1, 2).float()
    mu, sigma = d.layer.params(s.images, onehot)
    # oracle: a loop over the objects, each computed with record-level hard selection (labels)
    b = len(s)
    mu_o, sigma_o = d.layer.params(s.images, torch.zeros(b, dtype=torch.long))  # background everywhere
    mu_o, sigma_o = mu_o.clone(), sigma_o.clone()
    area = (s.boxes[:, 2] - s.boxes[:, 0]) * (s.boxes[:, 3] - s.boxes[:, 1])
    for j in torch.argsort(area, descending=True).tolist():
        i, c = int(s.scene[j]), int(s.labels[j]) + 1
        x0, y0, x1, y1 = (int(v) for v in s.boxes[j])
        m_c, s_c = d.layer.params(s.images[i : i + 1], torch.tensor([c]))
        mu_o[i, :, y0:y1, x0:x1], sigma_o[i, :, y0:y1, x0:x1] = m_c[0, :, y0:y1, x0:x1], s_c[0, :, y0:y1, x0:x1]
    assert torch.allclose(mu, mu_o, atol=1e-5) and torch.allclose(sigma, sigma_o, atol=1e-5)


@pytest.mark.parametrize("classes", [2, 80])
def test_region_selection_of_a_3x3_layer_follows_the_equation(classes):
    """raw = sum_c k_c * (pi_c ⊙ x) + pi_c ⊙ b_c (seed §2.1.1, input incarnation), computed class by class."""
    torch.manual_seed(1)
    layer = SCNLConv2d(2, 3, 3, classes)
    x = torch.randn(3, 2, 12, 12)
    regions = torch.randint(0, 3, (3, 12, 12)) * (classes // 3 + 1) % classes  # three classes per record
    mask = F.one_hot(regions, classes).permute(0, 3, 1, 2).float()
    want = sum(F.conv2d(x * mask[:, c : c + 1], layer.weight[c], padding=1) + mask[:, c : c + 1] * layer.bias[c][None, :, None, None] for c in range(classes))
    got = layer.raw(x, mask)  # (B, P, Co, H, W)
    assert torch.allclose(got.flatten(1, 2), want, atol=1e-5)


def test_hard_selection_cost_is_flat_in_the_number_of_classes(monkeypatch):
    """Multiply-adds of per-pixel hard selection on a 96x96 scene with 2 objects, at C = 2, 10, 80: every
    convolution the layer runs is recorded (counted, not timed)."""
    calls = []
    conv2d = F.conv2d

    def counting(x, weight, *args, **kwargs):
        out = conv2d(x, weight, *args, **kwargs)
        calls.append(out.numel() * weight[0].numel())
        return out

    monkeypatch.setattr(F, "conv2d", counting)
    regions = torch.zeros(1, 96, 96, dtype=torch.long)
    regions[0, 10:30, 10:30], regions[0, 50:90, 40:80] = 1, 1
    cost = []
    for c in (2, 10, 80):
        layer = SCNLConv2d(1, 4, 3, c)
        mask = F.one_hot(regions, c).permute(0, 3, 1, 2).float()
        x = torch.rand(1, 1, 96, 96)
        calls.clear()
        by_map = layer.raw(x, regions)  # a region map of class indices: no (B, C, H, W) mask is built
        cost.append(sum(calls))
        calls.clear()
        assert torch.allclose(layer.raw(x, mask), by_map, atol=1e-6)
        assert sum(calls) == cost[-1]
    assert cost[0] == cost[1] == cost[2] > 0


def test_inference_needs_no_boxes_and_training_mixes(small_task):
    s = small_task.train.subset(range(8))
    torch.manual_seed(0)
    d = create_defense("scnl-detect", input_shape=s.image_shape, num_classes=2, hard_fraction=0.5)
    d.train()
    h = d.encode_batch(s.images, None, region_map(s, 0, len(s)))
    assert h.shape == s.images.shape and d.penalty() > 0
    d.eval()
    assert d.encode(s.images).shape == s.images.shape


def test_bad_regions_are_named(small_task):
    d = create_defense("scnl-detect", input_shape=(1, 64, 64), num_classes=2)
    x = torch.rand(2, 1, 64, 64)
    with pytest.raises(ValueError, match="mask must be a tensor of shape"):
        d.encode(x, mask=torch.zeros(2, 64, 64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"integers in \[0, 2\]"):
        d.encode(x, mask=torch.full((2, 1, 64, 64), 3))


@pytest.mark.parametrize("alone", [True, False])
def test_the_detection_loss_reaches_the_selector_only_when_asked(small_task, alone):
    s = small_task.train.subset(range(8))
    torch.manual_seed(0)
    d = create_defense("scnl-detect", input_shape=s.image_shape, num_classes=s.num_classes, hard_fraction=0.0, selector_weight=0.0, train_selector_alone=alone).train()
    h = d.encode(s.images, None, mask=region_map(s, 0, len(s)))
    (h.square().mean() + d.penalty()).backward()
    reached = any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in d.layer.selector.parameters())
    assert reached is not alone


def test_setup_trains_the_detection_selector_on_the_region_maps(small_task):
    s = small_task.train
    regions = region_map(s, 0, len(s)).long()
    batches = [(s.images[i : i + 16], regions[i : i + 16]) for i in range(0, len(s), 16)]

    def object_recall(d):
        with torch.no_grad():
            pred = d.layer.selector(s.images).argmax(1)
        objects = regions[:, 0] > 0
        return float(((pred > 0) & objects).sum() / objects.sum())

    made = lambda n: create_defense("scnl-detect", input_shape=s.image_shape, num_classes=s.num_classes, selector_epochs=n)  # noqa: E731
    torch.manual_seed(0)
    untouched = made(0)
    untouched.setup(None, batches)
    torch.manual_seed(0)
    trained = made(30)
    trained.setup(None, batches)
    assert object_recall(trained) > max(0.5, object_recall(untouched) + 0.2), (object_recall(trained), object_recall(untouched))
    with pytest.raises(ValueError, match="region map"):
        trained.setup(None, [(s.images[:4],)])


def test_a_closed_content_channel_sends_only_region_templates(small_task):
    # content_closed: given the regions, the message's distribution does not depend on the scene, also after
    # training steps (its kernels get no gradient); the region templates (biases) still train
    s = small_task.train.subset(range(8))
    torch.manual_seed(0)
    d = create_defense("scnl-detect", input_shape=s.image_shape, num_classes=s.num_classes, content_closed=True, train_selector_alone=True).train()
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    bias = d.layer.bias.detach().clone()
    for _ in range(3):
        h = d.encode(s.images, None, mask=region_map(s, 0, len(s)))
        (h.square().mean() + d.penalty()).backward()
        opt.step()
        opt.zero_grad()
    assert float(d.layer.weight.detach().abs().max()) == 0.0
    assert not torch.equal(bias, d.layer.bias.detach())
    regions = region_map(s, 0, len(s))[:, 0]
    shuffled = s.images[torch.randperm(len(s))]
    for a, b in zip(d.layer.params(s.images, regions), d.layer.params(shuffled, regions)):
        assert torch.equal(a, b)
