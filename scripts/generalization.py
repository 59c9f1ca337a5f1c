"""How the held-out cut grows with the number of training occupations, per method (toy world).

    python scripts/generalization.py --pairs_file outputs/toy_demo/preferences/pairs.csv \
        --output_dir outputs/generalization --sizes 1,2,3,4 --methods popalign_unet,popalign_text_encoder,sft --seeds 0

Needs the pairs of a finished demo (`make demo`: pairs of the training split's occupations). For each method, size k
and seed s, the pairs of k training occupations (the first k of the pool in an order drawn from s) train the toy base
through 4_train.sh with validation during training on the validation split's occupations (popalign.training.validation);
the best checkpoint by the trainer's declared rule is then measured on the held-out occupations
(popalign.toy.base.measure_toy_model), against the base on the same prompts and seeds. Per point: held-out gender and
race discrepancy (mean over prompts, 95% interval over prompts, pooled over seeds), the exact paired sign-flip test of
tuned vs base over prompts with Holm's correction over every (method, size, axis) of the run, identity accuracy and
toy quality; where a size has two or more methods, each is tested against the first of --methods per held-out prompt
(method_tests: superiority, and equivalence within declared margins). Run it in the project's environment (source .venv/bin/activate: 4_train.sh calls python). Writes <output_dir>/table.md, results.json and generalization.png. Re-running resumes (finished trainings
and measurements are kept).
"""

import argparse
import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from popalign.attributes import load_attributes  # noqa: E402
from popalign.io import InputError, atomic_save_figure, atomic_write_csv, atomic_write_json, atomic_write_text, exit_2_on_input_error  # noqa: E402
from popalign.prompts import DEFAULT_TEMPLATE, expand_prompts, read_neutral_prompts  # noqa: E402
from popalign.toy import comparison  # noqa: E402

# Each method's settings, fixed before the runs: the demo's PopAlign setting (demo.sh), on the U-Net (full fine-tuning) or
# on the text encoder alone (LoRA of rank 8, U-Net frozen), and SFT on the winners at the demo's baseline rate.
COMMON = {"CAPTION_DROPOUT": "0.2", "LR_SCHEDULER": "cosine", "LR_WARMUP_STEPS": "20", "PRIOR_PRESERVATION_WEIGHT": "0.25",
          "PRIOR_PRESERVATION_TARGET": "reference"}
METHODS = {
    "popalign_unet": {"LOSS": "popalign", "BETA": "0.5", "LAMBDA_LOSER": "0.1", "LEARNING_RATE": "2e-4"},
    "popalign_text_encoder": {"LOSS": "popalign", "BETA": "0.5", "LAMBDA_LOSER": "0.1", "LEARNING_RATE": "2e-4", "LORA_RANK": "8",
                              "TRAIN_TEXT_ENCODER": "on", "TRAIN_UNET": "off", "TEXT_ENCODER_LR": "2e-3"},
    "sft": {"LOSS": "sft", "BETA": "0", "LEARNING_RATE": "2e-4"},
}
# Variants of popalign_unet, each changing one setting, declared before their runs: trained twice and four times as
# long, at 2.5x the learning rate, without prior preservation, without caption dropout.
VARIANTS = {"popalign_unet_600_steps": {"MAX_TRAIN_STEPS": "600"}, "popalign_unet_1200_steps": {"MAX_TRAIN_STEPS": "1200"},
            "popalign_unet_lr_5e-4": {"LEARNING_RATE": "5e-4"},
            "popalign_unet_no_prior_preservation": {"PRIOR_PRESERVATION_WEIGHT": "0"},
            "popalign_unet_no_caption_dropout": {"CAPTION_DROPOUT": "0"}}
MAIN_METHODS = tuple(METHODS)
METHODS.update({name: {**METHODS["popalign_unet"], **change} for name, change in VARIANTS.items()})
# SFT trained as long as the demo's PopAlign, declared before its run: which of the two the demo should train.
METHODS["sft_600_steps"] = {**METHODS["sft"], "MAX_TRAIN_STEPS": "600"}
AXES = ("gender", "race")


