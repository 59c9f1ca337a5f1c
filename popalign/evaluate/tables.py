"""Evaluation tables from classified and scored image folders: per prompt, summary, base vs tuned.

Input: one or more image folders per model (docs/data_formats.md), each with `manifest.csv`,
`labels_<classifier>.csv` and any number of `quality_<scorer>.csv` (image_path, prompt, score, scorer).
A model's folders are read as one set of images (e.g. people prompts in one folder and generic
prompts, generated with fewer images each, in another); a prompt may appear in only one of them.

Output, in the report folder:
    per_prompt_<model>.csv       one row per prompt: counts, bias metrics, accuracy, mean quality
    distributions_<model>.csv    label counts per neutral prompt and pooled, for every attribute
    summary.csv                  per model and prompt kind: mean over prompts [interval], pooled value, floor
    comparison.csv               per tuned model: exact paired sign-flip test over prompts of tuned - base, verdict
    classifier.csv               the classifier's confusion matrix, estimated on the base's identity-specific prompts
    corrected_shares.csv         pooled neutral shares per model, observed and corrected for the classifier's confusion
    evaluation.json              all of the above plus the settings and counts

Which metric applies to which prompt kind:
    neutral   bias metrics (discrepancy, its unbiased square, total variation, KL to the target, the
              pairwise gap; with identity-specific prompts, the discrepancy of classifier-corrected
              shares) per attribute and intersectional, face-detection rate, quality; and per
              attribute the discrepancy floor of a fair population of the same size
    identity  attribute accuracy (exact label match with the prompted label), detection rate, quality
    generic   detection rate (no person is asked for) and quality
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from popalign.evaluate import metrics
from popalign.attributes import AttributeSet
from popalign.image_folder import (PROMPT_KINDS, QUALITY_REQUIRED_COLUMNS, labels_file_name, labels_path, quality_path,
                                   read_manifest)
from popalign.io import InputError, atomic_write_csv, atomic_write_json, read_csv_checked

PROMPT_COLUMNS = ["prompt_id", "kind", "prompt", "neutral_prompt", "occupation", "activity"]
POOLED = "pooled"
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Bias metric name -> function of (labels, classes, target). Lower is better for all of them.
BIAS_METRICS = {
    "discrepancy": metrics.discrepancy,
    "sq_discrepancy_unbiased": metrics.unbiased_squared_discrepancy,
    "total_variation": metrics.total_variation,
    "kl": metrics.kl_to_target,
    # Shen et al. measure against balance whatever the target.
    "pairwise_gap": lambda labels, classes, target: metrics.pairwise_gap(labels, classes),
}
# The discrepancy of the classifier-corrected shares (per-prompt column discrepancy_corrected_<attribute>), and the
# value a fair population of the prompt's size would read (floor_<metric>, not a metric) for the metrics that have one.
CORRECTED_DISCREPANCY = "discrepancy_corrected"
FLOOR_PREFIX = "floor_"
DISCREPANCY_FLOOR = f"{FLOOR_PREFIX}discrepancy"
BIAS_PREFIXES = tuple(f"{name}_" for name in BIAS_METRICS)
# Which per-prompt columns are metrics of which prompt kind (columns are named <metric>_<attribute>).
KIND_METRIC_PREFIXES = {
    "neutral": ("face_detection_rate", *BIAS_PREFIXES, "quality_"),
    "identity": ("face_detection_rate", "accuracy_", "quality_"),
    "generic": ("face_detection_rate", "quality_"),
}


@dataclass(frozen=True)
class EvaluationSettings:
    """What the tables are computed with.

    axes: attributes whose distribution is measured on neutral prompts (labels from the classifier).
    intersectional: two axes whose joint distribution is also measured (e.g. race x gender), or ().
    targets: attribute -> {label: probability}; a missing attribute means uniform over its labels.
    correct_for_classifier: the headline reads the discrepancy of classifier-corrected shares (always
    shown in the classifier section) instead of the observed one.
    split, occupation_splits: with a split (e.g. 'heldout'), only the neutral and identity-specific prompts
    of the occupations that occupation_splits (occupation -> split) puts in it; generic prompts stay.
    """

    classifier: str = "deepface"
    axes: tuple[str, ...] = ("gender", "race")
    intersectional: tuple[str, ...] = ("race", "gender")
    targets: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    num_resamples: int = 10000
    confidence: float = 0.95
    seed: int = 0
    correct_for_classifier: bool = False
    split: str = ""
    occupation_splits: Mapping[str, str] = field(default_factory=dict)
    compare_on_intersection: bool = False
    min_confusion_singular_value: float = metrics.MIN_CONFUSION_SINGULAR_VALUE
    min_identity_images_per_class: int = metrics.MIN_IDENTITY_IMAGES_PER_CLASS


@dataclass
class ModelEvaluation:
    """Tables for one model's image folders."""

    name: str
    folders: list[Path]
    # One row per image: manifest columns, folder, image_file (the full path), face_detected, predicted_<attribute>,
    # quality_<scorer>.
    images: pd.DataFrame
    per_prompt: pd.DataFrame
    distributions: pd.DataFrame
    summary: pd.DataFrame
    scorers: list[str]
    # scorer -> {"scorer": distinct values of its files' `scorer` column,
    #           "description": distinct values of the optional `scorer_description` column (model, checkpoint, formula)}
    scorer_info: dict[str, dict[str, list[str]]]
    classifier_settings: dict  # the classifier's settings file of the first folder
    generation_configs: dict[str, dict]  # folder -> its generation_config.json


@dataclass
class EvaluationResult:
    settings: EvaluationSettings
    attributes: AttributeSet
    base: ModelEvaluation
    tuned: list[ModelEvaluation]
    comparison: pd.DataFrame
    image_pairing: dict[str, dict]  # tuned model name -> how many images pair with the base by seed
    # The classifier's confusion on the base's identity-specific prompts: one row per (attribute, prompted label,
    # read label) with count and rate; empty without identity-specific prompts.
    confusion: pd.DataFrame = field(default_factory=pd.DataFrame)
    # Pooled neutral shares per model, attribute and label: observed, corrected, corrected interval.
    corrected_shares: pd.DataFrame = field(default_factory=pd.DataFrame)
    # attribute -> whether its confusion estimate may be used to correct (metrics.check_confusion), and why not.
    confusion_checks: dict[str, metrics.ConfusionCheck] = field(default_factory=dict)
    # With compare_on_intersection: model name -> images left out because no other model has their twin.
    left_out: dict[str, int] = field(default_factory=dict)


def intersectional_name(axes: Sequence[str]) -> str:
    return "_x_".join(axes)


