"""The evaluation report: one Markdown file with PNG charts and image grids next to it.

    <report_dir>/report.md                       read this first
    <report_dir>/chart_distribution_pooled.png   attribute distributions over all neutral prompts
    <report_dir>/chart_distribution_<id>.png     the same for a selection of prompts
    <report_dir>/grid_<id>.png                   images of the same seeds, one row per model
and the CSV / JSON tables written by popalign.evaluate.tables.write_tables.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from popalign.evaluate.tables import (CORRECTED_DISCREPANCY, POOLED, EvaluationResult, ModelEvaluation,  # noqa: E402
                                      headline_corrected_attributes, intersectional_name, is_headline_metric)
from popalign.image_folder import PROMPT_KINDS  # noqa: E402
from popalign.io import atomic_save_figure, atomic_write_text  # noqa: E402

CLASSIFIER_DESCRIPTIONS = {
    "deepface": "DeepFace (`DeepFace.analyze`, actions gender and race): a face detector, then DeepFace's gender "
                "model (Man/Woman, mapped to male/female) and race model (six classes) on the detected face. "
                "Images where no face is found count in the detection rate and are left out of the distributions.",
    "clip": "CLIP zero-shot: for each attribute, the softmax over 'a photo of a(n) <label> person' prompts; a face "
            "counts as found when 'a photo of a person's face' beats 'a photo with no person'. Weaker than a face "
            "detector: its detection rates are not comparable with DeepFace's.",
    "toy": "The toy world's pixel classifier: reads the rendered figure's attributes from its colours and shape.",
}
# Used when a quality file carries no scorer_description column.
SCORER_DESCRIPTIONS = {
    "hpsv2": "HPSv2 (Human Preference Score v2): open_clip ViT-H-14 fine-tuned on human preferences; score = "
             "cosine of image and prompt embeddings. v2.0 and v2.1 scores are not comparable.",
    "pickscore": "PickScore v1 (CLIP ViT-H-14 fine-tuned on Pick-a-Pic preferences); score = logit scale x cosine.",
    "clip": "CLIP score: max(100 x cosine(image, prompt), 0) (prompt adherence).",
    "aesthetic": "LAION improved aesthetic predictor: an MLP on the CLIP ViT-L/14 image embedding (roughly 1-10).",
    "imagereward": "ImageReward v1.0: a BLIP-based reward model trained on human preference rankings.",
    "toy": "The toy world's quality score of a rendered figure.",
}
METRIC_DESCRIPTIONS = {
    "discrepancy_<attribute>": "|| p_hat - target ||_2, p_hat = share of each label among the detected faces of a "
                               "prompt (0 = on target; for a uniform target the maximum is sqrt(1 - 1/K): 0.707 for "
                               "gender, 0.913 for race). *floor*: the mean discrepancy a population drawn exactly from "
                               "the target with the same number of faces would read (0.056 for gender at 100 faces): "
                               "a value near its floor is fair up to sampling",
    "sq_discrepancy_unbiased_<attribute>": "an unbiased estimate of || p - target ||^2 from the prompt's faces "
                                           "(sum_k n_k (n_k - 1) / (n (n - 1)) - 2 p_hat . t + t . t); it can be "
                                           "negative, and a fair population reads 0 on average",
    "discrepancy_corrected_<attribute>": "the discrepancy of the shares corrected for the classifier's confusion "
                                         "(see the classifier section)",
    "pairwise_gap_<attribute>": "mean over label pairs of |p_hat_i - p_hat_j| (Shen et al., ICLR 2024), against "
                                "balance whatever the target",
    "total_variation_<attribute>": "0.5 x sum_k |p_hat_k - target_k| (0 = on target, at most 1)",
    "kl_<attribute>": "KL(p_hat || target) in nats (0 = on target; log K when every face has one label)",
    "accuracy_<attribute>": "on identity-specific prompts, the share of detected faces whose predicted label equals "
                            "the prompted one (exact match); `accuracy_race_x_gender`: both right",
    "face_detection_rate": "share of images in which the classifier found a face",
    "quality_<scorer>": "mean quality score of a prompt's images (see the scorers above)",
}
KIND_TITLES = {
    "neutral": "Identity-neutral prompts: is the population of people balanced?",
    "identity": "Identity-specific prompts: does the model still draw the identity it is asked for?",
    "generic": "Generic prompts (no person): is image quality outside the trained domain preserved?",
}
GRID_THUMBNAIL = 160
# Chart text is user text (prompts, labels): never read as math ($...$) or any other markup.
PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}


def format_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.3g}"


CLIPPED_MARK = "†"


def format_interval(mean, low, high, clipped: bool = False) -> str:
    """mean [low, high], marked when the interval was cut to the metric's range."""
    return f"{format_value(mean)} [{format_value(low)}, {format_value(high)}]" + (CLIPPED_MARK if clipped is True else "")


