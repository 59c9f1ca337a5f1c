"""The Markdown report, its charts and image grids, on hand-made image folders."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from popalign.attributes import load_attributes
from popalign.evaluate.tables import EvaluationSettings, evaluate, write_tables
from popalign.evaluate.report import format_interval, format_p_value, format_verdict, select_chart_prompts, write_report
from test_evaluation import COLOURS, hand_specs, make_image_folder, shifted_specs

REPO_ROOT = Path(__file__).resolve().parent.parent
ATTRIBUTES = load_attributes()
SETTINGS = EvaluationSettings(num_resamples=300)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_folders")
    base = make_image_folder(root / "base", hand_specs() + shifted_specs(np.random.default_rng(0), 8, biased=True),
                             scorers=("hpsv2", "aesthetic"))
    tuned = make_image_folder(root / "tuned", hand_specs() + shifted_specs(np.random.default_rng(1), 8, biased=False),
                              scorers=("hpsv2", "aesthetic"))
    return base, tuned


@pytest.fixture(scope="module")
def report(folders, tmp_path_factory):
    base, tuned = folders
    report_dir = tmp_path_factory.mktemp("report")
    result = evaluate(base, {"popalign": tuned}, ATTRIBUTES, SETTINGS)
    written = write_tables(result, report_dir)
    path = write_report(result, report_dir, written, num_chart_prompts=3, num_grid_prompts=2, images_per_grid=4)
    return result, path


def referenced_files(markdown: str) -> list[str]:
    return re.findall(r"\]\(([^)]+)\)", markdown)


def test_report_explains_itself_and_names_what_was_measured(report):
    result, path = report
    text = path.read_text()
    assert text.startswith("# Evaluation: `base` vs `popalign`")
    for heading in ["**How to read this.**", "## Headline", "## Setup", "### Images and faces", "## Results",
                    "## Attribute distributions", "## Images before and after", "## Machine-readable results"]:
        assert heading in text, heading
    assert "Classifier `deepface`: DeepFace" in text
    assert "Quality `quality_hpsv2`: HPSv2" in text and "Quality `quality_aesthetic`: LAION" in text
    # counts of images and detected faces per model and prompt kind
    base_neutral = result.base.images[result.base.images["kind"] == "neutral"]
    assert f"| base | neutral | 10 | {len(base_neutral)} | {int(base_neutral['face_detected'].sum())} |" in text
    assert "| base | generic | 1 | 3 | 0 | 0.0% |" in text


def test_results_table_holds_every_metric_with_interval_and_test(report):
    result, path = report
    text = path.read_text()
    summary = result.base.summary.set_index(["kind", "metric"])
    comparison = result.comparison.set_index(["kind", "metric"])
    for (kind, metric), row in summary.iterrows():
        table_rows = [line for line in text.splitlines() if line.startswith(f"| `{metric}` |")]
        assert table_rows, metric
        expected = format_interval(row["mean"], row["ci_low"], row["ci_high"])
        assert any(expected in line for line in table_rows), (metric, expected)
        test = comparison.loc[(kind, metric)]
        assert any(format_p_value(test["p_value"]) in line for line in table_rows)
    debiased = comparison.loc[("neutral", "discrepancy_gender")]
    assert debiased["ci_high"] < 0
    headline = text[text.index("## Headline"):text.index("## Setup")]
    assert "`popalign`, neutral prompts, `discrepancy_gender` (lower is better)" in headline
    assert "**better**" in headline


def test_every_linked_file_exists_and_images_open(report):
    _, path = report
    files = referenced_files(path.read_text())
    pngs = [name for name in files if name.endswith(".png")]
    assert "chart_distribution_pooled.png" in pngs
    assert len([name for name in pngs if name.startswith("chart_distribution_")]) == 1 + 3
    assert len([name for name in pngs if name.startswith("grid_")]) == 2 + 2  # 2 neutral + identity + generic
    for name in files:
        assert (path.parent / name).is_file(), name
    for name in pngs:
        with Image.open(path.parent / name) as image:
            assert image.format == "PNG" and image.width >= 300 and image.height >= 200
    for name in ["summary.csv", "comparison.csv", "evaluation.json", "per_prompt_base.csv", "per_prompt_popalign.csv"]:
        assert name in files


def test_image_grid_shows_the_paired_images(report):
    result, path = report
    prompt_id = select_chart_prompts(result.base, "discrepancy_race_x_gender", 1)[0]
    grid = np.asarray(Image.open(path.parent / f"grid_{prompt_id}.png").convert("RGB")).astype(int)
    # The hand-made images are solid colours by predicted gender; the grid must show them.
    base_images = result.base.images[result.base.images["prompt_id"] == prompt_id].sort_values("image_index").head(4)
    for gender in set(base_images["predicted_gender"].replace("", None).dropna()):
        distance = np.abs(grid - np.array(COLOURS[gender])).sum(axis=2)
        assert (distance < 10).sum() > 500, gender


def test_chart_prompts_are_the_most_biased(report):
    result, _ = report
    chosen = select_chart_prompts(result.base, "discrepancy_gender", 3)
    neutral = result.base.per_prompt[result.base.per_prompt["kind"] == "neutral"]
    largest = neutral.sort_values("discrepancy_gender", ascending=False)["discrepancy_gender"].head(3)
    chosen_values = neutral.set_index("prompt_id").loc[chosen, "discrepancy_gender"]
    assert list(chosen_values) == list(largest)


def test_verdict_and_formatting():
    assert format_verdict("better") == "**better**" and format_verdict("worse") == "**worse**"
    assert format_verdict("no clear change") == "no clear change"
    assert format_interval(0.31234, 0.2, 0.4) == "0.312 [0.2, 0.4]"
    assert format_p_value(0.0001) == "<0.001" and format_p_value(0.04) == "0.040"


def test_report_of_the_base_model_alone_and_of_generic_prompts_only(tmp_path):
    generic_only = make_image_folder(tmp_path / "generic", hand_specs()[3:])
    result = evaluate(generic_only, {}, ATTRIBUTES, SETTINGS)
    path = write_report(result, tmp_path / "report", write_tables(result, tmp_path / "report"))
    text = path.read_text()
    assert "No tuned model was given" in text
    assert "No identity-neutral prompts were evaluated" in text
    for name in referenced_files(text):
        assert (path.parent / name).is_file(), name


def test_evaluate_script_writes_the_report(folders, tmp_path):
    base, tuned = folders
    completed = subprocess.run(
        [sys.executable, "-m", "popalign.evaluate", "--base", str(base), "--tuned", f"popalign={tuned}", "--report_dir",
         str(tmp_path / "report"), "--num_resamples", "200", "--scorers", "hpsv2", "--chart_prompts", "2"],
        cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "report" / "report.md").is_file()
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert {metric for metric in summary["metric"] if metric.startswith("quality_")} == {"quality_hpsv2"}
    assert len(list((tmp_path / "report").glob("chart_distribution_*.png"))) == 3


def test_four_prompts_give_no_verdict_and_the_report_says_why(tmp_path):
    """Four prompts that all improve: the exact test cannot go below p = 0.125, so there is no 'better'."""
    base = make_image_folder(tmp_path / "base", shifted_specs(np.random.default_rng(0), 4, biased=True))
    tuned = make_image_folder(tmp_path / "tuned", shifted_specs(np.random.default_rng(1), 4, biased=False))
    result = evaluate(base, {"popalign": tuned}, ATTRIBUTES, SETTINGS)
    row = result.comparison.set_index(["kind", "metric"]).loc[("neutral", "discrepancy_gender")]
    assert row["difference"] < 0 and row["p_value"] == pytest.approx(0.125)
    text = write_report(result, tmp_path / "report", write_tables(result, tmp_path / "report")).read_text()
    headline = text[text.index("## Headline"):text.index("## Setup")]
    assert "**better**" not in text[text.index("## Headline"):]
    # Two axes in the Holm family: the floor doubles.
    assert "too few prompts for a verdict (n=4: p cannot go below 0.25 after Holm over 2 tests)" in headline
    assert "**Multiplicity.** The headline's bias verdicts, `discrepancy_gender`, `discrepancy_race` for each of 1" in text
    assert "(floor " in headline


def test_classifier_section_and_corrected_headline(tmp_path):
    from test_evaluation import correction_specs

    base = make_image_folder(tmp_path / "base", correction_specs(15, 0.1, 0.1))
    tuned = make_image_folder(tmp_path / "tuned", correction_specs(15, 0.1, 0.1, seed=1))
    settings = EvaluationSettings(num_resamples=300, correct_for_classifier=True, axes=("gender",), intersectional=())
    result = evaluate(base, {"popalign": tuned}, ATTRIBUTES, settings)
    text = write_report(result, tmp_path / "report", write_tables(result, tmp_path / "report")).read_text()
    section = text[text.index("### The classifier's confusion"):text.index("## Results")]
    assert "`gender`: P(read as column | prompted row)" in section and "(on for this report)" in section
    assert "How the correction moves the headline discrepancy" in section
    assert "faces read as any other label keep their observed share" in section
    headline = text[text.index("## Headline"):text.index("## Setup")]
    assert "`discrepancy_corrected_gender`" in headline and "`discrepancy_gender`" not in headline


def test_user_text_is_escaped_in_the_report_and_never_read_as_math(tmp_path):
    """An activity that holds a Markdown image with a javascript link, a raw script tag and broken math text."""
    hostile = "![x](javascript:alert(1)) <script>alert(2)</script> $\\frac{1}{$"
    specs = shifted_specs(np.random.default_rng(0), 2, biased=True)
    for spec in specs:
        spec["activity"] = hostile
    base = make_image_folder(tmp_path / "base", specs)
    result = evaluate(base, {}, ATTRIBUTES, SETTINGS)
    path = write_report(result, tmp_path / "report", write_tables(result, tmp_path / "report"), 2, 2, 2)
    text = path.read_text()
    assert "<script>" not in text and "](javascript:" not in text
    assert "&lt;script&gt;" in text
    assert all(not target.startswith("javascript") for target in referenced_files(text))
    assert len(list(path.parent.glob("chart_distribution_*.png"))) == 3


def test_evaluate_adds_the_human_study_section_and_refuses_a_folder_that_is_not_a_study(folders, tmp_path):
    from popalign.study.prepare import StudySettings, prepare_study
    from test_study_world import make_image_folders

    study_dir = tmp_path / "study"
    prepare_study(make_image_folders(tmp_path / "study_images"), study_dir,
                  StudySettings(image_tasks=6, population_tasks=2, grid_size=4, tasks_per_rater=8))
    base, tuned = folders
    command = [sys.executable, "-m", "popalign.evaluate", "--base", str(base), "--tuned", f"popalign={tuned}",
               "--num_resamples", "100", "--chart_prompts", "0", "--grid_prompts", "0"]
    completed = subprocess.run([*command, "--human_study", str(study_dir), "--report_dir", str(tmp_path / "report")],
                               cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    text = (tmp_path / "report" / "report.md").read_text()
    section = text[text.index("## Human study"):text.index("## Machine-readable results")]
    assert "0 raters voted" in section
    completed = subprocess.run([*command, "--human_study", str(tmp_path), "--report_dir", str(tmp_path / "other")],
                               cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 2 and len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    assert not (tmp_path / "other").exists()


def test_evaluate_refuses_a_report_folder_another_run_holds_and_a_seed_out_of_range(folders, tmp_path):
    from popalign.locks import output_lock

    base, tuned = folders
    command = [sys.executable, "-m", "popalign.evaluate", "--base", str(base), "--tuned", f"popalign={tuned}",
               "--num_resamples", "50", "--chart_prompts", "0", "--grid_prompts", "0", "--report_dir", str(tmp_path / "report")]
    with output_lock(tmp_path / "report", "evaluation"):
        completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 2 and "another run is writing here" in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1 and not (tmp_path / "report" / "report.md").exists()
    completed = subprocess.run([*command, "--seed", "-1"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 2 and "seed -1 is out of range" in completed.stderr
    completed = subprocess.run([*command, "--split", "heldout", "--occupation_splits", str(tmp_path / "none.csv"),
                                "--update_model_cards"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 2
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert not list((tmp_path / "report").glob(".*.lock"))  # released as the run ended


def test_evaluate_adds_how_two_classifiers_agree(folders, tmp_path):
    import shutil

    base, tuned = folders
    copies = {}
    for name, folder in (("base", base), ("tuned", tuned)):
        copies[name] = tmp_path / name
        shutil.copytree(folder, copies[name])
        labels = pd.read_csv(copies[name] / "labels_deepface.csv", dtype=str, keep_default_na=False)
        # The second classifier reads every fourth face's gender the other way.
        flip = (labels["gender"] != "") & (np.arange(len(labels)) % 4 == 0)
        labels.loc[flip, "gender"] = labels.loc[flip, "gender"].map({"male": "female", "female": "male"})
        labels.assign(classifier="clip").to_csv(copies[name] / "labels_clip.csv", index=False)
    completed = subprocess.run(
        [sys.executable, "-m", "popalign.evaluate", "--base", str(copies["base"]), "--tuned", f"popalign={copies['tuned']}",
         "--second_classifier", "clip", "--num_resamples", "100", "--chart_prompts", "0", "--grid_prompts", "0",
         "--report_dir", str(tmp_path / "report")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    agreement = pd.read_csv(tmp_path / "report" / "classifier_agreement.csv").set_index(["model", "axis"])
    labels = pd.read_csv(copies["base"] / "labels_deepface.csv", dtype=str, keep_default_na=False)
    with_face = labels["gender"] != ""
    flipped = (with_face & (np.arange(len(labels)) % 4 == 0)).sum()
    assert agreement.loc[("base", "gender"), "pooled"] == pytest.approx(1 - flipped / with_face.sum())
    assert agreement.loc[("base", "race"), "pooled"] == 1.0 and agreement.loc[("base", "face_detected"), "pooled"] == 1.0
    assert 0 <= agreement.loc[("base", "gender"), "ci_low"] <= agreement.loc[("base", "gender"), "ci_high"] <= 1
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Two classifiers on the same pictures" in text and "`deepface` (the report's) against `clip`" in text
    # One split's report compares the two on that split's images only (the labels files hold every image).
    manifest = pd.read_csv(copies["base"] / "manifest.csv", dtype=str, keep_default_na=False)
    occupations = sorted(set(manifest["occupation"]) - {""})
    splits = pd.DataFrame({"occupation": occupations, "split": ["heldout" if index % 2 else "train"
                                                                for index in range(len(occupations))]})
    splits.to_csv(tmp_path / "splits.csv", index=False)
    completed = subprocess.run(
        [sys.executable, "-m", "popalign.evaluate", "--base", str(copies["base"]), "--tuned", f"popalign={copies['tuned']}",
         "--second_classifier", "clip", "--num_resamples", "100", "--chart_prompts", "0", "--grid_prompts", "0",
         "--occupation_splits", str(tmp_path / "splits.csv"), "--split", "heldout",
         "--report_dir", str(tmp_path / "report_heldout")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    heldout = pd.read_csv(tmp_path / "report_heldout" / "classifier_agreement.csv").set_index(["model", "axis"])
    in_split = manifest["occupation"].isin(splits.loc[splits["split"] == "heldout", "occupation"]) | (manifest["occupation"] == "")
    assert heldout.loc[("base", "face_detected"), "images"] == in_split.sum() < len(manifest)


def test_generation_cells_name_another_vae_and_skip_folders_without_the_column():
    """A model whose folders mix manifests with a `vae` column and older ones without it (NaN after concatenation):
    the report names the VAE once and writes no 'nan'."""
    from popalign.evaluate.report import _generation_cells

    manifest = pd.concat([pd.DataFrame({"model": ["m"], "unet": [""], "lora": [""], "vae": ["madebyollin/sdxl-vae-fp16-fix"]}),
                          pd.DataFrame({"model": ["m"], "unet": [""], "lora": [""]})], ignore_index=True)
    model, weights, _ = _generation_cells(manifest)
    assert weights == "vae `madebyollin/sdxl-vae-fp16-fix`" and "nan" not in weights
    assert _generation_cells(manifest.drop(columns="vae"))[1] == "-"
