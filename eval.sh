#!/usr/bin/env bash
# Step 5: evaluate the base model and one or more fine-tuned models on the same prompts and seeds.
# Edit the variables below, or override any of them from the environment:
#   TUNED_MODELS="popalign=unet:runs/popalign-sdxl/unet dpo=lora:runs/dpo-lora" NUM_PROCESSES=8 bash eval.sh
# For each model: images for the identity-neutral, identity-specific and generic (no person) eval
# prompts in OUT_DIR/images/<name>, classified and quality-scored; then popalign.evaluate writes
# OUT_DIR/report/report.md with the tables, charts and image grids.
# Every image's seed is f(SEED, prompt, image index), so the models' images pair up one to one.
# Re-running resumes: finished images, labels and scores are skipped.
set -euo pipefail
cd "$(dirname "$0")"

# RECIPE=FILE (relative to the repository root): a file of `: "${NAME:=value}"` lines read before the defaults
# below, so a whole configuration travels as one file (configs/toy_recipe.sh); the environment still wins.
source scripts/shell_common.sh
load_recipe

# Models. TUNED_MODELS is a space-separated list of NAME=KIND:DIR, KIND one of
#   unet  a fine-tuned U-Net folder (diffusers format, e.g. what train_popalign.py saves)
#   lora  a LoRA weights folder (loaded with pipeline.load_lora_weights, then fused into the weights it adapts: no LoRA layers at inference)
#   best  a run folder trained with validation: the best checkpoint its finished.json names (U-Net or LoRA)
: "${BASE_MODEL:=stabilityai/stable-diffusion-xl-base-1.0}"
: "${BASE_NAME:=base}"
: "${TUNED_MODELS:=popalign=unet:runs/popalign-sdxl/unet}"   # 4_train.sh writes OUTPUT_DIR/unet (LoRA: OUTPUT_DIR)
# Prompts. The identity-specific set is derived from EVAL_PROMPTS by step 1, as the original's:
# every occupation x {male, female} x {white, asian, black}, with its template.
: "${EVAL_PROMPTS:=data/eval_prompts.csv}"
: "${GENERIC_PROMPTS=data/eval_generic_prompts.csv}"   # no person: quality outside the trained domain; empty: none
# The original eval prompt; the backslashes keep the shell from ending ${...} at the first brace.
: "${EVAL_TEMPLATE:=best quality, a realistic photo of {person\} {activity\}}"
: "${ATTRIBUTES:=data/attributes.json}"                   # attribute labels: the class lists of the bias metrics
: "${IDENTITY_AXES:=gender,race}"
: "${IDENTITY_RESTRICT=race=white,asian,black}"         # empty: all values of every axis
: "${IMAGES_PER_PROMPT:=100}"                            # per identity-neutral and generic prompt (the original: 100)
: "${IMAGES_PER_IDENTITY_PROMPT:=${IMAGES_PER_PROMPT}}"  # per identity-specific prompt (the original: 100)
# Optional: draw identity-specific prompts in rounds and stop a prompt once its identity accuracy's 95% interval is
# this wide or narrower (e.g. 0.1; popalign.evaluate.precision, docs/cost.md). Rounds start at MIN_IMAGES_PER_IDENTITY_PROMPT
# and double up to IMAGES_PER_IDENTITY_PROMPT; every model gets the same counts. Empty: a fixed count.
: "${TARGET_INTERVAL_WIDTH:=}"
: "${MIN_IMAGES_PER_IDENTITY_PROMPT:=10}"
# Sampling (defaults = the original: 50 steps, guidance 5.0, 1024x1024).
: "${STEPS:=50}"
: "${GUIDANCE:=5.0}"
: "${WIDTH:=1024}"
: "${HEIGHT:=1024}"
: "${SCHEDULER:=default}"
: "${NEGATIVE_PROMPT:=}"
: "${PRECISION:=auto}"                # auto = fp16 on GPU, fp32 on CPU
: "${SEED:=0}"                        # the same base seed for every model, so images pair up
# Decoding VAE: a folder or hub id (AutoencoderKL) replacing the model's own; "" = the model's own. Recorded in
# generation_config.json (a folder drawn with another VAE is refused). SDXL's own VAE overflows in fp16 and is upcast
# to fp32 to decode; GENERATION_VAE=madebyollin/sdxl-vae-fp16-fix decodes in fp16 without the upcast, but is opt-in:
# that it draws the same populations as SDXL's own VAE has not been shown. Not 4_train.sh's VAE (the training's
# encoder, which RECIPE files set too).
: "${GENERATION_VAE:=}"
: "${BATCH_SIZE:=4}"
# Speed: how the pipeline runs, not what it draws (on or off; none changes the pixels beyond float rounding, and
# none is recorded in generation_config.json). Measured in BENCHMARKS.md (benchmarks/gpu_check.sh on a GPU).
: "${CHANNELS_LAST:=off}"              # U-Net and VAE in channels-last memory format (faster convolutions on tensor cores)
: "${VAE_SLICING:=off}"                # decode a batch one image at a time (less memory at large BATCH_SIZE)
: "${VAE_TILING:=off}"                 # decode in tiles (less memory at high resolution)
: "${COMPILE_UNET:=off}"               # torch.compile the U-Net: minutes to compile on every process, then faster steps
# Classification and quality.
: "${CLASSIFIER:=deepface}"            # deepface, clip (zero-shot), age_gender (offline weights; no race), toy
: "${DETECTOR:=yunet}"                 # DeepFace face detector (the original used yunet); fastmtcnn runs offline
: "${CLIP_MODEL:=openai/clip-vit-large-patch14}"         # for CLASSIFIER=clip
: "${SECOND_CLASSIFIER:=}"             # another backend labelling the same images (e.g. age_gender): the report adds
                                      # how the two agree per axis; empty: none
