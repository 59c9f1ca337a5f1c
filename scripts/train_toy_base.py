"""Stages of building the biased toy base model (scripts/train_toy_base.sh runs them in order).

    python scripts/train_toy_base.py data --prompts P.csv --out DIR        biased training pictures + train.csv
    python scripts/train_toy_base.py pipeline --out DIR                    untrained toy pipeline (trains the VAE)
    python scripts/train_toy_base.py assemble --untrained DIR --unet U --out M   pipeline with the trained U-Net
    python scripts/train_toy_base.py measure --model M --prompts P.csv     identity accuracy and neutral skew (exit 1
                                                                           when the base M fails a gate)
        [--unet U]   measure a fine-tuned U-Net folder (or a LoRA .safetensors file) in place of M's own
    python scripts/train_toy_base.py vae_check --model M                   per occupation, pictures M's VAE gives back right
    python scripts/train_toy_base.py check --model M                       exit 2 unless M was built for this world

--occupations / --attributes name the world (default data/toy/occupations.csv, data/toy/attributes.json). The data
and pipeline stages record what they built in DIR/build.json and, run again, keep what was built the same way and
refuse what was built otherwise (another world, seed, skew or VAE).
"""

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from popalign.io import InputError, atomic_write_json, exit_2_on_input_error, file_sha256
from popalign.toy.base import (assemble_pipeline, check_base_world, format_measurement, gate_failures, measure_toy_model,
                               vae_round_trip_accuracy)
from popalign.toy.dataset import build_biased_dataset
from popalign.toy.model import VAE_BACKGROUNDS, build_toy_pipeline
from popalign.toy.world import load_world


BUILD_RECORD_NAME = "build.json"