def metric_direction(metric: str, kind: str) -> str:
    """'lower', 'higher' or 'neither': which way is better for a metric of prompts of `kind`."""
    if kind not in KIND_METRIC_PREFIXES:
        raise ValueError(f"unknown prompt kind {kind!r} (known: {', '.join(PROMPT_KINDS)})")
    if metric == "face_detection_rate" and kind == "generic":
        return "neither"  # no person is asked for; a change is worth seeing, not ranking
    if metric.startswith(BIAS_PREFIXES):
        return "lower"
    if metric.startswith(("accuracy_", "quality_", "face_detection_rate")):
        return "higher"
    raise ValueError(f"unknown metric {metric!r}")


def metric_bounds(metric: str, attributes: AttributeSet, settings: EvaluationSettings) -> tuple[float, float] | None:
    """The range a metric's true value can take (intervals are cut to it), or None where it is unbounded (quality).

    discrepancy (observed or corrected) in [0, max_k ||e_k - t||]; its unbiased square in [0, that squared];
    total variation in [0, 1 - min_k t_k]; KL in [0, -log min_k t_k]; the pairwise gap in [0, 2 / K];
    accuracy and detection rate in [0, 1].
    """
    if metric.startswith(("accuracy_", "face_detection_rate")):
        return (0.0, 1.0)
    if metric.startswith("quality_"):
        return None
    for name in sorted(BIAS_METRICS, key=len, reverse=True):
        if metric.startswith(f"{name}_"):
            attribute = metric[len(name) + 1:]
            if name == "discrepancy" and attribute.startswith("corrected_"):
                attribute = attribute[len("corrected_"):]
            classes = bias_class_lists(attributes, settings)[attribute]
            target = metrics.target_distribution(classes, settings.targets.get(attribute))
            largest = metrics.discrepancy_range(classes, target)[1]
            with np.errstate(divide="ignore"):
                return {"discrepancy": (0.0, largest), "sq_discrepancy_unbiased": (0.0, largest ** 2),
                        "total_variation": (0.0, float(1.0 - target.min())),
                        "kl": (0.0, float(-np.log(target.min()))), "pairwise_gap": (0.0, 2.0 / len(classes))}[name]
    raise ValueError(f"unknown metric {metric!r}")


def headline_discrepancies(axes: Sequence[str], corrected: frozenset = frozenset()) -> frozenset:
    """The headline's bias metrics: the neutral prompts' discrepancy of each measured axis, the corrected one for
    the axes in `corrected` (headline_corrected_attributes). The intersectional pair's discrepancy is not one of
    them: it stays in the tables, outside the Holm family, read as exploratory."""
    return frozenset(f"{CORRECTED_DISCREPANCY}_{axis}" if axis in corrected else f"discrepancy_{axis}" for axis in axes)


def is_headline_metric(metric: str, kind: str, axes: Sequence[str], corrected: frozenset = frozenset()) -> bool:
    """The headline's metrics: headline_discrepancies of the neutral prompts, and quality, identity accuracy,
    generic quality."""
    if kind == "neutral" and metric.startswith("discrepancy_"):
        return metric in headline_discrepancies(axes, corrected)
    prefixes = {"neutral": ("quality_",), "identity": ("accuracy_",), "generic": ("quality_",)}
    return metric.startswith(prefixes[kind])


# ---------------------------------------------------------------------------------------------
# Reading a folder


