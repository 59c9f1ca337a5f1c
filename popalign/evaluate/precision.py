"""Stop drawing for an identity-specific prompt once its identity accuracy is measured as precisely as asked.

eval.sh with TARGET_INTERVAL_WIDTH=w draws every identity-specific prompt in rounds: a first round of
MIN_IMAGES_PER_IDENTITY_PROMPT images, then, after classification, this module plans the next round. A prompt whose
identity accuracy (gender and race both read as prompted, among the images with a face) has a 95% Wilson interval
no wider than w is finished; the others double their images, up to `--max_images_per_prompt` (eval.sh's
IMAGES_PER_IDENTITY_PROMPT). Every model evaluated is drawn with the same counts (the most any of them needs), so
base and tuned folders keep the same prompts, image indices and seeds. Image seeds are a function of (seed, prompt,
image index), so a prompt's n images are the first n of the fixed-count run. Neutral prompts keep their fixed count:
their discrepancy is the headline and needs many images (docs/cost.md).

    python -m popalign.evaluate.precision --output_dir outputs/eval/images/base --output_dir outputs/eval/images/popalign \
        --classifier deepface --target_interval_width 0.1 --max_images_per_prompt 100 --counts_csv counts.csv

Writes counts_csv (prompt_id, images) for popalign.generate --images_per_prompt_csv and prints how many prompts need
more images (0: done).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from popalign.io import ArgumentParser, InputError, atomic_write_csv, check_output_location, exit_2_on_input_error

COUNTS_COLUMNS = ["prompt_id", "images"]


def _normal_quantile(probability: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(probability)


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion from `successes` of `trials`:

        p = successes / trials,  z = Phi^-1((1 + confidence) / 2)
        centre = (p + z^2 / (2 n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
        [centre - half, centre + half]

    Unlike p -+ z sqrt(p(1-p)/n), its width does not collapse to 0 when every trial succeeds
    (at p = 1 it is z^2 / (n + z^2)). (0, 1) with no trial.
    """
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return 0.0, 1.0
    z = _normal_quantile((1 + confidence) / 2)
    p, n = successes / trials, trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def next_image_count(drawn: int, successes: int, trials: int, target_width: float, max_images: int,
                     confidence: float = 0.95) -> int:
    """The images a prompt should have after the next round: `drawn` (stop) when the Wilson interval of
    `successes` of `trials` (the images with a face) is at most `target_width` wide or `drawn` reached
    `max_images`; otherwise min(max_images, 2 x drawn)."""
    low, high = wilson_interval(successes, trials, confidence)
    if high - low <= target_width or drawn >= max_images:
        return drawn
    return min(max_images, 2 * max(drawn, 1))


def identity_accuracy_counts(images: pd.DataFrame, attributes) -> pd.DataFrame:
    """Per identity-specific prompt: images drawn, images with a face, and those whose every prompted attribute was
    read as prompted. `images` as popalign.evaluate.tables.load_image_folder returns them."""
    from popalign.evaluate.tables import prompted_attributes

    identity = images[images["kind"] == "identity"]
    rows = []
    for prompt_id, group in identity.groupby("prompt_id", sort=True):
        faces = group[group["face_detected"]]
        right = pd.Series(True, index=faces.index)
        for axis in prompted_attributes(group, attributes):
            right &= faces[f"predicted_{axis}"] == faces[axis]
        rows.append({"prompt_id": prompt_id, "drawn": len(group), "faces": len(faces), "right": int(right.sum())})
    return pd.DataFrame(rows, columns=["prompt_id", "drawn", "faces", "right"])


def plan_next_round(folders: Sequence[str | Path], classifier: str, attributes, target_width: float, max_images: int,
                    confidence: float = 0.95) -> pd.DataFrame:
    """(prompt_id, images, drawn) for every identity-specific prompt: the most images any folder's next_image_count
    asks, and the fewest any folder holds now."""
    from popalign.evaluate.tables import load_image_folder

    wanted: dict[str, int] = {}
    drawn: dict[str, int] = {}
    for folder in folders:
        counts = identity_accuracy_counts(load_image_folder(folder, classifier, attributes, scorers=[]), attributes)
        for row in counts.itertuples():
            images = next_image_count(row.drawn, row.right, row.faces, target_width, max_images, confidence)
            wanted[row.prompt_id] = max(wanted.get(row.prompt_id, 0), images)
            drawn[row.prompt_id] = min(drawn.get(row.prompt_id, row.drawn), row.drawn)
    return pd.DataFrame([(prompt_id, wanted[prompt_id], drawn[prompt_id]) for prompt_id in sorted(wanted)],
                        columns=[*COUNTS_COLUMNS, "drawn"])


def read_image_counts(path: str | Path) -> dict[str, int]:
    """counts_csv -> {prompt_id: images}; each error names the file and row."""
    from popalign.io import csv_row_number, read_csv_checked

    frame = read_csv_checked(path, COUNTS_COLUMNS)
    counts = {}
    for position, (prompt_id, images) in enumerate(zip(frame["prompt_id"], frame["images"])):
        if not str(images).isdigit():
            raise InputError(f"{path}: row {csv_row_number(position)}: images must be a whole number >= 0, got {images!r}")
        if prompt_id in counts:
            raise InputError(f"{path}: row {csv_row_number(position)}: prompt_id {prompt_id} listed twice")
        counts[prompt_id] = int(images)
    return counts


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", action="append", required=True, help="an image folder of one model (repeat for every model)")
    parser.add_argument("--classifier", default="deepface")
    parser.add_argument("--attributes", default=None, help="attribute definition JSON (default: data/attributes.json)")
    parser.add_argument("--target_interval_width", type=float, required=True, help="width of the 95%% interval to reach, e.g. 0.1")
    parser.add_argument("--max_images_per_prompt", type=int, required=True, help="never more images per identity-specific prompt")
    parser.add_argument("--counts_csv", required=True, help="where the next round's counts go (prompt_id, images)")
    parser.add_argument("--validate_only", action="store_true",
                        help="check the flags and where the counts go, read no folder, write nothing, exit (2: what is wrong)")
    return parser


@exit_2_on_input_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from popalign.attributes import DEFAULT_ATTRIBUTES_PATH, load_attributes

    if not 0 < args.target_interval_width < 1:
        raise InputError(f"--target_interval_width must be in (0, 1), got {args.target_interval_width}")
    if args.max_images_per_prompt < 1:
        raise InputError(f"--max_images_per_prompt must be >= 1, got {args.max_images_per_prompt}")
    check_output_location(args.counts_csv, "--counts_csv")
    attributes = load_attributes(args.attributes or DEFAULT_ATTRIBUTES_PATH)
    if args.validate_only:
        return 0
    plan = plan_next_round(args.output_dir, args.classifier, attributes, args.target_interval_width, args.max_images_per_prompt)
    if plan.empty:
        raise InputError(f"--output_dir {', '.join(args.output_dir)}: no identity-specific prompt to plan")
    atomic_write_csv(args.counts_csv, plan[COUNTS_COLUMNS])
    print(int((plan["images"] > plan["drawn"]).sum()))  # prompts that need more images: 0 when every one is done
    return 0


if __name__ == "__main__":
    sys.exit(main())
