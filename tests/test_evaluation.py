"""Evaluation tables on hand-made image folders (manifest + labels + quality files + small PNGs)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from popalign.evaluate import metrics
from popalign.attributes import load_attributes
from popalign.evaluate.tables import EvaluationSettings, evaluate, evaluate_model, load_image_folder, write_tables
from popalign.io import InputError
from popalign.prompts import prompt_id, render_prompt

REPO_ROOT = Path(__file__).resolve().parent.parent
ATTRIBUTES = load_attributes()
GENDERS = ATTRIBUTES["gender"].labels
RACES = ATTRIBUTES["race"].labels
TEMPLATE = "a photo of {person} {activity}"
COLOURS = {"male": (40, 90, 200), "female": (220, 80, 60), None: (128, 128, 128)}


def image_seed(base_seed, prompt, index):
    import hashlib
    return int(hashlib.sha256(f"{base_seed}|{prompt}|{index}".encode()).hexdigest()[:15], 16)


def make_image_folder(folder, prompt_specs, scorers=("hpsv2",), classifier="deepface", base_seed=0, model="tiny"):
    """Write an image folder as generation + classification + scoring would.

    prompt_specs: dicts with kind, occupation (or prompt for generic), optional gender/race (identity),
    labels: one (gender, race) per image or None for no face, quality: one float per image.
    """
    folder = Path(folder)
    manifest_rows, label_rows = [], []
    quality_rows = {scorer: [] for scorer in scorers}
    for spec in prompt_specs:
        kind = spec["kind"]
        if kind == "generic":
            prompt = neutral = spec["prompt"]
            words = []
        else:
            neutral = render_prompt(TEMPLATE, spec["occupation"], spec.get("activity", ""))
            words = [ATTRIBUTES[axis].prompt_words[spec[axis]] for axis in ("race", "gender") if spec.get(axis)]
            prompt = render_prompt(TEMPLATE, spec["occupation"], spec.get("activity", ""), words)
        pid = prompt_id(prompt)
        for index, labels in enumerate(spec["labels"]):
            image_path = f"images/{pid}/{index:05d}.png"
            (folder / "images" / pid).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), COLOURS[labels[0] if labels else None]).save(folder / image_path)
            manifest_rows.append({
                "image_path": image_path, "prompt_id": pid, "kind": kind, "prompt": prompt, "neutral_prompt": neutral,
                "occupation": spec.get("occupation", ""), "activity": spec.get("activity", ""),
                "gender": spec.get("gender", ""), "race": spec.get("race", ""), "age": "", "image_index": index,
                "seed": image_seed(base_seed, prompt, index), "model": model, "scheduler": "euler", "steps": 2,
                "guidance": 5.0, "width": 32, "height": 32, "negative_prompt": "", "precision": "fp32"})
            label_rows.append({
                "image_path": image_path, "face_detected": 1 if labels else 0,
                "gender": labels[0] if labels else "", "gender_score": 0.9 if labels else "",
                "race": labels[1] if labels else "", "race_score": 0.8 if labels else "",
                "age": "", "age_score": "", "classifier": classifier})
            for scorer in scorers:
                quality_rows[scorer].append({"image_path": image_path, "prompt": prompt,
                                             "score": spec["quality"][index], "scorer": f"{scorer}-test"})
    pd.DataFrame(manifest_rows).to_csv(folder / "manifest.csv", index=False)
    pd.DataFrame(label_rows).to_csv(folder / f"labels_{classifier}.csv", index=False)
    for scorer, rows in quality_rows.items():
        pd.DataFrame(rows).to_csv(folder / f"quality_{scorer}.csv", index=False)
    return folder


def hand_specs():
    """Two neutral prompts, one identity prompt, one generic prompt, with hand-chosen labels."""
    return [
        {"kind": "neutral", "occupation": "doctor", "activity": "in a clinic",
         "labels": [("male", "white"), ("male", "white"), ("female", "asian"), None], "quality": [1.0, 2.0, 3.0, 4.0]},
        {"kind": "neutral", "occupation": "engineer", "activity": "on a bridge",
         "labels": [("male", "white"), ("male", "white"), ("male", "black"), ("male", "white")],
         "quality": [0.5, 0.5, 0.5, 0.5]},
        {"kind": "identity", "occupation": "doctor", "activity": "in a clinic", "gender": "female", "race": "asian",
         "labels": [("female", "asian"), ("male", "asian"), ("female", "white"), None], "quality": [1, 1, 1, 1]},
        {"kind": "generic", "prompt": "a photo of a mountain lake at sunrise",
         "labels": [None, None, None], "quality": [5.0, 6.0, 7.0]},
    ]


SETTINGS = EvaluationSettings(num_resamples=500)


@pytest.fixture()
def hand_folder(tmp_path):
    return make_image_folder(tmp_path / "base", hand_specs())


def test_per_prompt_values_match_hand_computation(hand_folder):
    model = evaluate_model("base", hand_folder, ATTRIBUTES, SETTINGS)
    table = model.per_prompt.set_index("occupation")
    neutral = model.per_prompt[model.per_prompt["kind"] == "neutral"].set_index("occupation")
    doctor = neutral.loc["doctor"]
    assert doctor["num_images"] == 4 and doctor["num_faces"] == 3
    assert doctor["face_detection_rate"] == pytest.approx(0.75)
    assert doctor["discrepancy_gender"] == pytest.approx(math.sqrt(2) / 6)
    # race over the fixed 6 classes: white 2/3, asian 1/3, the other four 0.
    assert doctor["discrepancy_race"] == pytest.approx(math.sqrt((2 / 3 - 1 / 6) ** 2 + (1 / 3 - 1 / 6) ** 2 + 4 / 36))
    assert doctor["total_variation_gender"] == pytest.approx(1 / 6)
    assert doctor["kl_gender"] == pytest.approx(2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3))
    # race x gender over 12 joint classes: white|male 2/3, asian|female 1/3.
    assert doctor["discrepancy_race_x_gender"] == pytest.approx(
        math.sqrt((2 / 3 - 1 / 12) ** 2 + (1 / 3 - 1 / 12) ** 2 + 10 / 144))
    assert doctor["quality_hpsv2"] == pytest.approx(2.5)
    assert neutral.loc["engineer", "discrepancy_gender"] == pytest.approx(math.sqrt(0.5))
    # Counts (2, 1): sum n_k (n_k - 1) / (n (n - 1)) - 1/K = 2/6 - 1/2; the gap |2/3 - 1/3|; the floor at 3 faces.
    assert doctor["sq_discrepancy_unbiased_gender"] == pytest.approx(-1 / 6)
    assert doctor["pairwise_gap_gender"] == pytest.approx(1 / 3)
    assert doctor["floor_discrepancy_gender"] == pytest.approx(metrics.discrepancy_floor(3, GENDERS))
    assert neutral.loc["engineer", "floor_discrepancy_race"] == pytest.approx(metrics.discrepancy_floor(4, RACES))
    # The only identity prompt (asian female) names one gender: a correction needs two named classes, so the
    # corrected discrepancy is the observed one, and so is its floor.
    assert doctor["discrepancy_corrected_gender"] == pytest.approx(math.sqrt(2) / 6)
    assert doctor["floor_discrepancy_corrected_gender"] == pytest.approx(metrics.discrepancy_floor(3, GENDERS))
    assert doctor["floor_pairwise_gap_gender"] == pytest.approx(metrics.pairwise_gap_floor(3, GENDERS))

    identity = model.per_prompt[model.per_prompt["kind"] == "identity"].iloc[0]
    assert identity["accuracy_gender"] == pytest.approx(2 / 3)
    assert identity["accuracy_race"] == pytest.approx(2 / 3)
    assert identity["accuracy_race_x_gender"] == pytest.approx(1 / 3)
    assert math.isnan(identity["discrepancy_gender"])  # bias metrics are for neutral prompts only

    generic = model.per_prompt[model.per_prompt["kind"] == "generic"].iloc[0]
    assert generic["face_detection_rate"] == 0.0 and generic["quality_hpsv2"] == pytest.approx(6.0)
    assert math.isnan(generic["discrepancy_gender"]) and math.isnan(generic["accuracy_gender"])
    assert len(table) == 4


def test_summary_means_intervals_and_pooled_values(hand_folder):
    model = evaluate_model("base", hand_folder, ATTRIBUTES, SETTINGS)
    summary = model.summary.set_index(["kind", "metric"])
    row = summary.loc[("neutral", "discrepancy_gender")]
    assert row["num_prompts"] == 2 and row["better"] == "lower"
    assert row["floor"] == pytest.approx((metrics.discrepancy_floor(3, GENDERS) + metrics.discrepancy_floor(4, GENDERS)) / 2)
    assert math.isnan(summary.loc[("neutral", "total_variation_gender"), "floor"])
    assert row["mean"] == pytest.approx((math.sqrt(2) / 6 + math.sqrt(0.5)) / 2)
    assert row["ci_low"] <= row["mean"] <= row["ci_high"]
    # pooled over the 7 neutral faces: 6 male, 1 female.
    assert row["pooled"] == pytest.approx(metrics.discrepancy(["male"] * 6 + ["female"], GENDERS))
    assert summary.loc[("neutral", "face_detection_rate"), "pooled"] == pytest.approx(7 / 8)
    assert summary.loc[("neutral", "quality_hpsv2"), "pooled"] == pytest.approx((1 + 2 + 3 + 4 + 4 * 0.5) / 8)
    assert summary.loc[("identity", "accuracy_gender"), "pooled"] == pytest.approx(2 / 3)
    assert summary.loc[("identity", "accuracy_gender"), "better"] == "higher"
    assert summary.loc[("generic", "quality_hpsv2"), "mean"] == pytest.approx(6.0)
    assert ("generic", "discrepancy_gender") not in summary.index
    assert ("neutral", "accuracy_gender") not in summary.index


def test_distribution_table_has_every_class_per_prompt_and_pooled(hand_folder):
    model = evaluate_model("base", hand_folder, ATTRIBUTES, SETTINGS)
    pooled = model.distributions[model.distributions["prompt_id"] == "pooled"]
    race = pooled[pooled["attribute"] == "race"].set_index("label")
    assert list(race.index) == RACES
    assert race.loc["white", "count"] == 5 and race.loc["indian", "count"] == 0
    assert race["fraction"].sum() == pytest.approx(1.0)
    per_prompt = model.distributions[model.distributions["prompt_id"] != "pooled"]
    assert per_prompt["prompt_id"].nunique() == 2  # neutral prompts only
    assert len(per_prompt) == 2 * (2 + 6)


def shifted_specs(rng, num_prompts, biased):
    """Neutral prompts whose gender labels are skewed (biased=True) or balanced."""
    specs = []
    for number in range(num_prompts):
        share = rng.uniform(0.75, 0.95) if biased else rng.uniform(0.45, 0.55)
        labels = [("male" if rng.random() < share else "female", RACES[rng.integers(6)]) for _ in range(20)]
        specs.append({"kind": "neutral", "occupation": f"occupation{number}", "labels": labels,
                      "quality": list(rng.normal(1.0, 0.1, size=20))})
    return specs


def test_comparison_detects_a_debiased_model_and_images_pair_up(tmp_path):
    base_folder = make_image_folder(tmp_path / "base", shifted_specs(np.random.default_rng(0), 30, biased=True))
    tuned_folder = make_image_folder(tmp_path / "tuned", shifted_specs(np.random.default_rng(1), 30, biased=False))
    same_folder = make_image_folder(tmp_path / "same", shifted_specs(np.random.default_rng(0), 30, biased=True))
    result = evaluate(base_folder, {"tuned": tuned_folder, "same": same_folder}, ATTRIBUTES, SETTINGS)
    comparison = result.comparison.set_index(["model", "kind", "metric"])
    debiased = comparison.loc[("tuned", "neutral", "discrepancy_gender")]
    assert debiased["num_pairs"] == 30
    assert debiased["difference"] < 0 and debiased["ci_high"] < 0 and debiased["p_value"] < 0.01
    assert debiased["verdict"] == "better" and not debiased["exact"]  # 30 prompts: random sign patterns
    base_values = result.base.per_prompt["discrepancy_gender"].to_numpy()
    tuned_values = result.tuned[0].per_prompt["discrepancy_gender"].to_numpy()
    assert debiased["difference"] == pytest.approx(np.mean(tuned_values - base_values))
    unchanged = comparison.loc[("same", "neutral", "discrepancy_gender")]
    assert unchanged["difference"] == 0 and unchanged["p_value"] == 1.0
    assert result.image_pairing["tuned"] == {"base_images": 600, "tuned_images": 600, "paired_images": 600,
                                             "same_seed": 600}


def test_folders_that_differ_are_an_error_unless_compared_on_the_intersection(tmp_path):
    from dataclasses import replace

    specs = hand_specs()
    base = make_image_folder(tmp_path / "base", specs)
    other_seeds = make_image_folder(tmp_path / "other_seeds", specs, base_seed=1)
    with pytest.raises(InputError, match=r"the models' image folders differ: 15 \(e.g. prompt \w+ image \d seed \d+\) base image\(s\) "
                                         r"without a tuned image of the same prompt, index and seed.*--compare_on_intersection"):
        evaluate(base, {"tuned": other_seeds}, ATTRIBUTES, SETTINGS)
    with pytest.raises(InputError, match="share no image"):
        evaluate(base, {"tuned": other_seeds}, ATTRIBUTES, replace(SETTINGS, compare_on_intersection=True))
    fewer_prompts = make_image_folder(tmp_path / "fewer", specs[1:])
    with pytest.raises(InputError, match=r"without a tuned image"):
        evaluate(base, {"tuned": fewer_prompts}, ATTRIBUTES, SETTINGS)
    result = evaluate(base, {"tuned": fewer_prompts}, ATTRIBUTES, replace(SETTINGS, compare_on_intersection=True))
    assert result.left_out == {"base": 4, "tuned": 0}
    assert len(result.base.images) == len(result.tuned[0].images) == 11
    row = result.comparison.set_index(["kind", "metric"]).loc[("neutral", "discrepancy_gender")]
    assert row["num_pairs"] == 1 and row["exact"] and row["min_p_value"] == 1.0
    assert row["verdict"].startswith("too few prompts for a verdict (n=1")
    from popalign.evaluate.report import write_report

    report = write_report(result, tmp_path / "report", write_tables(result, tmp_path / "report"), 0, 0, 0).read_text()
    assert "**Compared on the intersection**" in report and "`base` 4" in report


def test_a_model_may_have_several_folders(tmp_path):
    specs = hand_specs()
    people = make_image_folder(tmp_path / "people", specs[:3], scorers=("hpsv2", "pickscore"))
    generic = make_image_folder(tmp_path / "generic", specs[3:], scorers=("hpsv2",))
    model = evaluate_model("base", [people, generic], ATTRIBUTES, SETTINGS)
    assert model.scorers == ["hpsv2"]  # only the scorers every folder has
    assert len(model.images) == 15 and set(model.per_prompt["kind"]) == {"neutral", "identity", "generic"}
    assert set(model.images.loc[model.images["kind"] == "generic", "folder"]) == {str(generic)}
    with pytest.raises(InputError, match="in both"):
        evaluate_model("base", [people, people], ATTRIBUTES, SETTINGS)


def test_write_tables(tmp_path, hand_folder):
    result = evaluate(hand_folder, {"copy": hand_folder}, ATTRIBUTES, SETTINGS)
    written = write_tables(result, tmp_path / "report")
    for name in ["per_prompt_base.csv", "per_prompt_copy.csv", "distributions_base.csv", "summary.csv",
                 "comparison.csv", "classifier.csv", "corrected_shares.csv", "evaluation.json"]:
        assert (tmp_path / "report" / name).is_file(), name
    document = json.loads(written["json"].read_text())
    assert document["models"]["base"]["num_images"] == 15 and document["models"]["base"]["num_faces"] == 10
    assert document["models"]["base"]["scorers"] == {"hpsv2": {"scorer": ["hpsv2-test"], "description": []}}
    summary = pd.read_csv(written["summary"])
    assert set(summary["model"]) == {"base", "copy"}
    assert {"mean", "ci_low", "ci_high", "pooled", "num_prompts", "floor"} <= set(summary.columns)
    confusion = pd.read_csv(written["classifier"], keep_default_na=False).set_index(["attribute", "prompted", "read_as"])
    assert confusion.loc[("gender", "female", "male"), "count"] == 1
    assert float(confusion.loc[("gender", "female", "female"), "rate"]) == pytest.approx(2 / 3)
    # One identity-specific prompt names one gender and one race, 3 faces: no correction is offered, and why.
    assert result.corrected_shares.empty
    assert "fewer than two classes" in result.confusion_checks["gender"].reason
    assert document["comparison"][0]["headline"] in (True, False)
    assert document["comparison"][0]["exact"] in (True, False)


def test_missing_or_bad_inputs_raise_input_errors(tmp_path, hand_folder):
    labels_path = hand_folder / "labels_deepface.csv"
    labels = pd.read_csv(labels_path, dtype=str, keep_default_na=False)
    labels.iloc[:-1].to_csv(labels_path, index=False)
    with pytest.raises(InputError, match="no row for 1 of 15 images"):
        load_image_folder(hand_folder, "deepface", ATTRIBUTES)
    labels.loc[0, "gender"] = "Man"  # an unmapped classifier label
    labels.to_csv(labels_path, index=False)
    with pytest.raises(InputError, match="'Man' is not one of"):
        load_image_folder(hand_folder, "deepface", ATTRIBUTES)
    with pytest.raises(InputError, match="labels_clip.csv: file not found"):
        load_image_folder(hand_folder, "clip", ATTRIBUTES)
    labels.loc[0, "gender"] = "male"
    labels.to_csv(labels_path, index=False)
    assert len(load_image_folder(hand_folder, "deepface", ATTRIBUTES)) == 15
    with pytest.raises(InputError, match="quality_pickscore.csv"):
        load_image_folder(hand_folder, "deepface", ATTRIBUTES, scorers=["pickscore"])
    with pytest.raises(InputError, match="targets"):
        evaluate_model("base", hand_folder, ATTRIBUTES, EvaluationSettings(targets={"gender": {"male": 0.9}}))


def test_non_uniform_target(hand_folder):
    settings = EvaluationSettings(num_resamples=200, targets={"gender": {"male": 2 / 3, "female": 1 / 3}})
    model = evaluate_model("base", hand_folder, ATTRIBUTES, settings)
    doctor = model.per_prompt[(model.per_prompt["kind"] == "neutral") & (model.per_prompt["occupation"] == "doctor")]
    assert doctor["discrepancy_gender"].iloc[0] == pytest.approx(0.0)


def test_evaluate_script_reports_bad_input(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "popalign.evaluate", "--base", str(tmp_path / "missing"), "--report_dir",
                                str(tmp_path / "report")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 2
    assert completed.stderr.startswith("error: ") and "manifest.csv: file not found" in completed.stderr


def test_a_split_keeps_its_occupations_and_the_generic_prompts(tmp_path, hand_folder):
    from dataclasses import replace

    splits = {"doctor": "train", "engineer": "heldout"}
    heldout = evaluate_model("base", hand_folder, ATTRIBUTES, replace(SETTINGS, split="heldout", occupation_splits=splits))
    assert set(heldout.per_prompt["occupation"]) == {"engineer", ""}  # the generic prompt stays
    train = evaluate_model("base", hand_folder, ATTRIBUTES, replace(SETTINGS, split="train", occupation_splits=splits))
    assert set(train.per_prompt["kind"]) == {"neutral", "identity", "generic"}
    assert set(train.per_prompt["occupation"]) == {"doctor", ""}
    with pytest.raises(InputError, match=r"occupation\(s\) \['engineer'\] of the evaluated prompts have no split"):
        evaluate_model("base", hand_folder, ATTRIBUTES, replace(SETTINGS, split="train", occupation_splits={"doctor": "train"}))
    with pytest.raises(InputError, match="--split test: no occupation has it"):
        evaluate_model("base", hand_folder, ATTRIBUTES, replace(SETTINGS, split="test", occupation_splits=splits))


def correction_specs(faces_per_identity_prompt, male_read_as_female, female_read_as_male, seed=0):
    """Two occupations, each with a neutral prompt (6 male, 4 female drawn) and one identity prompt per gender."""
    rng = np.random.default_rng(seed)

    def read(drawn):
        flip = {"male": male_read_as_female, "female": female_read_as_male}[drawn]
        return (("female" if drawn == "male" else "male") if rng.random() < flip else drawn, "white")

    specs = []
    for occupation in ("doctor", "nurse"):
        drawn = ["male"] * 6 + ["female"] * 4
        specs.append({"kind": "neutral", "occupation": occupation, "labels": [read(d) for d in drawn],
                      "quality": [1.0] * len(drawn)})
        for gender in ("male", "female"):
            specs.append({"kind": "identity", "occupation": occupation, "gender": gender,
                          "labels": [read(gender) for _ in range(faces_per_identity_prompt)],
                          "quality": [1.0] * faces_per_identity_prompt})
    return specs


def test_the_correction_is_used_when_the_confusion_is_well_estimated_and_refused_otherwise(tmp_path):
    from dataclasses import replace

    from popalign.evaluate.report import write_report

    settings = replace(SETTINGS, axes=("gender",), intersectional=(), correct_for_classifier=True)
    good = make_image_folder(tmp_path / "good", correction_specs(15, 0.1, 0.1))
    result = evaluate(good, {"copy": good}, ATTRIBUTES, settings)
    check = result.confusion_checks["gender"]
    assert check.usable and check.corrected_classes == ("male", "female") and check.fewest_images == 30
    shares = result.corrected_shares.set_index(["model", "label"])
    assert {"observed", "corrected", "ci_low", "ci_high"} <= set(shares.columns)
    assert np.all(shares["ci_low"] <= shares["corrected"]) and np.all(shares["corrected"] <= shares["ci_high"])
    assert "discrepancy_corrected_gender" in result.base.per_prompt
    # The corrected discrepancy's interval holds the one over prompts with the confusion fixed (it is their union
    # with the replicates that re-estimate the confusion).
    per_prompt = result.base.per_prompt.loc[result.base.per_prompt["kind"] == "neutral", "discrepancy_corrected_gender"]
    _, fixed_low, fixed_high = metrics.bootstrap_mean_ci(per_prompt.to_numpy(dtype=float), settings.num_resamples)
    row = result.base.summary.set_index("metric").loc["discrepancy_corrected_gender"]
    assert row["ci_low"] <= max(fixed_low, 0.0) + 1e-12 and row["ci_high"] >= min(fixed_high, 1 / math.sqrt(2)) - 1e-12
    headline = result.comparison[result.comparison["headline"]]
    assert set(headline["metric"]) == {"discrepancy_corrected_gender", "quality_hpsv2", "accuracy_gender"}
    # One axis, one tuned model: a family of one, Holm's p the raw p.
    family = result.comparison[result.comparison["p_value_holm"].notna()]
    assert list(family["metric"]) == ["discrepancy_corrected_gender"] and list(family["family_size"]) == [1]
    assert family["p_value_holm"].iloc[0] == family["p_value"].iloc[0]
    report = write_report(result, tmp_path / "report_good", write_tables(result, tmp_path / "report_good"), 0, 0, 0).read_text()
    assert "are one family of 1 tests" in report and "corrected over male, female" in report

    # Race is measured too but no identity prompt names a race: its headline stays observed, and the family holds
    # the corrected gender and the observed race.
    both = evaluate(good, {"copy": good}, ATTRIBUTES, replace(settings, axes=("gender", "race")))
    family = both.comparison[both.comparison["p_value_holm"].notna()]
    assert set(family["metric"]) == {"discrepancy_corrected_gender", "discrepancy_race"}
    assert set(family["family_size"]) == {2}
    headline = both.comparison[both.comparison["headline"]]
    assert {"discrepancy_corrected_gender", "discrepancy_race"} <= set(headline["metric"])
    assert "discrepancy_gender" not in set(headline["metric"])
    # The intersectional pair is measured but is not a headline verdict: the family stays the axes.
    joint = evaluate(good, {"copy": good}, ATTRIBUTES, replace(settings, axes=("gender", "race"),
                                                                   intersectional=("race", "gender")))
    assert "discrepancy_race_x_gender" in set(joint.comparison["metric"])
    assert not joint.comparison.set_index("metric").loc["discrepancy_race_x_gender", "headline"]
    family = joint.comparison[joint.comparison["p_value_holm"].notna()]
    assert set(family["metric"]) == {"discrepancy_corrected_gender", "discrepancy_race"} and set(family["family_size"]) == {2}

    # Confusions near 50%: sigma_min is small and the correction is refused, with the reason in the report.
    singular = make_image_folder(tmp_path / "singular", correction_specs(15, 0.45, 0.45, seed=1))
    result = evaluate(singular, {"copy": singular}, ATTRIBUTES, settings)
    assert not result.confusion_checks["gender"].usable
    assert "nearly singular" in result.confusion_checks["gender"].reason
    assert result.corrected_shares.empty and "discrepancy_corrected_gender" not in result.base.per_prompt
    report = write_report(result, tmp_path / "report_singular", write_tables(result, tmp_path / "report_singular"),
                          0, 0, 0).read_text()
    assert "**not corrected**: the confusion is nearly singular" in report
    assert "`gender` has no usable estimate of the classifier's confusion" in report

    # Too few identity-specific faces per class.
    few = make_image_folder(tmp_path / "few", correction_specs(4, 0.1, 0.1))
    result = evaluate(few, {"copy": few}, ATTRIBUTES, settings)
    assert "8 identity-specific faces in the smallest class (needs >= 20)" in result.confusion_checks["gender"].reason
