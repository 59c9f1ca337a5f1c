"""Does a faster sampler at fewer steps draw the same populations? Measured in the toy world.

    python scripts/fewer_steps.py --output docs/fewer_steps.md

The shipped toy base draws every prompt of data/toy/occupations.csv (12 neutral, 72 identity-specific) with
the reference sampler (its DDIM at 20 steps, the demo's evaluation setting) and with each candidate, on the
same per-prompt seeds, at guidance 3. For each candidate: the paired difference of the neutral prompts'
discrepancies (mean over prompts, 95% interval, exact sign-flip test) and the difference of identity accuracy
(95% interval of a difference of proportions). A candidate is called EQUIVALENT only when both intervals lie
inside the margins declared here before the runs (MARGINS); otherwise the table says what was measured.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from popalign.evaluate import metrics  # noqa: E402
from popalign.attributes import load_attributes  # noqa: E402
from popalign.io import atomic_write_text, exit_2_on_input_error  # noqa: E402
from popalign.prompts import DEFAULT_TEMPLATE, expand_prompts, read_neutral_prompts  # noqa: E402
from popalign.toy.base import check_base_world  # noqa: E402
from popalign.toy.world import load_world  # noqa: E402

REFERENCE = ("default", 20)
CANDIDATES = (("dpmsolver++", 10), ("default", 10), ("dpmsolver++", 5))
# Declared before the runs: a discrepancy difference below the sampling floor of 100 figures (about 0.06) and an
# identity accuracy within 2 points count as no change for a researcher.
MARGINS = {"discrepancy": 0.05, "identity_accuracy": 0.02}


def measure(model: str, scheduler: str, steps: int, prompts, world, images_per_neutral: int, images_per_identity: int, seed: int) -> dict:
    import torch

    from popalign.pipelines import load_text_to_image_pipeline
    from popalign.toy.base import measure_toy_model

    pipeline = load_text_to_image_pipeline(model, torch.float32, torch.device("cpu"), scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return measure_toy_model(pipeline, world, prompts, images_per_identity, images_per_neutral, steps, 3.0, seed, keep_readings=True)


def difference_of_proportions(first: float, second: float, count: int) -> tuple[float, float, float]:
    """(b - a, low, high): normal 95% interval of a difference of two independent proportions of `count` each."""
    difference = second - first
    half = 1.96 * math.sqrt(max(first * (1 - first) + second * (1 - second), 1e-12) / count)
    return difference, difference - half, difference + half


def same_seed_table(runs: dict, prompts) -> list[str]:
    """Markdown lines: each candidate's pictures read differently from the reference's on the same seeds, and whether
    its means lie inside the reference's 95% intervals. Neither is one of the declared margins above."""
    from popalign.evaluate.precision import wilson_interval

    reference = runs[REFERENCE]
    kinds = list(prompts["kind"])
    intervals = {axis: metrics.bootstrap_mean_ci([row[f"{axis}_discrepancy"] for row in reference["neutral"]]) for axis in ("gender", "race")}
    accuracy_interval = wilson_interval(round(reference["identity_accuracy"] * reference["identity_images"]), reference["identity_images"])
    lines = [f"On the same seeds, against the reference's 95% intervals (gender discrepancy {intervals['gender'][0]:.3f} "
             f"[{intervals['gender'][1]:.3f}, {intervals['gender'][2]:.3f}], race {intervals['race'][0]:.3f} "
             f"[{intervals['race'][1]:.3f}, {intervals['race'][2]:.3f}] over prompts; identity accuracy "
             f"{reference['identity_accuracy']:.1%} [{accuracy_interval[0]:.1%}, {accuracy_interval[1]:.1%}], Wilson). "
             "A picture is read differently when its clean flag, occupation, gender or race differs:", "",
             "| sampler | steps | neutral pictures read differently [95% CI] | identity-specific pictures read differently [95% CI] "
             "| mean inside the reference's interval: gender / race discrepancy, identity accuracy |", "|---|---|---|---|---|"]
    for setting in CANDIDATES:
        run, cells = runs[setting], []
        for kind in ("neutral", "identity"):
            changed, pairs = metrics.changed_readings([r for k, r in zip(kinds, reference["readings"]) if k == kind],
                                                      [r for k, r in zip(kinds, run["readings"]) if k == kind])
            low, high = wilson_interval(changed, pairs)
            cells.append(f"{changed / pairs:.1%} [{low:.1%}, {high:.1%}] ({changed} of {pairs})")
        inside = [intervals[axis][1] <= run[f"neutral_{axis}_discrepancy"] <= intervals[axis][2] for axis in ("gender", "race")]
        inside.append(accuracy_interval[0] <= run["identity_accuracy"] <= accuracy_interval[1])
        cells.append(" / ".join("yes" if value else "no" for value in inside))
        lines.append(f"| `{setting[0]}` | {setting[1]} | " + " | ".join(cells) + " |")
    return lines