: "${CLASSIFY_BATCH_SIZE:=16}"
: "${SCORERS=hpsv2,pickscore,clip,aesthetic,imagereward}"    # empty (SCORERS=): no quality scoring
: "${SCORER_OPTIONS_JSON:=}"             # {scorer: {option: value}}: checkpoints, versions (see popalign.score)
: "${SCORE_BATCH_SIZE:=8}"
: "${NUM_RESAMPLES:=10000}"            # bootstrap resamples over prompts for the intervals (and random sign
                                      # patterns of the paired test beyond 16 prompts)
: "${CORRECT_FOR_CLASSIFIER:=0}"       # 1: the headline reads discrepancies of classifier-corrected shares
: "${UPDATE_MODEL_CARDS:=0}"            # 1: write the headline into each trained run's model card (README.md)
: "${OCCUPATION_SPLITS:=}"               # a prompt file with a split column: also one report per split
                                      # (report_<split>/, e.g. the occupations trained on vs held out)
# Processes: one per GPU. LAUNCH_ARGS may instead name an accelerate config (--config_file ...).
: "${NUM_PROCESSES:=1}"
: "${LAUNCH_ARGS:=--num_processes ${NUM_PROCESSES} --num_machines 1 --mixed_precision no --dynamo_backend no$([ "${NUM_PROCESSES}" -gt 1 ] && echo ' --multi_gpu')}"
: "${OUT_DIR:=outputs/eval}"

# The speed options as popalign.generate's flags; a value other than on or off stops here (exit 2).
speed_flags
# The sampling settings, the same for every model: only the weights differ.
generate_args=(
  --pretrained_model_name_or_path "$BASE_MODEL" --images_per_neutral_prompt "$IMAGES_PER_PROMPT" --images_per_identity_prompt "$IMAGES_PER_IDENTITY_PROMPT"
  --steps "$STEPS" --guidance "$GUIDANCE" --width "$WIDTH" --height "$HEIGHT" --scheduler "$SCHEDULER"
  --negative_prompt "$NEGATIVE_PROMPT" --precision "$PRECISION" --seed "$SEED" --pretrained_vae_model_name_or_path "$GENERATION_VAE" --batch_size "$BATCH_SIZE" "${speed_args[@]}"
)

classify_args=(--classifier "$CLASSIFIER" --detector "$DETECTOR" --clip_model "$CLIP_MODEL" --batch_size "$CLASSIFY_BATCH_SIZE")
second_classify_args=()
if [ -n "$SECOND_CLASSIFIER" ]; then
  if [ "$SECOND_CLASSIFIER" = "$CLASSIFIER" ]; then
    echo "error: SECOND_CLASSIFIER=$SECOND_CLASSIFIER: the same as CLASSIFIER" >&2
    exit 2
  fi
  second_classify_args=(--classifier "$SECOND_CLASSIFIER" --detector "$DETECTOR" --clip_model "$CLIP_MODEL" --batch_size "$CLASSIFY_BATCH_SIZE")
fi
score_args=(--scorers "$SCORERS" --batch_size "$SCORE_BATCH_SIZE")
[ -n "$SCORER_OPTIONS_JSON" ] && score_args+=(--options_json "$SCORER_OPTIONS_JSON")

# check_classify_score FOLDER: classification and scoring settings and FOLDER checked in one process (exit 2, nothing written).
check_classify_score() {
  python -m popalign.classify --output_dir "$1" "${classify_args[@]}" --validate_only
  if [ -n "$SCORERS" ]; then
    python -m popalign.score --output_dir "$1" "${score_args[@]}" --validate_only
  fi
}

