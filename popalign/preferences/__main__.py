"""Step 3: pair diverse and base image populations into preference pairs captioned with the neutral prompt.

    python 3_generate_preferences.py (= python -m popalign.preferences) --image_dirs outputs/images/train --classifier deepface \
        --output outputs/preferences/pairs.csv --num_iterations 20000 --population_size 5 --seed 0
writes the pairs CSV (paths relative to its folder) and <output stem>.summary.json next to it.
"""

import argparse
import sys

from popalign.attributes import DEFAULT_ATTRIBUTES_PATH, load_attributes
from popalign.distributed import global_rank
from popalign.io import ArgumentParser, check_output_location, exit_2_on_input_error, parse_seed
from popalign.preferences import DIVERSE_DRAWS, generate_preferences, summary_path_for


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--image_dirs", nargs="+", default=["outputs/images/train"],
                        help="step-2 image folders (each with manifest.csv and labels_<classifier>.csv)")
    parser.add_argument("--classifier", default="deepface", help="which labels_<classifier>.csv decides the diversity statistic")
    parser.add_argument("--output", default="outputs/preferences/pairs.csv")
    parser.add_argument("--num_iterations", type=int, default=20000, help="draws; each emits population_size pairs (the original: 20000)")
    parser.add_argument("--population_size", type=int, default=5, help="images drawn per side per iteration (the original: 5)")
    parser.add_argument("--seed", type=parse_seed, default=0, help="seed of the draws (0 <= seed < 2**32)")
    parser.add_argument("--keep_no_face", action="store_true",
                        help="keep images where no face was detected (default: excluded, as in the original)")
    parser.add_argument("--require_attribute_match", action="store_true",
                        help="keep only identity-prompted images whose classified attributes equal the prompted ones")
    parser.add_argument("--diverse_draw", choices=DIVERSE_DRAWS, default="per_identity_prompt",
                        help="per_identity_prompt: each diverse image from an identity-specific prompt picked uniformly, so "
                             "every identity is drawn equally often after filtering; per_image: uniformly over the kept "
                             "images (the original)")
    parser.add_argument("--attributes", default=str(DEFAULT_ATTRIBUTES_PATH), help="attribute definition JSON")
    return parser


@exit_2_on_input_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_output_location(args.output, "--output")
    check_output_location(summary_path_for(args.output), "--output")
    if global_rank() != 0:
        return 0  # under a multi-process launch the pairing (one seed, one draw) is made once, by the global main process
    summary = generate_preferences(
        args.image_dirs, args.classifier, args.output, load_attributes(args.attributes),
        num_iterations=args.num_iterations, population_size=args.population_size, seed=args.seed,
        keep_no_face=args.keep_no_face, require_attribute_match=args.require_attribute_match,
        diverse_draw=args.diverse_draw)
    excluded = summary["images_excluded_no_face"]
    print(f"wrote {args.output}: {summary['num_pairs']} pairs over {summary['neutral_prompts_used']} neutral prompts "
          f"({summary['iterations_won_by_base']} of {summary['num_iterations']} draws won by the base population)")
    print(f"images: {summary['images_total']}; excluded without a face: {excluded['diverse']} diverse, {excluded['base']} base; "
          f"excluded for attribute mismatch: {summary['images_excluded_attribute_mismatch']}")
    for skipped in summary["skipped_neutral_prompts"]:
        print(f"skipped (a side has no images): {skipped['neutral_prompt']!r} "
              f"diverse={skipped['diverse_images']} base={skipped['base_images']}")
    print(f"summary: {summary_path_for(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