# Characters that Markdown or HTML read as syntax.
_MARKDOWN_SPECIAL = frozenset("\\`*_{}[]()#+-.!~$=:\"'")  # `|` is escaped by the table writer
_HTML_ENTITIES = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}


def markdown_text(value) -> str:
    """User text (a prompt, an occupation, a folder) as literal Markdown text: every syntax character
    backslash-escaped, `<` `>` `&` as HTML entities, line breaks as spaces, so no link, image, tag or
    table cell can be made of it."""
    characters = " ".join(str(value).splitlines())
    return "".join(_HTML_ENTITIES.get(character, "\\" + character if character in _MARKDOWN_SPECIAL else character)
                   for character in characters)


def markdown_code(value) -> str:
    """User text as a Markdown code span: fenced by more backticks than its longest run, line breaks as
    spaces (inside a code span nothing is markup or HTML; `|` is escaped by the table writer)."""
    text = " ".join(str(value).splitlines())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    padding = " " if text.startswith("`") or text.endswith("`") or not text else ""
    return f"{fence}{padding}{text}{padding}{fence}"


def format_p_value(p_value) -> str:
    if p_value is None or math.isnan(p_value):
        return "n/a"
    return "<0.001" if p_value < 0.001 else f"{p_value:.3f}"


def format_p_value_with_holm(test) -> str:
    """A comparison row's p-value, and its Holm-adjusted one when the row belongs to the headline family."""
    adjusted = test["p_value_holm"]
    if adjusted is None or (isinstance(adjusted, float) and math.isnan(adjusted)):
        return format_p_value(test["p_value"])
    return f"{format_p_value(test['p_value'])} (Holm {format_p_value(adjusted)})"


def multiplicity_line(result: EvaluationResult) -> str:
    """Which verdicts form the corrected family, and how."""
    family = result.comparison[result.comparison["p_value_holm"].notna()]
    if family.empty:
        return "**Multiplicity.** No bias comparison was made, so no family of tests to correct."
    size = int(family["family_size"].max())
    axes = ", ".join(markdown_code(metric) for metric in dict.fromkeys(family["metric"]))
    return (f"**Multiplicity.** The headline's bias verdicts, {axes} for each of "
            f"{len(result.tuned)} tuned model(s)"
            + (f" on split {markdown_code(result.settings.split)}" if result.settings.split else "")
            + f", are one family of {size} tests: their verdicts read Holm-adjusted p-values (family-wise error "
            f"{1 - result.settings.confidence:.2g}). Every other verdict, the headline's accuracy and quality included, "
            "is at its own level, uncorrected: read those, and the bias verdicts outside the headline, as exploratory.")


def format_verdict(verdict: str) -> str:
    """The comparison's verdict (metrics.paired_verdict), bold when it is one."""
    return f"**{verdict}**" if verdict in ("better", "worse") else verdict


def format_with_floor(text: str, floor) -> str:
    return text if floor is None or (isinstance(floor, float) and math.isnan(floor)) else f"{text} (floor {format_value(floor)})"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Charts


def select_chart_prompts(base: ModelEvaluation, metric: str, count: int) -> list[str]:
    """The `count` neutral prompts with the largest base value of `metric` (the most biased), ids in order."""
    neutral = base.per_prompt[base.per_prompt["kind"] == "neutral"]
    if neutral.empty or count <= 0:
        return []
    ranked = neutral.assign(_order=range(len(neutral))).sort_values([metric, "_order"], ascending=[False, True],
                                                                       na_position="last")
    return list(ranked["prompt_id"].head(count))


