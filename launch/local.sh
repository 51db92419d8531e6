#!/usr/bin/env bash
# N local processes as one JAX job (127.0.0.1, CPU collectives), for testing multi-host code on one machine.
#   launch/local.sh 2 --config experiments/moe.py --workdir runs/local2
# Each process gets DEVICES_PER_PROCESS CPU devices (default 2); extra arguments go to moejax.train.
# The first process prints; all of them exit if one dies (jax.distributed heartbeats).
set -euo pipefail
N="${1:?usage: launch/local.sh N [moejax.train flags...]}"
shift
PORT="${PORT:-$((20000 + RANDOM % 20000))}"
DEVICES="${DEVICES_PER_PROCESS:-2}"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES" \
  MOEJAX_COORDINATOR="127.0.0.1:$PORT" MOEJAX_NUM_PROCESSES="$N" MOEJAX_PROCESS_ID="$i" \
    python -m moejax.train "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
