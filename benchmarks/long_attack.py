"""Attack one finished run again with attackers given room to learn (the check behind the "long" numbers).

    python benchmarks/long_attack.py RUN ATTACKERS EPOCHS PATIENCE [AVERAGING_K]
    python benchmarks/long_attack.py runs/salient cnn-bn 20 6

Inference exposure only, 3000-record attackers as the run's defense had, 500 validation and 2000 test
records (the frontier's --cpu sizes), no reconstruction or MI. Writes RUN/privacy.json (replacing the one
there: run it on a copy of a benchmark's run folder) and prints primary, attack and the best attacker.
"""
import json
import sys

import torch

from veil.evaluation.attack import AttackConfig
from veil.evaluation.sweep import EvalConfig, evaluate_run

if len(sys.argv) not in (5, 6):
    sys.exit(__doc__)
torch.set_num_threads(1)
attack = AttackConfig(attackers=tuple(sys.argv[2].split(",")), epochs=int(sys.argv[3]), patience=int(sys.argv[4]), batch_size=64, val_size=500,
                      test_size=2000, width=32, views=2, averaging_k=int(sys.argv[5]) if len(sys.argv) > 5 else 0, exposures=("inference",), seed=0)
result = evaluate_run(sys.argv[1], EvalConfig(attack=attack, reconstruction=None, mi=None), log=lambda s: print(s, flush=True))
print(json.dumps({k: result[k] for k in ("primary_acc", "attack_acc", "best_attacker")}))
