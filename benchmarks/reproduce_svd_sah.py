"""Reproduction check for the SVD (seed 003) and sample-and-hold (seed 004) peer defenses on mnist-lt5.

* SVD, seed 003 Fig. 4 shape: one ``svd`` run (pretrain, then fine-tune with random signal-content
  removal, §4.3), then the client's choice of m' swept at inference: primary accuracy, attack accuracy
  on the digit, communication ratio m'/n. Also the distortion-bounded variant (Theorem 1) at several
  relative budgets on the same weights, the unobfuscated split feature z as the baseline, and a few
  m' values trained one run each with the knob fixed (as ``veil sweep`` would).
* Sample-and-hold: one run per gamma through ``train_run`` (the one loop), attack accuracy, windows
  found by the control loop; and eff_san (Eq. 8) by layer of the clean network, window sizes 2..150
  as in the paper's Table 1.

Attack accuracies come from veil's attribute attack (src/veil/evaluation/attack.py): attackers trained
on obfuscated train records, early-stopped on obfuscated val records, scored on obfuscated test records.

Run: ``nice .venv/bin/python benchmarks/reproduce_svd_sah.py`` (about 20-30 min on 2 shared cores).
Writes benchmarks/results/peers/svd_sah.json, svd_fig4.csv, svd_bounded.csv, sah_gamma.csv,
sah_effsan.csv, svd_fixed.csv, svd_fig4.png, sah_effsan.png. Re-running reuses finished runs and cached attack points.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from veil.data.tasks import load_task
from veil.defenses.sample_and_hold import probabilistic_accuracy, sample_and_hold, sanitization_efficiency
from veil.defenses.svd import SVDBoundedObfuscation
from veil.evaluation.attack import AttackConfig, attribute_attack
from veil.io import read_json, write_csv, write_json
from veil.training.loop import TrainConfig, accuracy
from veil.training.run import load_run, train_run

OUT = Path(__file__).resolve().parent / "results" / "peers"


def log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


class Features(nn.Module):
    """A fixed message: the SVD defense's plain split feature z (no obfuscation), for the baseline attack."""

    def __init__(self, d) -> None:
        super().__init__()
        self.d = d
        self.name = "svd-features"

    def encode(self, x, y=None):
        return self.d.features(x)


def attack(defense, task, cfg: AttackConfig, cache: dict, key: str) -> dict:
    if key not in cache:
        t0 = time.time()
        r = attribute_attack(defense, task, cfg, log=lambda s: None)["inference"]
        cache[key] = {"attack_acc": r["attack_acc"], "best": r["best"], "attackers": {k: v["test_acc"] for k, v in r["attackers"].items()}, "seconds": round(time.time() - t0, 1)}
        write_json(OUT / "attack_cache.json", cache)
    log(f"  {key}: attack acc {cache[key]['attack_acc']:.4f} ({cache[key]['best']})")
    return cache[key]