@exit_2_on_input_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/toy_base")
    parser.add_argument("--occupations", default="data/toy/occupations.csv")
    parser.add_argument("--attributes", default="data/toy/attributes.json")
    parser.add_argument("--images_per_neutral_prompt", type=int, default=100)
    parser.add_argument("--images_per_identity_prompt", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", default="", help="also write the table to this Markdown file")
    parser.add_argument("--measurements_output", default="", help="also write every setting's measurements (per neutral prompt, and each picture's reading) to this JSON file")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    world = load_world(args.occupations, args.attributes)
    check_base_world(args.model, world, args.occupations, args.attributes)
    prompts = expand_prompts(read_neutral_prompts(args.occupations), load_attributes(args.attributes), ["gender", "race"], DEFAULT_TEMPLATE)
    runs = {setting: measure(args.model, *setting, prompts, world, args.images_per_neutral_prompt, args.images_per_identity_prompt, args.seed)
            for setting in (REFERENCE, *CANDIDATES)}
    if args.measurements_output:
        atomic_write_text(args.measurements_output, json.dumps({f"{name} {steps}": run for (name, steps), run in runs.items()}, indent=1))
    reference = runs[REFERENCE]
    lines = [f"Reference: scheduler `{REFERENCE[0]}` (the toy base's DDIM) at {REFERENCE[1]} steps. Same prompts and seeds; "
             f"{args.images_per_neutral_prompt} images per neutral prompt ({len(reference['neutral'])} prompts), "
             f"{args.images_per_identity_prompt} per identity-specific prompt; guidance 3. Margins declared before the runs: "
             f"discrepancy +-{MARGINS['discrepancy']}, identity accuracy +-{MARGINS['identity_accuracy']:.0%}.", "",
             "| sampler | steps | U-Net passes vs reference | gender discrepancy: difference [95% CI] (p) | race discrepancy: difference [95% CI] (p) "
             "| identity accuracy: difference [95% CI] | verdict |", "|---|---|---|---|---|---|---|"]
    for setting in CANDIDATES:
        run = runs[setting]
        cells, inside = [], True
        for axis in ("gender", "race"):
            base = np.array([row[f"{axis}_discrepancy"] for row in reference["neutral"]])
            other = np.array([row[f"{axis}_discrepancy"] for row in run["neutral"]])
            test = metrics.paired_test(base, other)
            inside &= -MARGINS["discrepancy"] <= test.ci_low and test.ci_high <= MARGINS["discrepancy"]
            cells.append(f"{test.mean_difference:+.3f} [{test.ci_low:+.3f}, {test.ci_high:+.3f}] (p {test.p_value:.2g})")
        accuracy = difference_of_proportions(reference["identity_accuracy"], run["identity_accuracy"], reference["identity_images"])
        inside &= -MARGINS["identity_accuracy"] <= accuracy[1] and accuracy[2] <= MARGINS["identity_accuracy"]
        cells.append(f"{accuracy[0]:+.1%} [{accuracy[1]:+.1%}, {accuracy[2]:+.1%}]")
        verdict = "equivalent within the margins" if inside else "not shown equivalent"
        lines.append(f"| `{setting[0]}` | {setting[1]} | {setting[1] / REFERENCE[1]:.0%} | " + " | ".join(cells) + f" | {verdict} |")
    lines += ["", *same_seed_table(runs, prompts)]
    given = argv if argv is not None else sys.argv[1:]
    lines += ["", f"Command: `{' '.join(['python scripts/fewer_steps.py', *given])}`", ""]
    text = "\n".join(lines)
    print(text)
    if args.output:
        atomic_write_text(args.output, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
