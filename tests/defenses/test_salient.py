"""select-salient: occlusion saliency credits what the model reads; keep maps take the top share; the selector,
learnt from y alone through a reference, keeps the task's content and closes an independent secret."""

import pytest
import torch
from torch import nn

from veil.data.tasks import Split, Task
from veil.defenses import create_defense
from veil.defenses.salient import keep_maps, occlusion_saliency
from veil.models import create_model
from veil.training.loop import TrainConfig, fit, known_secrets


class _LeftReader(nn.Module):
    """Logits from the left half of a (1, 8, 8) record only."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x[:, :, :, :4].flatten(1))


def test_occlusion_credits_only_what_the_model_reads():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8)
    s = occlusion_saliency(_LeftReader(), x, patch=2, stride=2)
    assert s.shape == (16, 1, 8, 8) and bool((s >= 0).all())
    assert float(s[:, :, :, 4:].abs().max()) == 0.0  # the right half never changes the answer
    assert float(s[:, :, :, :4].mean()) > 0.0


def test_occlusion_skipping_empty_windows_changes_nothing():
    """Windows already all zero are not passed again; the maps equal those of occluding every window."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3))
    model(torch.rand(8, 1, 10, 10))  # running statistics that are not the defaults
    model.eval()
    x = torch.zeros(6, 1, 10, 10)
    x[:3, :, 1:5, 2:6] = torch.rand(3, 1, 4, 4)  # ink in one corner of half the records, the rest empty
    x[3:5, :, 6:9, 6:9] = torch.rand(2, 1, 3, 3)
    patch, stride = 3, 2
    full = torch.zeros_like(x)
    count = torch.zeros(1, 1, 10, 10)
    with torch.no_grad():
        log_p = torch.log_softmax(model(x), 1)
        for r in sorted(set(range(0, 8, stride)) | {7}):
            for c in sorted(set(range(0, 8, stride)) | {7}):
                xo = x.clone()
                xo[..., r : r + patch, c : c + patch] = 0
                kl = (log_p.exp() * (log_p - torch.log_softmax(model(xo), 1))).sum(1).clamp(min=0)
                full[..., r : r + patch, c : c + patch] += kl.view(-1, 1, 1, 1)
                count[..., r : r + patch, c : c + patch] += 1
    s = occlusion_saliency(model, x, patch=patch, stride=stride)
    torch.testing.assert_close(s, full / count, atol=1e-6, rtol=1e-5)
    assert float(s[3:5].max()) > 0 and float(s[5].abs().max()) == 0.0  # the blank record scores nothing


def test_occlusion_refuses_bad_windows():
    with pytest.raises(ValueError, match="patch"):
        occlusion_saliency(_LeftReader(), torch.rand(2, 1, 8, 8), patch=9, stride=1)


def test_keep_maps_take_the_top_share_of_each_record():
    s = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    k = keep_maps(s, 0.25)
    assert k.shape == s.shape and set(k.unique().tolist()) == {0.0, 1.0}
    assert k.flatten(1).sum(1).tolist() == [4.0, 4.0]
    assert bool((k[:, :, 3] == 1).all())  # the largest scores are the last row
    assert keep_maps(torch.zeros(1, 1, 4, 4), 0.5).sum() == 0  # nothing the answer depends on: nothing kept
    faint = torch.tensor([[[[1.0, 0.5, 1e-3, 1e-4]]]])
    assert keep_maps(faint, 1.0).tolist() == [[[[1.0, 1.0, 0.0, 0.0]]]]  # under 1% of the record's top: not kept


def _toy_task(name: str, paint, seed: int = 0) -> Task:
    """16x16 records of 4 primary and 4 secret classes, independent; ``paint(canvas, y, z)`` draws each."""
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        y = torch.randint(0, 4, (n,), generator=gen)
        z = torch.randint(0, 4, (n,), generator=gen)
        x = torch.zeros(n, 1, 16, 16)
        for i in range(n):
            paint(x[i, 0], int(y[i]), int(z[i]))
        return Split(x, y, z)

    return Task(name, split(512), split(128), split(256), num_primary=4, num_secondary=4)


