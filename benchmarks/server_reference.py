"""How well does the undefended server model do? Trains ``none`` references through veil's one loop.

Issue #14 asked why the undefended ``cnn`` server reached only ~0.95 on mnist-lt5 while veil's own
CNN+BN attacker read the 10-class digit at 0.994. ``--model cnn-head4`` rebuilds the first version's
``cnn`` (its 7x7 map averaged down to 4x4 before the head) for the before/after comparison; ``cnn`` and
``resnet`` are the registered models. Appends one JSON line per run to OUT (test accuracy, epochs,
seconds, FLOPs).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/server_reference.py --task mnist-lt5 \\
        --models cnn-head4,cnn --train-size 20000 --epochs 3
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/server_reference.py --task mnist-lt5 \\
        --models cnn,resnet --epochs 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import nn

from veil.data import load_task
from veil.io import append_jsonl
from veil.defenses import create_defense
from veil.models import count_flops, create_model
from veil.noise import seed_everything
from veil.training.loop import TrainConfig, accuracy, fit


def cnn_head4(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> nn.Module:
    """The first version's ``cnn``: the last map average-pooled to 4x4 on inputs of 16 pixels or more."""
    c, h, w = input_shape
    pool = 2 if min(h, w) >= 16 else 1
    model = nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2) if pool == 2 else nn.Identity(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d((4, 4)) if min(h, w) >= 16 else nn.Identity(),
        nn.Flatten(), nn.LazyLinear(128), nn.ReLU(), nn.Linear(128, num_classes),
    )
    with torch.no_grad():
        model(torch.zeros(2, *input_shape))
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="mnist-lt5")
    p.add_argument("--models", default="cnn,resnet", help="comma-separated: cnn, resnet, mlp, cnn-head4")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/server_reference/runs.jsonl")
    args = p.parse_args(argv)

    task = load_task(args.task, seed=args.seed, train_size=args.train_size)
    for name in args.models.split(","):
        config = TrainConfig(
            task=args.task, defense="none", model=name if name != "cnn-head4" else "cnn", epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, seed=args.seed, train_size=args.train_size, lr_schedule=args.lr_schedule,
        )
        seed_everything(args.seed)
        defense = create_defense("none", input_shape=task.input_shape, num_classes=task.num_primary)
        model = cnn_head4(task.input_shape, task.num_primary) if name == "cnn-head4" else create_model(name, task.input_shape, task.num_primary)
        t0 = time.time()
        history = fit(defense, model, task, config)
        rec = {
            "task": args.task, "model": name, "train_records": len(task.train), "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": args.lr, "lr_schedule": args.lr_schedule, "seed": args.seed,
            "test_acc": accuracy(defense, model, task.test), "val_acc_per_epoch": [h["val_acc"] for h in history],
            "seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads(),
            "flops_per_record": count_flops(model, task.input_shape),
        }
        print(json.dumps(rec), flush=True)
        append_jsonl(args.out, rec)  # one line per run, written atomically
    return 0


if __name__ == "__main__":
    sys.exit(main())
