"""Cost of SCNL: hard selection flat in the number of classes C, and one training step against no SCNL.

1. Forward + backward time of hard selection (``layer(x, labels)``: gathered kernels, grouped conv /
   batched matmul) at C = 2, 10, 100, same batch. Target: C = 100 within 1.3x of C = 2.
2. One training step (encode + server CNN + loss + backward + Adam step) of each SCNL registry entry
   against the same server model without SCNL (defense ``none``). Target: within 1.5x.

A command, not a test (timings are never asserted in tests)::

    nice .venv/bin/python benchmarks/bench_scnl.py            # 28x28 records, batch 128, 1 thread

Writes ``benchmarks/results/scnl/bench_scnl.{json,png}`` (atomically). Median of ``--reps`` runs after
warm-up; on a shared machine, compare ratios measured in the same run, not absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.nn import functional as F

from veil.defenses import create_defense
from veil.io import atomic_path, write_json
from veil.layers import SCNLAdditive, SCNLConv2d, SCNLLinear
from veil.models import create_model
from veil.training.loop import train_step
from veil.defenses.base import Stage

OUT = Path(__file__).resolve().parent / "results" / "scnl"


def median_time(fn: Callable[[], None], reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_hard_selection(batch: int, size: int, reps: int) -> list[dict]:
    rows = []
    for kind in ("conv", "linear", "additive"):
        for c in (2, 10, 100):
            torch.manual_seed(0)
            if kind == "conv":
                layer, x = SCNLConv2d(1, 8, 3, c), torch.rand(batch, 1, size, size)
            elif kind == "linear":
                layer, x = SCNLLinear(size * size, 64, c), torch.rand(batch, size * size)
            else:
                layer, x = SCNLAdditive((1, size, size), c), torch.rand(batch, 1, size, size)
            y = torch.randint(0, c, (batch,))

            def step() -> None:
                layer.zero_grad(set_to_none=True)
                layer(x, y).square().mean().backward()

            t = median_time(step, reps)
            rows.append({"layer": kind, "classes": c, "batch": batch, "seconds": t})
            print(f"hard selection  {kind:8s} C={c:<4d} fwd+bwd {1e3 * t:8.2f} ms", file=sys.stderr, flush=True)
    for kind in ("conv", "linear", "additive"):
        base = next(r["seconds"] for r in rows if r["layer"] == kind and r["classes"] == 2)
        for r in rows:
            if r["layer"] == kind:
                r["ratio_to_C2"] = r["seconds"] / base
    return rows


def bench_training_step(batch: int, size: int, reps: int) -> list[dict]:
    shape = (1, size, size)
    x, y = torch.rand(batch, *shape), torch.randint(0, 2, (batch,))
    rows = []
    for name in ("none", "scnl", "scnl-adaptive", "scnl-joint"):
        torch.manual_seed(0)
        d = create_defense(name, input_shape=shape, num_classes=2)
        stage: Stage = d.stages()[0]
        d.set_stage(stage.name)
        d.train()
        model = create_model("cnn", d.output_shape(), 2)
        params = [p for p in list(d.parameters()) + list(model.parameters()) if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-3)

        def step() -> None:
            loss, _ = train_step(d, model, x, y, stage)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t = median_time(step, reps)
        rows.append({"defense": name, "stage": stage.name, "batch": batch, "seconds": t})
        print(f"training step   {name:14s} {1e3 * t:8.2f} ms", file=sys.stderr, flush=True)
    base = rows[0]["seconds"]
    for r in rows:
        r["ratio_to_none"] = r["seconds"] / base
    return rows


def plot(hard: list[dict], steps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for kind in ("conv", "linear", "additive"):
        rs = [r for r in hard if r["layer"] == kind]
        a.plot([r["classes"] for r in rs], [r["ratio_to_C2"] for r in rs], "o-", label=kind)
    a.axhline(1.3, ls="--", c="gray", label="target 1.3x")
    a.set_xscale("log")
    a.set_xlabel("classes C")
    a.set_ylabel("fwd+bwd time / time at C=2")
    a.set_title("hard selection is flat in C")
    a.legend(fontsize=8)
    b.bar([r["defense"] for r in steps], [r["ratio_to_none"] for r in steps])
    b.axhline(1.5, ls="--", c="gray", label="target 1.5x")
    b.set_ylabel("training step time / without SCNL")
    b.set_title("one training step (encode + server CNN)")
    b.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=28, help="records are (1, size, size)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    hard = bench_hard_selection(args.batch, args.size, args.reps)
    steps = bench_training_step(args.batch, args.size, args.reps)
    result = {"config": vars(args) | {"out": str(args.out)}, "torch": torch.__version__, "hard_selection": hard, "training_step": steps}
    write_json(args.out / "bench_scnl.json", result)
    plot(hard, steps, args.out / "bench_scnl.png")
    print("hard selection, fwd+bwd time relative to C=2 (target C=100 <= 1.3x):")
    for r in hard:
        print(f"  {r['layer']:8s} C={r['classes']:<4d} {1e3 * r['seconds']:8.2f} ms  x{r['ratio_to_C2']:.2f}")
    print("training step relative to no SCNL (target <= 1.5x):")
    for r in steps:
        print(f"  {r['defense']:14s} {1e3 * r['seconds']:8.2f} ms  x{r['ratio_to_none']:.2f}")
    print(f"wrote {args.out / 'bench_scnl.json'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
