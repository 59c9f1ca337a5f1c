# The toy world's settings for the numbered scripts: `RECIPE=configs/toy_recipe.sh bash 2_generate_images.sh`
# (demo.sh does this for every step). Each line only fills a variable the environment left unset, and the
# scripts' own defaults (the SDXL recipe) fill the rest.

# The shipped toy base: 32x32 pictures, DDIM (its own scheduler), fp32 on CPU, 2 processes of one thread.
: "${MODEL:=models/toy_base}"
: "${BASE_MODEL:=models/toy_base}"
: "${STEPS:=20}"
: "${WIDTH:=32}"
: "${HEIGHT:=32}"
: "${PRECISION:=fp32}"
: "${SCHEDULER:=default}"
: "${BATCH_SIZE:=50}"
: "${NUM_PROCESSES:=2}"
# Identity is read back from pixels by the toy classifier; quality by the toy score.
: "${CLASSIFIER:=toy}"
: "${CLASSIFY_BATCH_SIZE:=100}"
: "${SCORERS=toy}"
# Training on CPU: full precision, no 8-bit Adam, no VAE swap, no checkpoints or tracker for a 10-minute run.
: "${VAE=}"
: "${RESOLUTION:=32}"
: "${MIXED_PRECISION:=no}"
: "${GRADIENT_CHECKPOINTING:=off}"
: "${USE_8BIT_ADAM:=off}"
: "${CHECKPOINTING_STEPS:=0}"
: "${REPORT_TO:=none}"
# The toy world's attribute file, prompts and evaluation template.
: "${ATTRIBUTES:=data/toy/attributes.json}"
: "${EVAL_PROMPTS:=data/toy/occupations.csv}"
: "${GENERIC_PROMPTS:=data/toy/generic_prompts.csv}"   # header only: the toy world has no scene without a figure
: "${EVAL_TEMPLATE:=a photo of {person\} {activity\}}"
: "${NUM_RESAMPLES:=2000}"
