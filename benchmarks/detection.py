"""Detection on obfuscated scenes (issue #11): mAP of the undefended detector, the on-device detector and
``scnl-detect`` over its knob, with the per-object digit attack against its floor.

Reduced size for a shared 2-core CPU (say so beside every number): 64x64 mnist-scenes, ``--train-size``
scenes (default 3000) x ``--epochs`` (default 6), the server detector at width 16, client budget 1% of
its FLOPs; attackers (linear, mlp, cnn, cnn-bn; 20x20 crops, 10 epochs, 2 views) on 800 of the held-out scenes' objects, scored on the 1000 test scenes' objects.

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
    if name.startswith("closed:"):  # the content channel starting closed (init_gain 0)
        return DetectionConfig(defense="scnl-detect", knob=float(name[7:]), defense_options={"init_gain": 0.0}, client_budget=args.budget, **common)
    if name.startswith("templates:"):  # content closed for good (only region templates + noise), selector trained alone
        return DetectionConfig(defense="scnl-detect", knob=float(name[10:]), defense_options={"train_selector_alone": True, "selector_epochs": 20, "content_closed": True}, client_budget=args.budget, **common)
    if name.startswith("alone:"):  # the selector trained on the region maps only (20 passes alone first, then beside the joint stage)
        return DetectionConfig(defense="scnl-detect", knob=float(name[6:]), defense_options={"train_selector_alone": True, "selector_epochs": 20}, client_budget=args.budget, **common)
    return DetectionConfig(defense="scnl-detect", knob=float(name), client_budget=args.budget, **common)


def _interleaved(fns: dict, reps: int) -> dict:
    """Median seconds of each function, the reps of all of them interleaved (a shared machine's load
    then hits every setting alike)."""
    import statistics
    import time

    times = {k: [] for k in fns}
    for r in range(reps + 2):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= 2:  # warm-up
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def layer_cost() -> None:
    """Forward + backward time of SCNL hard selection against the number of classes C (1 thread, reps
    interleaved across C): per-pixel (region) hard selection of the detection layer on 96x96 scenes with 3
    objects, batch 16, from a region map (only the classes present) and, for reference, by the all-C
    formula; and record-level hard selection of SCNLLinear(512, 256) and SCNLConv2d(1, 8, 3) at batch 128
    (the classification cost item)."""
    import torch

    from veil.layers import SCNLConv2d, SCNLLinear

    torch.set_num_threads(1)
    rows = []
    classes = (2, 10, 80)
    regions = torch.zeros(16, 96, 96, dtype=torch.long)
    regions[:, 10:30, 10:30], regions[:, 50:90, 40:80], regions[:, 60:80, 5:25] = 1, 2, 1
    x = torch.rand(16, 1, 96, 96)

    def step(layer, *args, **kwargs):
        def fn() -> None:
            layer.zero_grad(set_to_none=True)
            layer.raw(*args, **kwargs).square().mean().backward()
        return fn

    for k in (1, 3):
        torch.manual_seed(0)
        layers = {c: SCNLConv2d(1, 1, k, c + 1) for c in classes}
        flat = _interleaved({c: step(layers[c], x, regions) for c in classes}, 15)
        pis = {c: torch.nn.functional.one_hot(regions, c + 1).permute(0, 3, 1, 2).float().unsqueeze(2) for c in classes}
        dense = _interleaved({c: step(layers[c], x, pi=pis[c]) for c in classes}, 3)
        for c in classes:
            rows.append({"item": f"region conv {k}x{k}, 96x96, batch 16", "classes": c, "seconds": flat[c], "all_classes_seconds": dense[c]})
            print(rows[-1], file=sys.stderr, flush=True)
    for kind in ("linear 512->256, batch 128", "conv 1->8 3x3 28x28, batch 128"):
        torch.manual_seed(0)
        cs = (2, 10, 80, 100)
        lin = kind.startswith("linear")
        layers = {c: SCNLLinear(512, 256, c) if lin else SCNLConv2d(1, 8, 3, c) for c in cs}
        xb = torch.rand(128, 512) if lin else torch.rand(128, 1, 28, 28)
        ys = {c: torch.randint(0, c, (128,)) for c in cs}
        t = _interleaved({c: step(layers[c], xb, ys[c]) for c in cs}, 15)
        for c in cs:
            rows.append({"item": f"hard selection {kind}", "classes": c, "seconds": t[c]})
            print(rows[-1], file=sys.stderr, flush=True)
    for r in rows:
        base = next(b for b in rows if b["item"] == r["item"] and b["classes"] == 2)
        r["ratio_to_C2"] = r["seconds"] / base["seconds"]
        if "all_classes_seconds" in r:
            r["all_classes_ratio_to_C2"] = r["all_classes_seconds"] / base["all_classes_seconds"]
    write_json(OUT / "layer_cost.json", {"command": " ".join(sys.argv), "note": "1 thread on a shared 2-core CPU, reps interleaved across C; compare ratios within this file", "rows": rows})
    write_csv(OUT / "layer_cost.csv", rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=("train", "evaluate", "table", "cost"))
    p.add_argument("--runs", default="none,local,0.3,1,3,10,closed:1", help="none, local, scnl-detect knob values, closed:KNOB (init_gain 0) or alone:KNOB (selector trained on the region maps only) or templates:KNOB (that, and content closed for good)")
    p.add_argument("--task", default="mnist-scenes")
    p.add_argument("--train-size", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--budget", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attack-epochs", type=int, default=10)
    p.add_argument("--attack-scenes", type=int, default=800, help="held-out scenes the attackers train on")
    p.add_argument("--attackers", default="linear,mlp,cnn,cnn-bn")
    p.add_argument("--crop", type=int, default=20)
    args = p.parse_args()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if args.phase == "cost":
        return layer_cost()
    if args.phase == "train":
        from veil.detection.train import train_detection

        for name in runs:
            train_detection(run_config(name, args), OUT / "runs" / name)
    elif args.phase == "evaluate":
        from veil.detection.attack import ObjectAttackConfig, evaluate_detection

        for name in runs:
            evaluate_detection(OUT / "runs" / name, ObjectAttackConfig(attackers=tuple(args.attackers.split(",")), epochs=args.attack_epochs, train_scenes=args.attack_scenes, crop=args.crop, views=2, recon_epochs=4), png=OUT / f"{name.replace(':', '-')}.png")
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
            row.update({k: pr["summary"].get(k) for k in ("attack_inference", "attack_training", "attack_averaging", "floor", "majority_floor", "answer_floor", "psnr", "baseline_psnr", "ssim")})
        rows.append(row)
    if rows:
        write_json(OUT / "detection.json", {"command": " ".join(sys.argv), "rows": rows})
        write_csv(OUT / "detection.csv", rows)
        for r in rows:
            print(r)


if __name__ == "__main__":
    main()
