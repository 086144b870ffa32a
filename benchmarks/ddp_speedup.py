"""Data-parallel training on 2 processes against 1 process, same config and global batch: speed and result.

Three runs of one TrainConfig, each in a fresh process on the CPU: one process with one thread, one process
with two threads, and ``torchrun --nproc-per-node 2`` (veil.training.distributed, gloo, one thread per
process). Reports each run's training time (``train_seconds``: the loop and the test evaluation, without
process start-up) and wall time, the speed-up ratios, and the 2-process result against the 1-process one
(primary accuracy, final loss, largest weight difference). Appends one JSON line per call to
``OUT/ddp_speedup.jsonl``.

    python benchmarks/ddp_speedup.py --task digits-lt5 --defense scnl --epochs 6 --out benchmarks/results/distributed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def worker(kind: str, config_json: str, out: str) -> None:
    from veil.training import TrainConfig, train_run
    from veil.training.distributed import train_run_distributed

    config = TrainConfig.from_dict(json.loads(config_json))
    if kind == "ddp":
        train_run_distributed(config, out, log=lambda s: None)
    else:
        train_run(config, out, log=lambda s: None)


def launch(kind: str, config: dict, out: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    args = [HERE.as_posix(), "--worker", kind, "--config", json.dumps(config), "--out", str(out)]
    if kind == "ddp":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(29500 + os.getpid() % 1000), *args]
    else:
        cmd = [sys.executable, *args]
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True, timeout=3600)
    return round(time.time() - t0, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=("one", "ddp"), help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--task", default="digits-lt5")
    p.add_argument("--defense", default="scnl")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.config, a.out)
        return

    import torch

    from veil.io import load_weights, read_json
    from veil.training import TrainConfig

    config = TrainConfig(task=a.task, defense=a.defense, epochs=a.epochs, batch_size=a.batch_size, train_size=a.train_size, seed=a.seed).to_dict()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, threads in (("one_1thread", "one", 1), ("one_2threads", "one", 2), ("ddp_2x1thread", "ddp", 1)):
            wall = launch(kind, config, Path(tmp) / name, threads)
            m = read_json(Path(tmp) / name / "metrics.json")
            runs[name] = {"train_seconds": m["train_seconds"], "wall_seconds": wall, "primary_acc": m["primary_acc"], "final_loss": m["history"][-1]["loss"]}
            print(name, runs[name], flush=True)
        w1, w2 = load_weights(Path(tmp) / "one_1thread" / "model.safetensors"), load_weights(Path(tmp) / "ddp_2x1thread" / "model.safetensors")
        max_weight_diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    record = {
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0], "torch": torch.__version__},
        "config": config,
        "runs": runs,
        "speedup_ddp2_vs_1thread": round(runs["one_1thread"]["train_seconds"] / runs["ddp_2x1thread"]["train_seconds"], 3),
        "speedup_ddp2_vs_2threads": round(runs["one_2threads"]["train_seconds"] / runs["ddp_2x1thread"]["train_seconds"], 3),
        "primary_acc_difference_ddp2_minus_1": round(runs["ddp_2x1thread"]["primary_acc"] - runs["one_1thread"]["primary_acc"], 4),
        "max_weight_difference": max_weight_diff,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from veil.io import append_jsonl

    append_jsonl(out / "ddp_speedup.jsonl", record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
