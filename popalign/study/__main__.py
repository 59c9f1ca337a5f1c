"""A blind A/B study of the models' pictures, rated by people (docs/human_study.md).

    python -m popalign.study prepare --image_dirs outputs/eval/images/base outputs/eval/images/popalign --output_dir outputs/study
    python -m popalign.study serve --study outputs/study --host 0.0.0.0 --port 8000 --links 5
    python -m popalign.study analyze --study outputs/study

prepare: the study folder (tasks, attention checks, images under random ids, the exclusion rule); serve: the rating
page (votes in <study>/votes.sqlite); analyze: <study>/analysis/analysis.md and analysis.json.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from popalign.io import ArgumentParser, InputError, atomic_write_json, atomic_write_text, check_output_location, parse_seed, \
    exit_2_on_input_error
from popalign.locks import output_lock
from popalign.study import ANALYSIS_DIR


def build_parser() -> ArgumentParser:
    from popalign.study.prepare import StudySettings

    defaults = StudySettings()
    parser = ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="prepare|serve|analyze")
    prepare = commands.add_parser("prepare", help="build a study folder from eval.sh's image folders",
                                  description="Build a study folder from eval.sh's image folders (one per model, the "
                                              "same prompts and seeds).")
    prepare.add_argument("--image_dirs", nargs="+", required=True,
                         help="the models' image folders (eval.sh's OUT_DIR/images/<name>), as DIR (named by the folder) or NAME=DIR")
    prepare.add_argument("--output_dir", required=True, help="the study folder to create (new or empty)")
    for field, help_text in [
            ("image_tasks", "(prompt, seed) pictures per pair of models, each asked 'better?' and 'matches the text?'"),
            ("population_tasks", "identity-neutral prompts per pair of models, asked 'which group is more varied?'"),
            ("grid_size", "images per model in a population grid (the same seeds)"),
            ("tasks_per_rater", "regular tasks each rater is given (attention checks come on top)"),
            ("gold_tasks", "gold pairs prepared (a picture against a visibly broken copy)"),
            ("gold_checks", "gold pairs each rater sees"),
            ("repeat_checks", "pairs each rater sees twice, the sides swapped"),
            ("max_failed_checks", "the exclusion rule: a rater failing more attention checks than this is left out"),
            ("seed", "seed of the task draw and of the raters' plans")]:
        prepare.add_argument(f"--{field}", type=parse_seed if field == "seed" else int, default=getattr(defaults, field), help=help_text)
    prepare.add_argument("--confidence", type=float, default=defaults.confidence, help="level of intervals and verdicts")

    serve = commands.add_parser("serve", help="serve the rating page", description="Serve a study's rating page.")
    serve.add_argument("--study", required=True, help="the study folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface of the machine)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--admin_token", default=None, help="token for the export (default: the study's private/admin_token)")
    serve.add_argument("--links", type=int, default=0, help="print this many fresh rater links")

    analyze = commands.add_parser("analyze", help="analyze the votes", description="Analyze a study's votes.")
    analyze.add_argument("--study", required=True, help="the study folder")
    analyze.add_argument("--votes", default=None, help="a CSV exported from the server (default: <study>/votes.sqlite)")
    analyze.add_argument("--output_dir", default=None, help=f"where to write analysis.md and analysis.json (default: <study>/{ANALYSIS_DIR})")
    analyze.add_argument("--num_resamples", type=int, default=2000, help="bootstrap resamples over raters and prompts")
    analyze.add_argument("--seed", type=parse_seed, default=0, help="seed of the bootstrap resampling")
    return parser


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


@exit_2_on_input_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "prepare":
        from popalign.study.prepare import StudySettings, parse_model_folders, prepare_study

        settings = StudySettings(**{field: getattr(args, field) for field in StudySettings.__dataclass_fields__})
        study = prepare_study(parse_model_folders(args.image_dirs), args.output_dir, settings)
        regular = len(study["pool"])
        print(f"{args.output_dir}: {regular} tasks ({study['num_models']} models), {len(study['gold'])} gold pairs; "
              f"each rater: {min(settings.tasks_per_rater, regular)} tasks + {settings.gold_checks} gold + "
              f"{settings.repeat_checks} repeated")
        return 0
    if args.command == "serve":
        if not 0 < args.port < 65536:
            raise InputError(f"--port must be in 1..65535, got {args.port}")
        if args.links < 0:
            raise InputError(f"--links must be >= 0, got {args.links}")
        from popalign.study import read_study
        from popalign.study.server import serve

        read_study(args.study)  # a bad folder is one line, before the server starts
        with output_lock(args.study, "serve"):  # one server per study: its raters' plans are numbered in join order
            serve(args.study, args.host, args.port, args.admin_token, args.links)
        return 0
    if args.num_resamples < 1:
        raise InputError(f"--num_resamples must be >= 1, got {args.num_resamples}")
    from popalign.study.analyze import analyze_study, read_votes_csv
    from popalign.study.report import analysis_markdown_lines

    output_dir = Path(args.output_dir) if args.output_dir else Path(args.study) / ANALYSIS_DIR
    check_output_location(output_dir, "--output_dir", folder=True)
    votes = read_votes_csv(args.votes) if args.votes else None
    analysis = analyze_study(args.study, votes, args.num_resamples, args.seed)
    lines = analysis_markdown_lines(analysis, heading="# Human study")
    with output_lock(output_dir, "analysis"):
        atomic_write_json(output_dir / "analysis.json", _json_safe(analysis))
        atomic_write_text(output_dir / "analysis.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
