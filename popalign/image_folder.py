"""The image folder that steps 2, 3 and 5 pass between them: one home for its file names and columns.

    <folder>/manifest.csv                 one row per image (MANIFEST_COLUMNS), written by generation
    <folder>/generation_config.json       the settings the images were drawn with (popalign.generate)
    <folder>/images/<prompt_id>/<index>.png
    <folder>/labels_<classifier>.csv      LABEL_COLUMNS, written by popalign.classify
    <folder>/quality_<scorer>.csv         QUALITY_COLUMNS, written by popalign.score

docs/data_formats.md describes each column.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import pandas as pd

from popalign.io import InputError, csv_row_number, read_csv_checked

PROMPT_KINDS = ("neutral", "identity", "generic")
ATTRIBUTE_COLUMNS = ("gender", "race", "age")
MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ["image_path", "prompt_id", "kind", "prompt", "neutral_prompt", "occupation", "activity",
                    *ATTRIBUTE_COLUMNS, "image_index", "seed", "model", "unet", "lora", "vae", "scheduler", "steps",
                    "guidance", "width", "height", "negative_prompt", "precision", "base_seed"]
LABEL_COLUMNS = ["image_path", "face_detected", "gender", "gender_score", "race", "race_score", "age", "age_score", "classifier"]
QUALITY_COLUMNS = ["image_path", "prompt", "score", "scorer", "scorer_description"]
QUALITY_REQUIRED_COLUMNS = QUALITY_COLUMNS[:4]  # scorer_description is optional in files written by hand
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _checked_name(kind: str, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InputError(f"--{kind} {name!r}: expected a name made of letters, digits, '_', '-', '.'")
    return name


def labels_file_name(classifier: str) -> str:
    return f"labels_{_checked_name('classifier', classifier)}.csv"


def quality_file_name(scorer: str) -> str:
    return f"quality_{_checked_name('scorers', scorer)}.csv"


def labels_path(folder: str | Path, classifier: str) -> Path:
    return Path(folder) / labels_file_name(classifier)


def quality_path(folder: str | Path, scorer: str) -> Path:
    return Path(folder) / quality_file_name(scorer)


def manifest_path(folder: str | Path) -> Path:
    return Path(folder) / MANIFEST_NAME


def read_manifest(folder: str | Path, columns: Sequence[str] = ("image_path",)) -> pd.DataFrame:
    """The folder's manifest with `columns`: at least one image, every image listed once and present, and
    every `kind` (when read) one of PROMPT_KINDS. Each error names the file and row."""
    folder = Path(folder)
    path = manifest_path(folder)
    manifest = read_csv_checked(path, list(dict.fromkeys(["image_path", *columns])))
    if manifest.empty:
        raise InputError(f"{path}: no images listed")
    seen: dict[str, int] = {}
    for position, image_path in enumerate(manifest["image_path"]):
        row = csv_row_number(position)
        if not image_path:
            raise InputError(f"{path}: row {row}: empty image_path")
        if image_path in seen:
            raise InputError(f"{path}: row {row}: image {image_path!r} already listed in row {seen[image_path]}")
        if not (folder / image_path).is_file():
            raise InputError(f"{path}: row {row}: image {image_path!r} not found in {folder}")
        seen[image_path] = row
    if "kind" in manifest.columns:
        unknown = ~manifest["kind"].isin(PROMPT_KINDS)
        if unknown.any():
            position = int(unknown.to_numpy().nonzero()[0][0])
            raise InputError(f"{path}: row {csv_row_number(position)}: kind {manifest['kind'].iloc[position]!r} is not one of "
                             f"{', '.join(PROMPT_KINDS)}")
    return manifest
