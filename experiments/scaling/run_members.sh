#!/usr/bin/env bash
# Runs a sweep's members as independent `llm-jax train` commands, N at a time, one per GPU.
#
#   experiments/scaling/run_members.sh SWEEP_FILE SWEEP_DIR [NUM_GPUS]
#
# The commands come from `llm-jax sweep SWEEP_FILE --print-commands`: the shared tokenizer's
# command first (run once, before any member), then one `llm-jax train` line per member,
# each given its own GPU through CUDA_VISIBLE_DEVICES. Every command resumes from its
# workdir's newest checkpoint, so rerunning this script after a failure continues the sweep.
# Afterwards `llm-jax sweep SWEEP_FILE --sweep_dir SWEEP_DIR` collects the finished members
# into SWEEP_DIR/sweep.jsonl (their runs are complete, so it only evaluates them).
set -euo pipefail
sweep_file=$1 sweep_dir=$2 num_gpus=${3:-$(nvidia-smi -L 2>/dev/null | wc -l)}
num_gpus=$(( num_gpus > 0 ? num_gpus : 1 ))
mapfile -t commands < <(llm-jax sweep "$sweep_file" --sweep_dir "$sweep_dir" --print-commands)
mkdir -p "$sweep_dir"
if [[ ${commands[0]} == "llm-jax tokenizer train"* ]]; then
  [[ -e $sweep_dir/tokenizer.model ]] || eval "${commands[0]}"
  commands=("${commands[@]:1}")
fi
for i in "${!commands[@]}"; do
  gpu=$(( i % num_gpus ))
  # One member per GPU at a time: wait for this GPU's previous member before starting.
  if (( i >= num_gpus )); then wait "${pids[$gpu]}" || echo "a member on GPU $gpu failed; see its log" >&2; fi
  name=$(basename "${commands[$i]##* --workdir }")
  CUDA_VISIBLE_DEVICES=$gpu bash -c "${commands[$i]}" > "$sweep_dir/$name.log" 2>&1 &
  pids[$gpu]=$!
done
wait || true
llm-jax sweep "$sweep_file" --sweep_dir "$sweep_dir"