def _read_json_if_present(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: invalid JSON ({error})") from None


def _check_covers(manifest_paths: pd.Series, other: pd.DataFrame, other_path: Path, hint: str) -> None:
    duplicated = other["image_path"].duplicated()
    if duplicated.any():
        raise InputError(f"{other_path}: image {other['image_path'][duplicated].iloc[0]!r} has more than one row")
    missing = ~manifest_paths.isin(other["image_path"])
    if missing.any():
        raise InputError(f"{other_path}: no row for {int(missing.sum())} of {len(manifest_paths)} images of "
                         f"manifest.csv (first: {manifest_paths[missing].iloc[0]!r}); {hint}")


def discover_scorers(folder: str | Path) -> list[str]:
    """Scorer names of the quality_<scorer>.csv files in a folder, sorted."""
    return sorted(path.stem[len("quality_"):] for path in Path(folder).glob("quality_*.csv"))


def load_image_folder(folder: str | Path, classifier: str, attributes: AttributeSet,
                      scorers: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per image of the manifest with its predicted labels and quality scores.

    Columns: the manifest's, `face_detected` (bool), `predicted_<attribute>` for every attribute
    (empty when no face or not predicted), and `quality_<scorer>` (float) for every scorer
    (all quality_*.csv files of the folder when `scorers` is None). Every manifest image must have
    a label row and a score row: a partial file means a stage has not finished.
    """
    folder = Path(folder)
    manifest = read_manifest(folder, ["image_path", "image_index", "seed", *PROMPT_COLUMNS, *attributes.names])

    labels_file = labels_path(folder, classifier)
    labels = read_csv_checked(labels_file, ["image_path", "face_detected", *attributes.names])
    _check_covers(manifest["image_path"], labels, labels_file, "run classification (popalign.classify) to finish it")
    for attribute in attributes.names:
        outside = ~labels[attribute].isin(["", *attributes[attribute].labels])
        if outside.any():
            raise InputError(f"{labels_file}: {attribute} label {labels[attribute][outside].iloc[0]!r} is not one of "
                             f"{attributes[attribute].labels}")
    bad_flags = ~labels["face_detected"].isin(["0", "1"])
    if bad_flags.any():
        raise InputError(f"{labels_file}: face_detected must be 1 or 0, got {labels['face_detected'][bad_flags].iloc[0]!r}")
    labels = labels[["image_path", "face_detected", *attributes.names]].rename(
        columns={name: f"predicted_{name}" for name in attributes.names})
    labels["face_detected"] = labels["face_detected"] == "1"
    images = manifest.merge(labels, on="image_path", how="left", validate="one_to_one")

    for scorer in discover_scorers(folder) if scorers is None else scorers:
        quality_file = quality_path(folder, scorer)
        quality = read_csv_checked(quality_file, QUALITY_REQUIRED_COLUMNS)
        _check_covers(manifest["image_path"], quality, quality_file, "run popalign.score to finish it")
        scores = pd.to_numeric(quality["score"], errors="coerce")
        if scores.isna().any():
            raise InputError(f"{quality_file}: score {quality['score'][scores.isna()].iloc[0]!r} is not a number")
        column = pd.Series(scores.to_numpy(), index=quality["image_path"], name=f"quality_{scorer}")
        images[f"quality_{scorer}"] = images["image_path"].map(column).astype(float)
    images["image_index"] = images["image_index"].astype(int)
    images["folder"] = str(folder)
    images["image_file"] = [str(folder / path) for path in images["image_path"]]
    return images


def load_image_folders(folders: Sequence[str | Path], classifier: str, attributes: AttributeSet,
                       scorers: Sequence[str] | None = None) -> pd.DataFrame:
    """The images of several folders of one model as one table (see load_image_folder).

    With `scorers` None, the scorers are those whose quality file exists in EVERY folder, so
    every image has every quality column. A prompt_id found in two folders is an error.
    """
    if not folders:
        raise InputError("no image folder given")
    if scorers is None:
        scorers = sorted(set.intersection(*(set(discover_scorers(folder)) for folder in folders)))
    tables = [load_image_folder(folder, classifier, attributes, scorers) for folder in folders]
    seen: dict[str, str] = {}
    for folder, table in zip(folders, tables):
        for prompt_id in table["prompt_id"].unique():
            if prompt_id in seen:
                raise InputError(f"prompt {prompt_id} is in both {seen[prompt_id]} and {folder}: give each prompt one folder")
            seen[prompt_id] = str(folder)
    return pd.concat(tables, ignore_index=True)


def scorer_info(folders: Sequence[str | Path], scorer: str) -> dict[str, list[str]]:
    """What a scorer's quality files say about it: distinct `scorer` and `scorer_description` values."""
    names, descriptions = set(), set()
    for folder in folders:
        quality = read_csv_checked(quality_path(folder, scorer), QUALITY_REQUIRED_COLUMNS)
        names.update(quality["scorer"])
        if "scorer_description" in quality.columns:
            descriptions.update(value for value in quality["scorer_description"] if value)
    return {"scorer": sorted(names), "description": sorted(descriptions)}


# ---------------------------------------------------------------------------------------------
# Per-prompt metrics


def bias_class_lists(attributes: AttributeSet, settings: EvaluationSettings) -> dict[str, list[str]]:
    """The fixed class list of every measured attribute, then of the intersectional pair (joint labels)."""
    class_lists = {axis: attributes[axis].labels for axis in settings.axes}
    if settings.intersectional:
        class_lists[intersectional_name(settings.intersectional)] = metrics.product_classes(
            *(attributes[axis].labels for axis in settings.intersectional))
    return class_lists


def bias_populations(images: pd.DataFrame, attributes: AttributeSet,
                     settings: EvaluationSettings) -> list[tuple[str, list, list[str]]]:
    """(name, predicted labels, classes) of every measured attribute, then of the intersectional pair."""
    populations = [(axis, list(images[f"predicted_{axis}"]), attributes[axis].labels) for axis in settings.axes]
    if settings.intersectional:
        populations.append((intersectional_name(settings.intersectional),
                            metrics.joint_labels(*(list(images[f"predicted_{axis}"]) for axis in settings.intersectional)),
                            bias_class_lists(attributes, settings)[intersectional_name(settings.intersectional)]))
    return populations


def _bias_values(images: pd.DataFrame, attributes: AttributeSet, settings: EvaluationSettings,
                 confusions: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Bias metrics of one population of images (a prompt's, or pooled), and its discrepancy floor."""
    values = {}
    for name, labels, classes in bias_populations(images, attributes, settings):
        target = settings.targets.get(name)
        for metric_name, function in BIAS_METRICS.items():
            values[f"{metric_name}_{name}"] = function(labels, classes, target)
        if name in confusions:
            corrected = metrics.partial_corrected_shares(metrics.empirical_distribution(labels, classes), confusions[name])
            values[f"{CORRECTED_DISCREPANCY}_{name}"] = (
                math.nan if np.isnan(corrected).any()
                else float(np.linalg.norm(corrected - metrics.target_distribution(classes, target))))
    for name, labels, classes in bias_populations(images, attributes, settings):
        faces = int(metrics.label_counts(labels, classes).sum())
        target = settings.targets.get(name)
        values[f"{FLOOR_PREFIX}discrepancy_{name}"] = metrics.discrepancy_floor(faces, classes, target)
        values[f"{FLOOR_PREFIX}pairwise_gap_{name}"] = metrics.pairwise_gap_floor(faces, classes)
        if name in confusions:
            values[f"{FLOOR_PREFIX}{CORRECTED_DISCREPANCY}_{name}"] = metrics.corrected_discrepancy_floor(
                faces, classes, confusions[name], target)
    return values


def prompted_attributes(images: pd.DataFrame, attributes: AttributeSet) -> list[str]:
    """The attributes an identity-specific prompt's images were all prompted with (their manifest column is set)."""
    return [name for name in attributes.word_order if (images[name] != "").all()]


def _accuracy_values(images: pd.DataFrame, attributes: AttributeSet) -> dict[str, float]:
    """Attribute accuracy per prompted attribute, and joint accuracy (all prompted attributes right)."""
    prompted_axes = prompted_attributes(images, attributes)
    values = {}
    for axis in prompted_axes:
        values[f"accuracy_{axis}"] = metrics.attribute_accuracy(
            list(images[f"predicted_{axis}"]), list(images[axis]), attributes[axis].labels)
    if len(prompted_axes) > 1:
        joint_predicted = metrics.joint_labels(*(list(images[f"predicted_{axis}"]) for axis in prompted_axes))
        joint_prompted = metrics.joint_labels(*(list(images[axis]) for axis in prompted_axes))
        values[f"accuracy_{intersectional_name(prompted_axes)}"] = metrics.attribute_accuracy(joint_predicted, joint_prompted)
    return values


def _common_values(images: pd.DataFrame, scorers: Sequence[str]) -> dict[str, float]:
    """Counts, face-detection rate and mean quality: defined for every prompt kind."""
    values = {"num_images": len(images), "num_faces": int(images["face_detected"].sum()),
              "face_detection_rate": metrics.face_detection_rate(list(images["face_detected"]))}
    for scorer in scorers:
        values[f"quality_{scorer}"] = float(images[f"quality_{scorer}"].mean())
    return values


def _population_values(images: pd.DataFrame, kind: str, attributes: AttributeSet, settings: EvaluationSettings,
                       scorers: Sequence[str], confusions: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Every metric of one prompt's images (all of one kind)."""
    common = _common_values(images, scorers)
    # Column order of the tables: counts, the kind's own metrics, detection rate, quality.
    values = {"num_images": common.pop("num_images"), "num_faces": common.pop("num_faces")}
    if kind == "neutral":
        values.update(_bias_values(images, attributes, settings, confusions))
    elif kind == "identity":
        values.update(_accuracy_values(images, attributes))
    elif kind != "generic":
        raise ValueError(f"unknown prompt kind {kind!r}")
    values.update(common)
    return values


def _pooled_accuracy(images: pd.DataFrame, metric: str) -> float:
    """accuracy_<a>[_x_<b>] over all images prompted with those attributes, each against its own prompt."""
    axes = metric[len("accuracy_"):].split("_x_")
    relevant = images[(images[axes] != "").all(axis=1)]
    predicted = metrics.joint_labels(*(list(relevant[f"predicted_{axis}"]) for axis in axes))
    prompted = metrics.joint_labels(*(list(relevant[axis]) for axis in axes))
    return metrics.attribute_accuracy(predicted, prompted)


def per_prompt_table(images: pd.DataFrame, attributes: AttributeSet, settings: EvaluationSettings,
                     scorers: Sequence[str], confusions: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """One row per prompt (manifest order): prompt columns, counts, and every metric of its kind."""
    rows = []
    for prompt_id, prompt_images in images.groupby("prompt_id", sort=False):
        first = prompt_images.iloc[0]
        kind = first["kind"]
        row = {column: first[column] for column in [*PROMPT_COLUMNS, *attributes.names]}
        row.update(_population_values(prompt_images, kind, attributes, settings, scorers, confusions))
        rows.append(row)
    return pd.DataFrame(rows)


def kind_metrics(per_prompt: pd.DataFrame, kind: str) -> list[str]:
    """The metric columns of a per-prompt table that apply to prompts of `kind`, in table order."""
    if kind not in KIND_METRIC_PREFIXES:
        raise ValueError(f"unknown prompt kind {kind!r} (known: {', '.join(PROMPT_KINDS)})")
    return [column for column in per_prompt.columns if column.startswith(KIND_METRIC_PREFIXES[kind])]


def distribution_table(images: pd.DataFrame, attributes: AttributeSet, axes: Sequence[str]) -> pd.DataFrame:
    """Label counts of the neutral prompts' images: per prompt, and pooled (prompt_id = 'pooled').

    Columns: prompt_id, prompt, attribute, label, count, fraction (count / images with a label of
    that attribute; NaN when there are none). Every label of the fixed class list has a row.
    """
    neutral = images[images["kind"] == "neutral"]
    groups = [(prompt_id, group["prompt"].iloc[0], group) for prompt_id, group in neutral.groupby("prompt_id", sort=False)]
    groups.append((POOLED, "all neutral prompts", neutral))
    rows = []
    for prompt_id, prompt, group in groups:
        for axis in axes:
            classes = attributes[axis].labels
            counts = metrics.label_counts(list(group[f"predicted_{axis}"]), classes)
            fractions = metrics.empirical_distribution(list(group[f"predicted_{axis}"]), classes)
            for label, count, fraction in zip(classes, counts, fractions):
                rows.append({"prompt_id": prompt_id, "prompt": prompt, "attribute": axis, "label": label,
                             "count": int(count), "fraction": float(fraction)})
    return pd.DataFrame(rows, columns=["prompt_id", "prompt", "attribute", "label", "count", "fraction"])


# ---------------------------------------------------------------------------------------------
# Summaries and comparisons


def summary_table(images: pd.DataFrame, per_prompt: pd.DataFrame, attributes: AttributeSet,
                  settings: EvaluationSettings, scorers: Sequence[str], confusions: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Per prompt kind and metric: mean over prompts with its interval (bootstrap_mean_ci), and the pooled value.

    Prompts where a metric is undefined (NaN: no face found) are left out of its mean;
    `num_prompts` counts the prompts that entered. The pooled value computes the metric once over
    all images of that kind (all faces together for bias metrics and accuracy). `floor` is, for the
    discrepancy of an attribute, the mean over prompts of the discrepancy a population drawn exactly
    from the target with that prompt's number of faces would read (NaN for other metrics).
    """
    rows = []
    for kind in PROMPT_KINDS:
        kind_prompts = per_prompt[per_prompt["kind"] == kind]
        if kind_prompts.empty:
            continue
        kind_images = images[images["kind"] == kind]
        if kind == "identity":
            pooled = _common_values(kind_images, scorers)
            pooled.update({metric: _pooled_accuracy(kind_images, metric)
                           for metric in kind_metrics(per_prompt, kind) if metric.startswith("accuracy_")})
        else:
            pooled = _population_values(kind_images, kind, attributes, settings, scorers, confusions)
        for metric in kind_metrics(per_prompt, kind):
            values = kind_prompts[metric].to_numpy(dtype=float)
            finite = np.isfinite(values)
            mean, low, high = metrics.bootstrap_mean_ci(values[finite], settings.num_resamples, settings.confidence,
                                                        settings.seed)
            low, high, clipped = metrics.clip_interval(low, high, metric_bounds(metric, attributes, settings))
            floor_column = f"{FLOOR_PREFIX}{metric}"
            floor = (float(kind_prompts[floor_column].to_numpy(dtype=float)[finite].mean())
                     if floor_column in kind_prompts and finite.any() else math.nan)
            rows.append({"kind": kind, "metric": metric, "better": metric_direction(metric, kind),
                         "num_prompts": int(finite.sum()), "mean": mean, "ci_low": low, "ci_high": high,
                         "ci_clipped": clipped, "pooled": pooled.get(metric, math.nan), "floor": floor})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


SUMMARY_COLUMNS = ["kind", "metric", "better", "num_prompts", "mean", "ci_low", "ci_high", "ci_clipped", "pooled", "floor"]


def compare_to_base(base: ModelEvaluation, tuned: ModelEvaluation, attributes: AttributeSet,
                    settings: EvaluationSettings) -> pd.DataFrame:
    """Exact paired sign-flip test over prompts of tuned - base, for every metric both models have.

    Prompts pair by prompt_id (the same prompt text); prompts missing from either model, or where
    either value is undefined, are left out (`num_pairs` says how many entered). `verdict` is
    metrics.paired_verdict at the settings' confidence: 'better' / 'worse' only where the test
    can reach that level with these prompts and does, and the interval agrees. The difference's
    interval is cut to the range a difference of the metric can take (`ci_clipped`). The verdicts
    here are each at their own level; holm_headline_family adjusts the headline ones as one family.
    """
    rows = []
    for kind in PROMPT_KINDS:
        base_rows = base.per_prompt[base.per_prompt["kind"] == kind].set_index("prompt_id")
        tuned_rows = tuned.per_prompt[tuned.per_prompt["kind"] == kind].set_index("prompt_id")
        if base_rows.empty or tuned_rows.empty:
            continue
        shared_metrics = [metric for metric in kind_metrics(base.per_prompt, kind) if metric in tuned_rows.columns]
        shared_prompts = base_rows.index.intersection(tuned_rows.index)
        for metric in shared_metrics:
            base_values = base_rows.loc[shared_prompts, metric].to_numpy(dtype=float)
            tuned_values = tuned_rows.loc[shared_prompts, metric].to_numpy(dtype=float)
            both = np.isfinite(base_values) & np.isfinite(tuned_values)
            result = metrics.paired_test(base_values[both], tuned_values[both], settings.confidence,
                                         max(settings.num_resamples, 1), settings.seed)
            better = metric_direction(metric, kind)
            low, high, clipped = metrics.clip_interval(result.ci_low, result.ci_high,
                                                       metrics.difference_bounds(metric_bounds(metric, attributes, settings)))
            result = replace(result, ci_low=low, ci_high=high)
            rows.append({"model": tuned.name, "kind": kind, "metric": metric, "better": better,
                         "num_pairs": result.num_pairs,
                         "base_mean": float(base_values[both].mean()) if both.any() else math.nan,
                         "tuned_mean": float(tuned_values[both].mean()) if both.any() else math.nan,
                         "difference": result.mean_difference, "ci_low": low, "ci_high": high, "ci_clipped": clipped,
                         "p_value": result.p_value, "exact": result.exact, "min_p_value": result.min_p_value,
                         "headline": False, "p_value_holm": math.nan, "family_size": 1,
                         "verdict": metrics.paired_verdict(result, better, settings.confidence)})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


COMPARISON_COLUMNS = ["model", "kind", "metric", "better", "num_pairs", "base_mean", "tuned_mean", "difference",
                      "ci_low", "ci_high", "ci_clipped", "p_value", "exact", "min_p_value", "headline", "p_value_holm",
                      "family_size", "verdict"]


def headline_corrected_attributes(settings: EvaluationSettings, confusions: Mapping[str, np.ndarray]) -> frozenset:
    """The attributes whose headline discrepancy is the corrected one: with --correct_for_classifier, those whose
    confusion passed the check (`confusions` holds only those); the others keep the observed discrepancy."""
    return frozenset(confusions) if settings.correct_for_classifier else frozenset()


def is_family_metric(metric: str, kind: str, settings: EvaluationSettings, corrected: frozenset) -> bool:
    """The headline's bias verdicts, corrected together: headline_discrepancies of the neutral prompts."""
    return kind == "neutral" and metric in headline_discrepancies(settings.axes, corrected)


def holm_headline_family(comparison: pd.DataFrame, settings: EvaluationSettings, corrected: frozenset) -> pd.DataFrame:
    """Mark the headline rows (is_headline_metric), and re-read the verdicts of the family (is_family_metric:
    axes x tuned models of this evaluation, i.e. one split) at Holm-adjusted p-values (metrics.holm_adjusted).

    Other rows, the headline's accuracy and quality included, keep their unadjusted verdicts.
    """
    comparison = comparison.copy()
    if comparison.empty:
        return comparison
    comparison["headline"] = [is_headline_metric(row.metric, row.kind, settings.axes, corrected)
                            for row in comparison.itertuples()]
    in_family = np.array([is_family_metric(row.metric, row.kind, settings, corrected)
                          for row in comparison.itertuples()], dtype=bool)
    family = np.flatnonzero(in_family & comparison["p_value"].notna().to_numpy())
    p_values = comparison["p_value"].to_numpy(dtype=float)[family]
    adjusted = metrics.holm_adjusted(p_values)
    floors = metrics.holm_floors(p_values, comparison["min_p_value"].to_numpy(dtype=float)[family])
    for index, p_adjusted, floor in zip(family, adjusted, floors):
        row = comparison.iloc[index]
        result = metrics.PairedTestResult(row["difference"], row["ci_low"], row["ci_high"], row["p_value"],
                                          int(row["num_pairs"]), bool(row["exact"]), row["min_p_value"])
        comparison.iloc[index, comparison.columns.get_loc("p_value_holm")] = p_adjusted
        comparison.iloc[index, comparison.columns.get_loc("family_size")] = len(family)
        comparison.iloc[index, comparison.columns.get_loc("verdict")] = metrics.paired_verdict(
            result, row["better"], settings.confidence, p_adjusted, len(family), floor)
    return comparison


def image_pairing(base_images: pd.DataFrame, tuned_images: pd.DataFrame) -> dict:
    """How the two folders' images pair up by (prompt_id, image_index), and whether their seeds match."""
    keys = ["prompt_id", "image_index"]
    paired = base_images[[*keys, "seed"]].merge(tuned_images[[*keys, "seed"]], on=keys, suffixes=("_base", "_tuned"))
    return {"base_images": len(base_images), "tuned_images": len(tuned_images), "paired_images": len(paired),
            "same_seed": int((paired["seed_base"] == paired["seed_tuned"]).sum())}


# ---------------------------------------------------------------------------------------------
# Whole evaluation


def check_targets(settings: EvaluationSettings, attributes: AttributeSet) -> None:
    """Every target names a measured attribute (or the intersectional pair) and is a distribution over its labels."""
    class_lists = bias_class_lists(attributes, settings)
    for name, target in settings.targets.items():
        if not isinstance(target, Mapping):
            raise InputError(f"targets: {name}: expected a mapping label -> probability, got {target!r}")
        if name not in class_lists:
            raise InputError(f"targets: {name!r} is not a measured attribute (measured: {', '.join(class_lists)})")
        try:
            metrics.target_distribution(class_lists[name], target)
        except ValueError as error:
            raise InputError(f"targets: {name}: {error}") from None


def identity_prompt_reads(images: pd.DataFrame, attributes: AttributeSet,
                          settings: EvaluationSettings) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per measured attribute (and the intersectional pair): how each identity-specific prompt's faces were read.

    Returns name -> (counts (J, K): the read labels of each of the J prompts that name the attribute(s),
    named (J,): the index of the class each prompt names). An attribute no identity-specific prompt
    names is left out (no correction for it).
    """
    identity = images[images["kind"] == "identity"]
    names = [(axis, (axis,)) for axis in settings.axes]
    if settings.intersectional:
        names.append((intersectional_name(settings.intersectional), tuple(settings.intersectional)))
    reads = {}
    for name, axes in names:
        prompted_rows = identity[(identity[list(axes)] != "").all(axis=1)] if not identity.empty else identity
        if prompted_rows.empty:
            continue
        classes = metrics.product_classes(*(attributes[axis].labels for axis in axes))
        counts, named = [], []
        for _, prompt_rows in prompted_rows.groupby("prompt_id", sort=False):
            prompt_counts = metrics.confusion_counts(
                metrics.joint_labels(*(list(prompt_rows[axis]) for axis in axes)),
                metrics.joint_labels(*(list(prompt_rows[f"predicted_{axis}"]) for axis in axes)), classes)
            row = int(np.argmax(prompt_counts.sum(axis=1))) if prompt_counts.any() else classes.index(
                metrics.joint_labels(*([prompt_rows[axis].iloc[0]] for axis in axes))[0])
            counts.append(prompt_counts[row])
            named.append(row)
        reads[name] = (np.array(counts, dtype=np.int64).reshape(-1, len(classes)), np.array(named, dtype=np.int64))
    return reads


def confusion_from_reads(counts: np.ndarray, named: np.ndarray) -> np.ndarray:
    """The confusion counts N[i, j] (metrics.confusion_counts) summed from identity_prompt_reads' per-prompt reads."""
    confusion = np.zeros((counts.shape[1], counts.shape[1]), dtype=np.int64)
    np.add.at(confusion, named, counts)
    return confusion


def classifier_confusions(images: pd.DataFrame, attributes: AttributeSet,
                          settings: EvaluationSettings) -> dict[str, np.ndarray]:
    """Confusion counts (metrics.confusion_counts) of every measured attribute and of the intersectional pair.

    Estimated on the identity-specific images that prompt the attribute(s), the prompted label as the
    reference. An attribute no identity-specific prompt names is left out (no correction for it).
    The estimate mixes the classifier's errors with the model's own misdrawn identities, so it is
    an upper bound on the classifier's error.
    """
    return {name: confusion_from_reads(*reads) for name, reads in identity_prompt_reads(images, attributes, settings).items()}


def confusion_checks(confusions: Mapping[str, np.ndarray], attributes: AttributeSet,
                     settings: EvaluationSettings) -> dict[str, metrics.ConfusionCheck]:
    """metrics.check_confusion of every estimated confusion, at the settings' thresholds."""
    class_lists = bias_class_lists(attributes, settings)
    return {name: metrics.check_confusion(counts, class_lists[name], settings.min_confusion_singular_value,
                                          settings.min_identity_images_per_class)
            for name, counts in confusions.items()}


def select_split(images: pd.DataFrame, settings: EvaluationSettings) -> pd.DataFrame:
    """The images of settings.split (all when it is empty); an occupation the split file does not list is an error."""
    if not settings.split:
        return images
    people = images["kind"] != "generic"
    unlisted = sorted(set(images.loc[people, "occupation"]) - set(settings.occupation_splits))
    if unlisted:
        raise InputError(f"--occupation_splits: occupation(s) {unlisted} of the evaluated prompts have no split")
    if settings.split not in set(settings.occupation_splits.values()):
        raise InputError(f"--split {settings.split}: no occupation has it "
                         f"(splits: {', '.join(sorted(set(settings.occupation_splits.values())))})")
    keep = ~people | images["occupation"].map(lambda occupation: settings.occupation_splits.get(occupation) == settings.split)
    return images[keep].reset_index(drop=True)


IMAGE_KEY = ["kind", "prompt_id", "image_index", "seed"]


def _describe_keys(keys: pd.DataFrame) -> str:
    first = keys.iloc[0]
    return f"{len(keys)} (e.g. prompt {first['prompt_id']} image {first['image_index']} seed {first['seed']})"


def like_with_like(images: Mapping[str, pd.DataFrame], allow_intersection: bool) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """Every model's images must be the same (kind, prompt, image index, seed) set as the first (the base's):
    the paired comparison is only a comparison of weights when nothing else differs. Otherwise InputError
    naming what differs, unless `allow_intersection`: then every model keeps the images all models share,
    and the second value says how many each lost."""
    names = list(images)
    keys = {name: frame[IMAGE_KEY].astype(str).drop_duplicates() for name, frame in images.items()}
    base = names[0]
    problems = []
    for name in names[1:]:
        merged = keys[base].merge(keys[name], how="outer", on=IMAGE_KEY, indicator=True)
        only_base, only_tuned = merged[merged["_merge"] == "left_only"], merged[merged["_merge"] == "right_only"]
        if len(only_base):
            problems.append(f"{_describe_keys(only_base)} {base} image(s) without a {name} image of the same prompt, index and seed")
        if len(only_tuned):
            problems.append(f"{_describe_keys(only_tuned)} {name} image(s) without a {base} one")
    if not problems:
        return dict(images), {}
    if not allow_intersection:
        raise InputError(f"the models' image folders differ: {'; '.join(problems)}. Generate every model with the same prompts, "
                         "images per prompt and SEED (eval.sh does), or pass --compare_on_intersection to compare on the images they share")
    common = keys[base]
    for name in names[1:]:
        common = common.merge(keys[name], on=IMAGE_KEY)
    kept = {}
    for name, frame in images.items():
        key = frame[IMAGE_KEY].astype(str)
        mask = key.merge(common.assign(_keep=True), on=IMAGE_KEY, how="left")["_keep"].fillna(False).to_numpy(dtype=bool)
        kept[name] = frame[mask].reset_index(drop=True)
    if all(frame.empty for frame in kept.values()):
        raise InputError(f"--compare_on_intersection: the models share no image ({'; '.join(problems)})")
    return kept, {name: len(images[name]) - len(kept[name]) for name in names}


def load_model_images(folders: Sequence[str | Path], attributes: AttributeSet, settings: EvaluationSettings,
                      scorers: Sequence[str] | None = None) -> pd.DataFrame:
    folders = [Path(folder) for folder in ([folders] if isinstance(folders, (str, Path)) else folders)]
    return select_split(load_image_folders(folders, settings.classifier, attributes, scorers), settings)


def evaluate_model(name: str, folders: Sequence[str | Path], attributes: AttributeSet, settings: EvaluationSettings,
                   scorers: Sequence[str] | None = None,
                   confusions: Mapping[str, np.ndarray] | None = None, images: pd.DataFrame | None = None) -> ModelEvaluation:
    """All tables of one model's image folders.

    `confusions` corrects the neutral shares for the classifier (classifier_confusions); None
    estimates them from this model's own identity-specific images. `images`: the folders' images already
    loaded (load_model_images), e.g. restricted by like_with_like.
    """
    if not MODEL_NAME_PATTERN.match(name):
        raise InputError(f"model name {name!r}: use letters, digits, '_', '.', '-' (it names files)")
    for axis in (*settings.axes, *settings.intersectional):
        if axis not in attributes.attributes:
            raise InputError(f"--axes/--intersectional: attribute {axis!r} is not defined (known: {', '.join(attributes.names)})")
    if settings.intersectional and len(settings.intersectional) != 2:
        raise InputError(f"intersectional needs two attributes, got {list(settings.intersectional)}")
    check_targets(settings, attributes)
    folders = [Path(folder) for folder in ([folders] if isinstance(folders, (str, Path)) else folders)]
    if images is None:
        images = load_model_images(folders, attributes, settings, scorers)
    scorers = [column[len("quality_"):] for column in images.columns if column.startswith("quality_")]
    if confusions is None:
        confusions = classifier_confusions(images, attributes, settings)
    per_prompt = per_prompt_table(images, attributes, settings, scorers, confusions)
    return ModelEvaluation(
        name=name, folders=folders, images=images, per_prompt=per_prompt,
        distributions=distribution_table(images, attributes, settings.axes),
        summary=summary_table(images, per_prompt, attributes, settings, scorers, confusions), scorers=scorers,
        scorer_info={scorer: scorer_info(folders, scorer) for scorer in scorers},
        classifier_settings=_read_json_if_present(folders[0] / f".{labels_file_name(settings.classifier).removesuffix('.csv')}.settings.json"),
        generation_configs={str(folder): _read_json_if_present(folder / "generation_config.json") for folder in folders})


def evaluate(base_folders: Sequence[str | Path] | str | Path, tuned_folders: Mapping[str, Sequence[str | Path] | str | Path],
             attributes: AttributeSet, settings: EvaluationSettings, base_name: str = "base",
             scorers: Sequence[str] | None = None) -> EvaluationResult:
    """Tables for the base model and each tuned model, and each tuned model's paired comparison with the base.

    A model's folders are a path or a list of paths; tuned_folders maps a model name to its folders.
    """
    if base_name in tuned_folders:
        raise InputError(f"--tuned: the name {base_name!r} is taken by the base model")
    folders = {base_name: base_folders, **tuned_folders}
    images, left_out = like_with_like({name: load_model_images(paths, attributes, settings, scorers) for name, paths in folders.items()},
                                      settings.compare_on_intersection)
    # One confusion matrix for every model: the classifier's, measured on the base where the reference label is
    # known, and used for correcting only where it passes the conditioning check.
    reads = identity_prompt_reads(images[base_name], attributes, settings)
    confusions = {name: confusion_from_reads(*prompt_reads) for name, prompt_reads in reads.items()}
    checks = confusion_checks(confusions, attributes, settings)
    usable = {name: counts for name, counts in confusions.items() if checks[name].usable}
    base = evaluate_model(base_name, base_folders, attributes, settings, scorers, usable, images=images[base_name])
    tuned = [evaluate_model(name, paths, attributes, settings, scorers, usable, images=images[name])
             for name, paths in tuned_folders.items()]
    for model in [base, *tuned]:
        widen_corrected_intervals(model, {name: reads[name] for name in usable}, attributes, settings)
    comparisons = [compare_to_base(base, model, attributes, settings) for model in tuned]
    comparison = pd.concat(comparisons, ignore_index=True) if comparisons else pd.DataFrame(columns=COMPARISON_COLUMNS)
    comparison = holm_headline_family(comparison, settings, headline_corrected_attributes(settings, usable))
    pairing = {model.name: image_pairing(base.images, model.images) for model in tuned}
    return EvaluationResult(settings, attributes, base, tuned, comparison, pairing,
                            confusion_table(confusions, attributes, settings),
                            corrected_shares_table([base, *tuned], {name: reads[name] for name in usable}, attributes,
                                                   settings), left_out=left_out, confusion_checks=checks)


def confusion_table(confusions: Mapping[str, np.ndarray], attributes: AttributeSet,
                    settings: EvaluationSettings) -> pd.DataFrame:
    """One row per (attribute, prompted label, read label): count and rate P(read | prompted)."""
    class_lists = bias_class_lists(attributes, settings)
    rows = []
    for name, counts in confusions.items():
        rates = metrics.confusion_rates(counts)
        for i, prompted in enumerate(class_lists[name]):
            for j, read in enumerate(class_lists[name]):
                rows.append({"attribute": name, "prompted": prompted, "read_as": read, "count": int(counts[i, j]),
                             "rate": float(rates[i, j]) if counts[i].sum() else math.nan})
    return pd.DataFrame(rows, columns=["attribute", "prompted", "read_as", "count", "rate"])


def neutral_prompt_counts(neutral: pd.DataFrame, name: str, attributes: AttributeSet,
                          settings: EvaluationSettings) -> np.ndarray:
    """Label counts of each neutral prompt's faces for one measured attribute (or the intersectional pair), (P, K)."""
    classes = bias_class_lists(attributes, settings)[name]
    prompt_labels = [{entry[0]: entry[1] for entry in bias_populations(prompt_images, attributes, settings)}[name]
                     for _, prompt_images in neutral.groupby("prompt_id", sort=False)]
    return np.array([metrics.label_counts(labels, classes) for labels in prompt_labels]).reshape(-1, len(classes))


def widen_corrected_intervals(model: ModelEvaluation, reads: Mapping[str, tuple[np.ndarray, np.ndarray]],
                              attributes: AttributeSet, settings: EvaluationSettings) -> None:
    """The summary interval of each corrected discrepancy becomes the union of its interval over prompts (the
    confusion fixed) and metrics.prompt_bootstrap_corrected_discrepancy (the confusion re-estimated in every
    replicate), cut to the metric's range: the headline's corrected value carries the confusion's noise."""
    neutral = model.images[model.images["kind"] == "neutral"]
    if neutral.empty:
        return
    for name, prompt_reads in reads.items():
        metric = f"{CORRECTED_DISCREPANCY}_{name}"
        rows = model.summary.index[(model.summary["kind"] == "neutral") & (model.summary["metric"] == metric)]
        if len(rows) == 0:
            continue
        classes = bias_class_lists(attributes, settings)[name]
        target = metrics.target_distribution(classes, settings.targets.get(name))
        low, high = metrics.prompt_bootstrap_corrected_discrepancy(
            neutral_prompt_counts(neutral, name, attributes, settings), *prompt_reads, target,
            min(settings.num_resamples, 2000), settings.confidence, settings.seed)
        row = rows[0]
        current_low, current_high = model.summary.at[row, "ci_low"], model.summary.at[row, "ci_high"]
        union_low = np.nanmin([current_low, low]) if not (math.isnan(current_low) and math.isnan(low)) else math.nan
        union_high = np.nanmax([current_high, high]) if not (math.isnan(current_high) and math.isnan(high)) else math.nan
        union_low, union_high, clipped = metrics.clip_interval(float(union_low), float(union_high),
                                                               metric_bounds(metric, attributes, settings))
        model.summary.at[row, "ci_low"], model.summary.at[row, "ci_high"] = union_low, union_high
        model.summary.at[row, "ci_clipped"] = bool(model.summary.at[row, "ci_clipped"]) or clipped


AGREEMENT_COLUMNS = ["model", "axis", "images", "prompts", "agreement", "ci_low", "ci_high", "ci_clipped", "pooled", "kappa"]


def classifier_agreement_table(models: Sequence[ModelEvaluation], first: str, second: str, axes: Sequence[str],
                               settings: EvaluationSettings) -> pd.DataFrame:
    """How two classifiers' labels of the same pictures agree, per model and axis (and on whether a face is there):
    popalign.classify.agreement.classifier_agreement over each model's folders, the prompt as the unit."""
    from popalign.classify.agreement import FACE_AXIS, classifier_agreement

    rows = []
    for model in models:
        prompt_ids = {f"{folder}/{image_path}": prompt for folder, image_path, prompt in
                      zip(model.images["folder"], model.images["image_path"], model.images["prompt_id"])}
        files = {name: [] for name in (first, second)}
        for folder in model.folders:
            for name in files:
                path = labels_path(folder, name)
                labels = read_csv_checked(path, ["image_path", "face_detected"])
                labels["image_path"] = [f"{folder}/{image_path}" for image_path in labels["image_path"]]
                # The images this evaluation reads (one split, or the images every model shares): the file holds all.
                files[name].append(labels[labels["image_path"].isin(prompt_ids)])
        agreements = classifier_agreement(pd.concat(files[first], ignore_index=True), pd.concat(files[second], ignore_index=True),
                                          prompt_ids, [*axes, FACE_AXIS], (labels_file_name(first), labels_file_name(second)),
                                          settings.confidence, settings.num_resamples, settings.seed)
        for axis, agreement in agreements.items():
            rows.append({"model": model.name, "axis": axis, "images": agreement.images, "prompts": agreement.prompts,
                         "agreement": agreement.agreement, "ci_low": agreement.low, "ci_high": agreement.high,
                         "ci_clipped": agreement.clipped, "pooled": agreement.pooled, "kappa": agreement.kappa})
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


def corrected_shares_table(models: Sequence[ModelEvaluation], reads: Mapping[str, tuple[np.ndarray, np.ndarray]],
                           attributes: AttributeSet, settings: EvaluationSettings) -> pd.DataFrame:
    """Pooled neutral shares per model, attribute and label: observed, corrected for the classifier, interval.

    reads: identity_prompt_reads of the base, for the attributes whose confusion passed the check. The
    interval resamples neutral and identity-specific prompts (metrics.prompt_bootstrap_corrected_shares).
    """
    rows = []
    for model in models:
        neutral = model.images[model.images["kind"] == "neutral"]
        if neutral.empty:
            continue
        for name, _, classes in bias_populations(neutral, attributes, settings):
            if name not in reads:
                continue
            neutral_counts = neutral_prompt_counts(neutral, name, attributes, settings)
            shares = metrics.prompt_bootstrap_corrected_shares(neutral_counts, *reads[name],
                                                               min(settings.num_resamples, 2000), settings.confidence,
                                                               settings.seed)
            for index, label in enumerate(classes):
                rows.append({"model": model.name, "attribute": name, "label": label,
                             "observed": float(shares.observed[index]), "corrected": float(shares.corrected[index]),
                             "ci_low": float(shares.ci_low[index]), "ci_high": float(shares.ci_high[index])})
    return pd.DataFrame(rows, columns=["model", "attribute", "label", "observed", "corrected", "ci_low", "ci_high"])


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows as JSON-safe dicts (NaN and infinities -> None)."""
    cleaned = frame.astype(object).where(frame.notna(), None)
    records = cleaned.to_dict(orient="records")
    for record in records:
        for key, value in record.items():
            if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
                record[key] = None
            elif isinstance(value, np.bool_):
                record[key] = bool(value)
            elif isinstance(value, np.integer):
                record[key] = int(value)
            elif isinstance(value, np.floating):
                record[key] = float(value)
    return records


def write_tables(result: EvaluationResult, report_dir: str | Path) -> dict[str, Path]:
    """Write the CSV and JSON files of an evaluation; returns the written paths by role."""
    report_dir = Path(report_dir)
    models = [result.base, *result.tuned]
    written: dict[str, Path] = {}
    for model in models:
        written[f"per_prompt_{model.name}"] = report_dir / f"per_prompt_{model.name}.csv"
        atomic_write_csv(written[f"per_prompt_{model.name}"], model.per_prompt)
        written[f"distributions_{model.name}"] = report_dir / f"distributions_{model.name}.csv"
        atomic_write_csv(written[f"distributions_{model.name}"], model.distributions)
    summary = pd.concat([model.summary.assign(model=model.name) for model in models], ignore_index=True)
    summary = summary[["model", *[column for column in summary.columns if column != "model"]]]
    written["summary"] = report_dir / "summary.csv"
    atomic_write_csv(written["summary"], summary)
    written["comparison"] = report_dir / "comparison.csv"
    atomic_write_csv(written["comparison"], result.comparison)
    written["classifier"] = report_dir / "classifier.csv"
    atomic_write_csv(written["classifier"], result.confusion)
    written["corrected_shares"] = report_dir / "corrected_shares.csv"
    atomic_write_csv(written["corrected_shares"], result.corrected_shares)
    settings = asdict(result.settings)
    settings["targets"] = {key: dict(value) for key, value in result.settings.targets.items()}
    settings["occupation_splits"] = dict(result.settings.occupation_splits)
    document = {
        "settings": settings,
        "models": {model.name: {"folders": [str(folder) for folder in model.folders], "scorers": model.scorer_info,
                                "num_prompts": len(model.per_prompt), "num_images": len(model.images),
                                "num_faces": int(model.images["face_detected"].sum()),
                                "classifier_settings": model.classifier_settings,
                                "generation_configs": model.generation_configs} for model in models},
        "image_pairing": result.image_pairing,
        "summary": _records(summary),
        "comparison": _records(result.comparison),
        "classifier_confusion": _records(result.confusion),
        "corrected_shares": _records(result.corrected_shares),
    }
    written["json"] = report_dir / "evaluation.json"
    atomic_write_json(written["json"], document)
    return written