def already_built(out_dir: Path, build: dict, product: str) -> bool:
    """Whether `out_dir` holds a finished `product` (train.csv of the data stage, model_index.json of the pipeline
    stage) built as `build` says; InputError if it holds one built otherwise (or one without its record), which a rerun
    would silently reuse."""
    if not (out_dir / product).is_file():
        return False
    try:
        then = json.loads((out_dir / BUILD_RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        then = None
    now = json.loads(json.dumps(build))
    if then == now:
        return True
    changed = sorted(key for key in set(now) | set(then or {}) if (then or {}).get(key) != now.get(key))
    raise InputError(f"--out {out_dir}: holds a {product} built " + (f"with other settings ({', '.join(changed)})" if then is not None
                     else f"without its record ({BUILD_RECORD_NAME})") + "; use another folder (WORK_DIR in train_toy_base.sh)")


@exit_2_on_input_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["data", "pipeline", "assemble", "measure", "vae_check", "check"])
    parser.add_argument("--occupations", default=None, help="toy occupation CSV (default data/toy/occupations.csv)")
    parser.add_argument("--attributes", default=None, help="toy attribute file (default data/toy/attributes.json)")
    parser.add_argument("--prompts", help="step-1 prompts CSV over the toy occupations")
    parser.add_argument("--out", help="output folder (data, pipeline, assemble) or JSON file (measure)")
    parser.add_argument("--images_per_neutral_prompt", type=int, default=600)
    parser.add_argument("--images_per_identity_prompt", type=int, default=100)
    parser.add_argument("--gender_majority", type=float, default=0.85, help="share of the majority gender in neutral-prompt pictures")
    parser.add_argument("--race_majority", type=float, default=0.8, help="share of the majority race in neutral-prompt pictures")
    parser.add_argument("--vae_steps", type=int, default=600)
    parser.add_argument("--vae_background", default="halves", choices=VAE_BACKGROUNDS,
                        help="pipeline: the VAE's figure pixels are those far from their own half's border median colour (halves: "
                        "a two-tone world's backgrounds) or from the whole border's (border, as models/toy_base_36); the same in a "
                        "world of one-colour backgrounds")
    parser.add_argument("--untrained", help="untrained toy pipeline folder (assemble)")
    parser.add_argument("--unet", default="", help="trained U-Net folder (assemble); measure: a fine-tuned U-Net folder or LoRA "
                        ".safetensors file to measure in place of the model's own")
    parser.add_argument("--model", help="toy pipeline to measure")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pictures_per_identity", type=int, default=5, help="vae_check: pictures per occupation x gender x race")
    args = parser.parse_args(argv)
    for flag in ("gender_majority", "race_majority"):
        if not 0.5 < getattr(args, flag) <= 1.0:  # a majority; the skew gate asks the base to keep it above 1/2
            raise InputError(f"--{flag} {getattr(args, flag)}: the share of a majority, above 0.5 and at most 1")
    world = load_world(args.occupations, args.attributes)
    if args.stage == "data":
        build = {"world": world.record(), "prompts_sha256": file_sha256(Path(args.prompts)),
                 **{name: getattr(args, name) for name in ("images_per_neutral_prompt", "images_per_identity_prompt",
                                                           "gender_majority", "race_majority", "seed")}}
        if already_built(Path(args.out), build, "train.csv"):
            print(f"{args.out}/train.csv: already built with these settings")
            return 0
        prompts = pd.read_csv(args.prompts, dtype=str, keep_default_na=False)
        atomic_write_json(Path(args.out) / BUILD_RECORD_NAME, build)  # first: a build killed before train.csv is rebuilt
        frame = build_biased_dataset(world, prompts, args.out, args.images_per_neutral_prompt, args.images_per_identity_prompt,
                                     args.gender_majority, args.race_majority, args.seed)
        print(f"wrote {len(frame)} pictures and {args.out}/train.csv")
    elif args.stage == "check":
        if not args.model:
            raise InputError("--model: the toy base to check")
        record = check_base_world(args.model, world, args.occupations or "data/toy/occupations.csv", args.attributes)
        print(f"{args.model}: built for this world ({record.name})" if record else f"{args.model}: no record of its world, not checked")
    elif args.stage == "pipeline":
        build = {"world": world.record(), "vae_steps": args.vae_steps, "vae_background": args.vae_background, "seed": args.seed}
        if already_built(Path(args.out), build, "model_index.json"):
            print(f"{args.out}: untrained pipeline already built with these settings")
            return 0
        atomic_write_json(Path(args.out) / BUILD_RECORD_NAME, build)  # first: a build killed before model_index.json is rebuilt
        print(f"saved {build_toy_pipeline(args.out, world, args.vae_steps, args.seed, args.vae_background)}")
    elif args.stage == "assemble":
        print(f"saved {assemble_pipeline(args.untrained, args.unet, args.out, world)}")
    elif args.stage == "vae_check":
        if not args.model or not (Path(args.model) / "vae").is_dir():
            raise InputError(f"--model {args.model or '(missing)'}: no toy pipeline folder with a vae/ folder")
        if args.pictures_per_identity < 1:
            raise InputError(f"--pictures_per_identity must be >= 1 (got {args.pictures_per_identity})")
        from diffusers import AutoencoderKL

        accuracy = vae_round_trip_accuracy(AutoencoderKL.from_pretrained(args.model, subfolder="vae").eval(), world,
                                           args.pictures_per_identity, args.seed)
        for occupation, share in sorted(accuracy.items(), key=lambda item: item[1]):
            print(f"{occupation}: {share:.0%} of {args.pictures_per_identity * len(world.genders) * len(world.races)} pictures "
                  f"given back right (background {world.background_codes[world.occupations.index(occupation)]})")
        if args.out:
            atomic_write_json(args.out, accuracy)
    else:
        import torch

        from popalign.pipelines import load_text_to_image_pipeline

        if args.unet and not Path(args.unet).exists():
            raise InputError(f"--unet {args.unet}: no such U-Net folder or LoRA file")
        lora = args.unet.endswith(".safetensors")
        pipeline = load_text_to_image_pipeline(args.model, torch.float32, torch.device("cpu"),
                                               unet_path=None if lora else args.unet or None,
                                               lora_path=args.unet if lora else None)
        prompts = pd.read_csv(args.prompts, dtype=str, keep_default_na=False)
        measurement = measure_toy_model(pipeline, world, prompts, args.images_per_identity_prompt, args.images_per_neutral_prompt,
                                        args.steps, args.guidance, args.seed, gender_majority=args.gender_majority,
                                        race_majority=args.race_majority)
        measurement["world"] = world.record()
        failures = None if args.unet else gate_failures(measurement)
        print(format_measurement(measurement, failures))
        if args.out:
            atomic_write_json(args.out, measurement)
        if failures:
            return 1  # a base below its gates: train_toy_base.sh ends with exit 1 (the base is already in --model, its
            # gates.json beside it); a fine-tuned U-Net is meant to lose the skew, so measuring one exits 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
