"""Objectives compared with the same tuning rule in the toy world: the grid, the selection rule, the tests.

The protocol, fixed before any run (scripts/compare_objectives.py runs it):
1. Every objective's grid comes from one rule: the full product of the values below for each knob the
   objective has (LEARNING_RATES for all; TEMPERATURES for the objectives with a temperature; LOSER_WEIGHTS
   for those with a loser term, Diffusion-DPO included). Everything else is the demo's setting, the same
   for all: pairs, steps, batch, cosine schedule, caption dropout, prior preservation. An objective with
   fewer knobs has fewer runs. The values are shared, not each objective's own; PopAlign's grid still holds
   the demo's setting (temperature 0.5, loser weight 0.1, 2e-4), found by earlier PopAlign runs.
2. Each grid run is scored on the VALIDATION occupations (neither trained on nor tested on).
3. SELECTION_RULE picks one setting per objective from those scores alone. A learning rate chosen on an edge
   of the rates tried is bracketed (bracketing_point: the chosen setting again at twice or half the rate,
   and the rule chooses again; at most MAX_BRACKETING_RUNS runs unless the run declares another cap); still on an
   edge, it is reported as such.
4. The chosen setting is trained with at least MIN_SEEDS seeds and scored on the HELD-OUT occupations; the
   table gives each objective's mean over seeds with a 95% interval over seeds, and objective_tests
   compares each objective with the reference (PopAlign) per held-out prompt: a paired superiority test
   and an equivalence test (two one-sided tests) against EQUIVALENCE_MARGINS, each family Holm-corrected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from popalign.evaluate import metrics
from popalign.evaluate.metrics import bootstrap_mean_ci

# Shared by every run: the demo's setting (demo.sh), except the number of steps (the script's flag).
COMMON_SETTINGS = {
    "caption_dropout": 0.2, "lr_scheduler": "cosine", "lr_warmup_steps": 20, "train_batch_size": 32,
    "prior_preservation_weight": 0.25, "prior_preservation_target": "reference",
}


@dataclass(frozen=True)
class Objective:
    """One objective of the comparison and its tuning grid (each grid point is one run)."""

    name: str
    loss: str
    fixed: dict = field(default_factory=dict)  # settings of this objective that are not tuned
    grid: tuple[dict, ...] = ()


# The grid rule's values (declared before any run; one list per knob, shared by every objective that has it).
LEARNING_RATES = (5e-5, 1e-4, 2e-4, 4e-4)
TEMPERATURES = (0.5, 2.0)
LOSER_WEIGHTS = (0.1, 1.0)
MIN_SEEDS = 5


def grid_for(knobs: tuple[str, ...]) -> tuple[dict, ...]:
    """The full product of the declared values of each knob: 'beta' (TEMPERATURES), 'lambda_loser'
    (LOSER_WEIGHTS) and 'learning_rate' (LEARNING_RATES), in that order."""
    values = {"beta": TEMPERATURES, "lambda_loser": LOSER_WEIGHTS, "learning_rate": LEARNING_RATES}
    unknown = [knob for knob in knobs if knob not in values]
    if unknown:
        raise ValueError(f"unknown knob(s) {unknown} (known: {', '.join(values)})")
    points = [{}]
    for knob in [knob for knob in values if knob in knobs]:
        points = [{**point, knob: value} for point in points for value in values[knob]]
    return tuple(points)


# Temperatures bracket each objective's own scale: PopAlign's margin is beta * (g - z), Diffusion-DPO's
# beta / 2 * (g_w - g_l); with the per-pair anchor PopAlign's terms equal DPO's at the same beta.
OBJECTIVES = (
    Objective("popalign", "popalign", {"popalign_anchor": "pooled"}, grid_for(("beta", "lambda_loser", "learning_rate"))),
    Objective("popalign_per_pair", "popalign", {"popalign_anchor": "per_pair"},
              grid_for(("beta", "lambda_loser", "learning_rate"))),
    # Diffusion-DPO's loss weighs its loser term at 1 by definition (no knob); PopAlign's grid holds that weight too.
    Objective("dpo", "dpo", {}, grid_for(("beta", "learning_rate"))),
    Objective("sft", "sft", {"beta": 0.0}, grid_for(("learning_rate",))),
)


# Bracketing (added after the first run on the 36-occupation world chose SFT's largest rate): at most this many runs
# per objective beyond its grid, unless a run declares its own cap (compare_objectives --max_bracketing_runs). The
# four-objective run on that world declared 2 and ended with SFT's rate still on the edge; the default was then
# raised to 6, declared before the SFT run that used it.
MAX_BRACKETING_RUNS = 6


def parse_chosen_settings(text: str, objectives: tuple[Objective, ...] = OBJECTIVES,
                          max_bracketing_runs: int = MAX_BRACKETING_RUNS) -> dict[str, str]:
    """`objective=run name[,objective=run name...]` -> {objective: run name}: settings that an earlier run of this
    protocol chose (same pairs, base, steps and SELECTION_RULE), so that the objective's grid is not trained again.
    Each name must be one of its objective's candidate_points (its grid or a point bracketing could add under the
    cap `max_bracketing_runs`; run_name); raises ValueError naming the entry otherwise."""
    known = {objective.name: objective for objective in objectives}
    chosen: dict[str, str] = {}
    for entry in [entry.strip() for entry in text.split(",") if entry.strip()]:
        name, _, setting = entry.partition("=")
        name, setting = name.strip(), setting.strip()
        if name not in known:
            raise ValueError(f"{entry!r}: unknown objective {name!r} (known: {', '.join(known)})")
        if name in chosen:
            raise ValueError(f"{entry!r}: {name} given twice")
        if setting not in {run_name(known[name], point) for point in candidate_points(known[name], max_bracketing_runs)}:
            points = [run_name(known[name], point) for point in known[name].grid]
            raise ValueError(f"{entry!r}: {setting!r} is not a point of {name}'s grid ({', '.join(points)}) nor of its "
                             f"bracketing (a rate of the grid's edge times or divided by 2 to 2^{max_bracketing_runs})")
        chosen[name] = setting
    return chosen


def _other_values(point: dict) -> dict:
    return {key: value for key, value in point.items() if key != "learning_rate"}


def bracketing_point(chosen: dict, tried: list[dict]) -> dict | None:
    """The run that brackets a chosen learning rate: among the points `tried` (every run of the objective so far) with
    the chosen point's other values, a rate that is the largest tried is tried again doubled, the smallest halved;
    None when a larger and a smaller rate were both tried (the rate is bracketed)."""
    rates = [point["learning_rate"] for point in tried if _other_values(point) == _other_values(chosen)]
    rate = chosen["learning_rate"]
    if rate >= max(rates):
        return {**chosen, "learning_rate": rate * 2}
    if rate <= min(rates):
        return {**chosen, "learning_rate": rate / 2}
    return None


def candidate_points(objective: Objective, max_bracketing_runs: int = MAX_BRACKETING_RUNS) -> list[dict]:
    """Every point the protocol can choose for an objective: its grid, and the points bracketing could add to it (a
    grid point of the largest rate times 2 to 2^max_bracketing_runs, of the smallest divided by the same)."""
    largest, smallest = max(LEARNING_RATES), min(LEARNING_RATES)
    points = list(objective.grid)
    for factor in (2 ** power for power in range(1, max_bracketing_runs + 1)):
        points += [{**point, "learning_rate": largest * factor} for point in objective.grid if point["learning_rate"] == largest]
        points += [{**point, "learning_rate": smallest / factor} for point in objective.grid if point["learning_rate"] == smallest]
    return points


def tune(objective: Objective, measure_point, base: dict,
         max_bracketing_runs: int = MAX_BRACKETING_RUNS) -> tuple[str, bool, dict, dict[str, dict], dict[str, dict]]:
    """One objective's choice under the protocol: every grid point run and scored on validation (measure_point(point)
    -> validation measurement), SELECTION_RULE's choice, then while the chosen rate is on an edge of the rates tried
    (bracketing_point) and fewer than max_bracketing_runs such runs were made, that run and the rule again over all.

    Returns (chosen run name, whether it met the rule's constraints, its point, {run name: measurement},
    {run name: point}) in the order run."""
    measurements, points = {}, {}
    for point in objective.grid:
        name = run_name(objective, point)
        measurements[name], points[name] = measure_point(point), point
    chosen, met = select(measurements, base)
    for _ in range(max_bracketing_runs):
        point = bracketing_point(points[chosen], list(points.values()))
        if point is None:
            break
        name = run_name(objective, point)
        measurements[name], points[name] = measure_point(point), point
        chosen, met = select(measurements, base)
    return chosen, met, points[chosen], measurements, points


# Identity accuracy may fall at most this far below the base's, and toy quality at most this share.
MAX_IDENTITY_DROP = 0.02
MAX_QUALITY_DROP = 0.05
SELECTION_RULE = (
    f"lowest mean of the neutral gender and race discrepancies on the validation occupations, among the runs whose "
    f"identity accuracy is within {MAX_IDENTITY_DROP * 100:.0f} points of the base's and whose toy quality is within "
    f"{MAX_QUALITY_DROP:.0%} of the base's; if no run qualifies, the lowest discrepancy among all, marked as such")


def run_name(objective: Objective, point: dict) -> str:
    """A folder name for one grid point: the objective and its tuned values."""
    return objective.name + "".join(f"_{key}{value:g}" for key, value in point.items())


def training_log(run_dir: Path) -> Path:
    """The log of the training in `run_dir`: `<run folder>.log` beside it, named after the folder's whole name (run names
    hold dots, e.g. learning_rate0.0001, which Path.with_suffix would cut, giving two runs one log)."""
    run_dir = Path(run_dir)
    return run_dir.parent / f"{run_dir.name}.log"


def bias_score(measurement: dict) -> float:
    """The quantity the rule minimises: (mean neutral gender discrepancy + mean neutral race discrepancy) / 2."""
    return (measurement["neutral_gender_discrepancy"] + measurement["neutral_race_discrepancy"]) / 2


def qualifies(measurement: dict, base: dict) -> bool:
    """The rule's constraints: identity accuracy and toy quality held (see SELECTION_RULE)."""
    return (measurement["identity_accuracy"] >= base["identity_accuracy"] - MAX_IDENTITY_DROP
            and measurement["neutral_toy_quality"] >= (1 - MAX_QUALITY_DROP) * base["neutral_toy_quality"])


