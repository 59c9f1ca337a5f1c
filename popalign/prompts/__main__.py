"""Step 1: neutral prompts -> identity-specific variants for every attribute combination.

    python 1_generate_diverse_prompts.py --axes gender,race      (= python -m popalign.prompts --axes gender,race)
writes outputs/prompts/training_prompts_diverse.csv (schema: docs/data_formats.md).

For the shell scripts, `python -m popalign.prompts splits FILE` and `python -m popalign.prompts check FILE` (helper_main).
"""

import argparse
import sys
from pathlib import Path

from popalign.attributes import DEFAULT_ATTRIBUTES_PATH, load_attributes
from popalign.io import ArgumentParser, atomic_write_csv, check_output_location, exit_2_on_input_error
from popalign.locks import output_lock
from popalign.prompts import DEFAULT_TEMPLATE, expand_prompts, occupation_splits, parse_restrictions, read_neutral_prompts, read_prompt_table


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--input", default="data/training_prompts.csv", help="neutral prompts: columns occupation, activity")
    parser.add_argument("--split", default="", help="only the input rows whose 'split' column holds this value (e.g. train)")
    parser.add_argument("--output", default="outputs/prompts/training_prompts_diverse.csv")
    parser.add_argument("--attributes", default=str(DEFAULT_ATTRIBUTES_PATH), help="attribute definition JSON")
    parser.add_argument("--axes", default="gender,race", help="attributes to combine, comma-separated (the original: gender,race)")
    parser.add_argument("--restrict", action="append", default=[], metavar="NAME=V1,V2",
                        help="use only these values of an attribute, e.g. race=white,asian,black (repeatable)")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="prompt template with {person} and {activity}")
    return parser


@exit_2_on_input_error
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["splits"], ["check"]):
        return helper_main(argv)
    args = build_parser().parse_args(argv)
    check_output_location(args.output, "--output")
    attributes = load_attributes(args.attributes)
    axes = [name.strip() for name in args.axes.split(",") if name.strip()]
    prompts = expand_prompts(read_neutral_prompts(args.input, args.split or None), attributes, axes, args.template,
                             parse_restrictions(args.restrict, attributes))
    output = Path(args.output)
    with output_lock(output.parent, output.name):
        atomic_write_csv(output, prompts)
    neutral_count = int((prompts["kind"] == "neutral").sum())
    print(f"wrote {args.output}: {neutral_count} neutral prompts, {len(prompts) - neutral_count} identity-specific prompts")
    return 0


def helper_main(argv) -> int:
    """For the shell scripts: `python -m popalign.prompts splits FILE` prints the split names of a prompt file;
    `python -m popalign.prompts check FILE` checks a file in step 1's output format (e.g. generic prompts)."""
    if len(argv) != 2 or argv[0] not in ("splits", "check"):
        print("usage: python -m popalign.prompts {splits,check} FILE", file=sys.stderr)
        return 2
    if argv[0] == "splits":  # an InputError is main's one error line and exit 2 (exit_2_on_input_error)
        print(" ".join(sorted(set(occupation_splits(argv[1]).values()))))
    else:
        read_prompt_table(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
