"""Where does an SCNL defense with an adaptive selector lose primary accuracy? Selector or server reading?

Trains one run (``veil.training.train_run``) and splits its inference-time primary accuracy (no label) into
the selector's own accuracy (argmax of pi(x) against the primary label) and what the server reads from the
noisy message, with the soft mixture (``sharpen=False``) and with the selector's one-hot argmax
(``sharpen=True``), on the same trained weights. Used for the fashion-lt5 target (README, "Headline
comparison"); results are appended to OUT as JSON lines.

    nice .venv/bin/python benchmarks/diagnose_selector.py --task fashion-lt5 --name cosine --lr-schedule cosine
    nice .venv/bin/python benchmarks/diagnose_selector.py --task fashion-lt5 --name width11 --option selector_width=11
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from veil.cli_common import parse_options
from veil.io import append_jsonl
from veil.training.loop import TrainConfig, accuracy
from veil.training.run import load_run, train_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="fashion-lt5")
    p.add_argument("--defense", default="scnl-private")
    p.add_argument("--name", required=True, help="name of this variant (run folder RUNS/NAME)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="defense option (JSON value), repeatable")
    p.add_argument("--runs", default="runs/diagnose", help="folder for the run folders")
    p.add_argument("--out", default="benchmarks/results/target/diagnose_selector.jsonl")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        options = parse_options(args.option)
    except ValueError as err:
        p.error(str(err))
    t0 = time.time()
    config = TrainConfig(task=args.task, defense=args.defense, epochs=args.epochs, seed=0, defense_options=options, lr_schedule=args.lr_schedule)
    run = Path(args.runs) / args.name
    metrics = train_run(config, run, log=lambda s: print(s, file=sys.stderr, flush=True))
    _, task, defense, model = load_run(run)
    result = {"name": args.name, "task": args.task, "defense": args.defense, "options": options, "epochs": args.epochs,
              "lr_schedule": args.lr_schedule, "primary_acc": metrics["primary_acc"], "client_flops_share": metrics["client_flops_share"]}
    selector = getattr(defense, "selector", None)
    if selector is None or not hasattr(selector, "logits"):
        print(f"{args.defense} has no adaptive selector; only its primary accuracy is reported", file=sys.stderr)
    else:
        defense.eval()
        with torch.no_grad():
            result["selector_acc"] = float((selector.logits(task.test.x).argmax(1) == task.test.y).float().mean())
        for sharpen in (False, True):
            defense.options["sharpen"] = sharpen
            result[f"server_acc_sharpen_{str(sharpen).lower()}"] = accuracy(defense, model, task.test)
    result["seconds"] = round(time.time() - t0, 1)
    append_jsonl(args.out, result)  # one line per run, written atomically
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