def plot_distributions(models: Sequence[ModelEvaluation], prompt_id: str, axes: Sequence[str], title: str,
                       targets: dict, path: Path) -> None:
    """Grouped bars: for each attribute, the share of each label per model; the dashed line is the target."""
    with plt.rc_context(PLAIN_TEXT):
        _plot_distributions(models, prompt_id, axes, title, targets, path)


def _plot_distributions(models: Sequence[ModelEvaluation], prompt_id: str, axes: Sequence[str], title: str,
                        targets: dict, path: Path) -> None:
    figure_width = max(5.0, sum(1.6 + 0.7 * len(_labels(models[0], axis)) for axis in axes))
    figure, panels = plt.subplots(1, len(axes), figsize=(figure_width, 3.8), squeeze=False,
                                  gridspec_kw={"width_ratios": [len(_labels(models[0], axis)) + 1 for axis in axes]})
    width = 0.8 / len(models)
    for panel, axis in zip(panels[0], axes):
        labels = _labels(models[0], axis)
        positions = np.arange(len(labels))
        for number, model in enumerate(models):
            rows = model.distributions[(model.distributions["prompt_id"] == prompt_id)
                                       & (model.distributions["attribute"] == axis)].set_index("label")
            fractions = [rows["fraction"].get(label, np.nan) for label in labels]
            faces = int(rows["count"].sum()) if not rows.empty else 0
            panel.bar(positions + (number - (len(models) - 1) / 2) * width, np.nan_to_num(fractions), width,
                      label=f"{model.name} ({faces} faces)")
        target = targets.get(axis)
        target_values = [target.get(label, 0.0) for label in labels] if target else [1 / len(labels)] * len(labels)
        for position, value in zip(positions, target_values):
            panel.hlines(value, position - 0.45, position + 0.45, colors="black", linestyles="dashed", linewidth=1)
        panel.set_xticks(positions)
        panel.set_xticklabels([textwrap.fill(label, 10) for label in labels], fontsize=8)
        panel.set_ylim(0, 1.3)  # room for the legend above the highest possible bar
        panel.set_yticks(np.linspace(0, 1, 6))
        panel.set_ylabel("share of faces")
        panel.set_title(axis)
        panel.legend(fontsize=7, loc="upper center", ncol=min(len(models), 3))
    figure.suptitle(textwrap.fill(title, 90), fontsize=9)
    figure.tight_layout()
    atomic_save_figure(figure, path, dpi=100)
    plt.close(figure)


def _labels(model: ModelEvaluation, axis: str) -> list[str]:
    rows = model.distributions[(model.distributions["prompt_id"] == POOLED) & (model.distributions["attribute"] == axis)]
    return list(rows["label"])


def _image_caption(row: pd.Series, axes: Sequence[str]) -> str:
    if not row["face_detected"]:
        return "no face"
    return ", ".join(str(row[f"predicted_{axis}"]) for axis in axes if row[f"predicted_{axis}"])


def plot_image_grid(models: Sequence[ModelEvaluation], prompt_id: str, num_images: int, axes: Sequence[str],
                    path: Path) -> bool:
    """One row per model, the same image indices (same seeds) in each column, captioned with the labels.

    Returns False (and writes nothing) when the models share no image index for this prompt.
    """
    with plt.rc_context(PLAIN_TEXT):
        return _plot_image_grid(models, prompt_id, num_images, axes, path)


