#!/usr/bin/env bash
# Runs `llm-jax train` on every worker of a Cloud TPU VM slice.
#
#   launch/tpu_vm.sh --project PROJECT --zone ZONE --name NAME --accelerator_type TYPE
#                    [--runtime_version VERSION] [--logdir DIR] [--delete] [--dry-run]
#                    -- TRAIN_ARGS...
#
# Creates the slice NAME (or reuses it if it exists), copies this checkout to every worker,
# installs it with jax[tpu] in a virtual environment there, runs the same
# `llm-jax train TRAIN_ARGS` on all workers at once (`--worker=all`; JAX finds the other
# workers itself), streams their output here, copies each worker's log to DIR, and with
# --delete deletes the slice afterwards. --dry-run prints the commands and runs nothing.
# The workdir in TRAIN_ARGS must be on storage every worker sees (a gcsfuse or NFS mount):
# Orbax writes one checkpoint from all workers.
set -euo pipefail

project="" zone="" name="" accelerator_type="" logdir="" delete=0 dry_run=0
runtime_version=""
die() { echo "launch/tpu_vm.sh: error: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) project="${2:-}"; shift 2 ;;
    --zone) zone="${2:-}"; shift 2 ;;
    --name) name="${2:-}"; shift 2 ;;
    --accelerator_type) accelerator_type="${2:-}"; shift 2 ;;
    --runtime_version) runtime_version="${2:-}"; shift 2 ;;
    --logdir) logdir="${2:-}"; shift 2 ;;
    --delete) delete=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) die "unknown argument '$1'; put llm-jax train arguments after --." ;;
  esac
done
train_args=("$@")

[[ -n "$project" ]] || die "--project is required (the Google Cloud project that owns the slice)."
[[ "$zone" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] \
  || die "--zone='$zone' is not a zone name like us-central2-b."
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "--name='$name' must be lower-case letters, digits and dashes, starting with a letter."
# Workers per slice: v4 and v5p count TensorCores (2 per chip, 4 chips per host); v5e and
# v6e count chips (up to 8 on one host, 4 per host beyond that).
if [[ "$accelerator_type" =~ ^(v4|v5p)-([0-9]+)$ ]]; then
  size=${BASH_REMATCH[2]}
  (( size >= 8 && size % 8 == 0 )) \
    || die "--accelerator_type=$accelerator_type: ${BASH_REMATCH[1]} sizes are multiples of 8."
  workers=$((size / 8))
elif [[ "$accelerator_type" =~ ^(v5litepod|v6e)-([0-9]+)$ ]]; then
  size=${BASH_REMATCH[2]}
  case "$size" in
    1|4|8) workers=1 ;;
    *) (( size >= 16 && (size & (size - 1)) == 0 )) || die "--accelerator_type=$accelerator_type:\
 ${BASH_REMATCH[1]} sizes are 1, 4, 8 or powers of 2 from 16."
       workers=$((size / 4)) ;;
  esac
else
  die "--accelerator_type='$accelerator_type' is not one of v4-N, v5p-N, v5litepod-N, v6e-N."
fi
if [[ -z "$runtime_version" ]]; then
  case "$accelerator_type" in
    v4-*) runtime_version=tpu-ubuntu2204-base ;;
    v5p-*) runtime_version=v2-alpha-tpuv5 ;;
    v5litepod-*) runtime_version=v2-alpha-tpuv5-lite ;;
    v6e-*) runtime_version=v2-alpha-tpuv6e ;;
  esac
fi
(( ${#train_args[@]} > 0 )) || die "give the llm-jax train arguments after --, e.g." \
  "-- --config configs/llama.py:llama2-7b --workdir /mnt/shared/7b."
if [[ $dry_run -eq 0 ]] && ! command -v gcloud >/dev/null; then
  die "gcloud is not on PATH; install the Google Cloud SDK (https://cloud.google.com/sdk)" \
    "and run 'gcloud auth login'."
fi

logdir="${logdir:-tpu_logs/$name}"
tarball="${TMPDIR:-/tmp}/llm-jax-$name.tar.gz"
repo=$(cd "$(dirname "$0")/.." && pwd)
where=(--zone="$zone" --project="$project")
remote_setup="rm -rf ~/llm-jax && mkdir -p ~/llm-jax && tar -xzf ~/llm-jax.tar.gz -C ~/llm-jax \
&& python3 -m venv ~/llm-jax-venv && ~/llm-jax-venv/bin/pip install -q -e ~/llm-jax 'jax[tpu]'"
remote_train="cd ~/llm-jax && ~/llm-jax-venv/bin/llm-jax train$(printf ' %q' "${train_args[@]}") \
2>&1 | tee ~/llm-jax-train.log; exit \${PIPESTATUS[0]}"

run() {  # prints a command, then runs it unless this is a dry run
  echo "$(printf '%q ' "$@")"
  [[ $dry_run -eq 1 ]] || "$@"
}

if [[ $dry_run -eq 0 ]]; then
  echo "Slice $name ($accelerator_type, $workers workers, runtime $runtime_version) in" \
    "$project/$zone: create it unless it exists, copy $repo, install, train on all workers," \
    "logs to $logdir$([[ $delete -eq 1 ]] && echo ', then delete the slice')." >&2
fi
existing=""
if [[ $dry_run -eq 0 ]]; then
  existing=$(gcloud compute tpus tpu-vm describe "$name" "${where[@]}" \
    --format='value(acceleratorType)' 2>/dev/null || true)
fi
if [[ -z "$existing" ]]; then
  run gcloud compute tpus tpu-vm create "$name" "${where[@]}" \
    --accelerator-type="$accelerator_type" --version="$runtime_version"
elif [[ "${existing##*/}" != "$accelerator_type" ]]; then
  die "the slice $name already exists as ${existing##*/}, not $accelerator_type; choose" \
    "another --name or delete that slice."
else
  echo "# reusing the existing slice $name" >&2
fi
run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=runs --exclude=tpu_logs \
  -C "$repo" .
run gcloud compute tpus tpu-vm scp "$tarball" "$name:~/llm-jax.tar.gz" "${where[@]}" --worker=all
run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$remote_setup"
status=0
run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all \
  --command="$remote_train" || status=$?
[[ $dry_run -eq 1 ]] || mkdir -p "$logdir"
for ((worker = 0; worker < workers; worker++)); do
  run gcloud compute tpus tpu-vm scp "$name:~/llm-jax-train.log" \
    "$logdir/worker_$worker.log" "${where[@]}" --worker="$worker" || true
done
if [[ $delete -eq 1 ]]; then
  run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
fi
exit $status
