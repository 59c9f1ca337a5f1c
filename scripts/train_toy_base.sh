#!/usr/bin/env bash
# Reproduce the shipped biased toy base model (models/toy_base) from scratch, offline, on CPU.
#   bash scripts/train_toy_base.sh            (about 35 minutes on 2 cores)
# Stages: step-1 prompts over the toy occupations -> biased training pictures -> untrained toy
# pipeline (its small VAE trained on toy pictures) -> U-Net trained from scratch with the
# project's trainer in SFT mode (train_popalign.py --loss sft) -> assembled pipeline -> gates
# measured (identity-specific prompts drawn right, neutral-prompt skew) into $OUT/gates.json; exits 1 when the
# base fails a gate (its gates.json kept, the failing gate printed).
# Every stage is deterministic for a given SEED; training resumes from its latest checkpoint.
# START_MODEL=<a toy pipeline folder> continues the U-Net training of that pipeline (its VAE and text encoder
# kept) instead of starting from a random U-Net.
set -euo pipefail
cd "$(dirname "$0")/.."
# One process trains; TORCH_THREADS=2 lets it use both of 2 cores (faster; float sums then differ from a 1-thread
# build in their last bits, so a given SEED reproduces a build only with the same TORCH_THREADS).
: "${TORCH_THREADS:=1}"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="$TORCH_THREADS" MKL_NUM_THREADS="$TORCH_THREADS"

: "${OCCUPATIONS:=data/toy/occupations.csv}"
: "${ATTRIBUTES:=data/toy/attributes.json}"
: "${WORK_DIR:=outputs/toy_base_build}"
: "${OUT:=models/toy_base}"
: "${SEED:=0}"
: "${START_MODEL:=$WORK_DIR/untrained}"
# The data set: neutral prompts draw skewed identities, identity-specific prompts exact ones.
: "${IMAGES_PER_NEUTRAL_PROMPT:=600}"
: "${IMAGES_PER_IDENTITY_PROMPT:=100}"
: "${GENDER_MAJORITY:=0.85}"
: "${RACE_MAJORITY:=0.8}"
: "${VAE_STEPS:=600}"
# What the VAE's loss weights as figure: pixels far from their own half's border median colour (halves) or from the
# whole border's (border: how models/toy_base_36 was built; on a two-tone background that median is neither colour and
# nearly every pixel counts as figure). In a world of one-colour backgrounds (up to 12 occupations) both are the same.
: "${VAE_BACKGROUND:=halves}"
# SFT from scratch: a high learning rate with cosine decay; 10% caption dropout so that
# classifier-free guidance has an unconditional model. Effective batch = TRAIN_BATCH_SIZE x 1 process.
: "${LEARNING_RATE:=1.5e-3}"
: "${TRAIN_BATCH_SIZE:=64}"
: "${MAX_TRAIN_STEPS:=5000}"
: "${WARMUP_STEPS:=200}"
: "${CAPTION_DROPOUT:=0.1}"
# Measuring the gates.
: "${MEASURE_IMAGES_PER_IDENTITY_PROMPT:=20}"
: "${MEASURE_IMAGES_PER_NEUTRAL_PROMPT:=100}"
: "${STEPS:=20}"
: "${GUIDANCE:=1.0}"

if [ "$START_MODEL" != "$WORK_DIR/untrained" ] && [ ! -f "$START_MODEL/model_index.json" ]; then
  echo "error: START_MODEL=$START_MODEL: no toy pipeline there (model_index.json missing)" >&2; exit 2
fi
if [ "$(realpath -m "$START_MODEL")" = "$(realpath -m "$OUT")" ]; then
  echo "error: OUT=$OUT: the same folder as START_MODEL; write the continued base elsewhere" >&2; exit 2
fi
TOY="--occupations $OCCUPATIONS --attributes $ATTRIBUTES"
python 1_generate_diverse_prompts.py --input "$OCCUPATIONS" --attributes "$ATTRIBUTES" --axes gender,race \
  --output "$WORK_DIR/prompts.csv"
python scripts/train_toy_base.py data $TOY --prompts "$WORK_DIR/prompts.csv" \
  --out "$WORK_DIR/data" --images_per_neutral_prompt "$IMAGES_PER_NEUTRAL_PROMPT" \
  --images_per_identity_prompt "$IMAGES_PER_IDENTITY_PROMPT" --gender_majority "$GENDER_MAJORITY" \
  --race_majority "$RACE_MAJORITY" --seed "$SEED"
[ "$START_MODEL" != "$WORK_DIR/untrained" ] || python scripts/train_toy_base.py pipeline $TOY \
  --out "$START_MODEL" --vae_steps "$VAE_STEPS" --vae_background "$VAE_BACKGROUND" --seed "$SEED"
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no train_popalign.py \
  --loss sft --pretrained_model_name_or_path "$START_MODEL" --pretrained_vae_model_name_or_path "" \
  --use_8bit_adam off --pairs_file "$WORK_DIR/data/train.csv" \
  --output_dir "$WORK_DIR/sft" --resolution 32 --train_batch_size "$TRAIN_BATCH_SIZE" \
  --learning_rate "$LEARNING_RATE" --lr_scheduler cosine --lr_warmup_steps "$WARMUP_STEPS" \
  --max_train_steps "$MAX_TRAIN_STEPS" --caption_dropout "$CAPTION_DROPOUT" --mixed_precision no \
  --gradient_checkpointing off --checkpointing_steps 250 --checkpoints_total_limit 2 \
  --resume_from_checkpoint latest --report_to none --seed "$SEED" --torch_threads "$TORCH_THREADS"
python scripts/train_toy_base.py assemble --untrained "$START_MODEL" --unet "$WORK_DIR/sft/unet" --out "$OUT"
python scripts/train_toy_base.py measure $TOY --model "$OUT" --prompts "$WORK_DIR/prompts.csv" \
  --images_per_identity_prompt "$MEASURE_IMAGES_PER_IDENTITY_PROMPT" \
  --images_per_neutral_prompt "$MEASURE_IMAGES_PER_NEUTRAL_PROMPT" --gender_majority "$GENDER_MAJORITY" \
  --race_majority "$RACE_MAJORITY" --steps "$STEPS" --guidance "$GUIDANCE" --out "$OUT/gates.json"
