"""Detection on obfuscated scenes (issue #11): mAP of the undefended detector, the on-device detector and
``scnl-detect`` over its knob, with the per-object digit attack against its floor.

Reduced size for a shared 2-core CPU (say so beside every number): 64x64 mnist-scenes, ``--train-size``
scenes (default 3000) x ``--epochs`` (default 6), the server detector at width 16, client budget 1% of
its FLOPs; attackers (linear, mlp, cnn; 20x20 crops, 10 epochs, 2 views) on 800 of the held-out scenes' objects, scored on the 1000 test scenes' objects.

    OMP_NUM_THREADS=1 python benchmarks/detection.py train --runs none,local,0.3,1,3,10
    OMP_NUM_THREADS=1 python benchmarks/detection.py evaluate --runs none,local,0.3,1,3,10
    python benchmarks/detection.py table

Run folders go to ``benchmarks/results/detection/runs/<name>`` (git-ignored weights); results to
``benchmarks/results/detection/detection.{json,csv}`` and the PNG of each run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from veil.io import read_json, write_csv, write_json

OUT = Path(__file__).resolve().parent / "results" / "detection"


def run_config(name: str, args: argparse.Namespace):
    from veil.detection.train import DetectionConfig

    common = dict(task=args.task, epochs=args.epochs, train_size=args.train_size, seed=args.seed)
    if name in ("none", "local"):
        return DetectionConfig(defense=name, client_budget=args.budget if name == "local" else None, **common)
    return DetectionConfig(defense="scnl-detect", knob=float(name), client_budget=args.budget, **common)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=("train", "evaluate", "table"))
    p.add_argument("--runs", default="none,local,0.3,1,3,10", help="none, local, or scnl-detect knob values")
    p.add_argument("--task", default="mnist-scenes")
    p.add_argument("--train-size", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--budget", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attack-epochs", type=int, default=10)
    p.add_argument("--attack-scenes", type=int, default=800, help="held-out scenes the attackers train on")
    p.add_argument("--attackers", default="linear,mlp,cnn")
    p.add_argument("--crop", type=int, default=20)
    args = p.parse_args()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if args.phase == "train":
        from veil.detection.train import train_detection

        for name in runs:
            train_detection(run_config(name, args), OUT / "runs" / name)
    elif args.phase == "evaluate":
        from veil.detection.attack import ObjectAttackConfig, evaluate_detection

        for name in runs:
            evaluate_detection(OUT / "runs" / name, ObjectAttackConfig(attackers=tuple(args.attackers.split(",")), epochs=args.attack_epochs, train_scenes=args.attack_scenes, crop=args.crop, views=2, recon_epochs=4), png=OUT / f"{name}.png")
    rows = []
    for name in runs:
        run = OUT / "runs" / name
        if not (run / "metrics.json").is_file():
            continue
        m = read_json(run / "metrics.json")
        row = {"run": name, "defense": m["defense"], "knob": m.get("knob"), "map_50": m["inference"]["map_50"], "map": m["inference"]["map"],
               "client_flops_share": m.get("client_flops_share"), "train_scenes": m["train_scenes"], "epochs": len(m["history"])}
        if (run / "privacy.json").is_file():
            pr = read_json(run / "privacy.json")
            row.update({k: pr["summary"].get(k) for k in ("attack_inference", "attack_training", "attack_averaging", "floor", "majority_floor", "psnr", "baseline_psnr", "ssim")})
        rows.append(row)
    if rows:
        write_json(OUT / "detection.json", {"command": " ".join(sys.argv), "rows": rows})
        write_csv(OUT / "detection.csv", rows)
        for r in rows:
            print(r)


if __name__ == "__main__":
    main()