def training_order(pool: list[str], seed: int) -> list[str]:
    """The training occupations in the order sizes take them (size k: the first k), drawn from the seed."""
    return [pool[index] for index in np.random.default_rng(seed).permutation(len(pool))]


def subset_pairs(pairs_file: Path, captions: set[str], output: Path) -> int:
    """The pairs whose caption is one of `captions`, with absolute image paths, written to `output`; their count."""
    pairs = pd.read_csv(pairs_file, dtype=str, keep_default_na=False)
    kept = pairs[pairs["caption"].isin(captions)].copy()
    for column in ("winner_path", "loser_path"):
        if column in kept.columns:
            kept[column] = [str((pairs_file.parent / path).resolve()) for path in kept[column]]
    atomic_write_csv(output, kept)
    return len(kept)


def training_environment(run_dir: Path, method: str, pairs_file: Path, validation_prompts: Path, seed: int, args) -> dict:
    """4_train.sh's variables for one training: the study's settings, then the method's own (which win)."""
    env = dict(os.environ, PAIRS_FILE=str(pairs_file), OUTPUT_DIR=str(run_dir), MODEL=args.pretrained_model, VAE="", RESOLUTION="32",
               MAX_TRAIN_STEPS=str(args.max_train_steps),
               TRAIN_BATCH_SIZE=str(args.train_batch_size // args.num_processes), NUM_PROCESSES=str(args.num_processes),
               MIXED_PRECISION="no", GRADIENT_CHECKPOINTING="off", USE_8BIT_ADAM="off", REPORT_TO="none", SEED=str(seed),
               CHECKPOINTING_STEPS=str(args.validation_steps), VALIDATION_PROMPTS_FILE=str(validation_prompts),
               VALIDATION_STEPS=str(args.validation_steps), NUM_VALIDATION_IMAGES=str(args.num_validation_images),
               NUM_VALIDATION_IDENTITY_IMAGES=str(args.num_validation_identity_images), VALIDATION_CLASSIFIER="toy",
               VALIDATION_SCORER="toy", VALIDATION_ATTRIBUTES=args.attributes, VALIDATION_NUM_INFERENCE_STEPS=str(args.steps),
               VALIDATION_GUIDANCE_SCALE=str(args.guidance), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               POPALIGN_TOY_OCCUPATIONS=args.occupations, POPALIGN_TOY_ATTRIBUTES=args.attributes)
    env.update({**COMMON, **METHODS[method]})  # a method's own setting (e.g. its MAX_TRAIN_STEPS) wins
    return env


def finished_elsewhere(run_dir: Path, pairs_file: Path, pretrained_model: str) -> str:
    """Why the finished run in `run_dir` is not a training of `pairs_file` from `pretrained_model` ('' when it is;
    the study reuses it): a folder of an earlier study with another occupation file, pairs file or base."""
    from popalign.io import file_sha256

    try:
        fingerprint = json.loads((run_dir / "finished.json").read_text(encoding="utf-8"))["fingerprint"]
        then_pairs, then_model = fingerprint["pairs_sha256"], fingerprint["settings"]["pretrained_model"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its finished.json does not say what it trained on"
    if then_model != pretrained_model and Path(then_model).resolve() != Path(pretrained_model).resolve():
        return f"it trained {then_model}, not --pretrained_model {pretrained_model}"
    if then_pairs != file_sha256(pairs_file):
        return f"it trained on other pairs than {pairs_file} (another pairs file, or its images moved since)"
    return ""


def train(run_dir: Path, method: str, pairs_file: Path, validation_prompts: Path, seed: int, args) -> bool:
    """One training through 4_train.sh with validation every --validation_steps (and a checkpoint at each); False when
    `run_dir` already holds it finished. A finished run of other pairs or another base there is an InputError."""
    if (run_dir / "finished.json").is_file():
        reason = finished_elsewhere(run_dir, pairs_file, args.pretrained_model)
        if reason:
            raise InputError(f"--output_dir: {run_dir} holds a finished run of another study ({reason}); use a new --output_dir")
        return False
    env = training_environment(run_dir, method, pairs_file, validation_prompts, seed, args)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = comparison.training_log(run_dir)
    # Appended: a training resumed after a kill keeps the log of its first part.
    returncode = comparison.run_training_script(env, log, REPO_ROOT)
    if returncode != 0:
        raise RuntimeError(f"training {run_dir} failed (exit {returncode}); see {log}")
    return True


def best_or_final_weights(run_dir: Path) -> dict:
    """The pipeline arguments of a run's best checkpoint; its final weights when no validation was eligible."""
    from popalign.training.checkpoints import best_weights

    try:
        kind, path = best_weights(run_dir)
    except InputError:
        lora = (run_dir / "pytorch_lora_weights.safetensors").is_file()
        kind, path = ("lora", run_dir) if lora else ("unet", run_dir / "unet")
    return {"unet_path": str(path)} if kind == "unet" else {"lora_path": str(path)}


def measure(run_dir, prompts: pd.DataFrame, args, world, cache: Path) -> dict:
    """The base (run_dir None) or a run's best checkpoint measured on the held-out prompts, with the run's best record."""
    measurement = comparison.measure_cached(best_or_final_weights(run_dir) if run_dir else {}, prompts, args.test_split, args, world, cache)
    if run_dir is not None:
        finished = json.loads((Path(run_dir) / "finished.json").read_text(encoding="utf-8"))
        measurement["best"] = finished.get("best")
        measurement["validation_discrepancy"] = validation_score(run_dir, (measurement["best"] or {}).get("step") or finished["global_step"])
    return measurement


def validation_score(run_dir, step: int) -> float:
    """The selection's score (mean over axes of the validation occupations' mean discrepancy) of the measured weights:
    the best step's validation, or the last step's when no validation was eligible."""
    from popalign.training.validation import mean_discrepancy, read_validations

    scores = [mean_discrepancy(record) for record in read_validations(run_dir) if record["step"] == step]
    return scores[-1] if scores else float("nan")


def per_prompt(measurement: dict, axis: str) -> list[float]:
    return [row[f"{axis}_discrepancy"] for row in measurement["neutral"]]


def paired_prompt_values(base: dict, measurements: list[dict], axis: str) -> tuple[np.ndarray, np.ndarray]:
    """Per held-out prompt, the tuned discrepancy (mean over the seeds that drew a clean figure for it) and the base's,
    for the prompts where both have a value: a prompt of which a model drew no clean figure has no population to
    measure (its discrepancy is NaN), so it leaves that row's mean, interval and paired test."""
    by_seed = np.array([per_prompt(measurement, axis) for measurement in measurements], dtype=float)
    drawn = ~np.isnan(by_seed)
    tuned = np.where(drawn, by_seed, 0.0).sum(axis=0) / np.maximum(drawn.sum(axis=0), 1)
    tuned[~drawn.any(axis=0)] = np.nan
    base_values = np.array(per_prompt(base, axis), dtype=float)
    kept = ~np.isnan(tuned) & ~np.isnan(base_values)
    return tuned[kept], base_values[kept]


def summarise(base: dict, runs: dict, args) -> tuple[list[dict], str]:
    """One row per (method, size): held-out discrepancies with intervals, tests against the base (Holm over the run's
    family of every method x size x axis), identity accuracy and quality, each the mean over seeds."""
    from popalign.attributes import load_attributes
    from popalign.evaluate.metrics import bootstrap_mean_ci, clip_interval, discrepancy_range, holm_adjusted, paired_test

    attributes = load_attributes(args.attributes)
    rows = []
    for (method, size), measurements in sorted(runs.items()):
        row = {"method": method, "size": size, "seeds": len(measurements),
               "best_steps": [measurement["best"]["step"] for measurement in measurements]}
        for axis in AXES:
            # per prompt, the mean over seeds: the prompt is the unit of the interval and of the paired test
            tuned, base_values = paired_prompt_values(base, measurements, axis)
            row[f"{axis}_prompts"] = len(tuned)
            mean, low, high = bootstrap_mean_ci(tuned)
            low, high, clipped = clip_interval(low, high, discrepancy_range(attributes[axis].labels))
            test = paired_test(base_values, tuned)
            row.update({f"{axis}": mean, f"{axis}_low": low, f"{axis}_high": high, f"{axis}_clipped": clipped,
                        f"{axis}_p": test.p_value,
                        f"{axis}_change": mean / float(np.mean(base_values)) - 1.0, f"{axis}_min_p": test.min_p_value})
        row["identity_accuracy"] = float(np.mean([measurement["identity_accuracy"] for measurement in measurements]))
        row["quality"] = float(np.mean([measurement["neutral_toy_quality"] for measurement in measurements]))
        row["validation_discrepancy"] = float(np.mean([measurement.get("validation_discrepancy", np.nan) for measurement in measurements]))
        rows.append(row)
    adjusted = holm_adjusted([row[f"{axis}_p"] for row in rows for axis in AXES])
    for index, row in enumerate(rows):
        for offset, axis in enumerate(AXES):
            row[f"{axis}_holm"] = adjusted[index * len(AXES) + offset]
    lines = ["| method | training occupations | held-out gender discrepancy (change) | Holm p | held-out race discrepancy (change) | Holm p "
             "| identity accuracy | toy quality | best step | validation discrepancy |", "|---|---|---|---|---|---|---|---|---|---|",
             f"| base | - | {np.nanmean(per_prompt(base, 'gender')):.3f} | | {np.nanmean(per_prompt(base, 'race')):.3f} | | "
             f"{base['identity_accuracy']:.1%} | {base['neutral_toy_quality']:.3f} | | |"]
    for row in rows:
        cells = [f"{row[axis]:.3f} [{row[axis + '_low']:.3f}, {row[axis + '_high']:.3f}]{'†' if row[axis + '_clipped'] else ''} "
                 f"({row[axis + '_change']:+.0%}{fewer_prompts(row, axis, len(base['neutral']))}) | {row[axis + '_holm']:.3g}"
                 for axis in AXES]
        lines.append(f"| {row['method']} | {row['size']} | {cells[0]} | {cells[1]} | {row['identity_accuracy']:.1%} | "
                     f"{row['quality']:.3f} | {', '.join(str(step) for step in row['best_steps'])} | {row['validation_discrepancy']:.3f} |")
    return rows, "\n".join(lines)


def method_tests(runs: dict, methods: list[str], bounds: dict[str, tuple[float, float]]) -> list[dict]:
    """Methods compared with each other, per size measured with two or more of them: each against the first of `methods`
    measured at that size, on the held-out prompts (comparison.objective_tests: difference = method - reference per
    prompt, each value the mean over seeds, and per prompt x seed; a paired superiority test and an equivalence test
    against comparison.EQUIVALENCE_MARGINS, declared before any run; each family Holm-corrected over its size's tests;
    intervals cut to the range of a difference, bounds: comparison.discrepancy_bounds)."""
    rows = []
    for size in sorted({size for _, size in runs}):
        held_out = {method: runs[method, size] for method in methods if (method, size) in runs}
        if len(held_out) < 2:
            continue
        reference = next(iter(held_out))
        rows += [{"size": size, **row} for row in comparison.objective_tests(held_out, bounds, reference)]
    return rows


def smallest_holm_p(rows: list[dict]) -> float:
    """The smallest Holm-adjusted p the run's family can reach: min(1, m x p_min), m = rows x axes tests and p_min the
    smallest p any of them allows (the exact paired test over n prompts: 2 / 2^n, every prompt moving the same way; a
    row without paired prompts allows none).
    Below 0.05 only when enough held-out prompts were measured; the table says so beside its p values."""
    allowed = [row[f"{axis}_min_p"] for row in rows for axis in AXES if not np.isnan(row[f"{axis}_min_p"])]
    return min(1.0, len(rows) * len(AXES) * min(allowed)) if allowed else 1.0


def fewer_prompts(row: dict, axis: str, total: int) -> str:
    """The table's note for a row measured on fewer than all held-out prompts (some drew no clean figure)."""
    return f"; {row[axis + '_prompts']} of {total} prompts" if row[axis + "_prompts"] < total else ""


def plot(rows: list[dict], base: dict, floors: dict, path: Path) -> None:
    """Held-out discrepancy against the number of training occupations, one panel per axis, intervals and the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, len(AXES), figsize=(5 * len(AXES), 3.6), sharey=True)
    for panel, axis in zip(panels, AXES):
        for method in sorted({row["method"] for row in rows}):
            points = sorted((row for row in rows if row["method"] == method), key=lambda row: row["size"])
            sizes = [row["size"] for row in points]
            means = np.array([row[axis] for row in points])
            errors = np.array([[row[axis] - row[axis + "_low"] for row in points], [row[axis + "_high"] - row[axis] for row in points]])
            panel.errorbar(sizes, means, yerr=np.nan_to_num(errors), marker="o", capsize=3, label=method)
        panel.axhline(float(np.nanmean(per_prompt(base, axis))), color="black", linestyle="--", label="base")
        panel.axhline(floors[axis], color="grey", linestyle=":", label="floor (fair population)")
        panel.set_title(f"held-out {axis} discrepancy")
        panel.set_xlabel("training occupations")
        panel.set_xticks(sorted({row["size"] for row in rows}))
    panels[0].set_ylabel("mean over held-out prompts")
    panels[-1].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_figure(figure, path, dpi=120)
    plt.close(figure)


@exit_2_on_input_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    comparison.add_toy_study_arguments(parser, output_dir="outputs/generalization")
    parser.add_argument("--train_split", default="train", help="the pool of training occupations")
    parser.add_argument("--sizes", default="1,2,3,4", help="numbers of training occupations")
    parser.add_argument("--methods", default=",".join(MAIN_METHODS), help=f"of {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0", help="training seeds (each also draws the order of the occupations)")
    parser.add_argument("--max_train_steps", type=int, default=300, help="optimizer steps per training (a method may set its own)")
    parser.add_argument("--train_batch_size", type=int, default=32, help="pairs per optimizer step (all processes)")
    parser.add_argument("--validation_steps", type=int, default=100)
    parser.add_argument("--num_validation_images", type=int, default=24)
    parser.add_argument("--num_validation_identity_images", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
        seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
        methods = [method.strip() for method in args.methods.split(",") if method.strip()]
        unknown = [method for method in methods if method not in METHODS]
        if unknown or not methods or not seeds or not sizes:
            raise InputError(f"--methods / --seeds / --sizes: unknown {', '.join(unknown) or 'or empty'} (methods: {', '.join(METHODS)})")
        pairs_file = Path(args.pairs_file)
        if not pairs_file.is_file():
            raise InputError(f"--pairs_file {pairs_file}: not found (run make demo first)")
        attributes = load_attributes(args.attributes)
        neutral = {split: expand_prompts(read_neutral_prompts(args.occupations, split), attributes, list(AXES), DEFAULT_TEMPLATE)
                   for split in (args.train_split, args.validation_split, args.test_split)}
        pool = sorted(set(neutral[args.train_split]["occupation"]))
        if max(sizes) > len(pool) or min(sizes) < 1:
            raise InputError(f"--sizes: the training pool has {len(pool)} occupations")
    except ValueError as error:  # a number that does not parse; InputError goes to exit_2_on_input_error's one line
        raise InputError(f"--sizes / --seeds: {error}") from None
    from popalign.evaluate.metrics import discrepancy_floor
    from popalign.toy.base import check_base_world
    from popalign.toy.world import load_world

    world = load_world(args.occupations, args.attributes)
    check_base_world(args.pretrained_model, world, args.occupations, args.attributes)
    output_dir = Path(args.output_dir)
    validation_prompts = output_dir / "validation_prompts.csv"
    atomic_write_csv(validation_prompts, neutral[args.validation_split])
    test_prompts = neutral[args.test_split]
    training_captions = neutral[args.train_split]
    subsets = {}  # every training set first, so that pairs of another occupation file stop the study before it trains
    for seed in seeds:
        order = training_order(pool, seed)
        for size in sizes:
            chosen = order[:size]
            captions = set(training_captions[(training_captions["kind"] == "neutral") & training_captions["occupation"].isin(chosen)]["prompt"])
            subset = output_dir / "pairs" / f"seed{seed}_size{size}.csv"
            count = subset_pairs(pairs_file, captions, subset)
            if count == 0:
                raise InputError(f"--pairs_file {pairs_file}: no pair is captioned with a neutral prompt of {', '.join(chosen)} "
                                 f"(pairs of another occupation file than --occupations {args.occupations}?)")
            subsets[seed, size] = (chosen, subset, count)
    base = measure(None, test_prompts, args, world, output_dir / "base_heldout.json")
    runs: dict = {}
    for seed in seeds:
        for size in sizes:
            chosen, subset, count = subsets[seed, size]
            for method in methods:
                run_dir = output_dir / "runs" / f"{method}_size{size}_seed{seed}"
                print(f"[{method}] {size} occupations ({', '.join(chosen)}; {count} pairs), seed {seed}", flush=True)
                measured = run_dir / "measure_heldout.json"
                if train(run_dir, method, subset, validation_prompts, seed, args):
                    measured.unlink(missing_ok=True)  # a measurement of weights trained before in this folder
                runs.setdefault((method, size), []).append(measure(run_dir, test_prompts, args, world, measured))
    clean = [row["images"] * row["clean_rate"] for row in base["neutral"]]
    floors = {axis: float(np.mean([discrepancy_floor(int(round(count)), labels) for count in clean]))
              for axis, labels in (("gender", list(world.genders)), ("race", list(world.races)))}
    rows, table = summarise(base, runs, args)
    smallest_holm = smallest_holm_p(rows)
    plot(rows, base, floors, output_dir / "generalization.png")
    command = "python scripts/generalization.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join([f"Held-out occupations ({args.test_split}, {len(set(test_prompts['occupation']))}): mean over prompts [95% interval "
                      f"over prompts], per-prompt values averaged over {len(seeds)} seed(s); the change is against the base; Holm p over the "
                      f"{len(rows) * len(AXES)} tests against the base of this run (exact paired sign-flip over prompts; a prompt of which a model drew no clean "
                      f"figure leaves that row, as noted); with these prompts the smallest Holm p possible is {smallest_holm:.3g} "
                      f"(every prompt moving the same way). Floors: gender "
                      f"{floors['gender']:.3f}, race {floors['race']:.3f}.", "", table, "", f"Command: `{command.strip()}`", ""])
    between = method_tests(runs, methods, comparison.discrepancy_bounds(world.genders, world.races))
    if between:
        text += "\n".join(["", "Between methods, per size (lower is better; difference = method - the first of --methods measured "
                           "there), per held-out prompt (each value the mean over seeds) and per prompt x seed (seeds taken as "
                           "independent: more pairs, anti-conservative if seeds share an effect); equivalence margins declared "
                           "before the runs; Holm over each size's superiority tests, and over its equivalence tests, per unit (sizes "
                           "not corrected together).",
                           "", comparison.tests_table(between, leading=(("training occupations", "size"),), name_header="method"), "",
                           "† an interval cut to the range a difference can take.", ""])
    atomic_write_text(output_dir / "table.md", text)
    atomic_write_json(output_dir / "results.json", {"settings": vars(args), "methods": {name: METHODS[name] for name in methods},
                                                    "common": COMMON, "base": base, "rows": rows, "floors": floors,
                                                    "method_tests": between})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
