"""Benchmark: federated training on Flower on mnist-lt5 (reduced size for a shared CPU).

Global-model accuracy per round with and without obfuscation (``none`` vs the client obfuscator, each
client training its own on 10% of its records), IID and non-IID (Dirichlet alpha over the digit),
FedAvg. Accuracy is measured by the clients on their test shards: obfuscated with their own
obfuscator and the label (training exposure), without the label (inference exposure), and clean.
Writes benchmarks/results/federated/{summary.json, accuracy_per_round.png} and one run folder per case.

    nice -n 10 .venv/bin/python benchmarks/federated_mnist.py --train-size 6000 --eval-size 2000 --clients 5 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from veil.federated.simulation import run_federated
from veil.federated.task import FederatedConfig
from veil.io import atomic_path, write_json
from veil.training.incremental import default_defense


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="mnist-lt5")
    ap.add_argument("--defense", default=default_defense())
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--train-size", type=int, default=6000)
    ap.add_argument("--eval-size", type=int, default=2000)
    ap.add_argument("--backend", default="inprocess", choices=["inprocess", "simulation"])
    ap.add_argument("--obfuscator", type=Path, default=None, help="also run with this shared pre-trained obfuscator (RUN/obfuscator.safetensors from 'veil train') in every client")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/federated"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    from veil.io import read_json

    old = read_json(args.out / "summary.json") if (args.out / "summary.json").exists() else {}
    summary: dict = {"task": args.task, "clients": args.clients, "rounds": args.rounds, "alpha": args.alpha, "train_size": args.train_size, "eval_size": args.eval_size, "backend": args.backend, "cases": {}}
    if {k: v for k, v in old.items() if k not in ("cases", "obfuscator")} == {k: v for k, v in summary.items() if k != "cases"}:
        summary["cases"] = old["cases"]  # same setting: finished cases are kept (run folders resume anyway)
    sources = [("none", None), (args.defense, None)] + ([("shared", str(args.obfuscator))] if args.obfuscator else [])
    if args.obfuscator:
        summary["obfuscator"] = str(args.obfuscator)
    for defense, shared in sources:
        for partition in ("iid", "noniid"):
            name = f"{defense}_{partition}"
            if name in summary["cases"]:
                continue
            cfg = FederatedConfig(task=args.task, clients=args.clients, rounds=args.rounds, partition=partition, alpha=args.alpha, defense=args.defense if shared else defense, obfuscator=shared,
                                  trusted_fraction=0.1, obfuscator_epochs=4, local_epochs=1, batch_size=32, train_size=args.train_size, eval_size=args.eval_size)
            t0 = time.time()
            res = run_federated(cfg, args.out / name, backend=args.backend, log=log)
            summary["cases"][name] = {"seconds": round(time.time() - t0, 1), "rounds": res["rounds"]}
            write_json(args.out / "summary.json", summary)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for i, partition in enumerate(("iid", "noniid")):
        for name, case in summary["cases"].items():
            if not name.endswith("_" + partition):
                continue
            r = [h["round"] for h in case["rounds"]]
            ax[i].plot(r, [h["acc_training_exposure"] for h in case["rounds"]], "o-", label=f"{name.rsplit('_', 1)[0]}: obfuscated test (training exposure)")
            if not name.startswith("none"):
                ax[i].plot(r, [h["acc_inference"] for h in case["rounds"]], "s--", label=f"{name.rsplit('_', 1)[0]}: obfuscated test (inference exposure)")
                ax[i].plot(r, [h["acc_clean"] for h in case["rounds"]], "^:", label=f"{name.rsplit('_', 1)[0]}: clean test")
        ax[i].set(title=f"{args.task}, {args.clients} clients, {partition}", xlabel="round", ylabel="primary accuracy", ylim=(0.3, 1.02))
        ax[i].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(args.out / "accuracy_per_round.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    print(json.dumps({n: {"seconds": c["seconds"], "final": c["rounds"][-1], "round0": c["rounds"][0]["acc_training_exposure"]} for n, c in summary["cases"].items()}, indent=1))


if __name__ == "__main__":
    main()