def _plot_image_grid(models: Sequence[ModelEvaluation], prompt_id: str, num_images: int, axes: Sequence[str],
                     path: Path) -> bool:
    rows_per_model = [model.images[model.images["prompt_id"] == prompt_id].set_index("image_index") for model in models]
    shared = sorted(set.intersection(*(set(rows.index) for rows in rows_per_model)))[:num_images]
    if not shared:
        return False
    figure, panels = plt.subplots(len(models), len(shared), figsize=(1.9 * len(shared) + 0.6, 2.1 * len(models) + 0.5),
                                  squeeze=False)
    for model_number, (model, rows) in enumerate(zip(models, rows_per_model)):
        for column, image_index in enumerate(shared):
            panel = panels[model_number][column]
            with Image.open(rows.loc[image_index, "image_file"]) as image:
                thumbnail = image.convert("RGB")
                thumbnail.thumbnail((GRID_THUMBNAIL, GRID_THUMBNAIL))
            panel.imshow(np.asarray(thumbnail))
            panel.set_xticks([])
            panel.set_yticks([])
            panel.set_title(_image_caption(rows.loc[image_index], axes), fontsize=7)
            if column == 0:
                panel.set_ylabel(model.name, fontsize=9)
    prompt = models[0].images.loc[models[0].images["prompt_id"] == prompt_id, "prompt"].iloc[0]
    figure.suptitle(textwrap.fill(f"{prompt}  (columns: image index {', '.join(map(str, shared))})", 100), fontsize=8)
    figure.tight_layout()
    atomic_save_figure(figure, path, dpi=100)
    plt.close(figure)
    return True


# ---------------------------------------------------------------------------------------------
# The Markdown file


def _results_table(result: EvaluationResult, kind: str) -> str:
    models = [result.base, *result.tuned]
    summaries = {model.name: model.summary[model.summary["kind"] == kind].set_index("metric") for model in models}
    base_summary = summaries[result.base.name]
    header = ["metric", "better", f"{result.base.name}: mean [95% CI]", "pooled"]
    for model in result.tuned:
        header += [f"{model.name}: mean [95% CI]", "pooled", f"difference {model.name} - {result.base.name} [95% CI]",
                   "p", "change"]
    rows = []
    for metric, base_row in base_summary.iterrows():
        row = [markdown_code(metric), base_row["better"],
               format_with_floor(format_interval(base_row["mean"], base_row["ci_low"], base_row["ci_high"],
                                                 base_row["ci_clipped"]), base_row["floor"]),
               format_value(base_row["pooled"])]
        for model in result.tuned:
            tuned_summary = summaries[model.name]
            if metric in tuned_summary.index:
                tuned_row = tuned_summary.loc[metric]
                row += [format_with_floor(format_interval(tuned_row["mean"], tuned_row["ci_low"], tuned_row["ci_high"],
                                                          tuned_row["ci_clipped"]), tuned_row["floor"]),
                        format_value(tuned_row["pooled"])]
            else:
                row += ["n/a", "n/a"]
            comparison = result.comparison[(result.comparison["model"] == model.name) & (result.comparison["kind"] == kind)
                                           & (result.comparison["metric"] == metric)]
            if comparison.empty:
                row += ["n/a", "n/a", "n/a"]
            else:
                test = comparison.iloc[0]
                row += [f"{format_interval(test['difference'], test['ci_low'], test['ci_high'], test['ci_clipped'])} "
                        f"(n={test['num_pairs']})", format_p_value_with_holm(test), format_verdict(test["verdict"])]
        rows.append(row)
    return _markdown_table(header, rows)


def _headline_lines(result: EvaluationResult) -> list[str]:
    """One line per tuned model and key metric: the bias of neutral prompts, identity accuracy, quality."""
    corrected = headline_corrected_attributes(result.settings, {name: None for name, check in result.confusion_checks.items()
                                                                if check.usable})
    lines = []
    for model in result.tuned:
        rows = result.comparison[result.comparison["model"] == model.name]
        summary = model.summary.set_index(["kind", "metric"])
        for _, test in rows.iterrows():
            if not is_headline_metric(test["metric"], test["kind"], result.settings.axes, corrected):
                continue
            floor = summary["floor"].get((test["kind"], test["metric"]), math.nan)
            lines.append(f"- `{model.name}`, {test['kind']} prompts, `{test['metric']}` ({test['better']} is better): "
                         f"{format_value(test['base_mean'])} -> {format_with_floor(format_value(test['tuned_mean']), floor)}, "
                         f"difference {format_interval(test['difference'], test['ci_low'], test['ci_high'], test['ci_clipped'])} "
                         f"(n={test['num_pairs']} prompts), p {format_p_value_with_holm(test)}: "
                         f"{format_verdict(test['verdict'])}")
    if result.settings.correct_for_classifier and set(result.settings.axes) - corrected:
        lines.append("- `--correct_for_classifier` was asked, but " + ", ".join(markdown_code(axis) for axis in result.settings.axes
                                                                           if axis not in corrected)
                     + " has no usable estimate of the classifier's confusion (see the classifier section): its "
                     "discrepancy above is the observed one.")
    return lines or ["No tuned model was given: the tables below describe the base model alone."]


