"""Old against new attacker settings on the same trained runs (issue #9 part 3), small enough for a CPU.

For each defense: train it with the server cnn on mnist-lt5 (``--train-size`` records, ``--epochs``), then
attack the same obfuscator twice with the same effort (epochs, patience, views):

* ``old``: the headline's former attackers: width 8, linear/MLP/CNN, 2000 records taken from the defense's
  *own* training records (a task without ``held_out``), the inference exposure.
* ``new``: width 32 with the server model itself among the attackers, as many records as the defense had,
  all disjoint from its training records (``task.held_out``), y beside the message at the training
  exposures, and the train-mode messages (``training-time``) where they differ.

The deeper CNN+BN is left out of both here to keep the CPU time at minutes (it is in the defaults).

    nice .venv/bin/python benchmarks/attacker_strength.py --out benchmarks/results/attacker_strength
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from veil.data import load_task
from veil.evaluation.attack import AttackConfig, attribute_attack
from veil.io import write_json
from veil.training import TrainConfig
from veil.training.run import build, evaluate_primary
from veil.training.loop import fit


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="mnist-lt5")
    p.add_argument("--defenses", default="gaussian=1,scnl=1", help="DEFENSE=KNOB pairs, comma-separated")
    p.add_argument("--train-size", type=int, default=8000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--attack-epochs", type=int, default=8)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/attacker_strength"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    task = load_task(args.task, seed=0, train_size=args.train_size)
    rng = np.random.default_rng(1)
    task.val = task.val.subset(np.sort(rng.permutation(len(task.val))[:2000]))
    task.test = task.test.subset(np.sort(rng.permutation(len(task.test))[: args.test_size]))
    effort = dict(epochs=args.attack_epochs, patience=3, batch_size=64, val_size=1000, views=2, averaging_k=0)
    old = AttackConfig(attackers=("linear", "mlp", "cnn"), width=8, train_size=2000, exposures=("inference",), **effort)
    new = AttackConfig(attackers=("linear", "mlp", "server"), width=32, train_size=None, **effort)
    results = []
    for item in args.defenses.split(","):
        name, knob = item.split("=")
        config = TrainConfig(task=args.task, defense=name, knob=float(knob), epochs=args.epochs, batch_size=64, train_size=args.train_size)
        t0 = time.time()
        _, defense, model = build(config, task)
        fit(defense, model, task, config, log=log)
        defense.eval()
        primary = evaluate_primary(defense, model, task)
        log(f"== {name} {knob}: primary {primary} ({time.time() - t0:.0f}s)")
        own = dataclasses.replace(task, held_out=None)  # the old behaviour: attack records from the defense's own
        row = {"defense": name, "knob": float(knob), **primary, "primary_only_floor": task.primary_only_floor()}
        for label, cfg, t in (("old", old, own), ("new", new, task)):
            t1 = time.time()
            r = attribute_attack(defense, t, cfg, server_model="cnn", log=log)
            for exposure in ("inference", "training", "training-time"):
                if exposure in r:
                    e = r[exposure]
                    row[f"{label}_{exposure}"] = e["attack_acc"]
                    row[f"{label}_{exposure}_per_attacker"] = {a: v["test_acc"] for a, v in e["attackers"].items()}
                    row[f"{label}_{exposure}_same_as"] = e.get("same_as")
            row[f"{label}_records"] = r["inference"]["records"]
            row[f"{label}_seconds"] = round(time.time() - t1, 1)
            log(f"   {label}: {json.dumps({k: v for k, v in row.items() if k.startswith(label) and not k.endswith('per_attacker')})}")
        results.append(row)
        write_json(args.out / "attacker_strength.json", {"settings": {"old": old.to_dict(), "new": new.to_dict(), **vars(args), "out": str(args.out)}, "rows": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
