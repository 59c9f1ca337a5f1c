"""Step 5b: bias and quality metrics of classified (and scored) image folders, and the report.

    python -m popalign.evaluate --base outputs/eval/base/people --base outputs/eval/base/generic \
        --tuned popalign=outputs/eval/popalign/people --tuned popalign=outputs/eval/popalign/generic \
        --report_dir outputs/eval/report
reads each folder's manifest.csv, labels_<classifier>.csv and quality_<scorer>.csv and writes
report.md, charts, per-prompt / summary / comparison CSVs and evaluation.json into --report_dir.
A model may have several folders (repeat the flag); each prompt must be in one of them.
"""

import argparse
import json
import sys
from pathlib import Path

from popalign.attributes import DEFAULT_ATTRIBUTES_PATH, load_attributes
from popalign.evaluate.metrics import MIN_CONFUSION_SINGULAR_VALUE, MIN_IDENTITY_IMAGES_PER_CLASS
from popalign.evaluate.tables import EvaluationSettings, evaluate, write_tables
from popalign.io import (ArgumentParser, InputError, atomic_write_csv, check_output_location, exit_2_on_input_error,
                         parse_seed)
from popalign.locks import check_not_locked, output_lock
from popalign.prompts import occupation_splits
from popalign.evaluate.report import write_report