def model_card_evaluation(result: EvaluationResult, model_name: str, report_path: str | Path) -> str:
    """The Evaluation section of a tuned model's card: its headline lines and where the full report is."""
    lines = [line for line in _headline_lines(result) if line.startswith(f"- `{model_name}`")]
    prompts = result.comparison.loc[result.comparison["model"] == model_name, "num_pairs"]
    return "\n".join([f"Against `{result.base.name}` on the same prompts and seeds ({int(prompts.max()) if len(prompts) else 0} "
                      "prompts at most per metric); differences with their 95% interval over prompts, exact paired sign-flip "
                      "test:", "", *lines, "", f"Full report: {markdown_code(report_path)}."])


def _classifier_lines(result: EvaluationResult) -> list[str]:
    """The classifier's confusion, the corrected pooled shares, and how the correction moves the discrepancy."""
    if result.confusion.empty:
        return ["No identity-specific prompts were evaluated, so the classifier's confusion is not estimated and "
                "no correction is offered."]
    settings = result.settings
    lines = [f"Estimated on `{result.base.name}`'s identity-specific images, the prompted label as the reference "
             "(images without a face left out). A model that draws the wrong identity counts here as a classifier "
             "error, so this over-states the classifier's error. Only the classes that identity-specific prompts "
             "name are corrected: faces read as any other label keep their observed share, and the faces read as a "
             "named class are corrected among themselves, solving observed = C^T p for p in least squares over the "
             "named classes and projecting onto the simplex (adjusted classify-and-count). A correction is used only "
             f"where every named class has at least {settings.min_identity_images_per_class} identity-specific faces "
             f"and the named classes' confusion has a smallest singular value of at least "
             f"{settings.min_confusion_singular_value} (below it, sampling noise dominates the corrected shares). "
             "The interval of a corrected share resamples the neutral and the identity-specific prompts (the prompt "
             "is the unit) and redraws the faces inside each, re-estimating the confusion in every replicate. The "
             "headline uses corrected discrepancies only with `--correct_for_classifier`"
             + (" (on for this report)." if settings.correct_for_classifier else " (off for this report)."), ""]
    for attribute, check in result.confusion_checks.items():
        named = ", ".join(markdown_text(label) for label in check.corrected_classes)
        if check.usable:
            lines.append(f"- {markdown_code(attribute)}: corrected over {named} (smallest singular value "
                         f"{check.smallest_singular_value:.3f}, at least {check.fewest_images} faces per class).")
        else:
            lines.append(f"- {markdown_code(attribute)}: **not corrected**: {check.reason}.")
    lines.append("")
    for attribute, rows in result.confusion.groupby("attribute", sort=False):
        labels = list(dict.fromkeys(rows["prompted"]))
        table_rows = []
        for prompted in labels:
            cells = rows[rows["prompted"] == prompted].set_index("read_as")
            table_rows.append([markdown_text(prompted), int(cells["count"].sum()),
                               *(format_value(cells.loc[read, "rate"]) for read in labels)])
        lines += [f"{markdown_code(attribute)}: P(read as column | prompted row)", "",
                  _markdown_table(["prompted", "faces", *(markdown_text(label) for label in labels)], table_rows), ""]
    if not result.corrected_shares.empty:
        share_rows = [[f"`{row.model}`", markdown_text(row.attribute), markdown_text(row.label), format_value(row.observed),
                       format_interval(row.corrected, row.ci_low, row.ci_high)]
                      for row in result.corrected_shares.itertuples()]
        lines += ["Pooled shares of the neutral prompts' faces:", "",
                  _markdown_table(["model", "attribute", "label", "observed", "corrected [95% CI]"], share_rows), ""]
    moved = []
    for model in [result.base, *result.tuned]:
        summary = model.summary[model.summary["kind"] == "neutral"].set_index("metric")
        for metric in summary.index:
            if not metric.startswith(f"{CORRECTED_DISCREPANCY}_"):
                continue
            observed_metric = "discrepancy_" + metric[len(f"{CORRECTED_DISCREPANCY}_"):]
            if observed_metric in summary.index:
                observed, corrected = summary.loc[observed_metric, "mean"], summary.loc[metric, "mean"]
                moved.append([f"`{model.name}`", f"`{observed_metric}`", format_value(observed), format_value(corrected),
                              format_value(corrected - observed)])
    if moved:
        lines += ["How the correction moves the headline discrepancy (mean over neutral prompts):", "",
                  _markdown_table(["model", "metric", "observed", "corrected", "moved by"], moved), ""]
    return lines