def svd_part(task, args, cache) -> dict:
    cfg = TrainConfig(task="mnist-lt5", defense="svd", epochs=args.epochs, seed=0, train_size=args.train_size, lr=1e-3)
    metrics = train_run(cfg, OUT / "runs" / "svd", task=task)
    _, _, d, model = load_run(OUT / "runs" / "svd", task=task)
    vec = AttackConfig(attackers=("linear", "mlp"), epochs=args.attack_epochs, patience=3, views=1, averaging_k=0, exposures=("inference",), val_size=5000)
    rows = []
    base = attack(Features(d), task, vec, cache, "svd/z (no obfuscation, n numbers)")
    rows.append({"variant": "split feature z", "m_prime": d.n, "comm_ratio": 1.0, "primary_acc": None, "attack_acc": base["attack_acc"]})
    for k in [1, 2, 4, 8, 16, 32, 64, 128, d.rank]:
        d.keep = k / d.rank
        assert d.kept() == k
        acc = accuracy(d, model, task.test)
        a = attack(d, task, vec, cache, f"svd/m'={k}")
        rows.append({"variant": "distortion-free" if k == d.rank else "top-m'", "m_prime": k, "comm_ratio": k / d.n, "primary_acc": acc, "attack_acc": a["attack_acc"]})
        log(f"svd m'={k}: primary {acc:.4f}, attack {a['attack_acc']:.4f}, m'/n {k / d.n:.4f}")
    bounded = []
    for eps in [0.0, 0.1, 0.2, 0.3, 0.5, 0.7]:
        b = SVDBoundedObfuscation(input_shape=task.input_shape, num_classes=2, epsilon=eps)
        b.load_state_dict(d.state_dict())
        b.eval()
        acc = accuracy(b, model, task.test)
        with torch.no_grad():
            b.encode(task.test.x)
        mean_m = float(b.last_kept.float().mean())
        a = attack(b, task, vec, cache, f"svd-bounded/eps={eps}")
        bounded.append({"epsilon": eps, "mean_m_prime": mean_m, "comm_ratio": mean_m / b.n, "primary_acc": acc, "attack_acc": a["attack_acc"]})
        log(f"svd-bounded eps={eps}: primary {acc:.4f}, attack {a['attack_acc']:.4f}, mean m' {mean_m:.1f}")
    # the same knob values trained through the one loop, one run each (as `veil sweep` does)
    fixed = []
    for k in args.fixed_m:
        cfg_k = TrainConfig(task="mnist-lt5", defense="svd", knob=k / d.rank, epochs=args.epochs, seed=0, train_size=args.train_size, lr=1e-3)
        mk = train_run(cfg_k, OUT / "runs" / f"svd-m{k}", task=task)
        _, _, dk, _ = load_run(OUT / "runs" / f"svd-m{k}", task=task)
        a = attack(dk, task, vec, cache, f"svd-trained-at/m'={k}")
        fixed.append({"m_prime": dk.kept(), "primary_acc": mk["primary_acc"], "attack_acc": a["attack_acc"], "client_flops_share": mk["client_flops_share"]})
        log(f"svd trained at m'={k}: primary {mk['primary_acc']:.4f}, attack {a['attack_acc']:.4f}")
    write_csv(OUT / "svd_fig4.csv", rows)
    write_csv(OUT / "svd_bounded.csv", bounded)
    write_csv(OUT / "svd_fixed.csv", fixed)
    return {"train_metrics": {k: v for k, v in metrics.items() if k != "history"}, "n": d.n, "m": d.m, "rank": d.rank, "sweep": rows, "bounded": bounded, "trained_at_m_prime": fixed}


def sah_part(task, args, cache) -> dict:
    img = AttackConfig(attackers=("linear", "mlp", "cnn"), epochs=args.attack_epochs, patience=3, views=1, averaging_k=0, exposures=("inference",), val_size=5000)
    rows = []
    for gamma in args.gammas:
        cfg = TrainConfig(task="mnist-lt5", defense="sample-and-hold", knob=gamma, epochs=args.epochs, seed=0, train_size=args.train_size, defense_options={"calibration_size": 256})
        metrics = train_run(cfg, OUT / "runs" / f"sah-{gamma}", task=task)
        _, _, d, model = load_run(OUT / "runs" / f"sah-{gamma}", task=task)
        a = attack(d, task, img, cache, f"sah/gamma={gamma}")
        rows.append({
            "gamma": gamma,
            "window": int(d.windows[1]),
            "gamma_reached_before_finetune": float(d.achieved),
            "reached": bool(int(d.reached)),
            "primary_acc": metrics["primary_acc"],
            "attack_acc": a["attack_acc"],
            "client_flops_share": metrics["client_flops_share"],
        })
        log(f"sah gamma={gamma}: window {rows[-1]['window']}, reached {rows[-1]['gamma_reached_before_finetune']:.3f}, primary {metrics['primary_acc']:.4f}, attack {a['attack_acc']:.4f}")
    write_csv(OUT / "sah_gamma.csv", rows)
    return {"sweep": rows, "effsan": effsan_by_layer(task, OUT / "runs" / f"sah-{args.gammas[0]}", args)}


