"""Standard against strong attacks on the frontier's private points: a table from `veil evaluate --strength strong`.

    python benchmarks/strong_report.py OUT NAME=STANDARD_RUN [NAME=STANDARD_RUN ...] [NAME=-] [--made-by TEXT]

OUT holds one folder per point, OUT/NAME: a copy of a finished run evaluated with `--strength strong` (its
privacy.json and attacks.png). STANDARD_RUN is the run folder the copy was made from, whose privacy.json
holds the frontier's standard evaluation; NAME=- is a point with no standard evaluation to compare with
(e.g. `none`, checked for what the attacks recover where nothing hides the record): its primary accuracy
and floor come from the strong evaluation and its standard columns stay empty. Writes OUT/strong.csv and OUT/README.md: for each point the
primary accuracy, the floor, the best standard attack, the best strong attack and which attack it was, the
reconstructions' PSNR, the secret read from each reconstruction, the Fisher bound, and whether the point
stays within the frontier's margin (floor + 5 points) and within 3 points of its standard attack (the
issue's goal). A folder whose strong evaluation has not finished is listed as such, not left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from veil.evaluation.sweep import PRIVACY_FILE, best_attack
from veil.io import read_json, write_bytes, write_csv

#: The frontier's privacy margin over the floor, and the most a private point's attack may rise under the strong preset.
MARGIN, RISE = 0.05, 0.03


def _row(name: str, standard_run: Path | None, folder: Path) -> dict[str, Any]:
    strong_file = folder / PRIVACY_FILE
    strong = read_json(strong_file) if strong_file.is_file() else None
    standard = read_json(standard_run / PRIVACY_FILE) if standard_run is not None else strong
    if standard is None:
        return {"point": name, "strong_attack": None, "strong_which": "not finished"}
    floor = standard["primary_only_floor"]
    row: dict[str, Any] = {"point": name, "defense": standard.get("defense"), "knob": standard.get("knob_value"), "primary": standard["primary_acc"], "floor": floor,
                           "standard_attack": None, "standard_which": None}
    if standard_run is not None:
        row.update({"standard_attack": best_attack(standard)[0], "standard_which": best_attack(standard)[1]})
    if strong is None:
        return {**row, "strong_attack": None, "strong_which": "not finished"}
    value, key = best_attack(strong)
    recon, prior, inversion, fisher = (strong.get(k) or {} for k in ("reconstruction", "reconstruction_prior", "inversion", "fisher"))
    row.update({
        "strong_attack": value, "strong_which": key, "strong_best_attacker": strong.get("best_attacker"),
        "decoder_psnr": recon.get("psnr"), "prior_decoder_psnr": prior.get("psnr"), "inversion_psnr": inversion.get("psnr"),
        "secret_from_decoder": strong.get("secret_from_reconstruction_acc"), "secret_from_prior_decoder": strong.get("secret_from_prior_reconstruction_acc"),
        "secret_from_inversion": strong.get("secret_from_inversion_acc"),
        "fisher_psnr_ceiling": fisher.get("psnr_ceiling") if fisher.get("applicable") else None,
        "private_strong": value <= floor + MARGIN, "rise": None, "rise_within_goal": None,
    })
    if row["standard_attack"] is not None:
        row.update({"rise": round(value - row["standard_attack"], 4), "rise_within_goal": value - row["standard_attack"] <= RISE})
    return row


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("points", nargs="+", metavar="NAME=STANDARD_RUN")
    p.add_argument("--made-by", default="", help="how the strong evaluations were made (command, machine), written into the README")
    args = p.parse_args(argv)
    rows = []
    for point in args.points:
        name, sep, run = point.partition("=")
        if not sep or not name or (run != "-" and not (Path(run) / PRIVACY_FILE).is_file()):
            sys.exit(f"each point must be NAME=STANDARD_RUN with a privacy.json in STANDARD_RUN (or NAME=-), got {point!r}")
        rows.append(_row(name, None if run == "-" else Path(run), args.out / name))
    write_csv(args.out / "strong.csv", rows)
    cols = [("point", "point"), ("primary", "primary"), ("floor", "floor"), ("standard_attack", "best standard attack"),
            ("strong_attack", "best strong attack"), ("strong_which", "which"), ("rise", "rise"), ("private_strong", "<= floor + 5"),
            ("rise_within_goal", "rise <= 3"), ("decoder_psnr", "decoder PSNR"), ("prior_decoder_psnr", "prior decoder PSNR"),
            ("inversion_psnr", "inversion PSNR"), ("secret_from_decoder", "secret from decoder"), ("secret_from_prior_decoder", "from prior decoder"),
            ("secret_from_inversion", "from inversion"), ("fisher_psnr_ceiling", "Fisher PSNR ceiling")]
    lines = ["# Strong attacks on the frontier's private points (generated by benchmarks/strong_report.py)", "",
             f"Made by: {args.made_by or '(not given)'}", "",
             "Each point: a copy of the frontier run evaluated with `veil evaluate --strength strong`; 'standard' is the frontier's own "
             "evaluation of the same run. 'which' names the strong preset's best attack (privacy.json key). PSNR in dB. Records, messages "
             "and reconstructions of each point: `NAME/attacks.png`.", "",
             "| " + " | ".join(title for _, title in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(key)) for key, _ in cols) + " |" for r in rows]
    write_bytes(args.out / "README.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines[-len(rows) - 2:]))


if __name__ == "__main__":
    main()
