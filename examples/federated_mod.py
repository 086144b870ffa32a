"""Federated clients behind veil's Flower mod: every record a client sends is obfuscated before it leaves.

Three Flower clients (an in-process grid here; the same ClientApp runs under ``flower-supernode``) each
hold a shard of digits-lt5. Their ClientApp answers the server's query with its records and labels, as a
plain app would; ``veil.ObfuscationMod`` replaces the records by messages (hard selection by the label:
the server trains on them; fresh OS-entropy noise) before the reply leaves. The server trains its model
on the messages with veil's one training loop and scores it on obfuscated test records; the leakage
report says what an attacker reads of the digit from such messages.

    python examples/federated_mod.py [--epochs 8] [--attackers strong]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import veil
from veil.api import ATTACKER_PRESETS
from veil.data import load_task
from veil.federated.simulation import InProcessGrid
from veil.training import TrainConfig, fit
from veil.training.loop import Messages, accuracy

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--clients", type=int, default=3)
parser.add_argument("--attackers", default="strong", help="strong, fast, or comma-separated architectures")
args = parser.parse_args()
torch.manual_seed(0)
task = load_task("digits-lt5", seed=0, train_size=600)

# 1. The data owners' obfuscator, trained once on a trusted share (here: the first 200 training records)
#    with the front door, and handed to every client as a file.
def server_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 2))

model = server_model()
trusted = DataLoader(TensorDataset(task.train.x[:200], task.train.y[:200]), batch_size=32, shuffle=True)
engine = veil.Obfuscation("scnl", lambda_=1.0)
client, model, optimizer, loader = engine.make_private(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), data_loader=trusted, epochs=args.epochs)
for _ in range(args.epochs):
    for x, y in loader:
        loss = engine.loss(model(client(x, y)), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
work = Path(tempfile.mkdtemp(prefix="veil-federated-"))
client.save(work / "client.safetensors")

# 2. The ClientApp: a plain Flower app that sends its shard. The mod obfuscates it on the way out.
shards = np.array_split(np.arange(len(task.train)), args.clients)
app = ClientApp(mods=[veil.ObfuscationMod(work / "client.safetensors", exposure="training")])


@app.query()
def send_records(msg: Message, context: Context) -> Message:
    shard = task.train.subset(shards[int(context.node_config["partition-id"])])
    records = ArrayRecord({"x": Array(shard.x.numpy()), "y": Array(shard.y.numpy())})
    return Message(content=RecordDict({"records": records}), reply_to=msg)


# 3. The server: ask every client, train on what arrives (messages and labels only).
grid = InProcessGrid(app, args.clients)
asks = [grid.create_message(RecordDict(), MessageType.QUERY, node, group_id="collect") for node in grid.get_node_ids()]
replies = list(grid.send_and_receive(asks))
if any(r.has_error() for r in replies):
    raise SystemExit(f"a client failed: {[r.error.reason for r in replies if r.has_error()]}")
m = torch.cat([torch.from_numpy(r.content["records"]["x"].numpy()) for r in replies])
y = torch.cat([torch.from_numpy(r.content["records"]["y"].numpy()) for r in replies])
print(f"the server received {len(m)} messages of shape {tuple(m.shape[1:])} from {len(replies)} clients")
received = server_model()
fit(None, received, Messages(m, y), TrainConfig(epochs=args.epochs, batch_size=64), log=lambda s: None)
client.eval()
print(f"server model trained on messages: primary accuracy on obfuscated test records {accuracy(client.defense, received, task.test):.3f}")

# 4. What an attacker holding the obfuscator reads of the digit from training-exposure messages
attackers = args.attackers if args.attackers in ATTACKER_PRESETS else tuple(args.attackers.split(","))
secret = DataLoader(TensorDataset(task.held_out.x, task.held_out.y, task.held_out.z), batch_size=256)
print(veil.leakage(client, secret, exposure="training", attackers=attackers))
