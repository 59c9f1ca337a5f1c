"""PopAlign, PopAlign with a per-pair anchor, Diffusion-DPO and SFT, each tuned by the same rule (toy world).

    python scripts/compare_objectives.py --pairs_file outputs/toy_demo/preferences/pairs.csv \
        --output_dir outputs/toy_comparison

Needs the pairs of a finished demo (`make demo`: built from the training split only). For each objective
of popalign.toy.comparison.OBJECTIVES it trains every grid point (the demo's settings, --max_train_steps
steps, seed = the first of --seeds), scores each on the validation occupations, picks one setting by the
declared rule (bracketing a learning rate chosen on an edge of the rates tried), trains it with every seed (at least popalign.toy.comparison.MIN_SEEDS) and scores those on the
held-out occupations, then tests each objective against PopAlign per held-out prompt (superiority and
equivalence against the declared margins, each family Holm-corrected). Writes `<output_dir>/table.md` and
`results.json`. Re-running resumes: finished trainings are skipped (their
finished.json) and measurements already written are kept. `--chosen_settings popalign=<run name>` takes an
objective's setting as an earlier run of this protocol chose it (its grid is not trained again; its seeds are,
and the table marks the setting), so that objectives can be added to a comparison whose folder was not kept.
"""

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from popalign.attributes import load_attributes  # noqa: E402
from popalign.io import InputError, atomic_write_json, atomic_write_text, exit_2_on_input_error  # noqa: E402
from popalign.prompts import DEFAULT_TEMPLATE, expand_prompts, read_neutral_prompts  # noqa: E402
from popalign.toy import comparison  # noqa: E402
from popalign.toy.base import check_base_world  # noqa: E402
from popalign.toy.world import load_world  # noqa: E402


