"""How many images per prompt does the evaluation need? Measured in the toy world, carried to the SDXL recipe.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/fewer_images.py --output_dir outputs/fewer_images

The shipped toy base draws every prompt of data/toy/occupations.csv (12 neutral, 72 identity-specific) 100 times
through the pipeline's own stages (popalign.generate and popalign.classify under `accelerate launch`, 2 processes),
with the demo's evaluation settings (its DDIM at 20 steps, guidance 3, seed 1). Image seeds are a function of
(seed, prompt, image index), so the first n images of a prompt are exactly what a run of n images draws; every
smaller count is read from these images:

- neutral prompts: the mean discrepancy over prompts with its 95% interval, and the floor a fair population of that
  many figures reads, at 10, 20, 50 and 100 images per prompt;
- identity-specific prompts: eval.sh's TARGET_INTERVAL_WIDTH rule (popalign.evaluate.precision: rounds from 10 images,
  doubling, until the Wilson interval of the prompt's identity accuracy is as narrow as asked, at most 100), replayed
  on these images for several widths: the images it draws and the identity accuracy it reports, against all 100.

Then the cost model (popalign.cost) says what the rule saves on the SDXL recipe.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_WIDTHS = (0.2, 0.1, 0.05)
NEUTRAL_COUNTS = (10, 20, 50, 100)


def run(command: list[str], env: dict) -> None:
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env)
    if completed.returncode != 0:
        raise SystemExit(f"failed ({completed.returncode}): {' '.join(command)}")


def draw_and_classify(output_dir: Path, images: int, processes: int) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "POPALIGN_TOY_OCCUPATIONS": "data/toy/occupations.csv", "POPALIGN_TOY_ATTRIBUTES": "data/toy/attributes.json"}
    prompts, folder = output_dir / "prompts.csv", output_dir / "images"
    run([sys.executable, "1_generate_diverse_prompts.py", "--input", "data/toy/occupations.csv", "--attributes", "data/toy/attributes.json",
         "--axes", "gender,race", "--output", str(prompts)], env)
    launch = ["accelerate", "launch", "--quiet", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", *(["--multi_gpu"] if processes > 1 else [])]
    run([*launch, "-m", "popalign.generate", "--pretrained_model_name_or_path", "models/toy_base", "--prompts_csv", str(prompts),
         "--output_dir", str(folder), "--kinds", "neutral,identity", "--images_per_neutral_prompt", str(images),
         "--images_per_identity_prompt", str(images), "--steps", "20", "--guidance", "3.0", "--width", "32", "--height", "32",
         "--precision", "fp32", "--seed", "1", "--batch_size", "50"], env)
    run([*launch, "-m", "popalign.classify", "--output_dir", str(folder), "--classifier", "toy", "--batch_size", "100"], env)
    return folder


def neutral_table(images: pd.DataFrame, attributes) -> list[str]:
    from popalign.evaluate import metrics

    lines = ["| images per neutral prompt | gender discrepancy: mean [95% CI] (width) | race discrepancy: mean [95% CI] (width) "
             "| floor of a fair population (gender / race) |", "|---|---|---|---|"]
    neutral = images[images["kind"] == "neutral"]
    for count in NEUTRAL_COUNTS:
        cells, floors = [], []
        for axis in ("gender", "race"):
            classes = attributes[axis].labels
            per_prompt, faces = [], []
            for _, group in neutral[neutral["image_index"] < count].groupby("prompt_id"):
                labels = list(group.loc[group["face_detected"], f"predicted_{axis}"])
                per_prompt.append(metrics.discrepancy(labels, classes))
                faces.append(len(labels))
            mean, low, high = metrics.bootstrap_mean_ci(per_prompt, num_resamples=2000, seed=0)
            cells.append(f"{mean:.3f} [{low:.3f}, {high:.3f}] ({high - low:.3f})")
            floors.append(f"{metrics.discrepancy_floor(int(np.median(faces)), classes):.3f}")
        lines.append(f"| {count} | {cells[0]} | {cells[1]} | {' / '.join(floors)} |")
    return lines


def replay_rule(images: pd.DataFrame, attributes, target_width: float, start: int, cap: int) -> pd.DataFrame:
    """Per identity-specific prompt: the images the rule draws, and its faces and right readings at that count."""
    from popalign.evaluate.precision import identity_accuracy_counts, next_image_count

    identity = images[images["kind"] == "identity"]
    rows = []
    for prompt_id, group in identity.groupby("prompt_id"):
        count = start
        while True:
            [row] = identity_accuracy_counts(group[group["image_index"] < count], attributes).itertuples()
            following = next_image_count(row.drawn, row.right, row.faces, target_width, cap)
            if following == count:
                break
            count = following
        rows.append({"prompt_id": prompt_id, "drawn": row.drawn, "faces": row.faces, "right": row.right})
    return pd.DataFrame(rows)


def identity_table(images: pd.DataFrame, attributes, cap: int) -> tuple[list[str], dict[float, float]]:
    from popalign.evaluate import metrics
    from popalign.evaluate.precision import identity_accuracy_counts

    full = identity_accuracy_counts(images[images["kind"] == "identity"], attributes)

    def summary(counts: pd.DataFrame) -> tuple[float, float, float, float]:
        per_prompt = list(counts["right"] / counts["faces"].clip(lower=1))
        mean, low, high = metrics.bootstrap_mean_ci(per_prompt, num_resamples=2000, seed=0)
        return counts["right"].sum() / max(counts["faces"].sum(), 1), mean, low, high

    pooled, mean, low, high = summary(full)
    lines = ["| rule | images drawn (of the fixed count's) | identity accuracy, pooled | mean over prompts [95% CI] "
             "| prompts stopped before the cap |", "|---|---|---|---|---|",
             f"| fixed, {cap} per prompt | {int(full['drawn'].sum()):,} (100%) | {pooled:.3f} | {mean:.3f} [{low:.3f}, {high:.3f}] | - |"]
    fractions = {}
    for width in TARGET_WIDTHS:
        adaptive = replay_rule(images, attributes, width, 10, cap)
        fractions[width] = adaptive["drawn"].sum() / full["drawn"].sum()
        pooled, mean, low, high = summary(adaptive)
        stopped = int((adaptive["drawn"] < cap).sum())
        lines.append(f"| TARGET_INTERVAL_WIDTH={width} | {int(adaptive['drawn'].sum()):,} ({fractions[width]:.0%}) | {pooled:.3f} "
                     f"| {mean:.3f} [{low:.3f}, {high:.3f}] | {stopped} of {len(adaptive)} |")
    return lines, fractions


def rule_at_accuracy(accuracy: float, target_width: float, start: int = 10, cap: int = 100) -> int:
    """The images the rule draws for a prompt whose every reading comes out at exactly `accuracy` (all faces found):
    what a prompt of that accuracy needs, without the sampling noise of a real run."""
    from popalign.evaluate.precision import next_image_count

    count = start
    while True:
        following = next_image_count(count, round(accuracy * count), count, target_width, cap)
        if following == count:
            return count
        count = following


def accuracy_table(cap: int) -> list[str]:
    accuracies = (1.0, 0.95, 0.9, 0.8, 0.5)
    lines = ["| TARGET_INTERVAL_WIDTH | " + " | ".join(f"accuracy {accuracy:.0%}" for accuracy in accuracies) + " |",
             "|---|" + "---|" * len(accuracies)]
    for width in TARGET_WIDTHS:
        lines.append(f"| {width} | " + " | ".join(str(rule_at_accuracy(accuracy, width, cap=cap)) for accuracy in accuracies) + " |")
    return lines


def cost_lines(fractions: dict[float, float]) -> list[str]:
    from popalign.cost import Recipe, generated_image_flops, gpu_hours

    recipe = Recipe.from_repository(processes=8)
    per_image = generated_image_flops("sdxl", recipe.steps, recipe.guidance)
    identity = recipe.eval_models * recipe.eval_neutral_prompts * recipe.eval_identities * recipe.eval_images_per_identity_prompt
    total_images = recipe.training_images + recipe.evaluation_images
    lines = ["| SDXL recipe | images drawn | generation FLOP | H100 GPU-h (40%) | vs the recipe |", "|---|---|---|---|---|",
             f"| as shipped | {total_images:,} | {total_images * per_image:.2e} | {gpu_hours(total_images * per_image, 'H100'):.1f} | 100% |"]
    for width, fraction in fractions.items():
        drawn = total_images - identity + fraction * identity
        lines.append(f"| TARGET_INTERVAL_WIDTH={width} (toy world's share of identity images) | {drawn:,.0f} | {drawn * per_image:.2e} "
                     f"| {gpu_hours(drawn * per_image, 'H100'):.1f} | {drawn / total_images:.0%} |")
    # With a sampler at half the U-Net passes as well (the VAE decode and the prompts unchanged).
    half_steps = generated_image_flops("sdxl", recipe.steps // 2, recipe.guidance)
    width = 0.1
    drawn = total_images - identity + fractions[width] * identity
    lines.append(f"| TARGET_INTERVAL_WIDTH={width} and a sampler at {recipe.steps // 2} steps (not shown equivalent) | {drawn:,.0f} "
                 f"| {drawn * half_steps:.2e} | {gpu_hours(drawn * half_steps, 'H100'):.1f} | {drawn * half_steps / (total_images * per_image):.0%} of the FLOPs |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/fewer_images")
    parser.add_argument("--images", type=int, default=100, help="images per prompt drawn once (the cap of the rule)")
    parser.add_argument("--num_processes", type=int, default=2)
    args = parser.parse_args(argv)
    from popalign.attributes import load_attributes
    from popalign.evaluate.tables import load_image_folder

    output_dir = (REPO_ROOT / args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    folder = draw_and_classify(output_dir, args.images, args.num_processes)
    attributes = load_attributes(REPO_ROOT / "data/toy/attributes.json")
    images = load_image_folder(folder, "toy", attributes, scorers=[])
    identity_lines, fractions = identity_table(images, attributes, args.images)
    print("\n".join(["Neutral prompts (12), the toy base:", "", *neutral_table(images, attributes), "",
                     "Identity-specific prompts (72), the toy base:", "", *identity_lines, "",
                     f"Images the rule draws for a prompt, by its identity accuracy (from 10, doubling, at most {args.images}):", "",
                     *accuracy_table(args.images), "",
                     "Carried to the SDXL recipe (popalign.cost; neutral, generic and training images unchanged):", "",
                     *cost_lines(fractions)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
