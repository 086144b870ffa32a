"""Trade-off reports: collect ``privacy.json`` files, draw the curves, write a markdown and a CSV table.

Per task, ``tradeoff_attack_TASK.png`` shows primary accuracy (x) against the best attacker's accuracy
(y) at both points of exposure, one curve per defense ordered by its knob, with the majority-class and
primary-only floors as horizontal lines (no defense can push a sound attacker below the primary-only
floor while keeping the primary task); ``tradeoff_mi_TASK.png`` shows primary accuracy against the
normalised KSG mutual information.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from veil.evaluation.sweep import ATTACK_KEYS, PRIVACY_FILE, best_attack
from veil.io import atomic_path, read_json, write_bytes, write_csv
from veil.training.run import check_output_folder, make_output_folder

COLUMNS = (
    "task", "defense", "knob", "knob_value", "primary_acc",
    "attack_acc", "best_attacker", "attack_acc_training", "attack_acc_training_time", "averaging_attack_acc", "majority_floor",
    "primary_only_floor", "mi_ksg", "mi_normalised", "mi_gaussian_bound", "psnr", "ssim",
    "client_flops_share", "run",
    # the strong preset (veil evaluate --strength strong); empty for standard evaluations
    "secret_from_reconstruction_acc", "secret_from_prior_reconstruction_acc", "secret_from_inversion_acc",
    "prior_psnr", "inversion_psnr", "inversion_path", "fisher_mse_bound", "fisher_psnr_ceiling", "strength",
    "best_attack", "best_attack_name",
)


def collect(dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every ``privacy.json`` under ``dirs`` (searched recursively), as flat table rows."""
    rows = []
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise FileNotFoundError(f"{d}: no such directory")
        files = [d] if d.is_file() else sorted(d.rglob(PRIVACY_FILE))
        for f in files:
            rows.append(flatten(check_privacy(read_json(f), f)))
    rows.sort(key=lambda r: (r["task"], r["defense"], _num(r["knob_value"])))
    return rows


#: Fields of a privacy.json the report reads: accuracies and floors (numbers in [0, 1] or null), other numbers.
_SHARES = ("primary_acc", *ATTACK_KEYS, "majority_floor", "primary_only_floor")
_NUMBERS = ("knob_value", "client_flops_share")


