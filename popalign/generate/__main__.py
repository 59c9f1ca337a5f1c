"""Step 2a: generate images for a prompts CSV (run under `accelerate launch`; see 2_generate_images.sh).

Writes OUT_DIR/images/<prompt_id>/<index>.png, OUT_DIR/manifest.csv and OUT_DIR/generation_config.json
(docs/data_formats.md). Re-running generates only the missing images.
"""

import argparse
import sys

from popalign.generate import GenerationSettings, generate_images
from popalign.image_folder import PROMPT_KINDS
from popalign.pipelines import SpeedOptions
from popalign.io import ArgumentParser, InputError, exit_2_on_input_error, parse_seed


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--pretrained_model_name_or_path", "--model", dest="model", default="stabilityai/stable-diffusion-xl-base-1.0", help="hub id or local pipeline folder")
    parser.add_argument("--unet", default="", help="fine-tuned U-Net folder (diffusers format) replacing the model's")
    parser.add_argument("--lora", default="", help="LoRA weights folder loaded with pipeline.load_lora_weights, then fused into "
                        "the weights it adapts (no LoRA layers left at inference; the same images up to float rounding)")
    parser.add_argument("--pretrained_vae_model_name_or_path", "--vae", dest="vae", default="",
                        help="VAE folder or hub id (AutoencoderKL) replacing the model's own; '' (default) = the model's own. "
                             "Recorded in generation_config.json. SDXL's own VAE is upcast to fp32 to decode in fp16; "
                             "madebyollin/sdxl-vae-fp16-fix decodes in fp16 without the upcast, but is opt-in: that it draws the same "
                             "populations as SDXL's own VAE is not verified")
    parser.add_argument("--prompts_csv", required=True, help="step-1 prompts file")
    parser.add_argument("--output_dir", "--out_dir", dest="out_dir", required=True, help="the image folder (docs/data_formats.md)")
    parser.add_argument("--kinds", default=",".join(PROMPT_KINDS), help="prompt kinds to generate (neutral,identity,generic)")
    parser.add_argument("--images_per_neutral_prompt", type=int, default=100, help="also used for generic prompts")
    parser.add_argument("--images_per_identity_prompt", type=int, default=10)
    parser.add_argument("--images_per_prompt_csv", default="",
                        help="prompt_id,images: counts of the prompts it lists (popalign.evaluate.precision's rounds; the others keep the above)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale; every value <= 1 means none and is recorded as 1.0")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--scheduler", default="default", help="default (the checkpoint's), euler, euler_ancestral, ddim, dpmsolver++, unipc, pndm, ddpm")
    parser.add_argument("--negative_prompt", default="")
    parser.add_argument("--precision", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    parser.add_argument("--seed", type=parse_seed, default=0, help="base seed (0 <= seed < 2**32); image seed = f(seed, prompt, image index)")
    parser.add_argument("--batch_size", type=int, default=4, help="images per forward pass on each process")
    speed = parser.add_argument_group("speed (how the pipeline runs, not what it draws; docs/cost.md)")
    speed.add_argument("--channels_last", action="store_true", help="U-Net and VAE in channels-last memory format")
    speed.add_argument("--vae_slicing", action="store_true", help="decode a batch one image at a time (less memory)")
    speed.add_argument("--vae_tiling", action="store_true", help="decode in tiles (less memory at high resolution)")
    speed.add_argument("--compile_unet", action="store_true", help="torch.compile the U-Net (slow to start, faster steps)")
    parser.add_argument("--validate_only", action="store_true",
                        help="check flags, prompts file and output folder, write nothing, exit (2: what is wrong)")
    return parser


@exit_2_on_input_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = GenerationSettings(model=args.model, unet=args.unet, lora=args.lora, vae=args.vae, scheduler=args.scheduler,
                                  steps=args.steps, guidance=args.guidance, width=args.width, height=args.height,
                                  negative_prompt=args.negative_prompt, precision=args.precision, seed=args.seed)
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in PROMPT_KINDS]
    if unknown:
        raise InputError(f"--kinds: unknown kind(s) {', '.join(unknown)} (known: {', '.join(PROMPT_KINDS)})")
    images_per_prompt = None
    if args.images_per_prompt_csv:
        from popalign.evaluate.precision import read_image_counts

        images_per_prompt = read_image_counts(args.images_per_prompt_csv)
    generate_images(args.prompts_csv, args.out_dir, settings, args.images_per_neutral_prompt,
                    args.images_per_identity_prompt, args.batch_size, kinds, validate_only=args.validate_only,
                    images_per_prompt=images_per_prompt,
                    speed=SpeedOptions(channels_last=args.channels_last, vae_slicing=args.vae_slicing,
                                       vae_tiling=args.vae_tiling, compile_unet=args.compile_unet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
