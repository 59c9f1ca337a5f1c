"""Score the images of a generated folder with image-quality scorers.

    accelerate launch -m popalign.score --output_dir outputs/eval/base/neutral \
        --scorers hpsv2,pickscore,clip,aesthetic,imagereward --batch_size 8

Writes <out_dir>/quality_<scorer>.csv (image_path, prompt, score, scorer, scorer_description)
per scorer; a re-run resumes. Checkpoints default to the published ones; override them with
--option SCORER.KEY=VALUE (e.g. --option hpsv2.version=v2.0, --option aesthetic.weights=FILE)
or a JSON file {scorer: {key: value}} given to --options_json.
"""

import argparse
import json
import sys
from pathlib import Path

from popalign.image_folder import manifest_path, quality_path
from popalign.io import ArgumentParser, InputError, check_output_location, exit_2_on_input_error
from popalign.score import SCORERS


def parse_scorer_options(assignments: list[str], options_json: str | None) -> dict[str, dict]:
    """{scorer: {key: value}} from a JSON file, then NAME.KEY=VALUE assignments (string values)."""
    options: dict[str, dict] = {}
    if options_json:
        try:
            with open(options_json, encoding="utf-8") as stream:
                options = json.load(stream)
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(f"--options_json {options_json}: {error}") from None
        if not isinstance(options, dict) or not all(isinstance(value, dict) for value in options.values()):
            raise InputError(f"--options_json {options_json}: expected an object {{scorer: {{option: value}}}}")
    for assignment in assignments:
        target, equals, value = assignment.partition("=")
        scorer, dot, key = target.partition(".")
        if not (equals and dot and scorer and key):
            raise InputError(f"--option {assignment!r}: expected SCORER.KEY=VALUE")
        options.setdefault(scorer, {})[key] = value
    return options


# --precision as the other stages spell it -> the scorers' dtype names.
SCORER_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", "--out_dir", dest="out_dir", required=True, help="image folder written by generation (holds manifest.csv)")
    parser.add_argument("--scorers", default="hpsv2,pickscore,clip,aesthetic,imagereward",
                        help=f"comma-separated, from: {', '.join(SCORERS)}")
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass, per process")
    parser.add_argument("--precision", "--dtype", dest="precision", default="auto",
                        help="auto (each scorer's default: fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16 (float32, float16, bfloat16 also read)")
    parser.add_argument("--option", action="append", default=[], metavar="SCORER.KEY=VALUE",
                        help="a scorer option, e.g. hpsv2.checkpoint=/path/HPS_v2.1_compressed.pt (repeatable)")
    parser.add_argument("--options_json", default=None, help="JSON file {scorer: {option: value}}")
    parser.add_argument("--validate_only", action="store_true",
                        help="check flags, options and the folder (its manifest once generation wrote it), write nothing, exit (2: what is wrong)")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def validate_scoring(args) -> tuple[list[str], dict[str, dict]]:
    """The scorers to run and their options, every flag and the output files checked before any model loads (a
    wrapper runs this before generation)."""
    scorer_names = [name.strip() for name in args.scorers.split(",") if name.strip()]
    unknown = [name for name in scorer_names if name not in SCORERS]
    if unknown or not scorer_names:
        raise InputError(f"--scorers: unknown scorer(s) {', '.join(unknown) or '(none given)'} (known: {', '.join(SCORERS)})")
    if args.batch_size < 1:
        raise InputError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.precision not in ("auto", *SCORER_DTYPES, *SCORER_DTYPES.values()):
        raise InputError(f"--precision: unknown {args.precision!r} (auto, fp32, fp16, bf16)")
    scorer_options = parse_scorer_options(args.option, args.options_json)
    misnamed = [name for name in scorer_options if name not in SCORERS]
    if misnamed:
        raise InputError(f"--option/--options_json: unknown scorer(s) {', '.join(misnamed)} (known: {', '.join(SCORERS)})")
    check_output_location(args.out_dir, "--output_dir", folder=True)
    for name in scorer_names:
        check_output_location(quality_path(args.out_dir, name), "--output_dir (scores file)")
    # Options for scorers not run this time (a shared options file) are dropped.
    return scorer_names, {name: options for name, options in scorer_options.items() if name in scorer_names}


@exit_2_on_input_error
def main(argv=None) -> int:
    args = parse_args(argv)
    scorer_names, scorer_options = validate_scoring(args)
    if args.validate_only:
        if Path(manifest_path(args.out_dir)).exists():  # before generation there is none yet
            from popalign.score.run import read_manifest_prompts

            read_manifest_prompts(args.out_dir)
        return 0
    from popalign.distributed import make_accelerator
    from popalign.score.run import score_image_folder

    # score_image_folder reads (and checks) the manifest before it loads any model.
    score_image_folder(args.out_dir, scorer_names, args.batch_size, scorer_options, dtype=SCORER_DTYPES.get(args.precision, args.precision),
                       accelerator=make_accelerator())
    return 0


if __name__ == "__main__":
    sys.exit(main())
