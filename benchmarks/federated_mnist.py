"""Benchmark: federated training on Flower on mnist-lt5 (reduced size for a shared CPU).

Global-model accuracy per round without obfuscation (``none``) and with the client obfuscator
(default ``scnl-private``) trained the federated way: every round each client trains it on a fresh
trusted fraction of its records jointly with the global model, and the strategy aggregates it with the
model (``--obfuscator-training federated``). IID and non-IID (Dirichlet alpha over the digit), FedAvg.
Accuracy is measured by the clients on their test shards: obfuscated by the global obfuscator with the
label (training exposure), without it (inference exposure), and clean. Every round of an obfuscated case
also attacks what the clients' engines received (the secondary digit, training exposure with y beside
the message; every attacker architecture of veil.evaluation.attack, trained on held-out records no
client holds, early-stopped, scored on obfuscated test records; the last round adds the averaging attack
over the R draws the engine holds of every record). Writes benchmarks/results/federated/{summary.json,
accuracy_per_round.png} and one run folder per case.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/federated_mnist.py --train-size 6000 --eval-size 2000 --clients 5 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from veil.federated.simulation import run_federated
from veil.federated.task import FederatedConfig
from veil.io import atomic_path, read_json, write_json
from veil.training.incremental import default_defense


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="mnist-lt5")
    ap.add_argument("--defense", default=default_defense())
    ap.add_argument("--obfuscator-training", default="federated", choices=["federated", "local"])
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--train-size", type=int, default=6000)
    ap.add_argument("--eval-size", type=int, default=2000)
    ap.add_argument("--trusted-fraction", type=float, default=0.1)
    ap.add_argument("--obfuscator-epochs", type=int, default=4)
    ap.add_argument("--attack-epochs", type=int, default=10)
    ap.add_argument("--attack-size", type=int, default=2000)
    ap.add_argument("--attack-clients", type=int, default=1)
    ap.add_argument("--attack-device", default="cpu", help="where the attackers train: cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", nargs="+", default=None, help="only these cases (e.g. scnl-private_iid none_noniid)")
    ap.add_argument("--backend", default="inprocess", choices=["inprocess", "simulation"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/federated"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    setting = {k: getattr(args, k) for k in ("task", "clients", "rounds", "alpha", "train_size", "eval_size", "backend", "trusted_fraction", "obfuscator_epochs", "obfuscator_training", "attack_epochs", "attack_size", "attack_clients", "attack_device")}
    old = read_json(args.out / "summary.json") if (args.out / "summary.json").exists() else {}
    summary: dict = {**setting, "cases": {}}
    if old.get("setting") == setting:
        summary["cases"] = old["cases"]  # same setting: finished cases are kept (run folders resume anyway)
    summary = {"setting": setting, "cases": summary["cases"]}
    for defense in ("none", args.defense):
        for partition in ("iid", "noniid"):
            name = f"{defense}_{partition}"
            if name in summary["cases"] or (args.cases and name not in args.cases):
                continue
            cfg = FederatedConfig(
                task=args.task, clients=args.clients, rounds=args.rounds, partition=partition, alpha=args.alpha, defense=defense,
                obfuscator_training=args.obfuscator_training, trusted_fraction=args.trusted_fraction, obfuscator_epochs=args.obfuscator_epochs,
                local_epochs=1, batch_size=32, train_size=args.train_size, eval_size=args.eval_size,
                attack_epochs=0 if defense == "none" else args.attack_epochs, attack_size=args.attack_size, attack_clients=args.attack_clients, attack_device=args.attack_device,
            )
            res = run_federated(cfg, args.out / name, backend=args.backend, log=log)
            summary["cases"][name] = {"seconds": res["seconds"], "config": cfg.to_dict(), "rounds": res["rounds"]}  # the run's own time, also when it was read back
            write_json(args.out / "summary.json", summary)
    plot(summary, args)
    table = {}
    for name, case in summary["cases"].items():
        last = case["rounds"][-1]
        table[name] = {"seconds": case["seconds"], "final": {k: round(v, 4) for k, v in last.items() if isinstance(v, float)},
                       "attack_per_round": [(r["round"], round(r["attack_acc"], 4), round(r["attack"]["primary_only_floor"], 4)) for r in case["rounds"] if "attack" in r],
                       "averaging_last_round": [c["averaging"] for c in last.get("attack", {}).get("clients", [])]}
    print(json.dumps(table, indent=1))


def plot(summary: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for i, partition in enumerate(("iid", "noniid")):
        for name, case in summary["cases"].items():
            if not name.endswith("_" + partition):
                continue
            label, r = name.rsplit("_", 1)[0], [h["round"] for h in case["rounds"]]
            ax[i].plot(r, [h["acc_inference"] for h in case["rounds"]], "o-", label=f"{label}: obfuscated test (inference exposure)")
            if label != "none":
                ax[i].plot(r, [h["acc_training_exposure"] for h in case["rounds"]], "s--", label=f"{label}: obfuscated test (training exposure)")
        ax[i].set(title=f"{args.task}, {args.clients} clients, {partition}", xlabel="round", ylabel="primary accuracy", ylim=(0.3, 1.02))
        ax[i].legend(fontsize=7, loc="lower right")
    for name, case in summary["cases"].items():
        rounds = [h for h in case["rounds"] if "attack" in h]
        if rounds:
            ax[2].plot([h["round"] for h in rounds], [h["attack_acc"] for h in rounds], "o-", label=f"{name}: attack on the engines' records")
            ax[2].plot([h["round"] for h in rounds], [h["attack"]["primary_only_floor"] for h in rounds], "k:", lw=0.8)
    ax[2].set(title="attack on the engines' records (dotted: floor)", xlabel="round", ylabel="attack accuracy", ylim=(0, 1))
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(args.out / "accuracy_per_round.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
