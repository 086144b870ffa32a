"""What hiding the sensitive region costs the task at best: the undefended server on records whose true region is blanked.

A region defense (``scnl-region``) closes the pixels its selector picks. However good the selector, the
task loses whatever the server could have read under the region (a garment's sleeve under the tag). This
trains the undefended server (``none``, through veil's one loop, the frontier's sizes) on the task's records
as they are (``clean``), with the true region set to zero (``zero``) and filled with Gaussian noise of scale
0.5 (``noise``, the sensitive region's initial noise), in training and test alike, and reports the primary
accuracy of each: the ceiling for any defense that hides the whole region. Writes OUT/bound.json.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/region_bound.py --cpu   # 3000 x 4 (the frontier's --cpu preset)
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/region_bound.py        # 8000 x 4 (its FULL preset)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import headline  # noqa: E402  (the frontier's data subsets)

from veil.data.tasks import Split, Task  # noqa: E402
from veil.io import write_json  # noqa: E402
from veil.training import TrainConfig, train_run  # noqa: E402

FILLS = ("clean", "zero", "noise")
NOISE_SCALE = 0.5


def fill(split: Split, how: str, generator: torch.Generator) -> Split:
    """``split`` with its sensitive region (``mask`` == 1) kept (``clean``), zeroed or filled with noise."""
    if how not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {how!r}")
    if split.mask is None:
        raise ValueError("this task has no region masks (use a task such as fashion-tag or digits-tag)")
    if how == "clean":
        return split
    m = split.mask.to(split.x.dtype)
    other = torch.zeros_like(split.x) if how == "zero" else torch.randn(split.x.shape, generator=generator) * NOISE_SCALE
    return dataclasses.replace(split, x=split.x * (1 - m) + other * m)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="fashion-tag", help="a task with region masks (default fashion-tag)")
    p.add_argument("--cpu", action="store_true", help="the frontier's --cpu sizes (3000 x 4; 1000 validation, 2000 test records)")
    p.add_argument("--train-size", type=int, default=None, help="training records (default 8000, 3000 with --cpu)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--model", default="resnet", help="server model (default resnet, the frontier's)")
    p.add_argument("--fills", default=",".join(FILLS), help=f"comma-separated, from {','.join(FILLS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/region_bound")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    fills = [f.strip() for f in args.fills.split(",") if f.strip()]
    for f in fills:
        if f not in FILLS:
            p.error(f"--fills: {f!r} is not one of {', '.join(FILLS)}")
    sizes = {"train_size": args.train_size or (3000 if args.cpu else 8000), "val_size": 1000 if args.cpu else 2000, "test_size": 2000 if args.cpu else 5000}
    task: Task = headline.load_smaller(args.task, sizes, args.seed)
    out = Path(args.out)
    results = {"task": args.task, "model": args.model, "epochs": args.epochs, **sizes, "noise_scale": NOISE_SCALE, "primary_acc": {}, "seconds": {}}
    for how in fills:
        g = torch.Generator().manual_seed(args.seed + 1)
        filled = dataclasses.replace(task, train=fill(task.train, how, g), val=fill(task.val, how, g), test=fill(task.test, how, g))
        config = TrainConfig(task=args.task, defense="none", model=args.model, epochs=args.epochs, batch_size=64, seed=args.seed,
                             train_size=sizes["train_size"], lr_schedule="cosine")
        t0 = time.time()
        metrics = train_run(config, out / "runs" / how, log=lambda s: None, task=filled)
        results["primary_acc"][how] = metrics["primary_acc"]
        results["seconds"][how] = round(time.time() - t0, 1)
        print(f"{how}: primary {metrics['primary_acc']:.4f} ({results['seconds'][how]:.0f}s)", flush=True)
        write_json(out / "bound.json", results)  # after every fill: an interrupted run keeps what it finished
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
