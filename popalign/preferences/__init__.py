"""Step 3: population preference pairs.

For a neutral prompt ("a photo of a doctor"), the DIVERSE population is the set of images made
from its identity-specific prompts ("a photo of an Asian female doctor", ...) and the BASE
population the images made from the neutral prompt itself. Each iteration of the pairing
algorithm (the original PopAlign's, with its numbers as defaults):

    1. pick a neutral prompt uniformly at random;
    2. draw `population_size` images with replacement from its diverse population and as many
       from its base population; a diverse image is drawn by first picking one of the neutral
       prompt's identity-specific prompts uniformly, then one of its images (`per_identity_prompt`,
       the default), so every identity is drawn equally often even where filtering kept fewer
       images of some identities than of others; `per_image` draws uniformly over the kept images
       (the original's draw, the same as per_identity_prompt when every identity-specific prompt
       kept the same number of images);
    3. the diverse draw wins, unless it has strictly fewer distinct races AND strictly fewer
       distinct genders than the base draw, in which case the roles swap;
    4. emit `population_size` pairs (winner_i, loser_i), every one captioned with the NEUTRAL
       prompt, so the model learns to produce the diverse population from the neutral prompt.

Distinct counts use the classifier's labels (never prompt text): an image without a detected
face carries no label and adds no class to a draw.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from popalign import image_folder
from popalign.attributes import AttributeSet
from popalign.image_folder import PROMPT_KINDS
from popalign.io import InputError, atomic_write_texts, csv_row_number, read_csv_checked
from popalign.locks import output_lock

# The statistic that decides a pair: distinct classified genders and races in a draw.
DIVERSITY_AXES = ("gender", "race")
# How a diverse image is drawn (module docstring, step 2).
DIVERSE_DRAWS = ("per_identity_prompt", "per_image")
# The columns of the image folder's files (popalign.image_folder) this step reads.
NEEDED_MANIFEST_COLUMNS = ["image_path", "kind", "prompt", "neutral_prompt", *DIVERSITY_AXES]
NEEDED_LABEL_COLUMNS = ["image_path", "face_detected", *DIVERSITY_AXES]
PAIR_COLUMNS = [
    "winner_path", "loser_path", "caption", "neutral_prompt", "winner_prompt", "loser_prompt", "winner_side",
    "diverse_distinct_genders", "diverse_distinct_races", "base_distinct_genders", "base_distinct_races", "iteration",
]


def _raise_at_first(mask: pd.Series, path: Path, describe) -> None:
    """Raise an InputError naming the file and line of the first row where `mask` is True."""
    positions = np.flatnonzero(mask.to_numpy())
    if len(positions):
        position = int(positions[0])
        raise InputError(f"{path}: row {csv_row_number(position)}: {describe(position)}")


def _check_unique_paths(frame: pd.DataFrame, path: Path) -> None:
    image_paths = frame["image_path"]
    _raise_at_first(image_paths == "", path, lambda position: "empty image_path")
    first_line = {image_path: csv_row_number(position) for position, image_path in
                  reversed(list(enumerate(image_paths)))}
    _raise_at_first(image_paths.duplicated(), path, lambda position: f"image_path {image_paths.iloc[position]!r} "
                    f"repeats row {first_line[image_paths.iloc[position]]}")


def _check_labels(frame: pd.DataFrame, path: Path, axes: Sequence[str], attributes: AttributeSet) -> None:
    for axis in axes:
        known = attributes[axis].labels
        values = frame[axis]
        _raise_at_first((values != "") & ~values.isin(known), path, lambda position: (
            f"{axis} {values.iloc[position]!r} is not a {axis} label ({', '.join(known)})"))


def _validate_manifest(manifest: pd.DataFrame, path: Path, axes: Sequence[str], attributes: AttributeSet) -> None:
    _check_unique_paths(manifest, path)
    kinds = manifest["kind"]
    _raise_at_first(~kinds.isin(PROMPT_KINDS), path,
                    lambda position: f"kind {kinds.iloc[position]!r} is not one of {', '.join(PROMPT_KINDS)}")
    _raise_at_first((kinds != "generic") & (manifest["neutral_prompt"] == ""), path,
                    lambda position: "empty neutral_prompt")
    _check_labels(manifest, path, axes, attributes)


def _validate_labels(labels: pd.DataFrame, path: Path, axes: Sequence[str], attributes: AttributeSet) -> None:
    _check_unique_paths(labels, path)
    flags = labels["face_detected"]
    _raise_at_first(~flags.isin(["0", "1"]), path,
                    lambda position: f"face_detected {flags.iloc[position]!r} is not 1 or 0")
    _check_labels(labels, path, axes, attributes)
    for axis in DIVERSITY_AXES:
        _raise_at_first((flags == "1") & (labels[axis] == ""), path,
                        lambda position: f"a face was detected but {axis} is empty")


def load_image_records(image_dirs: Sequence[str | Path], classifier: str, attributes: AttributeSet) -> pd.DataFrame:
    """Join every image folder's manifest with its classifier labels on image_path.

    Returns one row per image: `path` (absolute), `kind`, `prompt`, `neutral_prompt`,
    `face_detected` (bool), and for every attribute `prompted_<axis>` (the manifest's label) and
    `<axis>` (the classified label); both are empty where unknown (an attribute missing from
    either file, no face, or not prompted).
    """
    if not image_dirs:
        raise InputError("--image_dirs: name at least one image folder")
    frames = []
    for image_dir in image_dirs:
        image_dir = Path(image_dir)
        if not image_dir.is_dir():
            raise InputError(f"{image_dir}: image folder not found")
        manifest_path, labels_path = image_folder.manifest_path(image_dir), image_folder.labels_path(image_dir, classifier)
        manifest = read_csv_checked(manifest_path, NEEDED_MANIFEST_COLUMNS)
        labels = read_csv_checked(labels_path, NEEDED_LABEL_COLUMNS)
        axes = [axis for axis in attributes.names if axis in manifest.columns and axis in labels.columns]
        _validate_manifest(manifest, manifest_path, axes, attributes)
        _validate_labels(labels, labels_path, axes, attributes)
        labels = labels.set_index("image_path")
        unlabelled = ~manifest["image_path"].isin(labels.index)
        if unlabelled.any():
            position = int(np.flatnonzero(unlabelled.to_numpy())[0])
            raise InputError(f"{labels_path}: no row for image_path {manifest['image_path'].iloc[position]!r} "
                             f"({manifest_path} row {csv_row_number(position)}); "
                             f"{int(unlabelled.sum())} image(s) unclassified")
        labels = labels.loc[manifest["image_path"]]
        real_dir = os.path.realpath(image_dir)
        frame = pd.DataFrame({
            # The folder's symlinks resolved, as the trainer resolves the pairs file's folder.
            "path": [os.path.normpath(os.path.join(real_dir, image_path)) for image_path in manifest["image_path"]],
            "kind": manifest["kind"].to_numpy(),
            "prompt": manifest["prompt"].to_numpy(),
            "neutral_prompt": manifest["neutral_prompt"].to_numpy(),
            "face_detected": (labels["face_detected"] == "1").to_numpy(),
        })
        for axis in attributes.names:
            frame[f"prompted_{axis}"] = manifest[axis].to_numpy() if axis in axes else ""
            frame[axis] = labels[axis].to_numpy() if axis in axes else ""
            frame.loc[~frame["face_detected"], axis] = ""  # a label without a face is not evidence
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def classified_matches_prompted(records: pd.DataFrame, axes: Sequence[str]) -> pd.Series:
    """True where a face was found and, on every axis both prompted and classified, the labels agree.

    Exact label equality ('male' never matches 'female'). Images with no prompted attribute
    (neutral prompts) match vacuously when a face was found.
    """
    matches = records["face_detected"].copy()
    for axis in axes:
        prompted, classified = records[f"prompted_{axis}"], records[axis]
        comparable = (prompted != "") & (classified != "")
        matches &= ~comparable | (prompted == classified)
    return matches


@dataclass
class Population:
    """The images of one side (diverse or base) of one neutral prompt, sorted by path."""

    paths: np.ndarray
    prompts: np.ndarray
    genders: np.ndarray
    races: np.ndarray

    @classmethod
    def from_records(cls, records: pd.DataFrame) -> "Population":
        records = records.sort_values("path", kind="stable")
        return cls(*(records[column].to_numpy(dtype=object) for column in ("path", "prompt", "gender", "race")))

    def __len__(self) -> int:
        return len(self.paths)

    @cached_property
    def _images_by_prompt(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image indices grouped by prompt, each prompt's first position in them, each prompt's image count)."""
        order = np.argsort(self.prompts.astype(str), kind="stable")
        _, counts = np.unique(self.prompts[order].astype(str), return_counts=True)
        return order, np.concatenate([[0], np.cumsum(counts)[:-1]]), counts

    def draw(self, rng: np.random.Generator, size: int, per_prompt: bool) -> np.ndarray:
        """Indices of `size` images drawn with replacement: uniformly over images, or (per_prompt)
        a prompt uniformly over this population's K distinct prompts, then one of its images uniformly.

            per_image:  P(image i) = 1 / N
            per_prompt: P(image i) = 1 / (K * N_prompt(i)),   N_prompt(i) = images of i's prompt
        """
        if not per_prompt:
            return rng.integers(len(self), size=size)
        order, starts, counts = self._images_by_prompt
        chosen = rng.integers(len(counts), size=size)
        return order[starts[chosen] + rng.integers(counts[chosen])]


@dataclass
class Populations:
    """Per neutral prompt, its diverse and base populations after filtering, and what was dropped."""

    diverse: dict[str, Population]
    base: dict[str, Population]
    images_total: int
    ignored_generic: int
    excluded_no_face: dict[str, int]
    excluded_attribute_mismatch: int
    skipped_neutral_prompts: list[dict] = field(default_factory=list)

    @property
    def neutral_prompts(self) -> list[str]:
        """Neutral prompts with images on both sides, sorted, so the draw ignores input order."""
        return sorted(self.diverse)


def build_populations(
    records: pd.DataFrame,
    attribute_names: Sequence[str],
    keep_no_face: bool = False,
    require_attribute_match: bool = False,
) -> Populations:
    """Split image records into diverse (kind=identity) and base (kind=neutral) populations.

    keep_no_face: keep images without a detected face (the original dropped them).
    require_attribute_match: keep only identity-prompted images whose classified attributes equal
    the prompted ones, so that winners show the identities they were asked for.
    Images of `generic` prompts (no person) are ignored and counted. Neutral prompts lacking
    images on either side are listed in `skipped_neutral_prompts`.
    """
    images_total = len(records)
    is_generic = records["kind"] == "generic"
    records = records[~is_generic]
    is_diverse = records["kind"] == "identity"
    no_face = ~records["face_detected"]
    excluded_no_face = {"diverse": 0, "base": 0}
    keep = pd.Series(True, index=records.index)
    if not keep_no_face:
        excluded_no_face = {"diverse": int((no_face & is_diverse).sum()), "base": int((no_face & ~is_diverse).sum())}
        keep &= ~no_face
    excluded_attribute_mismatch = 0
    if require_attribute_match:
        mismatch = is_diverse & keep & ~classified_matches_prompted(records, attribute_names)
        excluded_attribute_mismatch = int(mismatch.sum())
        keep &= ~mismatch
    kept = records[keep]
    diverse_groups = dict(tuple(kept[kept["kind"] == "identity"].groupby("neutral_prompt", sort=True)))
    base_groups = dict(tuple(kept[kept["kind"] == "neutral"].groupby("neutral_prompt", sort=True)))
    diverse, base, skipped = {}, {}, []
    for neutral_prompt in sorted(set(records["neutral_prompt"])):
        diverse_records = diverse_groups.get(neutral_prompt)
        base_records = base_groups.get(neutral_prompt)
        diverse_count = 0 if diverse_records is None else len(diverse_records)
        base_count = 0 if base_records is None else len(base_records)
        if diverse_count == 0 or base_count == 0:
            skipped.append({"neutral_prompt": neutral_prompt, "diverse_images": diverse_count, "base_images": base_count})
            continue
        diverse[neutral_prompt] = Population.from_records(diverse_records)
        base[neutral_prompt] = Population.from_records(base_records)
    return Populations(diverse, base, images_total, int(is_generic.sum()), excluded_no_face,
                       excluded_attribute_mismatch, skipped)


def count_distinct(labels: Sequence[str]) -> int:
    """Number of distinct non-empty labels (an image without a face adds no class)."""
    return len({label for label in labels if label})


def sample_preference_pairs(populations: Populations, num_iterations: int, population_size: int, seed: int,
                            diverse_draw: str = "per_identity_prompt") -> pd.DataFrame:
    """Run the pairing algorithm; returns `num_iterations * population_size` pairs (PAIR_COLUMNS).

    Paths are the populations' (absolute). Deterministic for a seed (numpy PCG64 Generator).
    """
    if num_iterations < 1:
        raise InputError(f"--num_iterations {num_iterations}: must be >= 1")
    if population_size < 1:
        raise InputError(f"--population_size {population_size}: must be >= 1")
    if diverse_draw not in DIVERSE_DRAWS:
        raise InputError(f"--diverse_draw {diverse_draw!r}: must be one of {', '.join(DIVERSE_DRAWS)}")
    neutral_prompts = populations.neutral_prompts
    if not neutral_prompts:
        raise InputError("no neutral prompt has images in both its diverse and its base population "
                         f"(skipped: {len(populations.skipped_neutral_prompts)})")
    rng = np.random.default_rng(seed)
    rows = []
    for iteration in range(num_iterations):
        neutral_prompt = neutral_prompts[rng.integers(len(neutral_prompts))]
        diverse, base = populations.diverse[neutral_prompt], populations.base[neutral_prompt]
        diverse_picks = diverse.draw(rng, population_size, per_prompt=diverse_draw == "per_identity_prompt")
        base_picks = rng.integers(len(base), size=population_size)
        diverse_genders = count_distinct(diverse.genders[diverse_picks])
        diverse_races = count_distinct(diverse.races[diverse_picks])
        base_genders = count_distinct(base.genders[base_picks])
        base_races = count_distinct(base.races[base_picks])
        base_wins = diverse_races < base_races and diverse_genders < base_genders
        (winner, winner_picks), (loser, loser_picks) = ((base, base_picks), (diverse, diverse_picks)) if base_wins \
            else ((diverse, diverse_picks), (base, base_picks))
        for winner_index, loser_index in zip(winner_picks, loser_picks):
            rows.append((winner.paths[winner_index], loser.paths[loser_index], neutral_prompt, neutral_prompt,
                         winner.prompts[winner_index], loser.prompts[loser_index], "base" if base_wins else "diverse",
                         diverse_genders, diverse_races, base_genders, base_races, iteration))
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def winner_label_shares(populations: Populations, pairs: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """Per neutral prompt, the share of its pairs' winners with each classified gender and race label
    (images without a label counted as ""): what the pairs teach that prompt to draw.

        share(prompt, axis, label) = #{pairs of prompt whose winner has label} / #{pairs of prompt}
    """
    labels = {}
    for side in (populations.diverse, populations.base):
        for population in side.values():
            for path, gender, race in zip(population.paths, population.genders, population.races):
                labels[path] = {"gender": gender or "", "race": race or ""}
    shares = {}
    for neutral_prompt, group in pairs.groupby("neutral_prompt", sort=True):
        winners = pd.DataFrame([labels[path] for path in group["winner_path"]])
        shares[neutral_prompt] = {axis: {label: round(float(share), 4) for label, share in
                                         winners[axis].value_counts(normalize=True).sort_index().items()}
                                  for axis in DIVERSITY_AXES}
    return shares


def summary_path_for(pairs_path: str | Path) -> Path:
    """The JSON summary written next to a pairs file: pairs.csv -> pairs.summary.json."""
    pairs_path = Path(pairs_path)
    return pairs_path.with_name(f"{pairs_path.stem}.summary.json")


def _relative_paths(paths: pd.Series, folder: str) -> pd.Series:
    """Absolute paths -> '/'-separated paths relative to `folder` (one relpath per directory, for speed)."""
    relative_dirs: dict[str, str] = {}

    def relative(path: str) -> str:
        directory, name = os.path.split(path)
        if directory not in relative_dirs:
            relative_dirs[directory] = os.path.relpath(directory, folder).replace(os.sep, "/")
        return name if relative_dirs[directory] == "." else f"{relative_dirs[directory]}/{name}"

    return paths.map(relative)


def generate_preferences(
    image_dirs: Sequence[str | Path],
    classifier: str,
    output_path: str | Path,
    attributes: AttributeSet,
    num_iterations: int = 20000,
    population_size: int = 5,
    seed: int = 0,
    keep_no_face: bool = False,
    require_attribute_match: bool = False,
    diverse_draw: str = "per_identity_prompt",
) -> dict:
    """Read step 2's image folders, sample the pairs, write the pairs CSV and its JSON summary.

    Paths in the pairs file are relative to its folder. Both files are written atomically.
    Returns the summary.
    """
    records = load_image_records(image_dirs, classifier, attributes)
    populations = build_populations(records, attributes.names, keep_no_face, require_attribute_match)
    pairs = sample_preference_pairs(populations, num_iterations, population_size, seed, diverse_draw)
    winner_shares = winner_label_shares(populations, pairs)
    output_path = Path(output_path)
    # Symlinks resolved on both sides, as the trainer resolves the pairs file's folder.
    pairs_folder = os.path.realpath(output_path.parent)
    for column in ("winner_path", "loser_path"):
        pairs[column] = _relative_paths(pairs[column], pairs_folder)
    summary = {
        "pairs_file": str(output_path),
        "image_dirs": [str(image_dir) for image_dir in image_dirs],
        "classifier": classifier,
        "seed": seed,
        "num_iterations": num_iterations,
        "population_size": population_size,
        "keep_no_face": keep_no_face,
        "require_attribute_match": require_attribute_match,
        "diverse_draw": diverse_draw,
        "num_pairs": len(pairs),
        "iterations_won_by_base": int((pairs["winner_side"] == "base").sum() // population_size),
        "images_total": populations.images_total,
        "images_ignored_generic": populations.ignored_generic,
        "images_excluded_no_face": populations.excluded_no_face,
        "images_excluded_attribute_mismatch": populations.excluded_attribute_mismatch,
        "neutral_prompts_used": len(populations.neutral_prompts),
        "skipped_neutral_prompts": populations.skipped_neutral_prompts,
        "population_sizes": {prompt: {"diverse": len(populations.diverse[prompt]), "base": len(populations.base[prompt])}
                             for prompt in populations.neutral_prompts},
        "winner_label_shares": winner_shares,
    }
    pairs_text = pairs.to_csv(index=False, quoting=csv.QUOTE_MINIMAL)
    # The summary names the pairs file it describes by content; both are written in full before either is renamed into
    # place, under a lock, so two runs never leave one's pairs beside the other's summary.
    summary["pairs_sha256"] = hashlib.sha256(pairs_text.encode("utf-8")).hexdigest()
    with output_lock(output_path.parent, output_path.name):
        atomic_write_texts({output_path: pairs_text, summary_path_for(output_path): json.dumps(summary, indent=2, sort_keys=True) + "\n"})
    return summary
