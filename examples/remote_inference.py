"""Remote inference through ``veil serve``: the service holds the model, the client keeps its records.

Trains a small run (``veil train``'s Python entry point), starts ``veil serve`` on it in a subprocess
(loopback, a fresh token), and queries it with :class:`veil.Client`, which obfuscates each record here
(noise from the OS entropy) and sends the message alone. Stops the service at the end.

    python examples/remote_inference.py [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import veil
from veil.data import load_task
from veil.training import TrainConfig, train_run

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--records", type=int, default=100, help="test records to query")
args = parser.parse_args()
work = Path(tempfile.mkdtemp(prefix="veil-serve-"))

# 1. a run folder (the same as: veil train -t digits-lt5 -d scnl --lambda 0.3 --model mlp -o RUN)
run = work / "run"
train_run(TrainConfig(task="digits-lt5", defense="scnl", knob=0.3, epochs=args.epochs, model="mlp"), run, log=lambda s: None)

# 2. the service (the same as: veil serve RUN --token-file TOKENS --port 0); it reads model.safetensors only
token = secrets.token_urlsafe(32)
(work / "tokens").write_text(token + "\n")
ready = work / "ready.json"
server = subprocess.Popen([sys.executable, "-m", "veil.serving", str(run), "--port", "0", "--token-file", str(work / "tokens"), "--ready-file", str(ready)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=(work / "serve.log").open("wb"))
try:
    deadline = time.monotonic() + 60
    while not ready.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"veil serve did not start: {(work / 'serve.log').read_text()[-1000:]}")
        time.sleep(0.05)
    url = json.loads(ready.read_text())["url"]

    # 3. the client: only obfuscator.safetensors is read; records and labels stay here
    test = load_task("digits-lt5", seed=0).test
    x, y = test.x[: args.records], test.y[: args.records]
    with veil.Client(run / "obfuscator.safetensors", url, token) as client:
        predictions = client.predict(x)
    print(f"{url}: {len(predictions)} predictions, accuracy on the local labels {(predictions == y.numpy()).mean():.3f}")
finally:
    server.terminate()
    server.wait(10)
