#!/usr/bin/env bash
# Reproduces experiments/scaling: the CPU IsoFLOP sweep, its fits and plots.
#
#   experiments/scaling/reproduce.sh          # train (~45 min on a shared 2-core CPU), then fit
#   experiments/scaling/reproduce.sh --fit    # only refit the committed sweep.jsonl
#
# Training is resumable: rerunning skips finished members and resumes interrupted ones.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/scaling
if [[ ${1:-} != --fit ]]; then
  llm-jax sweep configs/sweeps/isoflop_cpu.py --sweep_dir runs/sweeps/isoflop_cpu
  cp runs/sweeps/isoflop_cpu/sweep.jsonl "$out/sweep.jsonl"
fi
llm-jax scaling fit "$out/sweep.jsonl" --out "$out" --draws 200 --seed 0 --overwrite
llm-jax scaling fit "$out/sweep.jsonl" --out "$out/non_embedding" --params params_non_embedding \
    --draws 200 --seed 0 --overwrite
