#!/usr/bin/env bash
# Step 4: fine-tune the SDXL U-Net on the preference pairs of step 3 with the PopAlign loss.
# Every setting below can be overridden from the environment, e.g.
#   LOSS=dpo MAX_TRAIN_STEPS=1000 ./4_train.sh
#   NUM_PROCESSES=8 ./4_train.sh                       (the original: 8 GPUs x 1 pair)
#   LAUNCH_ARGS="--config_file configs/accelerate/deepspeed_zero2.yaml" ./4_train.sh
# Defaults are those of the original PopAlign SDXL run.
set -euo pipefail
cd "$(dirname "$0")"

# RECIPE=FILE (relative to the repository root): a file of `: "${NAME:=value}"` lines read before the defaults
# below, so a whole configuration travels as one file (configs/toy_recipe.sh); the environment still wins.
source scripts/shell_common.sh
load_recipe

# --- data and model ---
: "${PAIRS_FILE:=outputs/preferences/pairs.csv}"          # written by 3_generate_preferences.py
: "${OUTPUT_DIR:=runs/popalign-sdxl}"
: "${MODEL:=stabilityai/stable-diffusion-xl-base-1.0}"
: "${VAE=auto}"                                           # encodes the training images; auto = SDXL's fp16-fixed VAE for an SDXL base, the base model's own otherwise; "" = the base model's own
: "${RESOLUTION:=1024}"
: "${CACHE_DIR=}"                                         # "" = <pairs folder>/encoding_cache (shared by runs)

# --- objective ---
: "${LOSS:=popalign}"                                     # popalign | dpo | sft | sudo
: "${BETA:=5000}"
: "${POPALIGN_ALPHA:=0.5}"                                # weight of the winners' mean in the pooled anchor
: "${POPALIGN_ANCHOR:=pooled}"                            # pooled (the original) | per_pair (the ablation) | none
: "${LAMBDA_WINNER:=1.0}"
: "${LAMBDA_LOSER:=1.0}"
: "${MIN_TIMESTEP:=0}"                                     # training timesteps t ~ U{MIN_TIMESTEP..MAX_TIMESTEP}
: "${MAX_TIMESTEP:=-1}"                                    # -1 = the scheduler's last timestep
: "${TIMESTEP_SHARING:=pair}"                             # pair: each pair draws its own t (the original); batch: one t per global batch
# The original replaces a pair's caption by the empty prompt 20% of the time, without saying so.
# It is kept as the default here, in plain sight; set 0 to train on every caption.
: "${CAPTION_DROPOUT:=0.2}"
# --- what trains ---
: "${LORA_RANK:=0}"                                       # 0 = full U-Net fine-tuning (the original); e.g. 8 for LoRA
: "${TRAIN_TEXT_ENCODER:=off}"                            # on: LoRA of rank LORA_RANK on the text encoder(s) too (needs LORA_RANK > 0)
: "${TEXT_ENCODER_LR:=5e-6}"                              # the text encoders' learning rate
: "${TRAIN_UNET:=on}"                                     # off (with TRAIN_TEXT_ENCODER=on): the text encoder(s) alone, the U-Net frozen
# Prior preservation (not in the original): also denoise each winner under its own identity-specific prompt
# (the pairs' winner_prompt column) with this weight, so that identity-specific prompts keep drawing what they name.
: "${PRIOR_PRESERVATION_WEIGHT:=0}"
# What that term denoises towards: noise (the denoising target: fit the winners under their prompts) or
# reference (the frozen reference U-Net's prediction: keep the base model's identity-specific behaviour).
: "${PRIOR_PRESERVATION_TARGET:=noise}"

