#!/usr/bin/env bash
# Regenerates the planner tables in this directory, one at a time (each takes 1-3 minutes on a
# 2-core CPU). Run from the repository root with llm-jax installed:
#   experiments/planning/run.sh
set -euo pipefail
out=experiments/planning/results
mkdir -p "$out"

plan() {  # NAME ARGS...: writes the command and its table to $out/NAME.txt
  local name=$1; shift
  echo "\$ llm-jax plan $*" >"$out/$name.txt"
  /usr/bin/time -f "wall %e s, max RSS %M KB" llm-jax plan "$@" >>"$out/$name.txt" 2>&1
  cat "$out/$name.txt"
}

plan llama2-7b_fsdp64 --config configs/llama.py:llama2-7b --devices 64 --hardware h100
plan llama2-7b_fsdp8_tensor8 --config configs/llama.py:llama2-7b \
  --config.mesh.fsdp=8 --config.mesh.tensor=8 --devices 64 --hardware h100
plan llama3-70b_fsdp256 --config configs/llama.py:llama3-70b --devices 256 --hardware tpu-v5p
plan llama3-70b_fsdp32_tensor8 --config configs/llama.py:llama3-70b \
  --config.mesh.fsdp=32 --config.mesh.tensor=8 --devices 256 --hardware tpu-v5p
plan llama3-70b_fsdp256_context4k --config configs/llama.py:llama3-70b \
  --config.model.context_length=4096 --config.train.batch_size=512 --devices 256 --hardware h100
