#!/usr/bin/env bash
# Starts N `llm-jax train` processes on this machine, each with its own fake CPU devices,
# joined through jax.distributed on localhost: a multi-host run in miniature, for tests and
# for trying multi-process code paths without a cluster.
#
#   launch/local.sh [--processes N] [--devices_per_process K] [--port P] [--logdir DIR]
#                   [--dry-run] -- TRAIN_ARGS...
#
# TRAIN_ARGS go to every process unchanged (e.g. --config configs/llama.py:25m --workdir
# runs/x); the script adds the distributed.* settings. Each process logs to
# DIR/process_I.log; process 0's log is also shown here. If one process fails, the others
# are stopped and the script exits with its status.
set -euo pipefail

processes=2
devices_per_process=4
port=""
logdir=""
dry_run=0
die() { echo "launch/local.sh: error: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes) processes="${2:-}"; shift 2 ;;
    --devices_per_process) devices_per_process="${2:-}"; shift 2 ;;
    --port) port="${2:-}"; shift 2 ;;
    --logdir) logdir="${2:-}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) die "unknown argument '$1'; put llm-jax train arguments after --." ;;
  esac
done
train_args=("$@")

[[ "$processes" =~ ^[1-9][0-9]*$ ]] || die "--processes='$processes' must be a positive integer."
[[ "$devices_per_process" =~ ^[1-9][0-9]*$ ]] \
  || die "--devices_per_process='$devices_per_process' must be a positive integer."
if [[ -z "$port" ]]; then
  # A port the kernel just handed out and released is free for the coordinator to bind.
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
fi
[[ "$port" =~ ^[0-9]+$ && "$port" -gt 0 && "$port" -lt 65536 ]] \
  || die "--port='$port' must be a TCP port number (1-65535)."
llm_jax="${LLM_JAX:-llm-jax}"
if [[ $dry_run -eq 0 ]] && ! command -v "$llm_jax" >/dev/null; then
  die "'$llm_jax' is not on PATH; activate the environment where llm-jax is installed."
fi

quoted_args=""
(( ${#train_args[@]} == 0 )) || quoted_args=$(printf ' %q' "${train_args[@]}")
process_command() {  # the environment and command of process $1
  echo "XLA_FLAGS=--xla_force_host_platform_device_count=$devices_per_process JAX_PLATFORMS=cpu" \
    "$llm_jax train$quoted_args" \
    "--config.distributed.coordinator_address=localhost:$port" \
    "--config.distributed.num_processes=$processes --config.distributed.process_id=$1"
}

if [[ $dry_run -eq 1 ]]; then
  for ((i = 0; i < processes; i++)); do process_command "$i"; done
  exit 0
fi
for ((i = 0; i < processes; i++)); do echo "+ $(process_command "$i")" >&2; done
logdir="${logdir:-$(mktemp -d "${TMPDIR:-/tmp}/llm-jax-local.XXXXXX")}"
echo "Starting $processes processes x $devices_per_process CPU devices, coordinator" \
  "localhost:$port, logs in $logdir" >&2
mkdir -p "$logdir"
pids=()
for ((i = 0; i < processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices_per_process" JAX_PLATFORMS=cpu \
    "$llm_jax" train "${train_args[@]}" \
    "--config.distributed.coordinator_address=localhost:$port" \
    "--config.distributed.num_processes=$processes" "--config.distributed.process_id=$i" \
    >"$logdir/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$logdir/process_0.log" >&2 &
tail_pid=$!
trap 'kill "${pids[@]}" "$tail_pid" 2>/dev/null; exit 130' INT TERM

status=0
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 && $status -eq 0 ]]; do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); else wait "$pid" || status=$?; fi
  done
  running=("${still[@]+"${still[@]}"}")
  [[ ${#running[@]} -gt 0 && $status -eq 0 ]] && sleep 1
done
if [[ $status -ne 0 ]]; then
  echo "launch/local.sh: a process exited with status $status; stopping the others" >&2
  for pid in "${running[@]+"${running[@]}"}"; do kill "$pid" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
fi
kill "$tail_pid" 2>/dev/null || true
if [[ $status -ne 0 ]]; then
  for ((i = 0; i < processes; i++)); do
    echo "--- last lines of $logdir/process_$i.log ---" >&2
    tail -n 5 "$logdir/process_$i.log" >&2
  done
fi
exit $status
