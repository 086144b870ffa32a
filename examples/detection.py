"""Detection: the obfuscator hides each object's secret attribute while the server's detector finds the objects.

digits-scenes (built in): scenes of several digits; the detector finds and classifies each object, the
attacker reads each object's secret attribute from its crop of the message. Runs ``veil train`` and
``veil evaluate``'s Python entry points for detection tasks (the front door, ``veil.Obfuscation``, is for
classifiers: a detector's loss is not a cross-entropy on one label).

    python examples/detection.py [--epochs 8] [--scale 1.0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from veil.detection.attack import ObjectAttackConfig, evaluate_detection
from veil.detection.train import DetectionConfig, train_detection

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--scale", type=float, default=1.0, help="shrink every split of the scenes (tests: 0.1)")
parser.add_argument("--attack-epochs", type=int, default=15)
args = parser.parse_args()
run = Path(tempfile.mkdtemp(prefix="veil-detection-")) / "run"

# veil train -t digits-scenes -d scnl-detect --model detector --epochs N -o RUN
metrics = train_detection(DetectionConfig(task="digits-scenes", defense="scnl-detect", epochs=args.epochs, scale=args.scale), run, log=lambda s: None)
# veil evaluate RUN: mAP, the per-object attack at each exposure, the floors, the reconstruction
quick = args.attack_epochs < 15
config = ObjectAttackConfig(epochs=args.attack_epochs, views=1 if quick else 3, averaging_k=0 if quick else 8, recon_epochs=0 if quick else 8)
summary = evaluate_detection(run, config, log=lambda s: None)["summary"]
print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}, indent=1))
print(f"results in {run}/privacy.json, picture {run}/detection.png")