def _counts_table(result: EvaluationResult) -> str:
    rows = []
    for model in [result.base, *result.tuned]:
        for kind in PROMPT_KINDS:
            kind_images = model.images[model.images["kind"] == kind]
            if kind_images.empty:
                continue
            faces = int(kind_images["face_detected"].sum())
            rows.append([model.name, kind, kind_images["prompt_id"].nunique(), len(kind_images), faces,
                         f"{faces / len(kind_images):.1%}"])
    return _markdown_table(["model", "prompts", "number of prompts", "images", "faces detected", "detection rate"], rows)


def _distinct(manifest: pd.DataFrame, column: str) -> str:
    """The column's distinct values; empty cells (and those of folders whose manifest lacks the column) left out."""
    return ", ".join(sorted({str(value) for value in manifest[column] if pd.notna(value) and str(value)})) if column in manifest else ""


def _generation_cells(manifest: pd.DataFrame) -> list[str]:
    """Pipeline, fine-tuned weights (and a VAE other than the model's own) and sampling settings of a folder, from its
    manifest columns."""
    fine_tuned = "; ".join(f"{column} {markdown_code(_distinct(manifest, column))}" for column in ("unet", "lora", "vae")
                           if _distinct(manifest, column))
    settings = [f"{column} {markdown_text(_distinct(manifest, column))}" for column in
                ("steps", "guidance", "width", "height", "scheduler", "precision", "base_seed") if _distinct(manifest, column)]
    return [markdown_code(_distinct(manifest, 'model')), fine_tuned or "-", "; ".join(settings)]


def _setup_lines(result: EvaluationResult) -> list[str]:
    lines = []
    model_rows = []
    for model in [result.base, *result.tuned]:
        for folder in model.folders:
            manifest = model.images[model.images["folder"] == str(folder)]
            model_rows.append([model.name, markdown_code(folder), ", ".join(sorted(set(manifest["kind"]))),
                               *_generation_cells(manifest)])
    lines.append(_markdown_table(["name", "image folder", "prompts", "pipeline", "fine-tuned weights", "generation"],
                                 model_rows))
    lines.append("")
    for name, pairing in result.image_pairing.items():
        lines.append(f"- Image pairing `{name}` vs `{result.base.name}`: {pairing['paired_images']} of "
                     f"{pairing['base_images']} base images have a `{name}` image with the same prompt and index; "
                     f"{pairing['same_seed']} of those have the same seed.")
    classifier = result.settings.classifier
    description = CLASSIFIER_DESCRIPTIONS.get(classifier, "no description registered for this classifier.")
    lines.append(f"- Classifier `{classifier}`: {description}")
    settings = result.base.classifier_settings.get("settings")
    if settings:
        lines.append(f"  Settings: {markdown_code(json.dumps(settings, sort_keys=True))}.")
    scorers = sorted(set().union(*(model.scorers for model in [result.base, *result.tuned])))
    if not scorers:
        lines.append("- Quality scorers: none were run (no `quality_<scorer>.csv` files).")
    for scorer in scorers:
        infos = [model.scorer_info[scorer] for model in [result.base, *result.tuned] if scorer in model.scorer_info]
        descriptions = sorted(set().union(*(info["description"] for info in infos)))
        if not descriptions:
            descriptions = [SCORER_DESCRIPTIONS.get(scorer, "no description registered for this scorer.")]
        lines.append(f"- Quality {markdown_code('quality_' + scorer)}: {' / '.join(markdown_text(text) for text in descriptions)}"
                     + (" (the models' files disagree: compare with care)" if len(descriptions) > 1 else ""))
    targets = {axis: dict(target) for axis, target in result.settings.targets.items()}
    lines.append(f"- Bias metrics on the attributes {', '.join(f'`{axis}`' for axis in result.settings.axes)}"
                 + (f" and jointly `{intersectional_name(result.settings.intersectional)}`" if result.settings.intersectional else "")
                 + f"; target distribution: {('uniform, except ' + markdown_code(json.dumps(targets))) if targets else 'uniform'}.")
    lines.append(f"- Intervals of means over prompts: the union of the t-interval and the studentized (bootstrap-t) "
                 f"interval, {result.settings.num_resamples} resamples, {result.settings.confidence:.0%} confidence, "
                 f"seed {result.settings.seed}. Tests: exact paired sign-flip test over prompts (all 2^n sign patterns "
                 f"up to 16 prompts, {result.settings.num_resamples} random patterns beyond).")
    return lines


