"""Data-parallel training across processes: ``veil train`` under ``torchrun --nproc-per-node N``.

Every process (rank) builds the same defense and model from the config's seed and walks the same
shuffled order of the training split (the loader's seed); of each batch of ``batch_size`` records, rank r
trains on its contiguous share (:class:`ShardedSplit`). Before every optimizer step the gradients are
all-reduced over ``torch.distributed`` (the gloo backend), each rank's weighted by its share of the batch,
so every rank takes the step one process takes on the whole batch: the task loss and the defense's
penalty are per-record means. That is the all-reduce PyTorch's ``DistributedDataParallel`` performs; it
is done here once per step on one flat buffer by an optimizer pre-step hook, because ``fit`` calls the
defense's ``encode`` and the model apart (``DistributedDataParallel`` wraps one module's ``forward``) and
because a defense's per-class kernels may go unused on one rank's share and not on another's (a flat
buffer with zeros for missing gradients needs no ``find_unused_parameters``). Buffers (batch-norm
statistics, what a defense's ``setup`` calibrated) are broadcast from rank 0 before every step, as DDP does
before every forward. Validation accuracy and the epoch's loss are computed on shards and summed.

What differs from one process: the defense's training noise. Each rank draws its own (rank 0 continues
the seeded stream, rank r > 0 is reseeded from (seed, rank, stage, epoch) at every epoch start, so that a
resumed run repeats the uninterrupted one), so two processes see other noise than one process does: equal
results up to that noise, and up to float summation order for a noise-free defense. A final batch with
fewer records than ranks is dropped.

Devices (:func:`backend_for`): with ``--device cpu`` every rank trains on the CPU and the collectives
go over gloo; with ``--device cuda`` rank r trains on ``cuda:LOCAL_RANK`` (one GPU per process, so
``--nproc-per-node`` at most the GPUs of a machine) and they go over nccl, which reduces tensors where
they are, on the GPUs: the flat gradient buffer, the broadcast buffers and the sums all live on the
rank's device. The device is a runtime choice, not part of the config: a job may resume on other devices.

Files: only rank 0 writes (``config.json``, the checkpoint after every epoch, the results); resuming,
every rank reads the checkpoint, so on several machines ``--out`` must be a folder they all see.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from veil.data.tasks import Split
from veil.defenses.saving import save_obfuscator
from veil.io import save_weights, write_json
from veil.training.loop import DEFAULT_DEVICE, TrainConfig, fit, resolve_device
from veil.training.run import CHECKPOINT, build, check_output_folder, client_cost, evaluate_primary, load_checkpoint, open_run_folder, save_checkpoint


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device: torch.device) -> str:
    """The ``torch.distributed`` backend for ranks training on ``device``: ``nccl`` on CUDA (it all-reduces
    GPU tensors in place; gloo would stage them through the CPU), ``gloo`` on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` (made the current CUDA device) for a CUDA run, else ``device``."""
    if device.type != "cuda":
        return device
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= count:
        raise ValueError(f"process {local} of this machine has no GPU of its own ({count} CUDA device(s)): start at most {count} processes per machine with --device cuda")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


@dataclasses.dataclass
class Shares:
    """The records of the current batch on this rank and in all (read by the gradient hook)."""

    mine: int = 0
    total: int = 0
    seen: int = 0  # records this rank trained on in the current epoch


@dataclasses.dataclass
class ShardedSplit(Split):
    """A training split whose loader yields rank ``rank``'s contiguous share of every batch."""

    rank: int = 0
    world: int = 1
    shares: Shares = dataclasses.field(default_factory=Shares)

    def loader(self, batch_size: int, *, shuffle: bool, seed: int = 0, with_secondary: bool = False, with_mask: bool = False) -> "_ShardLoader":
        """The same batches as :meth:`Split.loader` with ``batch_size`` and ``seed``, cut to this rank's share."""
        return _ShardLoader(super().loader(batch_size, shuffle=shuffle, seed=seed, with_secondary=with_secondary, with_mask=with_mask), self)


class _ShardLoader:
    def __init__(self, batches: Any, split: ShardedSplit) -> None:
        self.batches, self.split = batches, split
        last = len(split) % batches.batch_size if batches.batch_size else 0
        self.count = len(batches) - (1 if 0 < last < split.world else 0)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        shares = self.split.shares
        shares.seen = 0
        for i, batch in enumerate(self.batches):
            if i == self.count:
                break
            n = len(batch[0])
            parts = [torch.tensor_split(t, self.split.world)[self.split.rank] for t in batch]
            shares.mine, shares.total = len(parts[0]), n
            shares.seen += shares.mine
            yield parts


def _shard(split: Split, rank: int, world: int) -> Split:
    """Rank ``rank``'s contiguous part of ``split`` (validation)."""
    return split.subset(torch.tensor_split(torch.arange(len(split)), world)[rank])


@contextlib.contextmanager
def synchronized_steps(modules: list[nn.Module], shares: Shares) -> Iterator[None]:
    """While inside, every optimizer step first averages the gradients over all ranks (weighted by
    ``shares``) and takes every buffer of ``modules`` from rank 0."""

    def before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # a step outside the sharded batches (none in veil's loop today) is a plain average over ranks
        weight, total = (float(shares.mine), float(shares.total)) if shares.total else (1.0, float(dist.get_world_size()))
        # on the parameters' device: nccl reduces GPU tensors, gloo CPU ones
        flat = torch.cat([(p.grad.detach().reshape(-1) * weight if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)) for p in params])
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=flat.dtype, device=flat.device)
        flat = torch.cat([flat, has_grad])
        dist.all_reduce(flat)
        grads, anyone = flat[: -len(params)] / total, (flat[-len(params) :] > 0).tolist()  # one read, not one per parameter
        offset = 0
        for i, p in enumerate(params):
            if anyone[i]:  # a parameter no rank has a gradient for stays without one, as in one process
                p.grad = grads[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        for module in modules:
            for b in module.buffers():
                dist.broadcast(b, src=0)

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        yield
    finally:
        handle.remove()


def _reseed(config: TrainConfig, rank: int, stage: int, epoch: int) -> None:
    """Rank r > 0's noise stream for the epoch starting at (stage, epoch); rank 0 keeps its seeded one."""
    if rank > 0:
        torch.manual_seed((config.seed * 1_000_003 + rank * 10_007 + stage * 101 + epoch) % 2**63)


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def train_run_distributed(
    config: TrainConfig,
    out: str | Path,
    *,
    log: Callable[[str], None] | None = None,
    device: str | torch.device = DEFAULT_DEVICE,
) -> dict[str, Any] | None:
    """:func:`veil.training.run.train_run` on every rank of a ``torchrun`` job; rank 0 writes the run
    folder and returns the metrics, the other ranks return None. ``device``: cpu (gloo) or cuda (nccl,
    each rank on ``cuda:LOCAL_RANK``); see :func:`backend_for`."""
    device = rank_device(resolve_device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), timeout=timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    say = (log or (lambda s: print(s, file=sys.stderr, flush=True))) if rank == 0 else (lambda s: None)
    out = Path(out)
    try:
        if rank == 0:
            check_output_folder(out)
        task, defense, model = build(config)
        finished = open_run_folder(out, config, "metrics.json", log=say) if rank == 0 else None
        flag = torch.tensor([finished is not None], dtype=torch.int64, device=device)
        dist.broadcast(flag, src=0)  # also the barrier: config.json is written before anyone reads the folder
        if flag.item():
            return finished

        ckpt = out / CHECKPOINT
        start, opt_state, history = (0, 0), None, []
        if ckpt.exists():
            start, opt_state, history = load_checkpoint(ckpt, defense, model, config, device=device)
            say(f"{out}: resuming at stage {start[0] + 1}, epoch {start[1] + 1} ({world} processes)")
        _reseed(config, rank, *start)
        shares, whole, t0 = Shares(), task, time.time()
        t = task.train
        task = dataclasses.replace(task, train=ShardedSplit(t.x, t.y, t.z, t.mask, rank=rank, world=world, shares=shares), val=_shard(task.val, rank, world))

        def epoch_end(si: int, next_epoch: int, opt: torch.optim.Optimizer, rec: dict) -> None:
            n_val = len(task.val)
            loss, correct, seen, val_correct, val_n = _all_sum([rec["loss"] * shares.seen, rec["train_acc"] * shares.seen, shares.seen, rec.get("val_acc", 0.0) * n_val, n_val], device)
            rec.update(loss=loss / seen, train_acc=correct / seen, val_acc=val_correct / max(1.0, val_n))
            history.append(rec)
            if rank == 0:
                save_checkpoint(ckpt, defense, model, opt, {"stage": si, "epoch": next_epoch, "history": history})
            _reseed(config, rank, si, next_epoch)

        with synchronized_steps([defense, model], shares):
            fit(defense, model, task, config, start=start, optimizer_state=opt_state, on_epoch_end=epoch_end, log=say, device=device)
        metrics = None
        if rank == 0:
            metrics = evaluate_primary(defense, model, whole, device=device)
            metrics.update(client_cost(defense, model))
            metrics.update({"defense": defense.name, "knob": defense.knob, "knob_value": defense.knob_value(), "processes": world, "device": device.type, "train_seconds": round(time.time() - t0, 2), "history": history})
            save_obfuscator(out / "obfuscator.safetensors", defense)
            save_weights(out / "model.safetensors", model.state_dict())
            write_json(out / "metrics.json", metrics)
            ckpt.unlink(missing_ok=True)
        dist.barrier()
        return metrics
    finally:
        dist.destroy_process_group()


__all__ = ["ShardedSplit", "backend_for", "launched", "rank_device", "synchronized_steps", "train_run_distributed"]