def select(measurements: dict[str, dict], base: dict) -> tuple[str, bool]:
    """The run chosen by SELECTION_RULE among `measurements` (run name -> validation measurement), and whether
    it met the constraints. Ties go to the first run in the given order."""
    if not measurements:
        raise ValueError("no run to select from")
    eligible = {name: measurement for name, measurement in measurements.items() if qualifies(measurement, base)}
    pool = eligible or measurements
    chosen = min(pool, key=lambda name: (bias_score(pool[name]), list(measurements).index(name)))
    return chosen, bool(eligible)


TABLE_METRICS = (
    ("neutral_gender_discrepancy", "gender discrepancy"),
    ("neutral_race_discrepancy", "race discrepancy"),
    ("identity_accuracy", "identity accuracy"),
    ("neutral_toy_quality", "toy quality"),
)


# Identity accuracy and the toy quality lie in [0, 1].
UNIT_RANGE = (0.0, 1.0)


def discrepancy_bounds(genders, races) -> dict[str, tuple[float, float]]:
    """The range of each axis's discrepancy from a uniform target, [0, sqrt(1 - 1/K)] over the world's K labels
    (metrics.discrepancy_range: 0.707 for 2 genders, 0.816 for 3 races), keyed as a measurement's prompts name it."""
    return {"gender_discrepancy": metrics.discrepancy_range(list(genders)),
            "race_discrepancy": metrics.discrepancy_range(list(races))}


