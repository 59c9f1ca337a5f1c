#!/usr/bin/env bash
# The toy demo: the real numbered scripts 1 -> 2 -> 3 -> 4 -> eval on CPU, starting from the shipped
# biased toy base model (models/toy_base), with the toy settings passed through the scripts' variables.
#   bash demo.sh                 base vs PopAlign (about 9 minutes on 2 cores)
#   BASELINES=1 bash demo.sh     also Diffusion-DPO and SFT trained on the same pairs
# In the toy world a figure's occupation, gender and race are drawn as colours and shapes that the
# toy classifier reads back from the pixels (popalign/toy/). The base model draws neutral prompts
# with a skewed population (e.g. "a photo of a doctor in a clinic": mostly male and white);
# PopAlign fine-tunes it on population preference pairs so that neutral prompts draw a fair one.
# The base draws 12 occupations, each with its own skew (data/toy/occupations.csv: a row's majority identity is
# its majority_gender / majority_race columns where the file has them, else set by its place); the pairs come from the
# 4 of the training split only, and the evaluation reports each split separately: the trained occupations,
# the 2 that scripts/compare_objectives.py chooses settings on (validation), and the 6 held out.
# Another toy configuration: TOY_OCCUPATIONS / TOY_ATTRIBUTES (after training a base for it with
# scripts/train_toy_base.sh and pointing TOY_MODEL at it).
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

: "${OUT:=outputs/toy_demo}"
: "${TOY_MODEL:=models/toy_base}"
: "${TOY_OCCUPATIONS:=data/toy/occupations.csv}"
: "${TOY_ATTRIBUTES:=data/toy/attributes.json}"
: "${TOY_GENERIC_PROMPTS:=data/toy/generic_prompts.csv}"   # header only: the toy world has no scene without a figure
# The occupations step 1 builds pairs from (the 'split' column of TOY_OCCUPATIONS); empty = all of them.
: "${TOY_TRAIN_SPLIT:=train}"
: "${BASELINES:=0}"                  # 1: also train Diffusion-DPO and SFT on the same pairs
: "${NUM_PROCESSES:=2}"              # generation, classification and training processes (one thread each)
# Training runs data-parallel on NUM_PROCESSES processes (one thread each, the same launch line as on
# GPUs); TRAIN_BATCH_SIZE is the global batch (pairs per optimizer step), split evenly between them. The
# result does not depend on the process count beyond float rounding (tests/test_train.py).
: "${TRAIN_BATCH_SIZE:=32}"
if [ $((TRAIN_BATCH_SIZE % NUM_PROCESSES)) != 0 ]; then
  echo "error: TRAIN_BATCH_SIZE=$TRAIN_BATCH_SIZE is not divisible by NUM_PROCESSES=$NUM_PROCESSES" >&2; exit 2
fi
# The toy classifier and quality scorer read the toy world from these files.
export POPALIGN_TOY_OCCUPATIONS="$TOY_OCCUPATIONS" POPALIGN_TOY_ATTRIBUTES="$TOY_ATTRIBUTES"

# The toy world's settings (model, sampling, classifier, CPU training) travel as one file that every numbered
# script reads: RECIPE (configs/toy_recipe.sh). Step 2 draws the training populations at guidance 1.0 (the
# model's own conditional distribution: its neutral-prompt skew is the data's); the evaluation samples as a
# user would, with classifier-free guidance 3.0, which sharpens every prompt - the base's neutral prompts then
# draw their majority identity even more often.
: "${RECIPE:=configs/toy_recipe.sh}"
: "${EVAL_GUIDANCE:=3.0}"
export RECIPE

# A base built for another world would be read wrongly without an error: its gates.json says what it draws.
python scripts/train_toy_base.py check --model "$TOY_MODEL" --occupations "$TOY_OCCUPATIONS" --attributes "$TOY_ATTRIBUTES"

# Step 1: identity-neutral toy prompts -> identity-specific variants (gender x race).
python 1_generate_diverse_prompts.py --input "$TOY_OCCUPATIONS" --split "$TOY_TRAIN_SPLIT" --attributes "$TOY_ATTRIBUTES" \
  --axes gender,race --output "$OUT/prompts/train_prompts_diverse.csv"

# Step 2: the base model's populations: a biased one per neutral prompt, a diverse one from the
# identity-specific prompts; every image classified by the toy classifier.
MODEL="$TOY_MODEL" PROMPTS_CSV="$OUT/prompts/train_prompts_diverse.csv" OUT_DIR="$OUT/images/train" SEED=0 GUIDANCE=1.0 NUM_PROCESSES="$NUM_PROCESSES" \
IMAGES_PER_NEUTRAL_PROMPT="${TRAIN_IMAGES_PER_NEUTRAL_PROMPT:-100}" \
IMAGES_PER_IDENTITY_PROMPT="${TRAIN_IMAGES_PER_IDENTITY_PROMPT:-20}" \
  bash 2_generate_images.sh

# Step 3: population preference pairs (diverse population wins), captioned with the neutral prompt.
python 3_generate_preferences.py --image_dirs "$OUT/images/train" --classifier toy --attributes "$TOY_ATTRIBUTES" \
  --output "$OUT/preferences/pairs.csv" --num_iterations "${PAIR_ITERATIONS:-2000}" --population_size 5 --seed 0 \
  --require_attribute_match