def _bars_and_secret(seed: int = 0) -> Task:
    """Left half of a 16x16 record: a bar whose row says y. Right half: a bar whose row is the secret z."""

    def paint(canvas, y, z):
        canvas[4 * y : 4 * y + 4, 1:7] = 1.0
        canvas[4 * z : 4 * z + 4, 9:15] = 1.0

    return _toy_task("bars", paint, seed)


def test_learns_from_y_alone_to_keep_the_task_and_close_the_secret():
    torch.manual_seed(0)
    task = _bars_and_secret()
    d = create_defense("select-salient", input_shape=(1, 16, 16), num_classes=4, keep=0.3, reference_epochs=8, patch=4, stride=2, selector_epochs=30)
    assert not d.uses_mask and not d.uses_secret and d.uses == "y"
    model = create_model("cnn", (1, 16, 16), 4)
    fit(d, model, task, TrainConfig(task="bars", defense="select-salient", epochs=3, batch_size=32, lr=2e-3), log=lambda s: None)
    d.eval()
    x = task.test.x
    with torch.no_grad():
        kept = d.kept(x)
        m = d.encode(x)
        acc = float((model(m).argmax(1) == task.test.y).float().mean())
    task_ink, secret_ink = x[:, :, :, :8] > 0.5, x[:, :, :, 8:] > 0.5
    assert float(kept[:, :, :, :8][task_ink].mean()) > 0.8, "the task's bar was closed"
    assert float(kept[:, :, :, 8:][secret_ink].mean()) < 0.1, "the secret's bar was kept"
    assert acc > 0.9  # the server still reads y from what is kept


def test_selector_is_fixed_after_setup():
    """The task's gradient never reaches the selector: the joint stage leaves it as setup trained it."""
    torch.manual_seed(0)
    task = _bars_and_secret()
    d = create_defense("select-salient", input_shape=(1, 16, 16), num_classes=4, reference_epochs=1, selector_epochs=1)
    after_setup: list[torch.Tensor] = []
    setup = d.setup

    def recording_setup(model, loader):
        setup(model, loader)
        after_setup.extend(p.detach().clone() for p in d.selector.parameters())

    d.setup = recording_setup
    model = create_model("cnn", (1, 16, 16), 4)
    fit(d, model, task, TrainConfig(task="bars", defense="select-salient", epochs=2, batch_size=64), log=lambda s: None)
    assert after_setup and all(torch.equal(a, b) for a, b in zip(after_setup, d.selector.parameters()))
    assert not d.train().encode(task.train.x[:8]).requires_grad


@pytest.mark.parametrize("bad", [{"keep": 0.0}, {"keep": 1.5}, {"keep": float("nan")}, {"fill": "paint"}, {"keep_box": 99},
                                 {"saliency_from": ""}, {"reference_epochs": 0}, {"patch": -1}, {"lr_scale": 0}])
def test_refuses_bad_options(bad):
    with pytest.raises(ValueError):
        create_defense("select-salient", input_shape=(1, 16, 16), num_classes=4, **bad)


def test_saliency_from_must_be_a_finished_none_run(tmp_path):
    d = create_defense("select-salient", input_shape=(1, 16, 16), num_classes=4, saliency_from=str(tmp_path))
    with pytest.raises(ValueError, match="saliency_from"):
        d.setup(create_model("cnn", (1, 16, 16), 4), [(torch.rand(4, 1, 16, 16), torch.zeros(4, dtype=torch.long))])


def _bar_with_secret_beside(seed: int = 0) -> Task:
    """A bar in rows 4y..4y+3, columns 1..8, says y; right beside it, in the same band (columns 10..13), one
    lit row 4y+z says the secret z. The task's saliency reaches the secret (it sits in the band that says
    y), so selection from y alone keeps much of it."""

    def paint(canvas, y, z):
        canvas[4 * y : 4 * y + 4, 1:9] = 1.0
        canvas[4 * y + z, 10:14] = 1.0

    return _toy_task("bar-secret", paint, seed)