def check_privacy(p: Any, path: Path) -> dict[str, Any]:
    """``p`` (read from ``path``) if it is a privacy.json the report can draw; ``ValueError`` naming the
    file and the field otherwise."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: not a veil privacy.json ({what})")

    if not isinstance(p, dict):
        raise bad(f"expected a JSON object, got {type(p).__name__}")
    for key in ("task", "defense"):
        if not isinstance(p.get(key), str) or not p[key]:
            raise bad(f"{key!r} must be a name, got {p.get(key)!r}")
    for key in _SHARES + _NUMBERS:
        v = p.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad(f"{key!r} must be a finite number or null, got {v!r}")
        if key in _SHARES and not 0 <= v <= 1:
            raise bad(f"{key!r} is an accuracy, so it lies in [0, 1]; got {v!r}")
    if p.get("best_attacker") is not None and not isinstance(p["best_attacker"], str):
        raise bad(f"'best_attacker' must be a name or null, got {p['best_attacker']!r}")
    for key, fields in (("mi", ("ksg", "ksg_normalised")), ("reconstruction", ("psnr", "ssim")), ("reconstruction_prior", ("psnr", "ssim")),
                        ("inversion", ("psnr", "ssim")), ("fisher", ("mse_bound", "psnr_ceiling"))):
        sub = p.get(key)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise bad(f"{key!r} must be an object or null, got {sub!r}")
        for f in fields:
            v = sub.get(f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise bad(f"{key}.{f} must be a finite number or null, got {v!r}")
    bound = (p.get("mi") or {}).get("gaussian_bound")
    if bound is not None and not isinstance(bound, dict):
        raise bad(f"mi.gaussian_bound must be an object or null, got {bound!r}")
    return p


def flatten(p: dict[str, Any]) -> dict[str, Any]:
    """One table row from a ``privacy.json`` dict; ``best_attack``/``best_attack_name``: the strongest of
    :data:`~veil.evaluation.sweep.ATTACK_KEYS` (recomputed, so files written before they existed have them)."""
    mi = p.get("mi") or {}
    rec = p.get("reconstruction") or {}
    bound = mi.get("gaussian_bound") or {}
    row = {k: p.get(k) for k in COLUMNS if k in p}
    fisher = p.get("fisher") or {}
    row.update(
        {
            "mi_ksg": mi.get("ksg"),
            "mi_normalised": mi.get("ksg_normalised"),
            "mi_gaussian_bound": bound.get("full"),
            "psnr": rec.get("psnr"),
            "ssim": rec.get("ssim"),
            "prior_psnr": (p.get("reconstruction_prior") or {}).get("psnr"),
            "inversion_psnr": (p.get("inversion") or {}).get("psnr"),
            "inversion_path": (p.get("inversion") or {}).get("path"),
            "fisher_mse_bound": fisher.get("mse_bound"),
            "fisher_psnr_ceiling": fisher.get("psnr_ceiling"),
            "strength": (p.get("evaluation_config") or {}).get("strength", "standard"),
        }
    )
    row["best_attack"], row["best_attack_name"] = best_attack(row)
    return {k: row.get(k) for k in COLUMNS}


def _num(v: Any) -> float:
    return -math.inf if v is None else float(v)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a GitHub markdown table (a subset of columns, floors included)."""
    cols = (
        ("task", "task"), ("defense", "defense"), ("knob_value", "knob"), ("primary_acc", "primary (inference)"),
        ("attack_acc", "attack (inference)"), ("best_attacker", "best attacker"), ("attack_acc_training", "attack (training exp., with y)"),
        ("attack_acc_training_time", "attack (train-mode messages, with y)"),
        ("averaging_attack_acc", "attack, averaged copies"), ("primary_only_floor", "primary-only floor"),
        ("majority_floor", "majority floor"), ("mi_normalised", "MI (KSG, normalised)"), ("psnr", "PSNR dB"),
        ("ssim", "SSIM"), ("client_flops_share", "client FLOPs share"),
        ("secret_from_inversion_acc", "secret from inversion"), ("inversion_psnr", "inversion PSNR dB"),
        ("best_attack", "best attack"), ("best_attack_name", "best attack is"),
    )
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path, panels: list[tuple[str, str, str]], title: str, floors: bool) -> None:
    """One panel per (x key, y key, y label); one curve per defense, distinct colour and marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1.8, 4.6), squeeze=False)
    defenses = sorted({r["defense"] for r in rows})
    colours = plt.get_cmap("tab20")
    markers = "osD^vP*Xh<>p"
    for ax, (xkey, key, label) in zip(axes[0], panels):
        for j, name in enumerate(defenses):
            pts = [(r[xkey], r[key], r["knob_value"]) for r in rows if r["defense"] == name and r.get(key) is not None and r.get(xkey) is not None]
            if not pts:
                continue
            xs, ys, ks = zip(*pts)
            (line,) = ax.plot(xs, ys, marker=markers[j % len(markers)], color=colours(j % 20), label=name)
            for x, y, k in pts:
                if k is not None:
                    ax.annotate(f"{k:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points", color=line.get_color())
        if floors:
            maj = [r["majority_floor"] for r in rows if r.get("majority_floor") is not None]
            prim = [r["primary_only_floor"] for r in rows if r.get("primary_only_floor") is not None]
            if prim:
                ax.axhline(max(prim), color="k", linestyle="--", linewidth=1, label="primary-only floor")
            if maj:
                ax.axhline(max(maj), color="gray", linestyle=":", linewidth=1, label="majority floor")
        ax.set_xlabel("primary accuracy (inference)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / (5.5 * len(panels) + 1.8), 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def report(dirs: Iterable[str | Path], out: str | Path) -> dict[str, Any]:
    """Write ``results.csv``, ``results.md`` and per-task trade-off PNGs for every privacy.json under ``dirs``."""
    dirs = list(dirs)
    if not dirs:
        raise ValueError("report needs at least one directory holding privacy.json files")
    check_output_folder(Path(out))
    rows = collect(dirs)
    if not rows:
        raise ValueError(f"no {PRIVACY_FILE} under {', '.join(map(str, dirs))}; run 'veil evaluate' or 'veil sweep' first")
    out = Path(out)
    make_output_folder(out)
    write_csv(out / "results.csv", rows)
    figures = []
    md = ["# veil privacy/utility trade-off\n"]
    for task in sorted({r["task"] for r in rows}):
        sub = [r for r in rows if r["task"] == task]
        safe = task.replace("/", "_").replace(":", "_")
        f1 = out / f"tradeoff_attack_{safe}.png"
        _plot(sub, f1, [("primary_acc", "attack_acc", "best attack accuracy (inference exposure)"), ("primary_acc", "attack_acc_training", "best attack accuracy (training exposure, attacker given y)")], f"{task}: primary vs secondary (attack) accuracy", floors=True)
        f2 = out / f"tradeoff_mi_{safe}.png"
        _plot(sub, f2, [("primary_acc", "mi_normalised", "I_KSG(X;X') / I_KSG(X;X)  (PCA proxy)")], f"{task}: primary accuracy vs mutual information", floors=False)
        figures += [str(f1), str(f2)]
        md += [f"\n## {task}\n", f"![attack]({f1.name})\n", f"![mi]({f2.name})\n\n", markdown_table(sub)]
    md.append(
        "\nAttack accuracy: test accuracy of the attacker (of several architectures, the server model's own "
        "among them) with the best validation accuracy, trained on obfuscated records the defense did not train "
        "on. At the training exposure (and on the messages sent in train mode, where they differ) the attacker "
        "also reads the primary label, as the engine does. Floors: majority class; best guess from the primary "
        "label alone. MI: KSG on a PCA reduction, a low-dimensional proxy (see privacy.json for settings).\n"
    )
    write_bytes(out / "results.md", "".join(md).encode())
    return {"rows": len(rows), "csv": str(out / "results.csv"), "markdown": str(out / "results.md"), "figures": figures}


__all__ = ["collect", "flatten", "markdown_table", "report"]
