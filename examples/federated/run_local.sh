#!/usr/bin/env bash
# veil federated training as real Flower processes on this machine, over loopback only:
# one SuperLink, one SuperNode per client (each with its partition id), then `flwr run`.
# Every process started here is stopped by its PID when the script exits.
#
#   examples/federated/run_local.sh [CLIENTS] [extra --run-config, e.g. "rounds=2 defense='none'"]
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CLIENTS="${1:-3}"
EXTRA="${2:-}"
WORK="$(mktemp -d /tmp/veil-flower.XXXXXX)"
PORT="${VEIL_FLOWER_PORT:-9190}"
export PATH="$ROOT/.venv/bin:$PATH"                      # flower-superlink spawns flower-superexec by name
export FLWR_HOME="$WORK/flwr-home"                        # keep Flower's CLI config out of ~/.flwr
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1     # use the installed veil/torch, fetch nothing
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "veil-local"

[superlink.veil-local]
address = "127.0.0.1:$PORT"
insecure = true
TOML

PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

flower-superlink --insecure --host 127.0.0.1 --port "$PORT" > "$WORK/superlink.log" 2>&1 &
PIDS+=($!)
for ((k = 0; k < CLIENTS; k++)); do
  flower-supernode --insecure --superlink "127.0.0.1:$PORT" --port $((PORT + 1 + k)) \
    --node-config "partition-id=$k num-partitions=$CLIENTS" > "$WORK/supernode$k.log" 2>&1 &
  PIDS+=($!)
done
sleep 10
flwr run "$HERE" veil-local --stream --run-config "out='$WORK/run' clients=$CLIENTS $EXTRA"
echo "results: $WORK/run/federated.json, logs: $WORK/*.log" >&2