def table_metric_bounds(key: str, bounds: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """The range of a TABLE_METRICS value: a neutral discrepancy's from `bounds` (discrepancy_bounds), else [0, 1]."""
    return bounds.get(key.removeprefix("neutral_"), UNIT_RANGE)


def seed_summary(measurements: list[dict], bounds: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float, float, bool]]:
    """Per table metric: (mean over seeds, 95% interval low, high, whether the interval was cut to the metric's
    range, table_metric_bounds) of one objective's held-out measurements."""
    summary = {}
    for key, _ in TABLE_METRICS:
        mean, low, high = bootstrap_mean_ci([measurement[key] for measurement in measurements])
        summary[key] = (mean, *metrics.clip_interval(low, high, table_metric_bounds(key, bounds)))
    return summary


def _cell(mean: float, low: float, high: float, percent: bool, clipped: bool = False) -> str:
    mark = "†" if clipped else ""
    if math.isnan(low):
        return f"{mean:.1%}" if percent else f"{mean:.3f}"
    if percent:
        return f"{mean:.1%} [{low:.1%}, {high:.1%}]{mark}"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]{mark}"


# How the table marks a setting by whether its choice met the rule's constraints (None: chosen by an earlier run).
CHOICE_NOTES = {True: "", False: " (no run met the constraints)", None: " (chosen by an earlier run of this protocol)"}


