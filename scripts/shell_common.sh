# What the stage scripts (2_generate_images.sh, 4_train.sh, eval.sh) share besides their variables; each sources this
# file from the repository root.

# RECIPE=FILE (relative to the repository root): a file of `: "${NAME:=value}"` lines read before a script's defaults,
# so a whole configuration travels as one file (configs/toy_recipe.sh); the environment still wins.
load_recipe() {
  if [ -n "${RECIPE:-}" ]; then
    [ -f "$RECIPE" ] || { echo "error: RECIPE=$RECIPE: file not found" >&2; exit 2; }
    # shellcheck source=/dev/null
    source "$RECIPE"
  fi
}

# The generation speed options (CHANNELS_LAST, VAE_SLICING, VAE_TILING, COMPILE_UNET, each on or off) as
# popalign.generate's flags, in the array speed_args; another value stops the script here (exit 2).
speed_flags() {
  speed_args=()
  local option variable
  for option in CHANNELS_LAST:--channels_last VAE_SLICING:--vae_slicing VAE_TILING:--vae_tiling COMPILE_UNET:--compile_unet; do
    variable="${option%%:*}"
    case "${!variable}" in
      on) speed_args+=("${option#*:}") ;;
      off) ;;
      *) echo "error: $variable=${!variable}: expected on or off" >&2; exit 2 ;;
    esac
  done
}
