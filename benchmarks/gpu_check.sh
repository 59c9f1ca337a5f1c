#!/usr/bin/env bash
# One command on one GPU (under 10 minutes): generation speed at batch 1, 4 and 8 with and without each speed option,
# and a training step's time and peak memory, on random-weight SDXL-architecture models built from their configs
# (nothing is downloaded). Writes gpu_check.md (the table BENCHMARKS.md would carry) and gpu_check.json.
#   bash benchmarks/gpu_check.sh [OUTPUT_FOLDER]     (default: $OUT if set, else outputs/gpu_check)
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh FOLDER   # tiny models on the CPU, seconds: checks the script only
set -euo pipefail
cd "$(dirname "$0")/.."

: "${GPU_CHECK_SMOKE:=0}"
: "${GPU_CHECK_STEPS:=10}"         # sampler steps per image (the recipe draws 50; fewer to fit the time)
: "${GPU_CHECK_BATCHES:=1,4,8}"
: "${GPU_CHECK_BUDGET_S:=480}"     # seconds for generation: a measurement that would not end within them is skipped (and listed)
output="${1:-${OUT:-outputs/gpu_check}}"

smoke_args=()
if [ "$GPU_CHECK_SMOKE" = 1 ]; then
  smoke_args=(--smoke --steps 2 --batches 1,2 --repeats 1 --train_steps 1)
fi
HF_HUB_OFFLINE=1 python benchmarks/gpu_check.py --output_dir "$output" --steps "$GPU_CHECK_STEPS" --batches "$GPU_CHECK_BATCHES" \
  --budget_s "$GPU_CHECK_BUDGET_S" "${smoke_args[@]}"
