"""Agreement of two classifiers that labelled the same images: does a conclusion depend on the classifier?

Given labels_<a>.csv and labels_<b>.csv of one image folder (docs/data_formats.md), per axis (gender, race,
age; or face_detected itself), over the images where both found a face and both gave the axis a label:

    prompt j, with n_j such images, of which m_j got the same label from both:   a_j = m_j / n_j
    agreement        A = (1/J) sum_j a_j            over the J prompts with n_j >= 1, each prompt weighing the same
    its interval     bootstrap_mean_ci(a_1..a_J) (popalign.evaluate.metrics), cut to [0, 1]
    pooled           P = sum_j m_j / sum_j n_j      the share of images
    Cohen's kappa    kappa = (P - P_e) / (1 - P_e),  P_e = sum_k (N_k^a / N) (N_k^b / N)

where N = sum_j n_j and N_k^a, N_k^b count the images classifier a, b labelled k: kappa is the agreement beyond
what two classifiers with these label shares would reach by chance (1: always agree; 0: chance; < 0: below
chance); it is NaN when P_e = 1 (both gave every image one and the same label).

Why prompts, not images, are the unit of the interval: the images of one prompt share a subject, a style and
often a look, and so do the mistakes classifiers make on them; an interval that takes images as independent
(Wilson's) would be too narrow by a factor that grows with the images per prompt. The mean over prompts with
the prompt-level interval is the convention of the evaluation's tables (popalign.evaluate); the pooled share
is given beside it. Kappa is a point estimate: its interval is left out (a percentile bootstrap over few
prompts covers too little, and kappa is not a mean over prompts).

For `face_detected` the images are all images of both files, the labels '1'/'0'.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Mapping, Sequence

import pandas as pd

from popalign.image_folder import ATTRIBUTE_COLUMNS
from popalign.io import InputError, csv_row_number

FACE_AXIS = "face_detected"


@dataclass(frozen=True)
class AxisAgreement:
    """How often two classifiers gave the same label on one axis (module docstring: the equations)."""

    axis: str
    images: int             # N: images with a face and a label of this axis from both classifiers
    prompts: int            # J: prompts with at least one such image
    agreement: float        # A: mean over prompts of the share of agreeing images (NaN without images)
    low: float              # its interval (NaN with fewer than 2 prompts), cut to [0, 1]
    high: float
    clipped: bool           # whether the cut moved a bound
    pooled: float           # P: share over images
    kappa: float            # Cohen's kappa over images (NaN when chance agreement is 1)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (label of a, label of b) -> images


def _face_flags(frame: pd.DataFrame, name: str) -> list[bool]:
    flags = []
    for index, value in enumerate(frame["face_detected"]):
        text = str(value).strip()
        if text in ("1", "True", "true"):
            flags.append(True)
        elif text in ("0", "False", "false"):
            flags.append(False)
        else:
            raise InputError(f"{name}: row {csv_row_number(index)}: face_detected must be 1 or 0, got {value!r}")
    return flags


def _label(value) -> str:
    """'' for a missing label (empty cell, None, NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _indexed(frame: pd.DataFrame, name: str, axes: Sequence[str]) -> dict[str, dict[str, str | bool]]:
    needed = ["image_path", "face_detected", *[axis for axis in axes if axis != FACE_AXIS]]
    missing = [column for column in needed if column not in frame.columns]
    if missing:
        raise InputError(f"{name}: missing column(s) {', '.join(missing)}")
    faces = _face_flags(frame, name)
    rows = {}
    for index, (image_path, face) in enumerate(zip(frame["image_path"], faces)):
        if image_path in rows:
            raise InputError(f"{name}: row {csv_row_number(index)}: image {image_path!r} appears twice")
        rows[image_path] = {FACE_AXIS: face, **{axis: _label(frame[axis].iloc[index]) for axis in axes if axis != FACE_AXIS}}
    return rows


def prompt_of_image_path(image_path: str) -> str:
    """The prompt id in an image folder's path: images/<prompt_id>/<index>.png -> <prompt_id>."""
    return PurePosixPath(str(image_path).replace("\\", "/")).parent.name


def classifier_agreement(first: pd.DataFrame, second: pd.DataFrame, prompt_ids: Mapping[str, str] | None = None,
                         axes: Sequence[str] = ATTRIBUTE_COLUMNS, names: tuple[str, str] = ("labels_a.csv", "labels_b.csv"),
                         confidence: float = 0.95, num_resamples: int = 10000, seed: int = 0) -> dict[str, AxisAgreement]:
    """Agreement of two classifiers per axis: {axis: AxisAgreement}, in the order of `axes`.

    first, second: the two labels files as read (popalign.io.read_csv_checked: every cell a string), holding the
    same image paths in any order. prompt_ids: image_path -> prompt id (the manifest's columns); None reads it from
    the path (images/<prompt_id>/...). names: the two files as error messages name them. An axis no image has a
    label of from both classifiers (one of them does not predict it) gets images = 0 and NaN values.
    """
    from popalign.evaluate.metrics import bootstrap_mean_ci, clip_interval

    axes = list(axes)
    unknown = [axis for axis in axes if axis not in (*ATTRIBUTE_COLUMNS, FACE_AXIS)]
    if unknown:
        raise ValueError(f"unknown axis {unknown[0]!r} (known: {', '.join((*ATTRIBUTE_COLUMNS, FACE_AXIS))})")
    rows_a, rows_b = _indexed(first, names[0], axes), _indexed(second, names[1], axes)
    for rows, other, name in ((rows_a, rows_b, names[1]), (rows_b, rows_a, names[0])):
        absent = [image_path for image_path in rows if image_path not in other]
        if absent:
            raise InputError(f"{name}: no row for image {absent[0]!r} ({len(absent)} image(s) missing): "
                             "both labels files must describe the same images")
    prompt_of = {}
    for image_path in rows_a:
        prompt = prompt_of_image_path(image_path) if prompt_ids is None else prompt_ids.get(image_path)
        if prompt is None or prompt == "":
            raise InputError(f"{names[0]}: image {image_path!r} has no prompt id")
        prompt_of[image_path] = prompt

    results = {}
    for axis in axes:
        pairs_by_prompt: dict[str, list[tuple[str, str]]] = {}
        for image_path, row_a in rows_a.items():
            row_b = rows_b[image_path]
            if axis == FACE_AXIS:
                pair = ("1" if row_a[FACE_AXIS] else "0", "1" if row_b[FACE_AXIS] else "0")
            elif row_a[FACE_AXIS] and row_b[FACE_AXIS] and row_a[axis] and row_b[axis]:
                pair = (row_a[axis], row_b[axis])
            else:
                continue
            pairs_by_prompt.setdefault(prompt_of[image_path], []).append(pair)
        results[axis] = _axis_agreement(axis, pairs_by_prompt, confidence, num_resamples, seed, bootstrap_mean_ci, clip_interval)
    return results


def _axis_agreement(axis, pairs_by_prompt, confidence, num_resamples, seed, bootstrap_mean_ci, clip_interval) -> AxisAgreement:
    pairs = [pair for prompt_pairs in pairs_by_prompt.values() for pair in prompt_pairs]
    if not pairs:
        return AxisAgreement(axis, 0, 0, math.nan, math.nan, math.nan, False, math.nan, math.nan, {})
    per_prompt = [sum(a == b for a, b in prompt_pairs) / len(prompt_pairs) for prompt_pairs in pairs_by_prompt.values()]
    agreement, low, high = bootstrap_mean_ci(per_prompt, num_resamples=num_resamples, confidence=confidence, seed=seed)
    low, high, clipped = clip_interval(low, high, (0.0, 1.0))
    total = len(pairs)
    pooled = sum(a == b for a, b in pairs) / total
    shares_a, shares_b = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    chance = sum(shares_a[label] * shares_b[label] for label in shares_a) / total ** 2
    kappa = math.nan if chance >= 1.0 - 1e-12 else (pooled - chance) / (1.0 - chance)
    return AxisAgreement(axis, total, len(pairs_by_prompt), agreement, low, high, clipped, pooled, kappa, dict(Counter(pairs)))