# generate_classify FOLDER [weights and count flags...]: one model's images and labels.
generate_classify() {
  local folder="$1"
  shift
  # shellcheck disable=SC2086  # LAUNCH_ARGS is a list of flags
  accelerate launch --quiet $LAUNCH_ARGS -m popalign.generate "${generate_args[@]}" "$@" \
    --prompts_csv "$ALL_PROMPTS_CSV" --output_dir "$folder"
  check_classify_score "$folder"
  # shellcheck disable=SC2086
  accelerate launch --quiet $LAUNCH_ARGS -m popalign.classify --output_dir "$folder" "${classify_args[@]}"
}

# second_classify FOLDER: one model's labels from SECOND_CLASSIFIER (after the rounds: every image is drawn).
second_classify() {
  if [ -n "$SECOND_CLASSIFIER" ]; then
    # shellcheck disable=SC2086
    accelerate launch --quiet $LAUNCH_ARGS -m popalign.classify --output_dir "$1" "${second_classify_args[@]}"
  fi
}

# score FOLDER: one model's quality scores.
score() {
  if [ -n "$SCORERS" ]; then
    # shellcheck disable=SC2086
    accelerate launch --quiet $LAUNCH_ARGS -m popalign.score --output_dir "$1" "${score_args[@]}"
  fi
}

# Parse TUNED_MODELS before any work, so a typo fails in a second rather than after the base images.
tuned_names=()
tuned_kinds=()
tuned_dirs=()
for spec in $TUNED_MODELS; do
  name="${spec%%=*}"
  kind_and_dir="${spec#*=}"
  kind="${kind_and_dir%%:*}"
  weights="${kind_and_dir#*:}"
  if [ "$name" = "$spec" ] || [ "$kind" = "$kind_and_dir" ] || [ -z "$name" ] || [ -z "$weights" ]; then
    echo "error: TUNED_MODELS entry '$spec': expected NAME=unet:DIR, NAME=lora:DIR or NAME=best:RUN_DIR" >&2
    exit 2
  fi
  case "$kind" in
    unet|lora) ;;
    best)  # the run's best checkpoint: "unet PATH" or "lora PATH"
      best="$(python -m popalign.training.checkpoints best "$weights")" || exit 2
      kind="${best%% *}"
      weights="${best#* }" ;;
    *) echo "error: TUNED_MODELS entry '$spec': unknown kind '$kind' (unet, lora or best)" >&2; exit 2 ;;
  esac
  tuned_names+=("$name")
  tuned_kinds+=("$kind")
  tuned_dirs+=("$weights")
done

# The splits of OCCUPATION_SPLITS, read (and so checked) before any image is made.
splits=""
if [ -n "$OCCUPATION_SPLITS" ]; then
  splits="$(python -m popalign.prompts splits "$OCCUPATION_SPLITS")"
fi

# The prompt files are built in a scratch folder, checked with everything else below, and only then put in
# OUT_DIR/prompts: a bad setting leaves OUT_DIR as it was.
PROMPTS_CSV="$OUT_DIR/prompts/eval_prompts_diverse.csv"
ALL_PROMPTS_CSV="$OUT_DIR/prompts/eval_prompts_all.csv"
staged="$(mktemp -d)"
trap 'rm -rf "$staged"' EXIT
staged_prompts="$staged/$(basename "$PROMPTS_CSV")"
staged_all_prompts="$staged/$(basename "$ALL_PROMPTS_CSV")"
restrict_args=()
[ -n "$IDENTITY_RESTRICT" ] && restrict_args=(--restrict "$IDENTITY_RESTRICT")
python 1_generate_diverse_prompts.py --input "$EVAL_PROMPTS" --output "$staged_prompts" --attributes "$ATTRIBUTES" \
  --axes "$IDENTITY_AXES" "${restrict_args[@]}" --template "$EVAL_TEMPLATE"
# The generic prompts are already in step 1's output format (kind=generic): checked on their own, then their rows appended.
cp "$staged_prompts" "$staged_all_prompts"
if [ -n "$GENERIC_PROMPTS" ]; then
  if [ "$(head -n 1 "$GENERIC_PROMPTS" | tr -d '\r')" != "$(head -n 1 "$staged_prompts")" ]; then
    echo "error: $GENERIC_PROMPTS: header must be step 1's: $(head -n 1 "$staged_prompts")" >&2
    exit 2
  fi
  python -m popalign.prompts check "$GENERIC_PROMPTS"
  tail -n +2 "$GENERIC_PROMPTS" >> "$staged_all_prompts"
fi

# Each model's image folder; the same prompts, sampling settings, seeds and image counts for every model: only the
# weights differ.
folders=("$OUT_DIR/images/$BASE_NAME")
evaluate_args=(--base "$OUT_DIR/images/$BASE_NAME")
for name in "${tuned_names[@]}"; do
  folders+=("$OUT_DIR/images/$name")
  evaluate_args+=(--tuned "$name=$OUT_DIR/images/$name")