def _secret_ink_kept(name: str, **options) -> tuple[float, float]:
    torch.manual_seed(0)
    task = _bar_with_secret_beside()
    d = create_defense(name, input_shape=(1, 16, 16), num_classes=4, keep=0.25, reference_epochs=8, patch=4, stride=2, selector_epochs=30, **options)
    model = create_model("cnn", (1, 16, 16), 4)
    fit(d, model, task, TrainConfig(task="bar-secret", defense=name, epochs=3, batch_size=32, lr=2e-3), log=lambda s: None)
    d.eval()
    x = task.test.x
    with torch.no_grad():
        kept = d.kept(x)
        acc = float((model(d.encode(x)).argmax(1) == task.test.y).float().mean())
    return float(kept[:, :, :, 10:14][x[:, :, :, 10:14] > 0.5].mean()), acc


def test_known_secrets_close_what_selection_from_y_keeps():
    """With z known for 10% of the training records, select-salient-z closes the secret's ink that
    select-salient (y alone) keeps, and the server still reads y."""
    plain, plain_acc = _secret_ink_kept("select-salient")
    known, known_acc = _secret_ink_kept("select-salient-z", secret_fraction=0.1, secret_classes=4, secret_epochs=60)
    assert plain > 0.5, f"the toy task should make y-only selection keep the secret (kept {plain:.2f})"
    assert known < 0.2 and known < plain / 3, f"known secrets did not close the secret: {known:.2f} kept vs {plain:.2f}"
    assert known_acc > 0.9 and plain_acc > 0.9


def test_without_task_selection_only_what_the_secret_model_reads_is_closed(monkeypatch):
    """task_selection=False: the keep map starts from the whole record (no reference is built) and loses only
    the pixels the known-secret model reads: the secret's ink closes, the rest mostly stays as it is."""
    torch.manual_seed(0)
    task = _bar_with_secret_beside()
    d = create_defense("select-salient-z", input_shape=(1, 16, 16), num_classes=4, patch=4, stride=2, selector_epochs=30,
                       secret_fraction=0.1, secret_classes=4, secret_epochs=60, task_selection=False, fill="inpaint")
    monkeypatch.setattr(d, "reference", lambda *a: pytest.fail("task_selection=False must not build a reference"))
    batches = [tuple(b) for b in known_secrets(task.train, 0.1, 0).loader(32, shuffle=True, seed=1, with_secondary=True)]
    maps = torch.cat(d.keep_maps(create_model("cnn", (1, 16, 16), 4), batches))
    x = torch.cat([b[0] for b in batches])
    bar = torch.zeros_like(x, dtype=torch.bool)
    bar[:, :, :, 1:9] = x[:, :, :, 1:9] > 0.5
    secret = torch.zeros_like(x, dtype=torch.bool)
    secret[:, :, :, 10:14] = x[:, :, :, 10:14] > 0.5
    # the secret sits in the bar's band (its row says z relative to the bar), so the secret model reads part of
    # the bar too; the background, which a keep map from y would close, stays open
    assert float(maps[secret].mean()) < 0.15, "the secret's ink must close"
    assert float(maps[bar].mean()) > 5 * float(maps[secret].mean()), "the content must stay far more open than the secret"
    assert float(maps[x < 0.5].mean()) > 0.8, "what nobody reads must stay as it is"
    with pytest.raises(ValueError, match="task_selection"):
        create_defense("select-salient-z", input_shape=(1, 16, 16), num_classes=4, task_selection="no")


def test_known_secret_defense_declares_and_validates_its_secrets():
    d = create_defense("select-salient-z", input_shape=(1, 16, 16), num_classes=4, secret_classes=4, reference_epochs=1)
    assert d.uses == "y,z" and d.uses_secret and not d.uses_mask and d.secret_fraction == 0.1
    x = torch.rand(3, 1, 16, 16)
    assert d.encode(x, secret=torch.tensor([0, -1, 3])).shape == x.shape
    with pytest.raises(ValueError, match="secret labels"):
        d.encode(x, secret=torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="too few"):  # no record's secret is known
        d.setup(create_model("cnn", (1, 16, 16), 4), [(x, torch.zeros(3, dtype=torch.long), torch.full((3,), -1))])
    for bad in ({"secret_fraction": 0.0}, {"secret_close": 1.5}, {"secret_epochs": 0}, {"secret_classes": 1}):
        with pytest.raises(ValueError):
            create_defense("select-salient-z", input_shape=(1, 16, 16), num_classes=4, **bad)