# Step 4: fine-tune the base U-Net. Toy settings: a tiny model tolerates (and needs) a far higher
# learning rate than SDXL's 5e-7; fp32 on CPU. The learning rate decays to 0 (cosine after 20 warmup
# steps): at a constant rate, Adam keeps moving the identity balance that all neutral prompts share by a
# random walk to the last step, so the end state depended on the training seed (one seed drew 62% men
# for every occupation, another 70% women); decaying the rate lets it settle (docs/toy_world_history.md).
# Caption dropout stays at the trainer's 0.2, so the unconditional branch that guidance uses sees the pairs too.
# PopAlign's beta and loser weight: the toy's per-pixel v-prediction errors at high noise differ by ~0.3
# between winners and losers, so a beta of 0.5 lets the sigmoid stay unsaturated until the population
# has moved (beta 5 or more stops it after a small shift), and a loser weight of 0.1 keeps the loser
# (unlikelihood) term from degrading identity-specific prompts (docs/toy_world_history.md).
# Prior preservation towards the reference (weight 0.25): each winner is also denoised under its own
# identity-specific prompt, and the tuned prediction there is pulled towards the base model's. The toy's
# neutral and identity-specific prompts have close text encodings, so without it what is learned on the
# neutral caption also changes what identity-specific prompts draw (identity accuracy fell to 74-92%);
# with it they stay at the base's level and the neutral-prompt cut is kept (docs/toy_world_history.md).
# TRAIN_PRIOR_PRESERVATION_WEIGHT=0 trains without it (the original PopAlign).
train() {
  local loss="$1" beta="$2" learning_rate="$3" lambda_loser="${4:-1.0}"
  PAIRS_FILE="$OUT/preferences/pairs.csv" OUTPUT_DIR="$OUT/train/$loss" MODEL="$TOY_MODEL" \
  LOSS="$loss" BETA="$beta" LAMBDA_LOSER="$lambda_loser" CAPTION_DROPOUT="${TRAIN_CAPTION_DROPOUT:-0.2}" LEARNING_RATE="$learning_rate" \
  PRIOR_PRESERVATION_WEIGHT="${TRAIN_PRIOR_PRESERVATION_WEIGHT:-0.25}" PRIOR_PRESERVATION_TARGET="${TRAIN_PRIOR_PRESERVATION_TARGET:-reference}" \
  LR_SCHEDULER="${TRAIN_LR_SCHEDULER:-cosine}" LR_WARMUP_STEPS="${TRAIN_WARMUP_STEPS:-20}" MAX_TRAIN_STEPS="${TRAIN_STEPS:-600}" \
  TRAIN_BATCH_SIZE=$((TRAIN_BATCH_SIZE / NUM_PROCESSES)) NUM_PROCESSES="$NUM_PROCESSES" SEED="${TRAIN_SEED:-0}" \
    bash 4_train.sh
}
train popalign "${POPALIGN_BETA:-0.5}" "${POPALIGN_LR:-2e-4}" "${POPALIGN_LAMBDA_LOSER:-0.1}"
tuned="popalign=unet:$OUT/train/popalign/unet"
if [ "$BASELINES" = 1 ]; then
  train dpo "${DPO_BETA:-1000}" "${DPO_LR:-2e-4}"
  train sft 0 "${SFT_LR:-2e-4}"
  tuned="$tuned dpo=unet:$OUT/train/dpo/unet sft=unet:$OUT/train/sft/unet"
fi

# Step 5: evaluate base and tuned models on the same prompts with the same per-image seeds; a
# different base seed from step 2, so no evaluated image is one the pairs were made of.
# Identity-specific eval prompts: every gender x every race of the toy attribute file, which also
# fixes the class lists of the bias metrics (three races here, not six). Every occupation is evaluated;
# with a training split, each split also gets its own report (report_train, report_heldout).
toy_races="$(python -c 'import sys; from popalign.attributes import load_attributes; print(",".join(load_attributes(sys.argv[1])["race"].labels))' "$TOY_ATTRIBUTES")"
BASE_MODEL="$TOY_MODEL" TUNED_MODELS="$tuned" EVAL_PROMPTS="$TOY_OCCUPATIONS" GENERIC_PROMPTS="$TOY_GENERIC_PROMPTS" \
ATTRIBUTES="$TOY_ATTRIBUTES" IDENTITY_RESTRICT="race=$toy_races" SEED=1 UPDATE_MODEL_CARDS=1 \
IMAGES_PER_PROMPT="${EVAL_IMAGES_PER_NEUTRAL_PROMPT:-100}" IMAGES_PER_IDENTITY_PROMPT="${EVAL_IMAGES_PER_IDENTITY_PROMPT:-10}" \
OUT_DIR="$OUT/eval" GUIDANCE="$EVAL_GUIDANCE" NUM_PROCESSES="$NUM_PROCESSES" \
OCCUPATION_SPLITS="$([ -n "$TOY_TRAIN_SPLIT" ] && echo "$TOY_OCCUPATIONS")" \
  bash eval.sh

if [ -n "$TOY_TRAIN_SPLIT" ]; then
  report_dirs=("$OUT/eval/report_$TOY_TRAIN_SPLIT")
  for split in $(python -m popalign.prompts splits "$TOY_OCCUPATIONS"); do
    if [ "$split" != "$TOY_TRAIN_SPLIT" ]; then report_dirs+=("$OUT/eval/report_$split"); fi
  done
  python -m popalign.toy.report "${report_dirs[@]}"
else
  python -m popalign.toy.report "$OUT/eval/report"
fi
