"""Your own PyTorch model, optimizer and loop on your own tensors, private through veil's front door.

The task: digits-tag (built in; 40x40 scenes of a large digit, the task's label y, with a small second
digit beside it, the secret z, independent of y; each record carries the tag's region mask). Any tensors
of records (N, C, H, W), labels (N,) and, for region defenses, masks (N, 1, H, W) work the same way.

    python examples/own_model.py [--epochs 10] [--attackers strong]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import veil
from veil.api import ATTACKER_PRESETS
from veil.data import load_task

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--train-size", type=int, default=None, help="training records (default: all 1078)")
parser.add_argument("--attackers", default="strong", help="strong, fast, or comma-separated architectures")
parser.add_argument("--out", type=Path, default=None, help="folder for client.safetensors and client.onnx")
args = parser.parse_args()
torch.manual_seed(0)

task = load_task("digits-tag", seed=0, train_size=args.train_size)  # your tensors: x, y, mask
loader = DataLoader(TensorDataset(task.train.x, task.train.y, task.train.mask), batch_size=64, shuffle=True)
model = nn.Sequential(  # your model: it reads messages of the records' shape (1, 40, 40)
    nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(64 * 10 * 10, 128), nn.ReLU(), nn.Linear(128, 10),
)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

# --- the front door ---
engine = veil.Obfuscation(defense="scnl-region", client_budget=0.01, lambda_=0.1)
client, model, optimizer, loader = engine.make_private(model=model, optimizer=optimizer, data_loader=loader, epochs=args.epochs)
for epoch in range(args.epochs):
    for x, y, *side in loader:  # side: the region mask
        loss = engine.loss(model(client(x, y, *side)), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
    print(f"epoch {epoch + 1}: loss {loss.item():.3f}")

client.eval()  # deployment: no label, fresh noise from the OS entropy
attackers = args.attackers if args.attackers in ATTACKER_PRESETS else tuple(args.attackers.split(","))
secret = DataLoader(TensorDataset(torch.cat([task.held_out.x, task.val.x, task.test.x]), torch.cat([task.held_out.y, task.val.y, task.test.y]),
                                  torch.cat([task.held_out.z, task.val.z, task.test.z])), batch_size=256)  # records it never trained on, with z
report = veil.leakage(client, secret, model=model, attackers=attackers)
print(f"client: {engine.defense.name} at {engine.client_share:.2%} of the model's FLOPs")
print(report)

out = args.out or Path(tempfile.mkdtemp(prefix="veil-own-model-"))
client.save(out / "client.safetensors")  # for veil query / veil.Client and the ClientApp mod
print(f"wrote {out / 'client.safetensors'}")
try:  # ONNX (clients without Python) covers the defenses veil serve splits; region selection is not one yet
    veil.export_onnx(client, out / "client.onnx")
    print(f"wrote {out / 'client.onnx'}")
except ValueError as err:
    print(f"no client.onnx: {err}")