def train(run_dir: Path, objective: comparison.Objective, point: dict, seed: int, args) -> Path:
    """One training through 4_train.sh (the user's launcher); returns the U-Net folder."""
    settings = {**comparison.COMMON_SETTINGS, **objective.fixed, **point}
    processes = args.num_processes
    env = dict(os.environ, PAIRS_FILE=args.pairs_file, OUTPUT_DIR=str(run_dir), MODEL=args.pretrained_model, VAE="",
               RESOLUTION="32", LOSS=objective.loss, BETA=str(settings.get("beta", 0.0)),
               LAMBDA_LOSER=str(settings.get("lambda_loser", 1.0)),
               POPALIGN_ANCHOR=settings.get("popalign_anchor", "pooled"),
               CAPTION_DROPOUT=str(settings["caption_dropout"]), LEARNING_RATE=str(settings["learning_rate"]),
               PRIOR_PRESERVATION_WEIGHT=str(settings["prior_preservation_weight"]),
               PRIOR_PRESERVATION_TARGET=settings["prior_preservation_target"], LR_SCHEDULER=settings["lr_scheduler"],
               LR_WARMUP_STEPS=str(settings["lr_warmup_steps"]), MAX_TRAIN_STEPS=str(args.max_train_steps),
               TRAIN_BATCH_SIZE=str(settings["train_batch_size"] // processes), MIXED_PRECISION="no",
               GRADIENT_CHECKPOINTING="off", USE_8BIT_ADAM="off", CHECKPOINTING_STEPS="0", REPORT_TO="none",
               NUM_PROCESSES=str(processes), SEED=str(seed), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    log = comparison.training_log(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # Appended: a re-run of a finished training (4_train.sh says "nothing to do") keeps the log of the training itself.
    returncode = comparison.run_training_script(env, log, REPO_ROOT)
    if returncode != 0:
        raise RuntimeError(f"training {run_dir} failed (exit {returncode}); see {log}")
    return run_dir / "unet"


def measure(unet: Path | None, prompts, split: str, args, world, cache: Path) -> dict:
    """The base (unet None) or a tuned U-Net measured on a split (popalign.toy.comparison.measure_cached)."""
    return comparison.measure_cached({"unet_path": str(unet)} if unet else {}, prompts, split, args, world, cache)


def recorded_command(given: list[str], max_bracketing_runs: int) -> str:
    """This run's command as table.md records it: the flags given, and the bracketing cap it kept even when that was
    the default (so the command reruns the same protocol after the default changes)."""
    flags = list(given)
    if not any(flag.split("=")[0] == "--max_bracketing_runs" for flag in flags):
        flags += ["--max_bracketing_runs", str(max_bracketing_runs)]
    return " ".join(["python scripts/compare_objectives.py", *flags])


@exit_2_on_input_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    comparison.add_toy_study_arguments(parser, output_dir="outputs/toy_comparison")
    parser.add_argument("--objectives", default=",".join(objective.name for objective in comparison.OBJECTIVES),
                        help="the objectives to run and tabulate (each with its full grid and seeds)")
    parser.add_argument("--seeds", default=",".join(str(seed) for seed in range(comparison.MIN_SEEDS)),
                        help=f"training seeds of each chosen setting (at least {comparison.MIN_SEEDS}); the first also "
                             "trains the grid")
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--max_bracketing_runs", type=int, default=comparison.MAX_BRACKETING_RUNS,
                        help="runs per objective beyond its grid that may bracket a learning rate chosen on an edge "
                             "(declare it before the run)")
    parser.add_argument("--chosen_settings", default="",
                        help="objective=run name,...: settings an earlier run of this protocol chose (same pairs, base "
                             "and steps), whose grids are not trained again; the table marks them")
    args = parser.parse_args(argv)
    try:
        seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
        if len(set(seeds)) < comparison.MIN_SEEDS:
            raise InputError(f"--seeds: give at least {comparison.MIN_SEEDS} distinct seeds (got {len(set(seeds))})")
        if any(not 0 <= seed < 2 ** 32 for seed in seeds):
            raise InputError("--seeds: each seed must be in [0, 2^32)")
        if args.max_bracketing_runs < 0:
            raise InputError(f"--max_bracketing_runs {args.max_bracketing_runs}: must be 0 or more")
        known = {objective.name: objective for objective in comparison.OBJECTIVES}
        names = [name.strip() for name in args.objectives.split(",") if name.strip()]
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise InputError(f"--objectives: unknown {', '.join(unknown) or '(none given)'} (known: {', '.join(known)})")
        objectives = [known[name] for name in names]
        try:
            given = comparison.parse_chosen_settings(args.chosen_settings, max_bracketing_runs=args.max_bracketing_runs)
        except ValueError as error:
            raise InputError(f"--chosen_settings {error}") from None
        not_run = sorted(set(given) - set(names))
        if not_run:
            raise InputError(f"--chosen_settings: {', '.join(not_run)} not in --objectives")
        if not Path(args.pairs_file).is_file():
            raise InputError(f"--pairs_file {args.pairs_file}: not found (run make demo first)")
        if comparison.COMMON_SETTINGS["train_batch_size"] % args.num_processes:
            raise InputError(f"--num_processes {args.num_processes} does not divide the batch of "
                             f"{comparison.COMMON_SETTINGS['train_batch_size']}")
        world = load_world(args.occupations, args.attributes)
        check_base_world(args.pretrained_model, world, args.occupations, args.attributes)
        attributes = load_attributes(args.attributes)
        prompts = {split: expand_prompts(read_neutral_prompts(args.occupations, split), attributes, ["gender", "race"],
                                         DEFAULT_TEMPLATE) for split in (args.validation_split, args.test_split)}
    except (InputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir)
    base = {split: measure(None, prompts[split], split, args, world, output_dir / f"base_{split}.json")
            for split in prompts}

    validation, chosen, chosen_points, tried, met, held_out = {}, {}, {}, {}, {}, {}
    for objective in objectives:
        def measure_point(point, objective=objective):
            name = comparison.run_name(objective, point)
            run_dir = output_dir / "runs" / f"{name}_seed{seeds[0]}"
            print(f"[grid] {name}, seed {seeds[0]}", flush=True)
            unet = train(run_dir, objective, point, seeds[0], args)
            return measure(unet, prompts[args.validation_split], args.validation_split, args, world,
                           run_dir / f"measure_{args.validation_split}.json")

        if objective.name in given:
            chosen[objective.name], met[objective.name], validation[objective.name] = given[objective.name], None, {}
            chosen_points[objective.name] = next(point for point in comparison.candidate_points(objective, args.max_bracketing_runs)
                                                 if comparison.run_name(objective, point) == given[objective.name])
            tried[objective.name] = [*objective.grid, chosen_points[objective.name]]
        else:
            (chosen[objective.name], met[objective.name], chosen_points[objective.name], validation[objective.name],
             points) = comparison.tune(objective, measure_point, base[args.validation_split],
                                             args.max_bracketing_runs)
            tried[objective.name] = list(points.values())
        point = chosen_points[objective.name]
        held_out[objective.name] = []
        for seed in seeds:
            run_dir = output_dir / "runs" / f"{chosen[objective.name]}_seed{seed}"
            print(f"[chosen] {chosen[objective.name]}, seed {seed}", flush=True)
            unet = train(run_dir, objective, point, seed, args)
            held_out[objective.name].append(measure(unet, prompts[args.test_split], args.test_split, args, world,
                                                    run_dir / f"measure_{args.test_split}.json"))

    bounds = comparison.discrepancy_bounds(world.genders, world.races)
    table = comparison.comparison_table(base[args.test_split], chosen, held_out, met, bounds)
    on_edge = {name for name, point in chosen_points.items() if comparison.bracketing_point(point, tried[name]) is not None}
    edges = [name for name in chosen_points if name in on_edge and name not in given]
    given_edges = [name for name in chosen_points if name in on_edge and name in given]
    tests = (comparison.objective_tests(held_out, bounds) if comparison.REFERENCE_OBJECTIVE in held_out and len(held_out) > 1
             else [])
    command = recorded_command(sys.argv[1:] if argv is None else argv, args.max_bracketing_runs)
    text = "\n".join([
        f"Held-out occupations ({args.test_split}): mean over {len(seeds)} training seeds [95% interval over seeds; "
        "† cut to the metric's range].",
        "", table, "",
        f"Selection rule (declared before the runs): {comparison.SELECTION_RULE}.",
        "Grid rule (declared before the runs): " + "; ".join(
            f"{objective.name} {len(objective.grid)} runs" + (" (trained by the earlier run that chose its setting, "
                                                              "not here)" if objective.name in given else "")
            + (f" and {len(validation[objective.name]) - len(objective.grid)} bracketing run(s)"
               if len(validation[objective.name]) > len(objective.grid) else "")
            for objective in objectives) + f", {args.max_train_steps} steps each. Bracketing (at most "
        f"{args.max_bracketing_runs} runs per objective): a chosen learning rate that is the largest (smallest) tried "
        "with its other values is tried again doubled (halved), and the rule chooses again among all the objective's runs.",
        ("Chosen on an edge of the learning rates tried, after bracketing (not bracketed): " + ", ".join(edges) + ".") if edges
        else "Every learning rate chosen here is bracketed by the rates tried.",
        *([f"Chosen by an earlier run on an edge of {'its' if len(given_edges) == 1 else 'their'} grid (whether that run "
           "bracketed it is for its own table to say): " + ", ".join(given_edges) + "."] if given_edges else []), "",
        f"Each objective against {comparison.REFERENCE_OBJECTIVE} per held-out prompt (difference = objective - "
        f"{comparison.REFERENCE_OBJECTIVE}; lower is better), with equivalence margins declared before the runs "
        f"({comparison.EQUIVALENCE_MARGINS}); superiority and equivalence tests each Holm-corrected over their family "
        "per unit:", "",
        comparison.tests_table(tests) if tests else "(needs the reference objective and at least one other)", "",
        "† an interval cut to the range a difference can take.", "",
        f"Command: `{command.strip()}`", ""])
    atomic_write_text(output_dir / "table.md", text)
    atomic_write_json(output_dir / "results.json", {
        "settings": vars(args), "selection_rule": comparison.SELECTION_RULE, "common_settings": comparison.COMMON_SETTINGS,
        "base": base, "validation": validation, "chosen": chosen, "met_constraints": met, "held_out": held_out,
        "equivalence_margins": comparison.EQUIVALENCE_MARGINS, "tests": tests})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
