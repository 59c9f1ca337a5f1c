#!/usr/bin/env bash
# Training speed on 1 vs 2 data-parallel CPU processes (one thread each), the same global batch, on the
# toy demo's pairs with the demo's PopAlign settings (prior preservation towards the reference included).
#   bash benchmarks/bench_toy_training.sh [PAIRS_FILE] [STEPS]
# Needs the pairs of a finished demo run (make demo). Run with nothing else on the machine: the wall
# time of each launch (model loading and the cached encodings included) is printed, and their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
pairs="${1:-outputs/toy_demo/preferences/pairs.csv}"
steps="${2:-150}"
[ -f "$pairs" ] || { echo "error: $pairs not found (run make demo first, or pass a pairs file)" >&2; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

launch() {
  local processes="$1" steps="$2"
  PAIRS_FILE="$pairs" OUTPUT_DIR="$work/run$processes" CACHE_DIR="$work/cache" MODEL=models/toy_base VAE="" RESOLUTION=32 \
  LOSS=popalign BETA=0.5 LAMBDA_LOSER=0.1 PRIOR_PRESERVATION_WEIGHT=0.25 PRIOR_PRESERVATION_TARGET=reference \
  LEARNING_RATE=2e-4 LR_SCHEDULER=cosine LR_WARMUP_STEPS=20 MAX_TRAIN_STEPS="$steps" TRAIN_BATCH_SIZE=$((32 / processes)) \
  MIXED_PRECISION=no GRADIENT_CHECKPOINTING=off USE_8BIT_ADAM=off CHECKPOINTING_STEPS=0 REPORT_TO=none \
  NUM_PROCESSES="$processes" SEED=0 bash 4_train.sh > "$work/log$processes" 2>&1
}

launch 1 1  # fills the encoding cache; not timed
rm -rf "$work/run1"
declare -A seconds
for processes in 1 2; do
  start=$(date +%s.%N)
  launch "$processes" "$steps"
  seconds[$processes]=$(python -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")
  echo "$processes process(es) x $((32 / processes)) pairs, $steps steps: ${seconds[$processes]} s"
done
python -c "import sys; print(f'speed-up of 2 processes: {float(sys.argv[1]) / float(sys.argv[2]):.2f}x')" "${seconds[1]}" "${seconds[2]}"
