"""Benchmark: incremental training with obfuscated data on mnist-lt5 (reduced size for a shared CPU).

Accuracy against p (p = 5, 10, 15, 20) of
  * NN-p: the server model trained on p% of the records in the clear only (warm-started from NN-(p-5)),
  * NN'-p: NN-p resumed on p% clean + (100-p)% obfuscated by SL-p with screening,
  * "100% clean": the same model trained on all records in the clear for clean_epochs + resume_epochs,
and the privacy of the handed-over part against the primary-only floor: every attacker architecture of
veil.evaluation.attack (linear, MLP, CNN, CNN+BN, the server's model), at the training exposure (y beside
the message, as the engine has it), trained on SL-p's obfuscations of the handed-over records (at most
--attack-size of them), early-stopped on obfuscated validation records, scored on obfuscated test records.
The obfuscator is veil's most private working defense by default (scnl-private, lambda 10). Writes benchmarks/results/incremental/{summary.json, accuracy_vs_p.png} and the run
folder(s) under it.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/incremental_mnist.py --train-size 10000 --eval-size 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from veil.data.tasks import load_task
from veil.io import write_json
from veil.models import create_model
from veil.noise import seed_everything
from veil.training.incremental import IncrementalConfig, default_defense, plot_incremental
from veil.training.loop import Messages, TrainConfig, fit, model_accuracy
from veil.workflows.incremental import run as run_with_attack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="mnist-lt5")
    ap.add_argument("--defense", default=default_defense())
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--eval-size", type=int, default=2000)
    ap.add_argument("--screen-ratio", type=float, nargs="+", default=[0.25, 0.0], help="one run per ratio (0 = the ablation without screening)")
    ap.add_argument("--attack-epochs", type=int, default=10, help="0 skips the attack (SL-p, hence the attack, does not depend on the screen ratio)")
    ap.add_argument("--attack-size", type=int, default=3000, help="most handed-over records each attacker trains on")
    ap.add_argument("--no-attack-for", type=float, nargs="*", default=[0.0], help="screen ratios run without the attack (SL-p and so the attack do not depend on the ratio)")
    ap.add_argument("--attack-device", default="cpu", help="where the attackers train: cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/incremental"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    task = load_task(args.task, seed=0, train_size=args.train_size)
    from veil.io import read_json

    old = read_json(args.out / "summary.json") if (args.out / "summary.json").exists() else {}
    summary: dict = {"task": args.task, "train_size": len(task.train), "eval_size": args.eval_size, "defense": args.defense, "runs": dict(old.get("runs", {})) if old.get("defense") == args.defense else {}}
    base = dict(task=args.task, defense=args.defense, start=5, step=5, max_p=20, target=1.0, clean_epochs=5, obfuscator_epochs=4, resume_epochs=3, attack_size=args.attack_size, batch_size=64, train_size=args.train_size, eval_size=args.eval_size)
    for ratio in args.screen_ratio:
        attack_epochs = 0 if ratio in args.no_attack_for else args.attack_epochs
        cfg = IncrementalConfig(**base, attack_epochs=attack_epochs, screen_ratio=ratio)
        t0 = time.time()
        tag = f"screen{ratio:g}" + ("" if attack_epochs else "_noattack")
        res = run_with_attack(cfg, args.out / f"run_{args.defense}_{tag}", task=task, attack_device=args.attack_device, log=log)
        summary["runs"][f"screen_ratio={ratio:g}" + ("" if attack_epochs else " (no attack)")] = {"seconds": round(time.time() - t0, 1), "steps": res["steps"]}

    # reference: all training records in the clear, same number of epochs as NN-p + NN'-p
    t0 = time.time()
    seed_everything(0)
    clean_model = create_model("cnn", task.input_shape, task.num_primary)
    fit(None, clean_model, Messages(task.train.x, task.train.y), TrainConfig(task=args.task, defense="none", epochs=base["clean_epochs"] + base["resume_epochs"], batch_size=64, lr=1e-3, seed=1), log=log, name="100% clean")
    test = task.test.subset(torch.arange(min(args.eval_size, len(task.test))))
    summary["clean_100"] = {"test_acc_clean": model_accuracy(clean_model, test.x, test.y), "seconds": round(time.time() - t0, 1)}
    log(f"100% clean: {summary['clean_100']}")

    first = summary["runs"].get("screen_ratio=0.25", next(iter(summary["runs"].values())))["steps"]
    plot_incremental(first, args.out / "accuracy_vs_p.png", baselines={"100% clean": summary["clean_100"]["test_acc_clean"]})
    write_json(args.out / "summary.json", summary)
    rows = []
    for name, run in summary["runs"].items():
        for s in run["steps"]:
            rows.append({"run": name, "p": s["p"], "NN-p clean test": round(s["nn_p"]["test_acc_clean"], 4), "NN'-p clean test": round(s["nn_prime_p"]["test_acc_clean"], 4),
                         "NN'-p obfuscated test": round(s["nn_prime_p"]["test_acc_training_exposure"], 4), "attack": round(s["privacy"].get("attack_acc", float("nan")), 4),
                         "floor": round(s["privacy"]["primary_only_floor"], 4), "seconds": s["seconds"]})
    print(json.dumps({"clean_100": summary["clean_100"], "rows": rows, "run_seconds": {k: v["seconds"] for k, v in summary["runs"].items()}}, indent=1))


if __name__ == "__main__":
    main()