def parse_named_folders(specs: list[str]) -> dict[str, list[str]]:
    """['popalign=out/a', 'popalign=out/b', 'dpo=out/c'] -> {'popalign': ['out/a', 'out/b'], 'dpo': ['out/c']}."""
    folders: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise InputError(f"--tuned {spec!r}: expected NAME=FOLDER")
        folders.setdefault(name, []).append(folder)
    return folders


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--base", action="append", required=True, metavar="FOLDER",
                        help="image folder of the base model (repeatable)")
    parser.add_argument("--base_name", default="base", help="name of the base model in tables and the report")
    parser.add_argument("--tuned", action="append", default=[], metavar="NAME=FOLDER",
                        help="image folder of a tuned model (repeatable, also with the same NAME); "
                             "compared with the base prompt by prompt")
    parser.add_argument("--output_dir", "--report_dir", dest="report_dir", required=True, help="where report.md, charts and tables are written")
    parser.add_argument("--classifier", default="deepface", help="reads labels_<classifier>.csv in each folder")
    parser.add_argument("--scorers", default="", help="comma-separated; reads quality_<scorer>.csv (default: every such file)")
    parser.add_argument("--attributes", default=str(DEFAULT_ATTRIBUTES_PATH), help="attribute definition JSON")
    parser.add_argument("--axes", default="gender,race", help="attributes whose distribution is measured on neutral prompts")
    parser.add_argument("--intersectional", default="race,gender", help="two attributes measured jointly; empty for none")
    parser.add_argument("--targets", default="", help='JSON target distributions, e.g. {"gender": {"male": 0.5, "female": 0.5}}; default uniform')
    parser.add_argument("--num_resamples", type=int, default=10000,
                        help="bootstrap resamples over prompts for the intervals; random sign patterns of the paired "
                             "test beyond 16 prompts (up to 16 it enumerates all 2^n)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    parser.add_argument("--seed", type=parse_seed, default=0, help="seed of the bootstrap resampling")
    parser.add_argument("--occupation_splits", default="", metavar="CSV",
                        help="a neutral prompt file with a 'split' column (occupation -> split); with --split")
    parser.add_argument("--split", default="", help="evaluate only the prompts of this split's occupations (e.g. heldout)")
    parser.add_argument("--correct_for_classifier", action="store_true",
                        help="headline the discrepancy of shares corrected for the classifier's confusion (estimated on "
                             "the base's identity-specific prompts); the correction is always shown in its own section")
    parser.add_argument("--min_identity_images_per_class", type=int, default=MIN_IDENTITY_IMAGES_PER_CLASS,
                        help="the correction is used only where every class named by identity-specific prompts has at "
                             "least this many of their faces")
    parser.add_argument("--min_confusion_singular_value", type=float, default=MIN_CONFUSION_SINGULAR_VALUE,
                        help="the correction is used only where the named classes' confusion has a smallest singular "
                             "value of at least this (below it sampling noise dominates the corrected shares)")
    parser.add_argument("--compare_on_intersection", action="store_true",
                        help="when the models' folders hold different prompts, image indices or seeds, compare on the images all "
                             "share (the report says so at the top) instead of stopping with an error")
    parser.add_argument("--second_classifier", default="",
                        help="another classifier whose labels_<name>.csv every folder also holds: the report adds how the "
                             "two agree per attribute (does a conclusion depend on the classifier?)")
    parser.add_argument("--human_study", default="", metavar="STUDY_DIR",
                        help="a study folder of python -m popalign.study (prepared, served, voted on): adds its "
                             "'Human study' section to report.md")
    parser.add_argument("--update_model_cards", action="store_true",
                        help="write this evaluation's headline into the model card (README.md) of each tuned model's "
                             "training run; off by default, so that a quick evaluation never changes a run's card")
    parser.add_argument("--chart_prompts", type=int, default=6, help="neutral prompts charted one by one")
    parser.add_argument("--grid_prompts", type=int, default=3, help="neutral prompts shown as before/after image grids")
    parser.add_argument("--grid_images", type=int, default=6, help="images per model in each grid")
    return parser


@exit_2_on_input_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        targets = json.loads(args.targets) if args.targets else {}
    except json.JSONDecodeError as error:
        raise InputError(f"--targets: invalid JSON ({error})") from None
    if bool(args.split) != bool(args.occupation_splits):
        raise InputError("--split and --occupation_splits go together")
    splits = occupation_splits(args.occupation_splits) if args.occupation_splits else {}
    if not 0.0 < args.confidence < 1.0:
        raise InputError(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.num_resamples < 1:
        raise InputError(f"--num_resamples must be >= 1, got {args.num_resamples}")
    if args.min_identity_images_per_class < 1:
        raise InputError(f"--min_identity_images_per_class must be >= 1, got {args.min_identity_images_per_class}")
    if not 0.0 <= args.min_confusion_singular_value <= 1.0:
        raise InputError(f"--min_confusion_singular_value must be in [0, 1], got {args.min_confusion_singular_value}")
    attributes = load_attributes(args.attributes)
    for flag in ("axes", "intersectional"):
        unknown = [axis for axis in parse_list(getattr(args, flag)) if axis not in attributes.attributes]
        if unknown:
            raise InputError(f"--{flag}: attribute(s) {', '.join(unknown)} not in {args.attributes} (known: {', '.join(attributes.names)})")
    settings = EvaluationSettings(classifier=args.classifier, axes=parse_list(args.axes),
                                  intersectional=parse_list(args.intersectional), targets=targets,
                                  num_resamples=args.num_resamples, confidence=args.confidence, seed=args.seed,
                                  correct_for_classifier=args.correct_for_classifier, split=args.split,
                                  occupation_splits=splits, compare_on_intersection=args.compare_on_intersection,
                                  min_identity_images_per_class=args.min_identity_images_per_class,
                                  min_confusion_singular_value=args.min_confusion_singular_value)
    if args.update_model_cards and args.split:
        raise InputError("--update_model_cards: a card's headline comes from the evaluation of every prompt, not of one split")
    check_output_location(args.report_dir, "--output_dir", folder=True)
    check_not_locked(args.report_dir, "evaluation")  # another evaluation writing there: stop before the work
    if args.second_classifier == args.classifier:
        raise InputError(f"--second_classifier {args.second_classifier}: the same as --classifier")
    if args.human_study:
        from popalign.study import read_study

        read_study(args.human_study)  # a folder that is not a study stops here, before any work
    result = evaluate(args.base, parse_named_folders(args.tuned), attributes, settings,
                      base_name=args.base_name, scorers=list(parse_list(args.scorers)) or None)
    with output_lock(args.report_dir, "evaluation"):
        return _write_outputs(args, result)


def _write_outputs(args, result) -> int:
    """The report folder's files, written while this run holds its lock."""
    written = write_tables(result, args.report_dir)
    extra_sections = []
    if args.second_classifier:
        from popalign.evaluate.report import agreement_section
        from popalign.evaluate.tables import classifier_agreement_table

        agreement = classifier_agreement_table([result.base, *result.tuned], args.classifier, args.second_classifier,
                                               result.settings.axes, result.settings)
        atomic_write_csv(Path(args.report_dir) / "classifier_agreement.csv", agreement)
        extra_sections += agreement_section(agreement, args.classifier, args.second_classifier)
    if args.human_study:
        from popalign.study.report import human_study_section

        extra_sections += human_study_section(args.human_study, min(args.num_resamples, 2000), args.seed)
    report_path = write_report(result, args.report_dir, written, args.chart_prompts, args.grid_prompts, args.grid_images,
                               extra_sections)
    print(f"wrote {report_path}")
    if args.update_model_cards:
        for card in update_model_cards(result, report_path):
            print(f"updated the Evaluation section of {card}")
    return 0


def update_model_cards(result, report_path) -> list[Path]:
    """Each tuned model trained by train_popalign.py (its run folder holds the model card) gets the headline."""
    from popalign.evaluate.report import model_card_evaluation
    from popalign.training.model_card import MODEL_CARD_NAME, update_evaluation_section

    updated = []
    for model in result.tuned:
        for config in model.generation_configs.values():
            weights = config.get("unet") or config.get("lora")
            if not weights:
                continue
            weights = Path(weights)
            run_dir = weights.parent if config.get("unet") or weights.is_file() else weights
            card = run_dir / MODEL_CARD_NAME
            if update_evaluation_section(card, model_card_evaluation(result, model.name, Path(report_path).resolve())):
                updated.append(card)
    return updated


if __name__ == "__main__":
    sys.exit(main())
