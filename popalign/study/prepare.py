"""Build a study folder from eval.sh's image folders (one per model, the same prompts and seeds).

Tasks:
- image tasks: one prompt, one seed, two models; each is asked twice, once per question of IMAGE_QUESTIONS;
- population tasks: one identity-neutral prompt, a grid of the first `grid_size` images of each of two models
  (the same seeds), asked POPULATION_QUESTIONS;
- gold pairs: one picture of the study against a visibly broken copy of itself (blocks shuffled, heavy noise),
  asked GOLD_QUESTION; the rater who picks the broken one (or a tie) fails the check.
Every image is re-encoded (no metadata survives) and stored under a random id; which model drew what is written
only to private/key.json.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from popalign.image_folder import manifest_path, read_manifest
from popalign.io import InputError, atomic_write_json, atomic_write_text, check_output_location, csv_row_number
from popalign.study import (ADMIN_TOKEN_FILE, GOLD_QUESTION, IMAGE_QUESTIONS, IMAGES_DIR, KEY_FILE, POPULATION_QUESTIONS,
                            PRIVATE_DIR, QUESTIONS, STUDY_FILE, TASKS_FILE)

MANIFEST_FIELDS = ("prompt_id", "kind", "prompt", "image_index", "seed")
_MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# Grid tiles: small pictures are enlarged (nearest neighbour) so a grid is readable, large ones shrunk.
MIN_TILE, MAX_TILE = 96, 256


@dataclass(frozen=True)
class StudySettings:
    image_tasks: int = 24          # (prompt, seed) pairs per pair of models; each asked both image questions
    population_tasks: int = 8      # neutral prompts per pair of models
    grid_size: int = 9             # images per model in a population grid
    tasks_per_rater: int = 30      # regular tasks each rater is given (attention checks come on top)
    gold_tasks: int = 6            # gold pairs prepared; each rater sees gold_checks of them
    gold_checks: int = 3
    repeat_checks: int = 2
    max_failed_checks: int = 1     # the exclusion rule: more failed checks than this and a rater's votes are left out
    confidence: float = 0.95
    seed: int = 0


def parse_model_folders(specs: Sequence[str]) -> dict[str, Path]:
    """`NAME=DIR` or `DIR` (the name is the folder's name, as eval.sh names them) -> {name: folder}."""
    folders: dict[str, Path] = {}
    for spec in specs:
        name, separator, folder = spec.partition("=")
        if not separator:
            name, folder = Path(spec.rstrip("/")).name, spec
        if not _MODEL_NAME.fullmatch(name):
            raise InputError(f"--image_dirs {spec!r}: a model name is made of letters, digits, '_', '-', '.'")
        if name in folders:
            raise InputError(f"--image_dirs {spec!r}: model {name!r} given twice (NAME=DIR names them apart)")
        folders[name] = Path(folder)
    if len(folders) < 2:
        raise InputError("--image_dirs: give at least two models' image folders")
    return folders


def check_settings(settings: StudySettings) -> None:
    for flag in ("image_tasks", "population_tasks", "gold_tasks", "gold_checks", "repeat_checks", "max_failed_checks"):
        if getattr(settings, flag) < 0:
            raise InputError(f"--{flag} must be >= 0, got {getattr(settings, flag)}")
    for flag in ("grid_size", "tasks_per_rater"):
        if getattr(settings, flag) < 1:
            raise InputError(f"--{flag} must be >= 1, got {getattr(settings, flag)}")
    if settings.image_tasks + settings.population_tasks == 0:
        raise InputError("--image_tasks and --population_tasks are both 0: the study would have no task")
    if settings.gold_checks > settings.gold_tasks:
        raise InputError(f"--gold_checks {settings.gold_checks} is more than --gold_tasks {settings.gold_tasks}")
    if settings.gold_checks + settings.repeat_checks == 0:
        raise InputError("--gold_checks and --repeat_checks are both 0: no rater could be checked")
    if not 0 < settings.confidence < 1:
        raise InputError(f"--confidence must be in (0, 1), got {settings.confidence}")


def load_common_images(folders: dict[str, Path]) -> pd.DataFrame:
    """One row per (prompt_id, image_index) that every model drew with the same seed: prompt_id, kind, prompt,
    image_index and one column `path:<model>` per model (the image file)."""
    common = None
    first_name = next(iter(folders))
    for name, folder in folders.items():
        manifest = read_manifest(folder, MANIFEST_FIELDS)
        path = manifest_path(folder)
        try:
            manifest["image_index"] = manifest["image_index"].astype(int)
        except ValueError:
            raise InputError(f"{path}: column image_index must hold integers") from None
        manifest = manifest.assign(row=[csv_row_number(position) for position in range(len(manifest))])
        manifest[f"path:{name}"] = [str(folder / image_path) for image_path in manifest["image_path"]]
        columns = ["prompt_id", "image_index", "kind", "prompt", "seed", "row", f"path:{name}"]
        manifest = manifest[columns]
        if common is None:
            common = manifest.drop(columns="row")
            continue
        merged = common.merge(manifest, on=["prompt_id", "image_index"], suffixes=("", ":other"))
        differs = merged["seed"] != merged["seed:other"]
        if differs.any():
            row = merged[differs].iloc[0]
            raise InputError(f"{path}: row {row['row']}: prompt {row['prompt_id']!r} image {row['image_index']} has seed "
                             f"{row['seed:other']}, {first_name}'s has {row['seed']}: the models must be drawn on the "
                             "same seeds (eval.sh does)")
        differs = merged["prompt"] != merged["prompt:other"]
        if differs.any():
            row = merged[differs].iloc[0]
            raise InputError(f"{path}: row {row['row']}: prompt {row['prompt_id']!r} reads {row['prompt:other']!r}, "
                             f"{first_name}'s reads {row['prompt']!r}")
        common = merged[[column for column in merged.columns if not column.endswith(":other") and column != "row"]]
    if common.empty:
        raise InputError("--image_dirs: the folders share no (prompt_id, image_index): nothing to compare")
    return common.sort_values(["prompt_id", "image_index"], kind="stable").reset_index(drop=True)


def _load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable image ({error})") from None


def broken_image(image: Image.Image, seed: int) -> Image.Image:
    """A visibly broken copy: the picture cut into an 8 x 8 grid of blocks, the blocks shuffled, heavy noise added."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = pixels.shape[:2]
    block_height, block_width = max(1, height // 8), max(1, width // 8)
    rows, columns = height // block_height, width // block_width
    cropped = pixels[: rows * block_height, : columns * block_width]
    blocks = cropped.reshape(rows, block_height, columns, block_width, 3).transpose(0, 2, 1, 3, 4)
    blocks = blocks.reshape(rows * columns, block_height, block_width, 3)[rng.permutation(rows * columns)]
    shuffled = blocks.reshape(rows, columns, block_height, block_width, 3).transpose(0, 2, 1, 3, 4)
    pixels = pixels.copy()
    pixels[: rows * block_height, : columns * block_width] = shuffled.reshape(rows * block_height, columns * block_width, 3)
    pixels += rng.normal(0.0, 80.0, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def grid_image(images: Sequence[Image.Image]) -> Image.Image:
    """The images as one picture, in rows of ceil(sqrt(n)), on white with a small gap."""
    tile = int(min(MAX_TILE, max(MIN_TILE, images[0].width)))
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    gap = max(2, tile // 32)
    grid = Image.new("RGB", (columns * tile + (columns - 1) * gap, rows * tile + (rows - 1) * gap), "white")
    for index, image in enumerate(images):
        resample = Image.NEAREST if image.width < tile else Image.LANCZOS
        grid.paste(image.resize((tile, tile), resample), ((index % columns) * (tile + gap), (index // columns) * (tile + gap)))
    return grid


class _ImageStore:
    """Images written under random ids into the staged study; the private record of where each came from."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.records: dict[str, dict] = {}
        self.by_source: dict[tuple, str] = {}

    def new_id(self) -> str:
        while True:
            image_id = secrets.token_hex(8)
            if image_id not in self.records:
                return image_id

    def add(self, image: Image.Image, record: dict, source_key: tuple | None = None) -> str:
        if source_key is not None and source_key in self.by_source:
            return self.by_source[source_key]
        image_id = self.new_id()
        image.save(self.folder / f"{image_id}.png", format="PNG")  # a fresh PNG: no text chunk of the source survives
        self.records[image_id] = record
        if source_key is not None:
            self.by_source[source_key] = image_id
        return image_id


def _task(tasks: list[dict], key: dict, kind: str, question: str, prompt: str, unit: str, models: tuple[str, str],
          images: tuple[str, str]) -> None:
    task_id = f"t{len(tasks) + 1:04d}"
    tasks.append({"id": task_id, "kind": kind, "question": question, "prompt": prompt, "unit": unit,
                  "a": images[0], "b": images[1]})
    key[task_id] = {"a": models[0], "b": models[1]}


def exclusion_rule_text(settings: StudySettings) -> str:
    return (f"A rater's votes are left out when the rater failed more than {settings.max_failed_checks} attention "
            f"check(s), or answered none. Each rater sees {settings.gold_checks} gold pair(s) (one picture visibly "
            "broken; choosing it or a tie fails) and "
            f"{settings.repeat_checks} repeated pair(s) with the sides swapped (a different answer the second time fails).")


def prepare_study(folders: dict[str, Path], output_dir: str | Path, settings: StudySettings) -> dict:
    """Write the study folder (see popalign.study) at `output_dir`, which must not exist yet or be empty; everything
    is written to a staged folder first and moved into place at the end. Returns the study settings written."""
    output_dir = Path(output_dir)
    check_settings(settings)
    check_output_location(output_dir, "--output_dir", folder=True)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise InputError(f"--output_dir {output_dir}: not empty (a study is never overwritten: its votes would no "
                         "longer match its tasks); give a new folder")
    for name, folder in folders.items():
        if not folder.is_dir():
            raise InputError(f"--image_dirs {name}={folder}: no such folder")
    common = load_common_images(folders)
    models = list(folders)
    neutral = common[common["kind"] == "neutral"]
    population_prompts = [prompt_id for prompt_id, group in neutral.groupby("prompt_id", sort=True)
                          if len(group) >= settings.grid_size]
    if settings.population_tasks and not population_prompts:
        raise InputError(f"--grid_size {settings.grid_size}: no identity-neutral prompt has that many images in every "
                         "folder (lower --grid_size, or --population_tasks 0)")
    rng = np.random.default_rng(settings.seed)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.", suffix=".tmp"))
    try:
        (staged / IMAGES_DIR).mkdir()
        (staged / PRIVATE_DIR).mkdir()
        store = _ImageStore(staged / IMAGES_DIR)
        tasks: list[dict] = []
        task_key: dict[str, dict] = {}
        pairs = list(itertools.combinations(models, 2))
        for pair in pairs:
            # As many different prompts as there are tasks (a neutral prompt has many more images than an
            # identity-specific one, and the prompt is the unit of the test), then a random seed of each.
            rows_of_prompt = {prompt_id: list(rows) for prompt_id, rows in common.groupby("prompt_id", sort=True).indices.items()}
            prompt_order = [list(rows_of_prompt)[index] for index in rng.permutation(len(rows_of_prompt))]
            chosen = []
            for task_number in range(min(settings.image_tasks, len(common))):
                rows = rows_of_prompt[prompt_order[task_number % len(prompt_order)]]
                while not rows:  # this prompt's images are all used: the next prompt with any left
                    task_number += 1
                    rows = rows_of_prompt[prompt_order[task_number % len(prompt_order)]]
                chosen.append(rows.pop(int(rng.integers(0, len(rows)))))
            for position in sorted(int(index) for index in chosen):
                row = common.iloc[position]
                order = pair if rng.random() < 0.5 else pair[::-1]
                image_ids = tuple(store.add(_load_rgb(row[f"path:{model}"]),
                                            {"model": model, "kind": "image", "prompt_id": row["prompt_id"],
                                             "image_index": int(row["image_index"]), "seed": row["seed"],
                                             "source": row[f"path:{model}"]},
                                            source_key=(model, row["prompt_id"], int(row["image_index"])))
                                  for model in order)
                for question in IMAGE_QUESTIONS:
                    _task(tasks, task_key, "image", question, row["prompt"], row["prompt_id"], order, image_ids)
            chosen_prompts = rng.permutation(len(population_prompts))[: settings.population_tasks]
            for prompt_id in sorted(population_prompts[int(index)] for index in chosen_prompts):
                group = neutral[neutral["prompt_id"] == prompt_id].head(settings.grid_size)
                order = pair if rng.random() < 0.5 else pair[::-1]
                image_ids = tuple(store.add(grid_image([_load_rgb(path) for path in group[f"path:{model}"]]),
                                            {"model": model, "kind": "population", "prompt_id": prompt_id,
                                             "image_indices": [int(index) for index in group["image_index"]],
                                             "source": list(group[f"path:{model}"])})
                                  for model in order)
                for question in POPULATION_QUESTIONS:
                    _task(tasks, task_key, "population", question, group["prompt"].iloc[0], prompt_id, order, image_ids)
        pool = [task["id"] for task in tasks]
        pool = [pool[index] for index in rng.permutation(len(pool))]
        gold = []
        for gold_index in range(settings.gold_tasks):
            row = common.iloc[int(rng.integers(0, len(common)))]
            model = models[int(rng.integers(0, len(models)))]
            picture = _load_rgb(row[f"path:{model}"])
            source = {"prompt_id": row["prompt_id"], "image_index": int(row["image_index"]), "source": row[f"path:{model}"]}
            image_ids = (store.add(picture, {"model": model, "kind": "gold", **source}),
                         store.add(broken_image(picture, settings.seed * 1000 + gold_index),
                                   {"model": "(broken)", "kind": "gold-broken", **source}))
            _task(tasks, task_key, "gold", GOLD_QUESTION, row["prompt"], row["prompt_id"], (model, "(broken)"), image_ids)
            gold.append(tasks[-1]["id"])
        questions_used = sorted({task["question"] for task in tasks if task["kind"] != "gold"}, key=list(QUESTIONS).index)
        study = {
            "format": 1,
            "questions": {question: QUESTIONS[question] for question in questions_used},
            "settings": settings.__dict__,
            "num_models": len(models),
            "pool": pool,
            "gold": gold,
            "exclusion_rule": exclusion_rule_text(settings),
            "family": {
                "tests": len(questions_used) * len(pairs),
                "text": (f"every question ({', '.join(questions_used)}) x every pair of models ({len(pairs)}): "
                         f"{len(questions_used) * len(pairs)} tests, Holm-adjusted together"),
            },
        }
        atomic_write_json(staged / STUDY_FILE, study)
        atomic_write_json(staged / TASKS_FILE, {"tasks": tasks})
        atomic_write_json(staged / PRIVATE_DIR / KEY_FILE, {
            "models": models, "folders": {name: str(folder) for name, folder in folders.items()},
            "tasks": task_key, "images": store.records})
        atomic_write_text(staged / PRIVATE_DIR / ADMIN_TOKEN_FILE, secrets.token_urlsafe(24) + "\n")
        os.chmod(staged / PRIVATE_DIR / ADMIN_TOKEN_FILE, 0o600)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staged, 0o777 & ~umask)  # mkdtemp's folder is private to its owner
        try:
            if output_dir.exists():
                output_dir.rmdir()  # checked empty above
            os.replace(staged, output_dir)
        except OSError:
            raise InputError(f"--output_dir {output_dir}: something was written there while the study was prepared; "
                             "give a new folder") from None
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return study
