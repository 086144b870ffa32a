"""Training off the CPU, checked without a GPU: ``veil train --device``, the device-generic forward paths,
the collectives' buffers and device-independent checkpoints.

No GPU is at hand here, so the CUDA path is checked on PyTorch's ``meta`` device: every defense and
server model is moved there and fed meta records, and an op that meets a tensor made on the CPU inside
``encode``/``decode``/``penalty``/``forward`` fails as it would on CUDA ("Tensor on device cpu is not on
the expected device meta!"). Meta tensors carry shapes but no values, so the few reads of a value that
the paths make (input validation such as ``torch.isfinite(x).all()``, ``int(windows[1])``, statistics
such as ``float(kl.mean())``) and ops whose output size depends on values (``nonzero``) get a stand-in
(:class:`MetaValues`); on CUDA those are ordinary, if synchronising, reads. Every other op runs with its
device checks as they are.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

from veil.cli import app
from veil.defenses import Defense, create_defense, list_defenses
from veil.defenses.sample_and_hold import sample_and_hold
from veil.io import load_weights
from veil.models import create_model
from veil.training import TrainConfig, train_run
from veil.training.distributed import backend_for, rank_device, synchronized_steps
from veil.training.loop import make_optimizer, resolve_device, train_step, training_recipe
from veil.training.run import build, load_checkpoint

SHAPE = (1, 8, 8)
C = 2
B = 4  # even: MetaValues' nonzero finds half of a batch, so a batch split in two complementary parts adds up
META = torch.device("meta")
MODELS = ("cnn", "resnet", "mlp")
#: Defenses whose ``setup`` cannot run on meta tensors, and why (their stages still run).
SETUP_NEEDS_VALUES = {
    "sample-and-hold": "setup's calibration is a control loop on measured accuracies (it raises the windows "
    "until the server's accuracy falls by 2**gamma): it needs the values meta tensors do not hold",
}


class MetaValues(TorchDispatchMode):
    """Stand-ins for the value reads of meta tensors (which hold none): a flag reads True, a number 1,
    ``torch.equal`` True, and ``nonzero`` finds half the elements. Each first checks that every tensor
    it is given is on the meta device, so the stand-ins never hide a CPU tensor."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if any(t.is_meta for t in tensors):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default, torch.ops.aten.nonzero.default):
                strays = [t.device for t in tensors if not t.is_meta]
                assert not strays, f"{func}: a tensor on {strays[0]} met a meta tensor"
            if func is torch.ops.aten._local_scalar_dense.default:
                return True if args[0].dtype == torch.bool else 1
            if func is torch.ops.aten.equal.default:
                return True
            if func is torch.ops.aten.nonzero.default:
                return torch.empty(args[0].numel() // 2, args[0].dim(), dtype=torch.int64, device=META)
        return func(*args, **kwargs)


def _on_meta(name: str, model_name: str) -> tuple[Defense, torch.nn.Module]:
    torch.manual_seed(0)
    defense = create_defense(name, input_shape=SHAPE, num_classes=C)
    model = create_model(model_name, defense.output_shape(), C)
    return defense.to(META), model.to(META)


def _batch(defense: Defense) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x = torch.empty(B, *SHAPE, device=META)
    y = torch.empty(B, dtype=torch.int64, device=META)
    mask = torch.empty(B, 1, *SHAPE[1:], device=META) if defense.uses_mask else None
    return x, y, mask


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("name", list_defenses())
def test_every_stage_and_the_inference_path_stay_on_the_device(name, model_name):
    """encode -> decode -> model -> loss + penalty -> backward -> optimizer step in every stage, then
    both points of exposure in eval mode, all on meta: no op meets a tensor made on the CPU."""
    defense, model = _on_meta(name, model_name)
    x, y, mask = _batch(defense)
    with MetaValues():
        for stage in defense.stages():
            defense.set_stage(stage.name)
            defense.train()
            model.train()
            if name not in SETUP_NEEDS_VALUES:
                z = (torch.empty(B, dtype=torch.int64, device=META),) if defense.uses_secret else ()  # known secrets, -1 elsewhere
                defense.setup(model, [(x, y, *z) if mask is None else (x, y, *z, mask)])  # batches as training hands them
            loss, logits = train_step(defense, model, x, y, stage, mask)
            assert loss.is_meta and logits.shape == (B, C)
            params = [p for p in defense.parameters() if p.requires_grad] + (list(model.parameters()) if stage.train_model else [])
            opt = make_optimizer(params, training_recipe(defense, TrainConfig()))
            opt.zero_grad()
            loss.backward()
            assert all(p.grad is None or p.grad.is_meta for p in params)
            opt.step()
        defense.eval()
        model.eval()
        with torch.no_grad():
            for labels, m in ((None, None), (y, mask)):  # inference, then the training exposure
                out = model(defense.decode(defense.encode_batch(x, labels, defense.mask_for(labels is not None, mask))))
                assert out.is_meta and out.shape == (B, C)
            assert defense.penalty().is_meta


def test_sample_and_hold_windows_stay_on_the_device():
    """The defense's path above reads its windows as 1 on meta (no sanitising); Algorithm 1 itself here."""
    with MetaValues():
        held = sample_and_hold(torch.empty(B, 4, 4, 4, device=META), 3)
    assert held.is_meta and held.shape == (B, 4, 4, 4)


def test_the_meta_check_catches_a_tensor_made_on_the_cpu():
    """The oracle of this file: a defense that makes its noise on the CPU fails on meta."""

    class CPUNoise(Defense):
        name = "cpu-noise"

        def encode(self, x, y=None):
            return x + torch.randn(x.shape)

    d = CPUNoise(input_shape=SHAPE, num_classes=C)
    with MetaValues(), pytest.raises(RuntimeError, match="device"):
        d.encode(torch.empty(B, *SHAPE, device=META))


# ------------------------------------------------------------------------------------ across processes
def test_backend_follows_the_device():
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda")) == "nccl"
    assert backend_for(torch.device("cuda", 1)) == "nccl"
    assert rank_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_cuda_rank_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="no GPU of its own"):
        rank_device(torch.device("cuda"))


