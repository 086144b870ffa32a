"""Put a veil obfuscator in front of your own PyTorch model and data loader (the README's example)."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from veil.data import load_task
from veil.defenses import create_defense
from veil.training import obfuscate
from veil.training.loop import train_step

torch.manual_seed(0)
task = load_task("digits-lt5")  # any (x, y) loader of float images works the same way
loader = DataLoader(TensorDataset(task.train.x, task.train.y), batch_size=32, shuffle=True)

# --- the ten lines ---
defense = create_defense("scnl", input_shape=(1, 8, 8), num_classes=2, lambda_=1.0)  # client side
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 2))  # your model (server side)
for stage in defense.stages():
    defense.set_stage(stage.name)
    opt = torch.optim.Adam([p for p in [*defense.parameters(), *model.parameters()] if p.requires_grad], lr=1e-3)
    for epoch in range(10):
        for x, y in loader:
            loss, _ = train_step(defense, model, x, y, stage)  # task loss + defense.penalty()
            opt.zero_grad(); loss.backward(); opt.step()
m = obfuscate(defense, task.test.x)  # what leaves the client at inference: no label, fresh OS-entropy noise
with torch.no_grad():
    acc = (model.eval()(defense.decode(m)).argmax(1) == task.test.y).float().mean()
print(f"primary accuracy on obfuscated test records: {acc:.3f}")