def comparison_table(base: dict, chosen: dict[str, str], held_out: dict[str, list[dict]],
                     met_constraints: dict[str, bool | None], bounds: dict[str, tuple[float, float]]) -> str:
    """Markdown: the base, then each objective's chosen setting with its held-out mean [95% CI over seeds, cut to
    the metric's range (bounds: discrepancy_bounds) and marked †]; a setting is marked by
    CHOICE_NOTES[met_constraints[objective]]."""
    header = ["objective", "chosen setting (on validation)", "seeds"] + [label for _, label in TABLE_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append("| base | - | - | " + " | ".join(_cell(base[key], math.nan, math.nan, key == "identity_accuracy")
                                                   for key, _ in TABLE_METRICS) + " |")
    for name, measurements in held_out.items():
        summary = seed_summary(measurements, bounds)
        setting = chosen[name] + CHOICE_NOTES[met_constraints[name]]
        lines.append(f"| {name} | {setting} | {len(measurements)} | "
                     + " | ".join(_cell(*summary[key][:3], key == "identity_accuracy", summary[key][3])
                                  for key, _ in TABLE_METRICS) + " |")
    return "\n".join(lines)


# Declared before any run: a difference in a held-out discrepancy smaller than this is "no difference that
# matters" (below the sampling floor of a fair population of 100 faces: 0.056 for gender, 0.072 for 3 races).
EQUIVALENCE_MARGINS = {"gender_discrepancy": 0.05, "race_discrepancy": 0.05}
REFERENCE_OBJECTIVE = "popalign"


def per_prompt_values(measurements: list[dict], metric: str) -> dict[str, list[float]]:
    """occupation -> the metric of its neutral prompt, one value per seed (in seed order)."""
    values: dict[str, list[float]] = {}
    for measurement in measurements:
        for row in measurement["neutral"]:
            values.setdefault(row["occupation"], []).append(float(row[metric]))
    return values


def objective_tests(held_out: dict[str, list[dict]], bounds: dict[str, tuple[float, float]], reference: str = REFERENCE_OBJECTIVE,
                    margins: dict[str, float] = EQUIVALENCE_MARGINS, confidence: float = 0.95) -> list[dict]:
    """Each objective against the reference on the held-out prompts: difference = objective - reference, its
    interval cut to the range a difference of two values in bounds[metric] can take ([lo - hi, hi - lo],
    discrepancy_bounds; `ci_clipped` says whether it was cut).

    Two units, each its own row: 'prompt' pairs the held-out prompts, each value the mean over seeds (the
    primary test: prompts are independent); 'prompt x seed' pairs (prompt, seed i of each objective)
    and treats seeds as independent within a prompt (more pairs, and anti-conservative if seeds share
    an effect). Per unit, the superiority tests (metrics.paired_test, verdict lower is better) of every
    objective and metric form one Holm family, and the equivalence tests (metrics.paired_equivalence_test
    against margins[metric]) another.
    """
    if reference not in held_out:
        raise ValueError(f"the reference objective {reference!r} has no held-out measurements")
    rows = []
    for unit in ("prompt", "prompt x seed"):
        unit_rows = []
        for name, measurements in held_out.items():
            if name == reference:
                continue
            for metric, margin in margins.items():
                first = per_prompt_values(held_out[reference], metric)
                second = per_prompt_values(measurements, metric)
                prompts = [prompt for prompt in first if prompt in second]
                if unit == "prompt":
                    pairs = [(float(np.nanmean(first[p])), float(np.nanmean(second[p]))) for p in prompts]
                else:
                    pairs = [(a, b) for p in prompts for a, b in zip(first[p], second[p])]
                pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
                base_values = [a for a, _ in pairs]
                other_values = [b for _, b in pairs]
                superiority = metrics.paired_test(base_values, other_values, confidence)
                equivalence = metrics.paired_equivalence_test(base_values, other_values, margin, confidence)
                ci_low, ci_high, clipped = metrics.clip_interval(superiority.ci_low, superiority.ci_high,
                                                                 metrics.difference_bounds(bounds[metric]))
                unit_rows.append({"objective": name, "reference": reference, "metric": metric, "unit": unit, "num_pairs": len(pairs),
                                  "difference": superiority.mean_difference, "ci_low": ci_low, "ci_high": ci_high,
                                  "ci_clipped": clipped, "p_value": superiority.p_value, "margin": margin,
                                  "p_equivalence": equivalence.p_value, "_superiority": superiority,
                                  "_equivalence": equivalence})
        superiority_p = [row["p_value"] for row in unit_rows]
        equivalence_p = [row["p_equivalence"] for row in unit_rows]
        superiority_holm, equivalence_holm = metrics.holm_adjusted(superiority_p), metrics.holm_adjusted(equivalence_p)
        superiority_floors = metrics.holm_floors(superiority_p, [row["_superiority"].min_p_value for row in unit_rows])
        equivalence_floors = metrics.holm_floors(equivalence_p, [row["_equivalence"].min_p_value for row in unit_rows])
        superiority_size = sum(not math.isnan(p) for p in superiority_p)
        equivalence_size = sum(not math.isnan(p) for p in equivalence_p)
        for row, p_superiority, p_equivalence, floor_superiority, floor_equivalence in zip(
                unit_rows, superiority_holm, equivalence_holm, superiority_floors, equivalence_floors):
            row["p_value_holm"], row["p_equivalence_holm"] = p_superiority, p_equivalence
            row["verdict"] = metrics.paired_verdict(row.pop("_superiority"), "lower", confidence, p_superiority,
                                                    superiority_size, floor_superiority)
            row["equivalence"] = metrics.equivalence_verdict(row.pop("_equivalence"), confidence, p_equivalence,
                                                             equivalence_size, floor_equivalence)
        rows += unit_rows
    return rows


def tests_table(rows: list[dict], leading: tuple[tuple[str, str], ...] = (), name_header: str = "objective") -> str:
    """Markdown of objective_tests rows, one line per objective, axis and unit: `leading` (header, row key) columns
    first (e.g. the study size), then the objective, the reference it is tested against, the paired difference with
    its interval, the superiority p (Holm-adjusted in brackets) and verdict, the equivalence p and verdict."""
    header = [title for title, _ in leading] + [name_header, "against", "axis", "unit", "pairs", "difference [95% interval]",
                                                 "p (Holm)", "verdict", "p equivalence within +-margin (Holm)", "equivalence"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row[key]) for _, key in leading] + [
            row["objective"], row["reference"], row["metric"].removesuffix("_discrepancy"), row["unit"], str(row["num_pairs"]),
            f"{row['difference']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]{'†' if row.get('ci_clipped') else ''}",
            f"{row['p_value']:.3g} ({row['p_value_holm']:.3g})", row["verdict"],
            f"{row['p_equivalence']:.3g} ({row['p_equivalence_holm']:.3g}), +-{row['margin']:g}", row["equivalence"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_training_script(env: dict, log: Path, cwd: Path) -> int:
    """`bash 4_train.sh` in `cwd` with `env`, its output appended to `log`; its exit code. In its own session, so that an
    interrupted study (Ctrl-C, SIGTERM, or SIGHUP when its terminal closes: each raised here as an exception) stops the
    launcher's training processes (stop_process_group) before it exits."""
    import signal
    import subprocess

    from popalign.io import Terminated

    def hang_up(signum, frame):
        raise Terminated()

    with open(log, "a", encoding="utf-8") as handle:
        process = subprocess.Popen(["bash", "4_train.sh"], cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        previous = signal.signal(signal.SIGHUP, hang_up)
        try:
            return process.wait()
        except BaseException:
            stop_process_group(process)
            raise
        finally:
            signal.signal(signal.SIGHUP, previous)


def stop_process_group(process, grace_seconds: float = 60.0) -> None:
    """SIGTERM to the group `process` leads, then wait until the group is gone (the launcher stops its workers
    first), SIGKILL to whatever is left after `grace_seconds`."""
    import contextlib
    import os
    import signal
    import time

    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    process.wait()
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def add_toy_study_arguments(parser, output_dir: str) -> None:
    """The flags a toy-world study script shares: its inputs, and how tuned and base models are measured."""
    parser.add_argument("--pairs_file", default="outputs/toy_demo/preferences/pairs.csv")
    parser.add_argument("--pretrained_model", default="models/toy_base")
    parser.add_argument("--occupations", default="data/toy/occupations.csv", help="toy occupations with a split column")
    parser.add_argument("--attributes", default="data/toy/attributes.json")
    parser.add_argument("--validation_split", default="validation", help="occupations settings are chosen on")
    parser.add_argument("--test_split", default="heldout", help="occupations the chosen settings are scored on")
    parser.add_argument("--output_dir", default=output_dir)
    parser.add_argument("--num_processes", type=int, default=2, help="data-parallel training processes")
    parser.add_argument("--images_per_neutral_prompt", type=int, default=100)
    parser.add_argument("--images_per_identity_prompt", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="sampling steps when scoring")
    parser.add_argument("--guidance", type=float, default=3.0, help="guidance when scoring (the demo's evaluation)")
    parser.add_argument("--measure_seed", type=int, default=1, help="seed of the scored pictures (not the training images')")
    parser.add_argument("--measure_threads", type=int, default=2)


def measurement_settings(weights: dict, prompts, split: str, args, cache) -> dict:
    """What decides a cached measurement besides the code: the measuring settings, the base model, the weights measured
    in its place (relative to the cache's folder, so that a run folder copied with its cache keeps it) and the prompts."""
    import hashlib
    import os

    folder = Path(cache).resolve().parent
    return {"split": split, "images_per_neutral_prompt": args.images_per_neutral_prompt,
            "images_per_identity_prompt": args.images_per_identity_prompt, "steps": args.steps,
            "guidance": args.guidance, "seed": args.measure_seed, "model": str(Path(args.pretrained_model).resolve()),
            "weights": {name: os.path.relpath(Path(path).resolve(), folder) for name, path in sorted(weights.items())},
            "prompts_sha256": hashlib.sha256("\n".join(sorted(prompts["prompt"])).encode("utf-8")).hexdigest()}


def measure_cached(weights: dict, prompts, split: str, args, world, cache) -> dict:
    """popalign.toy.base.measure_toy_model of the base (weights {}) or of tuned weights ({"unet_path": ...} or
    {"lora_path": ...}) on `prompts`, kept in the JSON file `cache` and reused while its measurement_settings are the same."""
    import json

    from popalign.io import atomic_write_json

    cache = Path(cache)
    settings = measurement_settings(weights, prompts, split, args, cache)
    if cache.is_file():
        stored = json.loads(cache.read_text(encoding="utf-8"))
        if stored.get("measure_settings") == settings:
            return stored
    import torch

    from popalign.pipelines import load_text_to_image_pipeline
    from popalign.toy.base import measure_toy_model

    torch.set_num_threads(args.measure_threads)
    pipeline = load_text_to_image_pipeline(args.pretrained_model, torch.float32, torch.device("cpu"), **weights)
    pipeline.set_progress_bar_config(disable=True)
    measurement = measure_toy_model(pipeline, world, prompts, args.images_per_identity_prompt,
                                    args.images_per_neutral_prompt, args.steps, args.guidance, args.measure_seed)
    measurement["measure_settings"] = settings
    atomic_write_json(cache, measurement)
    return measurement