# --- optimisation ---
: "${LEARNING_RATE:=5e-7}"
: "${LR_SCHEDULER:=constant}"                             # constant | cosine | linear, each after a linear warmup
: "${LR_WARMUP_STEPS:=200}"
: "${MAX_TRAIN_STEPS:=750}"
: "${TRAIN_BATCH_SIZE:=1}"                                # pairs per process per micro-step
: "${GRADIENT_ACCUMULATION_STEPS:=1}"
: "${MAX_GRAD_NORM:=1.0}"
: "${MIXED_PRECISION:=bf16}"                              # no | fp16 | bf16; the frozen reference U-Net is kept in it
: "${GRADIENT_CHECKPOINTING:=on}"
: "${USE_8BIT_ADAM:=on}"                                  # needs CUDA + bitsandbytes (refused without); off = torch AdamW, ~15 GB more on SDXL
: "${USE_EMA:=off}"                                       # on: <OUTPUT_DIR>/unet holds an EMA of the weights (unet_raw the raw ones)
: "${EMA_DECAY:=0.9999}"
: "${SEED:=0}"

# --- checkpoints and logging ---
: "${CHECKPOINTING_STEPS:=250}"
: "${CHECKPOINTS_TOTAL_LIMIT:=0}"                         # 0 = keep every checkpoint
: "${RESUME_FROM_CHECKPOINT:=latest}"                     # "latest" starts fresh when there is none
: "${REPORT_TO:=tensorboard}"                             # tensorboard | wandb | none

# --- population metrics during training (off unless VALIDATION_PROMPTS_FILE is set): a step-1 prompts file of
# occupations kept out of training, drawn at step 0, every VALIDATION_STEPS and the last step; validation.jsonl, grids, and the best
# checkpoint in finished.json (eval.sh: TUNED_MODELS="popalign=best:OUTPUT_DIR")
: "${VALIDATION_PROMPTS_FILE:=}"
: "${VALIDATION_STEPS:=250}"                              # a multiple of CHECKPOINTING_STEPS: each validated step can be kept
: "${NUM_VALIDATION_IMAGES:=16}"                          # per neutral validation prompt
: "${NUM_VALIDATION_IDENTITY_IMAGES:=4}"                  # per identity-specific validation prompt
: "${VALIDATION_SEED:=0}"
: "${VALIDATION_CLASSIFIER:=deepface}"                    # deepface | clip | toy, as step 2
: "${VALIDATION_SCORER=clip}"                             # quality proxy ("" = none)
: "${VALIDATION_ATTRIBUTES:=data/attributes.json}"        # the attribute file of the validation prompts
: "${VALIDATION_NUM_INFERENCE_STEPS:=25}"
: "${VALIDATION_GUIDANCE_SCALE:=5.0}"
: "${BEST_CHECKPOINT_ACCURACY_MARGIN:=0.02}"              # the best checkpoint keeps identity accuracy within this of step 0's
: "${BEST_CHECKPOINT_QUALITY_MARGIN:=0.05}"               # ... and quality within this share of step 0's

# --- processes: one per GPU. The original ran 8 processes x 1 pair; on fewer GPUs keep the
# effective batch with TRAIN_BATCH_SIZE or GRADIENT_ACCUMULATION_STEPS. LAUNCH_ARGS may instead name
# an accelerate config (--config_file configs/accelerate/deepspeed_zero2.yaml or fsdp.yaml: GPU only, never run;
# FSDP=on is the sharded path that is tested, on 2 CPU processes).
: "${NUM_PROCESSES:=1}"
: "${FSDP:=off}"                                          # on: the U-Net's weights, gradients and AdamW state sharded over the
                                                          # NUM_PROCESSES processes (torch FSDP2; full fine-tuning, USE_8BIT_ADAM=off)
: "${LAUNCH_ARGS:=--num_processes ${NUM_PROCESSES} --num_machines 1 --mixed_precision ${MIXED_PRECISION} --dynamo_backend no$([ "${NUM_PROCESSES}" -gt 1 ] && echo ' --multi_gpu')}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"            # one CPU thread per process

