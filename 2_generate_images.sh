#!/usr/bin/env bash
# Step 2: generate images for the step-1 prompts, then classify every image (face found?, gender, race).
# Edit the variables below, or override any of them from the environment:
#   NUM_PROCESSES=8 bash 2_generate_images.sh
# Images, manifest.csv and labels_<classifier>.csv land in OUT_DIR (schema: docs/data_formats.md).
# Re-running resumes: finished images and labels are skipped.
set -euo pipefail
cd "$(dirname "$0")"

# RECIPE=FILE (relative to the repository root): a file of `: "${NAME:=value}"` lines read before the defaults
# below, so a whole configuration travels as one file (configs/toy_recipe.sh); the environment still wins.
source scripts/shell_common.sh
load_recipe

# Model and sampling (defaults = the original PopAlign setup: SDXL base, 50 steps, guidance 5.0, 1024x1024).
: "${MODEL:=stabilityai/stable-diffusion-xl-base-1.0}"
: "${SCHEDULER:=default}"             # default keeps the checkpoint's scheduler; or euler, ddim, dpmsolver++, ...
: "${STEPS:=50}"
: "${GUIDANCE:=5.0}"
: "${WIDTH:=1024}"
: "${HEIGHT:=1024}"
: "${NEGATIVE_PROMPT:=}"
: "${PRECISION:=auto}"                # auto = fp16 on GPU (VAE upcast for decoding), fp32 on CPU
: "${SEED:=0}"                        # base seed; each image's seed = f(SEED, prompt, image index)
# Decoding VAE: a folder or hub id (AutoencoderKL) replacing the model's own; "" = the model's own. Recorded in
# generation_config.json (a folder drawn with another VAE is refused). SDXL's own VAE overflows in fp16 and is upcast
# to fp32 to decode; GENERATION_VAE=madebyollin/sdxl-vae-fp16-fix decodes in fp16 without the upcast, but is opt-in:
# that it draws the same populations as SDXL's own VAE has not been shown. Not 4_train.sh's VAE (the training's
# encoder, which RECIPE files set too).
: "${GENERATION_VAE:=}"
# Data.
: "${PROMPTS_CSV:=outputs/prompts/training_prompts_diverse.csv}"   # written by 1_generate_diverse_prompts.py
: "${OUT_DIR:=outputs/images/train}"
: "${IMAGES_PER_NEUTRAL_PROMPT:=100}"  # the biased "base" population of each neutral prompt
: "${IMAGES_PER_IDENTITY_PROMPT:=10}"  # the diverse population: 10 per identity-specific prompt
: "${BATCH_SIZE:=4}"                   # images per forward pass on each process
# Speed: how the pipeline runs, not what it draws (on or off; none changes the pixels beyond float rounding, and
# none is recorded in generation_config.json). Measured in BENCHMARKS.md (benchmarks/gpu_check.sh on a GPU).
: "${CHANNELS_LAST:=off}"              # U-Net and VAE in channels-last memory format (faster convolutions on tensor cores)
: "${VAE_SLICING:=off}"                # decode a batch one image at a time (less memory at large BATCH_SIZE)
: "${VAE_TILING:=off}"                 # decode in tiles (less memory at high resolution)
: "${COMPILE_UNET:=off}"               # torch.compile the U-Net: minutes to compile on every process, then faster steps
# Classification.
: "${CLASSIFIER:=deepface}"            # deepface, clip (zero-shot), toy
: "${DETECTOR:=yunet}"                 # DeepFace face detector (the original used yunet); fastmtcnn runs offline
: "${CLASSIFY_BATCH_SIZE:=16}"
# Processes: one per GPU. LAUNCH_ARGS may instead name an accelerate config (--config_file ...).
: "${NUM_PROCESSES:=1}"
: "${LAUNCH_ARGS:=--num_processes ${NUM_PROCESSES} --num_machines 1 --mixed_precision no --dynamo_backend no$([ "${NUM_PROCESSES}" -gt 1 ] && echo ' --multi_gpu')}"

# The speed options as popalign.generate's flags; a value other than on or off stops here (exit 2).
speed_flags
generate_args=(
  --pretrained_model_name_or_path "$MODEL" --scheduler "$SCHEDULER" --steps "$STEPS" --guidance "$GUIDANCE"
  --width "$WIDTH" --height "$HEIGHT" --negative_prompt "$NEGATIVE_PROMPT" --precision "$PRECISION" --seed "$SEED"
  --pretrained_vae_model_name_or_path "$GENERATION_VAE"
  --prompts_csv "$PROMPTS_CSV" --output_dir "$OUT_DIR"
  --images_per_neutral_prompt "$IMAGES_PER_NEUTRAL_PROMPT" --images_per_identity_prompt "$IMAGES_PER_IDENTITY_PROMPT"
  --batch_size "$BATCH_SIZE" "${speed_args[@]}"
)
classify_args=(--output_dir "$OUT_DIR" --classifier "$CLASSIFIER" --detector "$DETECTOR" --batch_size "$CLASSIFY_BATCH_SIZE")
# Both stages checked first in one process: a bad setting or file is one line and exit code 2, and nothing is written.
python -m popalign.generate "${generate_args[@]}" --validate_only
python -m popalign.classify "${classify_args[@]}" --validate_only
# shellcheck disable=SC2086  # LAUNCH_ARGS is a list of flags
accelerate launch --quiet $LAUNCH_ARGS -m popalign.generate "${generate_args[@]}"

# The folder now has its manifest: checked again, then classified.
python -m popalign.classify "${classify_args[@]}" --validate_only
# shellcheck disable=SC2086
accelerate launch --quiet $LAUNCH_ARGS -m popalign.classify "${classify_args[@]}"
