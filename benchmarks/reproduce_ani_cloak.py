"""Reproduction check: ANI vs Cloak on mnist-lt5 (seed 002 §5.3, Fig. 4a), plus Shredder and no defense.

The paper reports, at 98% primary accuracy on MNIST (digit < 5), a secondary (digit) accuracy of 48%
for ANI and 97.8% for Cloak. This script trains each defense with the server model through the one
training path (``veil.training.train_run``, as ``veil train`` does), then runs veil's attribute attack
(``veil.evaluation.attack``): attackers trained on obfuscated training records to predict the digit z,
early-stopped on obfuscated validation records, scored on obfuscated test records; plus an averaging
attack (mean of k obfuscations of a record). Everything is reduced to stay affordable on 2 CPU cores
(train_size 10000, a few epochs, where the paper trains 50 epochs on 50000 records).

Run::

    nice .venv/bin/python benchmarks/reproduce_ani_cloak.py            # about 10-20 minutes on 2 cores

Writes ``benchmarks/results/peers/reproduce_ani_cloak.{json,csv}`` (run folders under ``runs/peers/``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from veil.data.tasks import load_task
from veil.evaluation.attack import AttackConfig, attribute_attack
from veil.io import write_csv, write_json
from veil.training import TrainConfig, train_run
from veil.training.run import load_run

PAPER = {"ani": {"primary": 0.98, "secondary": 0.48}, "cloak": {"primary": 0.98, "secondary": 0.978}}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@torch.no_grad()
def noise_stats(defense, x: torch.Tensor) -> dict:
    """Method-specific noise magnitudes on a batch of test records."""
    name = defense.name
    if name == "ani":
        w = defense.weights(x)
        return {"mean_w": float(w.mean()), "mean_1_minus_w": float((1 - w).mean())}
    if name == "cloak":
        s = defense.sigma()
        return {"mean_sigma": float(s.mean()), "suppressed_fraction": defense.suppressed_fraction()}
    if name == "shredder":
        return {"noise_to_signal": defense.noise_to_signal(x), "mean_abs_noise": float(defense.noise().abs().mean())}
    return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="mnist-lt5")
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--ani", type=float, nargs="*", default=[1e-5, 1e-4], help="ANI lambda values")
    ap.add_argument("--cloak", type=float, nargs="*", default=[0.01, 0.05], help="Cloak lambda values")
    ap.add_argument("--shredder", type=float, nargs="*", default=[1.0], help="Shredder lambda values")
    ap.add_argument("--no-baseline", action="store_true", help="skip the no-defense run")
    ap.add_argument("--attackers", nargs="*", default=["linear", "cnn"])
    ap.add_argument("--attack-epochs", type=int, default=6)
    ap.add_argument("--averaging-k", type=int, default=8)
    ap.add_argument("--val-size", type=int, default=5000, help="obfuscated val records for the attackers' early stopping")
    ap.add_argument("--runs", type=Path, default=Path("runs/peers"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/peers"))
    ap.add_argument("--name", default="reproduce_ani_cloak")
    args = ap.parse_args()
    torch.set_num_threads(1)

    plan = [] if args.no_baseline else [("none", None)]
    plan += [("ani", k) for k in args.ani] + [("cloak", k) for k in args.cloak] + [("shredder", k) for k in args.shredder]
    task = load_task(args.task, seed=0, train_size=args.train_size)
    attack_cfg = AttackConfig(
        attackers=tuple(args.attackers), epochs=args.attack_epochs, patience=3, views=2, val_size=args.val_size,
        averaging_k=args.averaging_k, exposures=("inference",), seed=0,
    )
    rows, full = [], []
    for name, knob in plan:
        t0 = time.time()
        config = TrainConfig(task=args.task, defense=name, knob=knob, epochs=args.epochs, train_size=args.train_size, seed=0)
        run = args.runs / f"{args.task}-{name}-{knob}-e{args.epochs}-n{args.train_size}"
        log(f"=== {name} knob={knob}: training into {run}")
        metrics = train_run(config, run, task=task, log=log)
        _, _, defense, _ = load_run(run, task=task)
        log(f"=== {name} knob={knob}: attribute attack")
        attack = attribute_attack(defense, task, attack_cfg, log=log)
        inf = attack["inference"]
        row = {
            "defense": name,
            "knob": defense.knob or None,
            "knob_value": knob,
            "primary_acc": metrics["primary_acc"],
            "attack_acc": inf["attack_acc"],
            "attack_best": inf["best"],
            "attack_acc_max_over_attackers": inf["attack_acc_max_over_attackers"],
            "averaging_attack_acc": (inf["averaging"] or {}).get("test_acc"),
            "averaging_k": args.averaging_k,
            "primary_only_floor": attack["primary_only_floor"],
            "majority_floor": attack["majority_floor"],
            "client_flops_share": metrics["client_flops_share"],
            "client_flops": metrics["client_flops"],
            "server_flops": metrics["server_flops"],
            "client_params": metrics["client_params"],
            **noise_stats(defense, task.test.x[:512]),
            "paper_primary": PAPER.get(name, {}).get("primary"),
            "paper_secondary": PAPER.get(name, {}).get("secondary"),
            "seconds": round(time.time() - t0, 1),
        }
        rows.append(row)
        full.append({"row": row, "train_config": config.to_dict(), "train_metrics": metrics, "attack": attack})
        log(f"=== {name} knob={knob}: primary {row['primary_acc']:.4f}  attack {row['attack_acc']:.4f}  averaging {row['averaging_attack_acc']}  ({row['seconds']}s)")
        # written after every method so that a long run leaves its partial results behind
        write_json(args.out / f"{args.name}.json", {"settings": vars(args), "attack_config": attack_cfg.to_dict(), "results": full})
        write_csv(args.out / f"{args.name}.csv", rows)
    print(f"{'defense':9s} {'knob':>8s} {'primary':>8s} {'attack':>7s} {'avg-k':>7s} {'floor':>6s} {'client%':>8s}  paper (primary, secondary)")
    for r in rows:
        paper = f"({r['paper_primary']}, {r['paper_secondary']})" if r["paper_primary"] else ""
        avg = "-" if r["averaging_attack_acc"] is None else f"{r['averaging_attack_acc']:.3f}"
        share = "-" if r["client_flops_share"] is None else f"{100 * r['client_flops_share']:.2f}"
        print(f"{r['defense']:9s} {str(r['knob_value']):>8s} {r['primary_acc']:8.4f} {r['attack_acc']:7.4f} {avg:>7s} {r['primary_only_floor']:6.3f} {share:>8s}  {paper}")


if __name__ == "__main__":
    main()