# Effective batch size = pairs per process x processes x gradient accumulation steps. The PopAlign
# anchor is pooled over pairs per process x processes, so this is a real hyperparameter.
echo "effective batch size: ${TRAIN_BATCH_SIZE} pairs/process x ${NUM_PROCESSES} processes x ${GRADIENT_ACCUMULATION_STEPS} accumulation steps = $((TRAIN_BATCH_SIZE * NUM_PROCESSES * GRADIENT_ACCUMULATION_STEPS)) pairs per optimizer step"

train_args=(
  --pairs_file "$PAIRS_FILE" --output_dir "$OUTPUT_DIR" --pretrained_model_name_or_path "$MODEL" --pretrained_vae_model_name_or_path "$VAE"
  --resolution "$RESOLUTION" --cache_dir "$CACHE_DIR"
  --loss "$LOSS" --beta "$BETA" --popalign_alpha "$POPALIGN_ALPHA" --popalign_anchor "$POPALIGN_ANCHOR"
  --lambda_winner "$LAMBDA_WINNER" --lambda_loser "$LAMBDA_LOSER" --timestep_sharing "$TIMESTEP_SHARING"
  --min_timestep "$MIN_TIMESTEP" --max_timestep "$MAX_TIMESTEP"
  --caption_dropout "$CAPTION_DROPOUT" --prior_preservation_weight "$PRIOR_PRESERVATION_WEIGHT"
  --prior_preservation_target "$PRIOR_PRESERVATION_TARGET"
  --learning_rate "$LEARNING_RATE" --lr_scheduler "$LR_SCHEDULER" --lr_warmup_steps "$LR_WARMUP_STEPS"
  --max_train_steps "$MAX_TRAIN_STEPS" --train_batch_size "$TRAIN_BATCH_SIZE"
  --gradient_accumulation_steps "$GRADIENT_ACCUMULATION_STEPS" --max_grad_norm "$MAX_GRAD_NORM"
  --mixed_precision "$MIXED_PRECISION" --gradient_checkpointing "$GRADIENT_CHECKPOINTING"
  --use_8bit_adam "$USE_8BIT_ADAM" --fsdp "$FSDP" --use_ema "$USE_EMA" --ema_decay "$EMA_DECAY" --rank "$LORA_RANK" --seed "$SEED"
  --train_text_encoder "$TRAIN_TEXT_ENCODER" --text_encoder_lr "$TEXT_ENCODER_LR" --train_unet "$TRAIN_UNET"
  --validation_prompts_file "$VALIDATION_PROMPTS_FILE" --validation_steps "$VALIDATION_STEPS"
  --num_validation_images "$NUM_VALIDATION_IMAGES" --num_validation_identity_images "$NUM_VALIDATION_IDENTITY_IMAGES"
  --validation_seed "$VALIDATION_SEED" --validation_classifier "$VALIDATION_CLASSIFIER" --validation_scorer "$VALIDATION_SCORER"
  --validation_attributes "$VALIDATION_ATTRIBUTES"
  --validation_num_inference_steps "$VALIDATION_NUM_INFERENCE_STEPS" --validation_guidance_scale "$VALIDATION_GUIDANCE_SCALE"
  --best_checkpoint_accuracy_margin "$BEST_CHECKPOINT_ACCURACY_MARGIN" --best_checkpoint_quality_margin "$BEST_CHECKPOINT_QUALITY_MARGIN"
  --checkpointing_steps "$CHECKPOINTING_STEPS" --checkpoints_total_limit "$CHECKPOINTS_TOTAL_LIMIT"
  --resume_from_checkpoint "$RESUME_FROM_CHECKPOINT" --report_to "$REPORT_TO"
)
# Every flag, the pairs file, the model folder and the checkpoint are checked first, in one process: a bad
# input is one line and exit code 2, and nothing in OUTPUT_DIR is touched.
python train_popalign.py "${train_args[@]}" --validate_only
# shellcheck disable=SC2086  # LAUNCH_ARGS is a list of flags
accelerate launch --quiet $LAUNCH_ARGS train_popalign.py "${train_args[@]}"
