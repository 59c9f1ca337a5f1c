"""Objectives compared with the same tuning budget in the toy world: the grid, the selection rule, the table.

The protocol, fixed before any run (scripts/compare_objectives.py runs it):
1. Every objective gets the same number of runs: a 2 x 2 grid of its own temperature and the learning
   rate (SFT has no temperature: four learning rates). Everything else is the demo's setting, the
   same for all: pairs, steps, batch, cosine schedule, caption dropout, prior preservation.
2. Each grid run is scored on the VALIDATION occupations (neither trained on nor tested on).
3. SELECTION_RULE picks one setting per objective from those scores alone.
4. The chosen setting is trained with several seeds and scored on the HELD-OUT occupations; the
   table gives each objective's mean over seeds with a 95% interval over seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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


def _grid(betas, learning_rates) -> tuple[dict, ...]:
    return tuple({"beta": beta, "learning_rate": learning_rate} for beta in betas for learning_rate in learning_rates)


# The temperatures bracket each objective's own scale: PopAlign's margin is beta * (g - z), Diffusion-DPO's
# beta / 2 * (g_w - g_l); with the per-pair anchor PopAlign's terms equal DPO's at the same beta.
OBJECTIVES = (
    Objective("popalign", "popalign", {"popalign_anchor": "pooled", "lambda_loser": 0.1}, _grid((0.5, 2.0), (1e-4, 2e-4))),
    Objective("popalign_per_pair", "popalign", {"popalign_anchor": "per_pair", "lambda_loser": 0.1},
              _grid((0.5, 2.0), (1e-4, 2e-4))),
    Objective("dpo", "dpo", {}, _grid((0.5, 2.0), (1e-4, 2e-4))),
    Objective("sft", "sft", {"beta": 0.0}, tuple({"learning_rate": rate} for rate in (5e-5, 1e-4, 2e-4, 4e-4))),
)

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


def seed_summary(measurements: list[dict]) -> dict[str, tuple[float, float, float]]:
    """Per table metric: (mean over seeds, 95% interval low, high) of one objective's held-out measurements."""
    return {key: bootstrap_mean_ci([measurement[key] for measurement in measurements]) for key, _ in TABLE_METRICS}


def _cell(mean: float, low: float, high: float, percent: bool) -> str:
    if math.isnan(low):
        return f"{mean:.1%}" if percent else f"{mean:.3f}"
    if percent:
        return f"{mean:.1%} [{low:.1%}, {high:.1%}]"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def comparison_table(base: dict, chosen: dict[str, str], held_out: dict[str, list[dict]],
                     met_constraints: dict[str, bool]) -> str:
    """Markdown: the base, then each objective's chosen setting with its held-out mean [95% CI over seeds]."""
    header = ["objective", "chosen setting (on validation)", "seeds"] + [label for _, label in TABLE_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append("| base | - | - | " + " | ".join(_cell(base[key], math.nan, math.nan, key == "identity_accuracy")
                                                   for key, _ in TABLE_METRICS) + " |")
    for name, measurements in held_out.items():
        summary = seed_summary(measurements)
        setting = chosen[name] + ("" if met_constraints[name] else " (no run met the constraints)")
        lines.append(f"| {name} | {setting} | {len(measurements)} | "
                     + " | ".join(_cell(*summary[key], key == "identity_accuracy") for key, _ in TABLE_METRICS) + " |")
    return "\n".join(lines)


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


def measure_cached(weights: dict, prompts, split: str, args, world, cache) -> dict:
    """popalign.toy.base.measure_toy_model of the base (weights {}) or of tuned weights ({"unet_path": ...} or
    {"lora_path": ...}) on `prompts`, kept in the JSON file `cache` and reused while the measuring settings are the same."""
    import json
    from pathlib import Path

    from popalign.io import atomic_write_json

    cache = Path(cache)
    settings = {"split": split, "images_per_neutral_prompt": args.images_per_neutral_prompt,
                "images_per_identity_prompt": args.images_per_identity_prompt, "steps": args.steps,
                "guidance": args.guidance, "seed": args.measure_seed}
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