def test_gradients_are_reduced_on_the_parameters_device(monkeypatch):
    """The flat buffer the optimizer hook all-reduces (zeros standing in for a missing gradient included)
    is made on the parameters' device: nccl reduces GPU tensors only."""
    import torch.distributed as dist

    from veil.training.distributed import Shares

    seen: list[torch.device] = []

    class Reduced(Exception):
        pass

    def all_reduce(t):
        seen.append(t.device)
        raise Reduced  # meta values cannot be read back; the device is what is checked

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    used, unused = torch.nn.Parameter(torch.empty(3, device=META)), torch.nn.Parameter(torch.empty(2, device=META))
    opt = torch.optim.SGD([used, unused], lr=0.1)
    used.grad = torch.empty(3, device=META)
    with synchronized_steps([], Shares(mine=1, total=2)), pytest.raises(Reduced):
        opt.step()
    assert seen == [META]


# ------------------------------------------------------------------------------------ the command line
runner = CliRunner()
QUICK = ["--task", "digits-lt5", "--defense", "gaussian", "--epochs", "1", "--train-size", "200", "--batch-size", "64"]


def test_train_on_the_cpu_records_the_device(tmp_path):
    r = runner.invoke(app, ["train", *QUICK, "--device", "cpu", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["device"] == "cpu"
    assert "device" not in json.loads((tmp_path / "run" / "config.json").read_text())  # not part of the config


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line_and_writes_nothing(tmp_path):
    r = runner.invoke(app, ["train", *QUICK, "--device", "cuda", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    assert "CUDA" in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="CUDA"):
        resolve_device("cuda")


def test_auto_and_bad_device_names(tmp_path):
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    r = runner.invoke(app, ["train", *QUICK, "--device", "gpu", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "--device must be one of cpu, cuda, auto" in r.output


# ------------------------------------------------------------------------------------ checkpoints
CFG = TrainConfig(task="digits-lt5", defense="scnl", epochs=2, batch_size=64, train_size=200)


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")  # meta holds no values to copy into
def test_a_checkpoint_is_device_independent_and_resumes(tmp_path):
    """Written from CPU copies, read onto the CPU and copied into the modules wherever they are (here:
    meta, as a CUDA run would hold them); a run interrupted under one device string resumes under it."""
    full = train_run(CFG, tmp_path / "full", log=lambda s: None, device="cpu")

    def interrupt(line: str) -> None:
        if "epoch 2/" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(CFG, tmp_path / "cut", log=interrupt, device="cpu")
    ckpt = tmp_path / "cut" / "checkpoint.safetensors"
    assert all(t.device.type == "cpu" for t in load_weights(ckpt).values())

    state = torch.get_rng_state()
    _, defense, model = build(CFG)
    defense.to(META)
    model.to(META)
    start, _, _ = load_checkpoint(ckpt, defense, model, CFG, device=META)
    assert start == (0, 1) and all(t.is_meta for t in (*defense.state_dict().values(), *model.state_dict().values()))
    torch.set_rng_state(state)

    resumed = train_run(CFG, tmp_path / "cut", log=lambda s: None, device="cpu")
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert resumed["device"] == full["device"] == "cpu"