done
counts="$OUT_DIR/images/identity_image_counts.csv"   # with TARGET_INTERVAL_WIDTH: the counts of the last round planned
precision_args=()
for folder in "${folders[@]}"; do precision_args+=(--output_dir "$folder"); done
precision_args+=(--classifier "$CLASSIFIER" --attributes "$ATTRIBUTES" --target_interval_width "$TARGET_INTERVAL_WIDTH"
                 --max_images_per_prompt "$IMAGES_PER_IDENTITY_PROMPT" --counts_csv "$counts")

# Every model's generation, classification and scoring is checked (settings, weights folders, output folders)
# before any file is written; so are the rounds' settings.
[ -n "$TARGET_INTERVAL_WIDTH" ] && python -m popalign.evaluate.precision "${precision_args[@]}" --validate_only
python -m popalign.generate "${generate_args[@]}" --prompts_csv "$staged_all_prompts" \
  --output_dir "$OUT_DIR/images/$BASE_NAME" --validate_only
check_classify_score "$OUT_DIR/images/$BASE_NAME"
# The second classifier's settings (the same for every folder; each folder is checked again as it is labelled).
if [ -n "$SECOND_CLASSIFIER" ]; then
  python -m popalign.classify --output_dir "$OUT_DIR/images/$BASE_NAME" "${second_classify_args[@]}" --validate_only
fi
for index in "${!tuned_names[@]}"; do
  python -m popalign.generate "${generate_args[@]}" "--${tuned_kinds[$index]}" "${tuned_dirs[$index]}" \
    --prompts_csv "$staged_all_prompts" --output_dir "$OUT_DIR/images/${tuned_names[$index]}" --validate_only
  check_classify_score "$OUT_DIR/images/${tuned_names[$index]}"
done
mkdir -p "$(dirname "$PROMPTS_CSV")"
for file in "$PROMPTS_CSV" "$ALL_PROMPTS_CSV"; do
  cp "$staged/$(basename "$file")" "$file.tmp" && mv -f "$file.tmp" "$file"
done

# generate_classify_all [count flags...]: every model's images and labels.
generate_classify_all() {
  generate_classify "$OUT_DIR/images/$BASE_NAME" "$@"
  for index in "${!tuned_names[@]}"; do
    generate_classify "$OUT_DIR/images/${tuned_names[$index]}" "--${tuned_kinds[$index]}" "${tuned_dirs[$index]}" "$@"
  done
}
if [ -z "$TARGET_INTERVAL_WIDTH" ]; then
  generate_classify_all
else
  count_args=(--images_per_identity_prompt "$MIN_IMAGES_PER_IDENTITY_PROMPT")
  [ -f "$counts" ] && count_args+=(--images_per_prompt_csv "$counts")   # a re-run starts from the last round planned
  while :; do
    generate_classify_all "${count_args[@]}"
    more="$(python -m popalign.evaluate.precision "${precision_args[@]}")"
    echo "identity-specific prompts needing more images: $more"
    [ "$more" = 0 ] && break
    count_args=(--images_per_identity_prompt "$MIN_IMAGES_PER_IDENTITY_PROMPT" --images_per_prompt_csv "$counts")
  done
fi
for folder in "${folders[@]}"; do second_classify "$folder"; score "$folder"; done

scorer_args=()
[ -n "$SCORERS" ] && scorer_args=(--scorers "$SCORERS")
[ "$CORRECT_FOR_CLASSIFIER" = 1 ] && scorer_args+=(--correct_for_classifier)
[ -n "$SECOND_CLASSIFIER" ] && scorer_args+=(--second_classifier "$SECOND_CLASSIFIER")
card_args=()
[ "$UPDATE_MODEL_CARDS" = 1 ] && card_args=(--update_model_cards)
python -m popalign.evaluate "${evaluate_args[@]}" --base_name "$BASE_NAME" --classifier "$CLASSIFIER" "${scorer_args[@]}" \
  --attributes "$ATTRIBUTES" --num_resamples "$NUM_RESAMPLES" --output_dir "$OUT_DIR/report" "${card_args[@]}"
if [ -n "$OCCUPATION_SPLITS" ]; then
  for split in $splits; do
    python -m popalign.evaluate "${evaluate_args[@]}" --base_name "$BASE_NAME" --classifier "$CLASSIFIER" "${scorer_args[@]}" \
      --attributes "$ATTRIBUTES" --num_resamples "$NUM_RESAMPLES" --occupation_splits "$OCCUPATION_SPLITS" \
      --split "$split" --output_dir "$OUT_DIR/report_$split"
  done
fi