@torch.no_grad()
def effsan_by_layer(task, run: Path, args) -> list[dict]:
    """eff_san (Eq. 8) of every IFM of the clean network (client block + server CNN), windows 2..150."""
    _, _, d, model = load_run(run, task=task)
    assert int(d.windows[1]) == 1, "eff_san is measured on the clean network (gamma = 0 run)"
    layers = list(d.client) + list(model)
    named = [(i, type(m).__name__) for i, m in enumerate(layers) if isinstance(m, (nn.Conv2d, nn.Linear, nn.MaxPool2d))]
    x, y = task.test.x[: args.effsan_images], task.test.y[: args.effsan_images]
    windows = list(range(2, 151))
    rows = []
    for i, kind in named:
        ifm = x
        for m in layers[:i]:
            ifm = m(ifm)
        rest = nn.Sequential(*layers[i:])
        probs = np.stack([probabilistic_accuracy(rest(sample_and_hold(ifm, n)), y).numpy() for n in windows], 1)  # (images, windows)
        effs = [sanitization_efficiency(p) for p in probs]
        effs2 = [sanitization_efficiency(p, decimals=2) for p in probs]  # a coarser resolution, for comparison
        where = "client" if i < len(d.client) else "server"
        rows.append({
            "ifm_of": f"{where} layer {i} ({kind})",
            "samples": int(ifm[0].numel()),
            "zero_ratio": float((ifm == 0).float().mean()),
            "eff_san_mean": float(np.mean(effs)),
            "eff_san_min": float(np.min(effs)),
            "eff_san_max": float(np.max(effs)),
            "eff_san_mean_2_decimals": float(np.mean(effs2)),
            "p_clean": float(probabilistic_accuracy(rest(ifm), y).mean()),
            "p_at_window_2": float(probs[:, 0].mean()),
            "p_at_window_150": float(probs[:, -1].mean()),
            "curve_mean": probs.mean(0).tolist(),
        })
        log(f"eff_san {rows[-1]['ifm_of']}: {rows[-1]['eff_san_mean']:.3f} (zeros {rows[-1]['zero_ratio']:.2f})")
    write_csv(OUT / "sah_effsan.csv", [{k: v for k, v in r.items() if k != "curve_mean"} for r in rows])
    return rows


def plots(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from veil.io import atomic_path

    s = res["svd"]
    sweep = [r for r in s["sweep"] if r["primary_acc"] is not None]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ks = [r["m_prime"] for r in sweep]
    ax[0].plot(ks, [1 - r["primary_acc"] for r in sweep], "o-", label="target error (digit < 5)")
    ax[0].plot(ks, [1 - r["attack_acc"] for r in sweep], "s-", label="attack error (digit)")
    ax[0].axhline(1 - s["sweep"][0]["attack_acc"], ls=":", c="gray", label="attack error on z (no obfuscation)")
    ax[0].set_xscale("log", base=2)
    ax[0].set_xlabel("m' (coefficients kept and sent)")
    ax[0].set_ylabel("error")
    ax[0].set_title("SVD obfuscation, mnist-lt5 (cf. seed 003 Fig. 4)")
    ax[0].legend(fontsize=8)
    b = s["bounded"]
    ax[1].plot([r["epsilon"] for r in b], [r["primary_acc"] for r in b], "o-", label="primary acc")
    ax[1].plot([r["epsilon"] for r in b], [r["attack_acc"] for r in b], "s-", label="attack acc")
    ax[1].set_xlabel("relative distortion budget epsilon (Theorem 1)")
    ax[1].set_title("distortion-bounded")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(OUT / "svd_fig4.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in res["sah"]["effsan"]:
        ax.plot(range(2, 151), r["curve_mean"], label=f"{r['ifm_of']}: eff_san {r['eff_san_mean']:.2f}")
    ax.set_xlabel("sampling window n")
    ax.set_ylabel("probabilistic accuracy (mean over images)")
    ax.set_title("sample-and-hold by layer, mnist-lt5 (cf. seed 004 Fig. 4)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(OUT / "sah_effsan.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main() -> None:
    global OUT
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--attack-epochs", type=int, default=8)
    p.add_argument("--fixed-m", type=int, nargs="*", default=[1, 4], help="m' values also trained one run each")
    p.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 0.9])
    p.add_argument("--effsan-images", type=int, default=20)
    p.add_argument("--only", choices=["svd", "sah", "all"], default="all")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    OUT = args.out
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    cache = read_json(OUT / "attack_cache.json") if (OUT / "attack_cache.json").exists() else {}
    task = load_task("mnist-lt5", seed=0, train_size=args.train_size)
    res_path = OUT / "svd_sah.json"
    res = read_json(res_path) if res_path.exists() else {}
    res.update({"task": "mnist-lt5", "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "primary_only_floor": task.primary_only_floor(), "majority_floor": task.majority_floor()})
    if args.only in ("svd", "all"):
        res["svd"] = svd_part(task, args, cache)
        write_json(res_path, res)
    if args.only in ("sah", "all"):
        res["sah"] = sah_part(task, args, cache)
        write_json(res_path, res)
    if "svd" in res and "sah" in res:
        plots(res)
    log(f"results in {OUT}")


if __name__ == "__main__":
    main()