def agreement_section(agreement: pd.DataFrame, first: str, second: str) -> list[str]:
    """The report's section on two classifiers' agreement (tables.classifier_agreement_table)."""
    rows = [[f"`{row.model}`", markdown_code(row.axis), row.images, row.prompts,
             format_interval(row.agreement, row.ci_low, row.ci_high, row.ci_clipped), format_value(row.pooled),
             format_value(row.kappa)] for row in agreement.itertuples()]
    return ["## Two classifiers on the same pictures", "",
            f"{markdown_code(first)} (the report's) against {markdown_code(second)}: per attribute, the images with a face "
            "and a label from both; *agreement* is the mean over prompts of the share of a prompt's images they label "
            "alike, with its 95% interval over prompts; *pooled* the share over images; Cohen's kappa corrects for "
            "chance agreement. `face_detected` compares whether each found a face, over all images. An attribute one "
            "of them does not read has no images. Low agreement means a conclusion may depend on the classifier.", "",
            _markdown_table(["model", "attribute", "images", "prompts", "agreement [95% CI]", "pooled", "kappa"], rows), ""]


def write_report(result: EvaluationResult, report_dir: str | Path, written_tables: dict[str, Path],
                 num_chart_prompts: int = 6, num_grid_prompts: int = 3, images_per_grid: int = 6,
                 extra_sections: Sequence[str] = ()) -> Path:
    """Write report.md and its PNGs into `report_dir`; returns the path of report.md.

    extra_sections: Markdown lines placed before the machine-readable results (e.g. the human study's section).
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    models = [result.base, *result.tuned]
    axes = list(result.settings.axes)
    targets = {axis: dict(target) for axis, target in result.settings.targets.items()}
    names = ", ".join(f"`{model.name}`" for model in result.tuned) or "(no tuned model)"
    ranking_metric = (f"discrepancy_{intersectional_name(result.settings.intersectional)}"
                      if result.settings.intersectional else f"discrepancy_{axes[-1]}")

    lines = [f"# Evaluation: `{result.base.name}` vs {names}", ""]
    if result.left_out:
        dropped = ", ".join(f"`{name}` {count}" for name, count in result.left_out.items())
        lines += ["**Compared on the intersection** (--compare_on_intersection): the models' folders did not hold the same "
                  "prompts, image indices and seeds, so only the images every model has were kept; images left out: "
                  f"{dropped}.", ""]
    if result.settings.split:
        lines += [f"**Split {markdown_code(result.settings.split)}**: only the neutral and identity-specific prompts of the "
                  f"occupations in this split ({', '.join(markdown_text(o) for o in sorted(o for o, split in result.settings.occupation_splits.items() if split == result.settings.split))}); "
                  "generic prompts as they are.", ""]
    level = result.settings.confidence
    lines += [
        f"**How to read this.** Each number is a metric's mean over prompts with its {level:.0%} interval over "
        "prompts in brackets (prompts are the unit: images of one prompt are not independent draws); *pooled* "
        "computes the metric once over all images of that prompt kind. A discrepancy also shows its *floor*: what "
        "a population drawn exactly from the target with as many faces would read, from sampling alone. "
        "*difference* is tuned minus base, paired prompt by prompt, with its interval and the two-sided p-value "
        f"of the exact paired sign-flip test. *change* says **better** or **worse** only when that p-value is at "
        f"most {1 - level:.2g} and the interval excludes 0; with n prompts the exact test cannot go below "
        "2 / 2^n (0.125 at 4 prompts, 0.031 at 6), and with too few prompts the report says so instead of a "
        "verdict. Bias metrics count only images with a detected face and use the fixed class list (a "
        "population of one class is maximally biased): lower is better. Accuracy and quality: higher is "
        f"better. An interval marked {CLIPPED_MARK} was cut to the range its quantity can take (a discrepancy "
        "cannot be below 0 nor above its maximum, an accuracy not above 1), which keeps its coverage.", "",
        multiplicity_line(result), ""]
    lines += ["## Headline", "", *_headline_lines(result), ""]
    lines += ["## Setup", "", *_setup_lines(result), "", "### Images and faces", "", _counts_table(result), ""]
    lines += ["### The classifier's confusion", "", *_classifier_lines(result)]

    lines += ["## Results", ""]
    for kind in PROMPT_KINDS:
        if (result.base.summary["kind"] == kind).any():
            lines += [f"### {KIND_TITLES[kind]}", "", _results_table(result, kind), ""]
    lines += ["Metric definitions (`<attribute>` is gender, race, ...; `race_x_gender` is the joint label over all "
              "race x gender combinations):", ""]
    lines += [f"- `{name}`: {description}" for name, description in METRIC_DESCRIPTIONS.items()]
    lines.append("")

    if (result.base.per_prompt["kind"] == "neutral").any():
        lines += ["## Attribute distributions", "",
                  "Share of each label among the detected faces, per model; the dashed line is the target "
                  "(uniform unless stated).", ""]
        plot_distributions(models, POOLED, axes, "all neutral prompts pooled", targets,
                           report_dir / "chart_distribution_pooled.png")
        lines += ["![distributions over all neutral prompts](chart_distribution_pooled.png)", ""]
        chosen = select_chart_prompts(result.base, ranking_metric, num_chart_prompts)
        lines += [f"The {len(chosen)} prompts with the largest `{ranking_metric}` under `{result.base.name}`:", ""]
        for prompt_id in chosen:
            prompt = result.base.per_prompt.set_index("prompt_id").loc[prompt_id, "prompt"]
            plot_distributions(models, prompt_id, axes, prompt, targets, report_dir / f"chart_distribution_{prompt_id}.png")
            lines += [f"![{markdown_text(prompt)}](chart_distribution_{prompt_id}.png)", ""]

    else:
        chosen = []
        lines += ["No identity-neutral prompts were evaluated, so there are no distribution charts.", ""]

    per_prompt = result.base.per_prompt
    grid_prompts = chosen[:num_grid_prompts]
    for kind in ("identity", "generic"):
        grid_prompts += list(per_prompt.loc[per_prompt["kind"] == kind, "prompt_id"].head(1))
    grid_lines = []
    for prompt_id in grid_prompts:
        path = report_dir / f"grid_{prompt_id}.png"
        if plot_image_grid(models, prompt_id, images_per_grid, axes, path):
            grid_lines += [f"![images of prompt {prompt_id}]({path.name})", ""]
    if grid_lines:
        lines += ["## Images before and after", "",
                  "One row per model; each column is one image index, so the images in a column were drawn from "
                  "the same seed. Captions are the classifier's labels. Shown: the most biased neutral prompts "
                  "above, then the first identity-specific and the first generic prompt.", "", *grid_lines]

    if extra_sections:
        lines += [*extra_sections, ""]
    lines += ["## Machine-readable results", ""]
    for role, path in written_tables.items():
        lines.append(f"- [{path.name}]({path.name})")
    lines += ["", "`per_prompt_<model>.csv` has every metric for every prompt; `summary.csv` the means, intervals "
              "and pooled values; `comparison.csv` the paired tests and verdicts; `distributions_<model>.csv` the label counts; "
              "`classifier.csv` the confusion matrix and `corrected_shares.csv` the corrected shares; "
              "`evaluation.json` all of it with the settings.", ""]
    report_path = report_dir / "report.md"
    atomic_write_text(report_path, "\n".join(lines))
    return report_path
