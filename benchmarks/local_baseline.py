"""The on-device baseline ``local`` on a real task: train it, then retrain attackers on its messages.

Trains ``local`` (the client's small classifier sends the template of its decision) through the one loop
with the ``cnn`` server, reports the primary accuracy, the client's own decision accuracy, the client
FLOPs share and a retrained attack on the secondary label beside the primary-only floor. Appends one JSON
line to OUT.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/local_baseline.py --task mnist-lt5 --epochs 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from veil.data import load_task
from veil.io import append_jsonl
from veil.evaluation.attack import AttackConfig, attribute_attack
from veil.training.loop import TrainConfig
from veil.training.run import load_run, train_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="mnist-lt5")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"])
    p.add_argument("--runs", default="runs/local_baseline", help="parent folder of the run folder")
    p.add_argument("--out", default="benchmarks/results/server_reference/local.jsonl")
    args = p.parse_args(argv)

    task = load_task(args.task)
    t0 = time.time()
    run = Path(args.runs) / f"{args.task}-e{args.epochs}-{args.lr_schedule}"
    metrics = train_run(TrainConfig(task=args.task, defense="local", epochs=args.epochs, lr_schedule=args.lr_schedule), run, task=task)
    _, _, defense, _ = load_run(run, task=task)
    client_acc = float((defense.predict(task.test.x) == task.test.y).float().mean())
    seconds = time.time() - t0
    # deterministic messages: one view, no averaging attack
    config = AttackConfig(attackers=("linear", "mlp", "cnn"), epochs=8, patience=3, views=1, averaging_k=0, exposures=("inference",), train_size=10000, val_size=2000)
    attack = attribute_attack(defense, task, config)
    rec = {
        "task": args.task, "defense": "local", "epochs": args.epochs, "lr_schedule": args.lr_schedule, "train_records": len(task.train),
        "primary_acc": metrics["primary_acc"], "client_decision_acc": client_acc, "client_flops_share": metrics.get("client_flops_share"),
        "attack_acc": attack["inference"]["attack_acc"],
        "attackers": {k: v["test_acc"] for k, v in attack["inference"]["attackers"].items()},
        "primary_only_floor": attack["primary_only_floor"], "train_seconds": round(seconds, 1), "attack": config.to_dict(),
    }
    print(json.dumps(rec), flush=True)
    append_jsonl(args.out, rec)  # one line per run, written atomically
    return 0


if __name__ == "__main__":
    sys.exit(main())
