"""Lambda sweep of the SCNL defense: primary accuracy, injected noise and a retrained attacker vs lambda.

For every lambda: train the defense and the server model together (veil's one training loop), then

* primary accuracy on the test split at the inference exposure (no label; selector) and at the training
  exposure (hard selection by the known label);
* the injected noise: the VIB charge (mean KL(q(h|x) || N(0, 1)), nats per element) and the mean noise
  scale of the inference-path output on the test split;
* an attribute attack: veil's attacker (:func:`veil.evaluation.attack.attack_exposure`) trains a CNN on
  obfuscated *training* records to predict the digit z, early-stops on obfuscated validation records and
  is scored on obfuscated *test* records; the primary-only floor is printed beside it;
* the adaptive selector's own accuracy and the client's FLOPs as a share of the server model's.

A command, not a test. Kept affordable on a shared 2-core CPU (defaults: mnist-lt5, 10000 training
records, 3 epochs per lambda, 5 lambdas, one thread)::

    nice .venv/bin/python benchmarks/lambda_sweep.py
    nice .venv/bin/python benchmarks/lambda_sweep.py --defense scnl-adaptive --lambdas 0,0.3,1,3

Writes ``benchmarks/results/scnl/lambda_sweep_<defense>.{json,csv,png}`` (atomically).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from veil.data.tasks import load_task
from veil.evaluation.attack import AttackConfig, attack_exposure
from veil.layers import AdaptiveSelection
from veil.io import atomic_path, write_csv, write_json
from veil.training import TrainConfig, build, client_cost, fit
from veil.training.run import evaluate_primary

OUT = Path(__file__).resolve().parent / "results" / "scnl"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sweep_point(config: TrainConfig, task, attack: AttackConfig) -> dict:
    t0 = time.time()
    _, defense, model = build(config, task)
    fit(defense, model, task, config, log=log)
    row: dict = {"lambda": config.knob, **evaluate_primary(defense, model, task)}
    stats = defense.noise_stats(task.test.x) if hasattr(defense, "noise_stats") else {}
    row.update({f"noise_{k}": v for k, v in stats.items()})
    sel = getattr(defense, "selector", None)
    if isinstance(sel, AdaptiveSelection):
        with torch.no_grad():
            row["selector_acc"] = float((sel.logits(task.test.x).argmax(1) == task.test.y).float().mean())
    layer = getattr(defense, "layer", None)
    if layer is not None and hasattr(layer, "gain"):
        row["content_gain_abs"] = float(layer.gain.detach().abs().mean())
    row["client_flops_share"] = client_cost(defense, model)["client_flops_share"]
    res = attack_exposure(defense, task, "inference", attack, log=log)
    row["attack_acc"] = res["attack_acc"]
    row["attack_best"] = res["best"]
    row["seconds"] = round(time.time() - t0, 1)
    return row


def plot(rows: list[dict], floor: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = [r["lambda"] for r in rows]
    xs = list(range(len(lam)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(xs, [r["primary_acc"] for r in rows], "o-", label="primary acc (inference, no label)")
    a.plot(xs, [r["attack_acc"] for r in rows], "s-", label="attack acc (CNN, digit)")
    a.axhline(floor, ls="--", c="gray", label=f"primary-only floor {floor:.3f}")
    a.set_xticks(xs, [str(v) for v in lam])
    a.set_xlabel("lambda (larger = more private)")
    a.set_ylabel("accuracy")
    a.legend(fontsize=8)
    b.plot(xs, [r.get("noise_kl", float("nan")) for r in rows], "o-", label="mean KL(q(h|x)||N(0,1)) [nats/elem]")
    b.plot(xs, [r.get("noise_noise_scale", float("nan")) for r in rows], "s-", label="mean noise scale")
    b.set_xticks(xs, [str(v) for v in lam])
    b.set_xlabel("lambda")
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def monotone(values: list[float], direction: int, tol: float) -> bool:
    return all(direction * (b - a) >= -tol for a, b in zip(values, values[1:]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="mnist-lt5")
    p.add_argument("--defense", default="scnl")
    p.add_argument("--lambdas", default="0,0.3,1,3,10", help="comma-separated, increasing")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--attack-epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--option", action="append", default=[], help="extra defense option KEY=VALUE (JSON value)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--tag", default="", help="suffix of the result files (keeps several sweeps apart)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import json

    options = {}
    for item in args.option:
        k, v = item.split("=", 1)
        options[k] = json.loads(v)
    lambdas = [float(v) for v in args.lambdas.split(",")]
    if lambdas != sorted(lambdas):
        raise ValueError(f"--lambdas must be increasing, got {lambdas}")
    task = load_task(args.task, seed=args.seed, train_size=args.train_size)
    attack = AttackConfig(attackers=("cnn",), epochs=args.attack_epochs, patience=3, train_size=args.train_size, val_size=5000, views=2, averaging_k=0, exposures=("inference",), seed=args.seed)
    floor = task.primary_only_floor()
    rows = []
    for lam in lambdas:
        config = TrainConfig(task=args.task, defense=args.defense, knob=lam, defense_options=options, epochs=args.epochs, train_size=args.train_size, seed=args.seed)
        log(f"== {args.defense} lambda={lam}")
        row = sweep_point(config, task, attack)
        rows.append(row)
        log("   " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    summary = {
        "defense": args.defense,
        "task": args.task,
        "train_size": args.train_size,
        "epochs": args.epochs,
        "defense_options": options,
        "attack_config": attack.to_dict(),
        "primary_only_floor": floor,
        "rows": rows,
        "monotone": {
            "noise_kl_decreasing": monotone([r["noise_kl"] for r in rows], -1, 0.0),
            "primary_acc_nonincreasing_tol_0.005": monotone([r["primary_acc"] for r in rows], -1, 0.005),
            "attack_acc_nonincreasing_tol_0.01": monotone([r["attack_acc"] for r in rows], -1, 0.01),
        },
        "command": " ".join(["benchmarks/lambda_sweep.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    stem = args.out / f"lambda_sweep_{args.defense}{'_' + args.tag if args.tag else ''}"
    write_json(stem.with_suffix(".json"), summary)
    write_csv(stem.with_suffix(".csv"), rows)
    plot(rows, floor, stem.with_suffix(".png"), f"{args.defense} on {args.task} ({args.train_size} train, {args.epochs} epochs)")
    print(f"{'lambda':>8} {'primary':>8} {'train-exp':>9} {'KL':>7} {'scale':>7} {'attack':>7} {'selector':>8} {'client':>7}")
    for r in rows:
        print(f"{r['lambda']:>8} {r['primary_acc']:>8.4f} {r['label_readback_training_exposure']:>9.4f} {r.get('noise_kl', float('nan')):>7.4f} "
              f"{r.get('noise_noise_scale', float('nan')):>7.4f} {r['attack_acc']:>7.4f} {r.get('selector_acc', float('nan')):>8.4f} {r['client_flops_share']:>7.4f}")
    print(f"primary-only floor {floor:.4f}; monotone: {summary['monotone']}; wrote {stem}.json/.csv/.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
