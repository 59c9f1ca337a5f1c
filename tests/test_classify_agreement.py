"""Agreement of two classifiers on the same images: hand values, a slow independent count, bad input."""

import math

import numpy as np
import pandas as pd
import pytest

from popalign.classify.agreement import FACE_AXIS, classifier_agreement, prompt_of_image_path
from popalign.evaluate.metrics import bootstrap_mean_ci
from popalign.image_folder import LABEL_COLUMNS
from popalign.io import InputError


def labels_frame(rows, classifier):
    """rows: (image_path, face, gender, race, age) -> a labels file as read (every cell a string)."""
    records = []
    for image_path, face, gender, race, age in rows:
        records.append({"image_path": image_path, "face_detected": "1" if face else "0", "gender": gender, "gender_score": "",
                        "race": race, "race_score": "", "age": age, "age_score": "", "classifier": classifier})
    return pd.DataFrame.from_records(records, columns=LABEL_COLUMNS)


# Three prompts. Classifier b does not predict race.
A_ROWS = [("images/p1/00000.png", True, "male", "white", "young"), ("images/p1/00001.png", True, "female", "asian", "young"),
          ("images/p1/00002.png", True, "male", "black", "young"), ("images/p1/00003.png", True, "female", "white", "mid-aged"),
          ("images/p2/00000.png", True, "male", "white", "very old"), ("images/p2/00001.png", False, "", "", ""),
          ("images/p3/00000.png", True, "female", "indian", "young")]
B_ROWS = [("images/p1/00000.png", True, "male", "", "young"), ("images/p1/00001.png", True, "male", "", "mid-aged"),
          ("images/p1/00002.png", False, "", "", ""), ("images/p1/00003.png", True, "female", "", "mid-aged"),
          ("images/p2/00000.png", True, "male", "", "very old"), ("images/p2/00001.png", True, "female", "", "young"),
          ("images/p3/00000.png", True, "male", "", "young")]


def test_hand_values():
    result = classifier_agreement(labels_frame(A_ROWS, "a"), labels_frame(B_ROWS[::-1], "b"),  # row order does not matter
                                  axes=("gender", "race", "age", FACE_AXIS), num_resamples=2000)
    assert list(result) == ["gender", "race", "age", FACE_AXIS]
    gender = result["gender"]
    # faces in both: p1 -> 3 images (2 agree), p2 -> 1 (agrees), p3 -> 1 (disagrees)
    assert (gender.images, gender.prompts) == (5, 3)
    assert gender.agreement == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert gender.pooled == pytest.approx(3 / 5)
    # a: male 2, female 3; b: male 4, female 1 -> chance (2*4 + 3*1) / 25 = 0.44; kappa = (0.6 - 0.44) / 0.56 = 2/7
    assert gender.kappa == pytest.approx(2 / 7)
    assert gender.counts == {("male", "male"): 2, ("female", "male"): 2, ("female", "female"): 1}
    _, low, high = bootstrap_mean_ci([2 / 3, 1.0, 0.0], num_resamples=2000)
    assert (gender.low, gender.high) == (pytest.approx(max(low, 0.0)), pytest.approx(min(high, 1.0)))
    assert gender.clipped == (low < 0.0 or high > 1.0)
    assert 0.0 <= gender.low <= gender.agreement <= gender.high <= 1.0

    # b gives no race label: nothing to compare
    race = result["race"]
    assert race.images == 0 and race.prompts == 0 and all(math.isnan(value) for value in (race.agreement, race.pooled, race.kappa))

    age = result["age"]  # p1: young/young, young/mid-aged, mid-aged/mid-aged; p2: very old/very old; p3: young/young
    assert (age.images, age.agreement, age.pooled) == (5, pytest.approx((2 / 3 + 1 + 1) / 3), pytest.approx(4 / 5))
    # a: young 3, mid-aged 1, very old 1; b: young 2, mid-aged 2, very old 1 -> chance (6 + 2 + 1) / 25 = 0.36
    assert age.kappa == pytest.approx((0.8 - 0.36) / 0.64)

    # face found: all 7 images; p1 3/4 agree, p2 1/2, p3 1/1; a finds 6 of 7, b finds 6 of 7 -> chance 37/49
    face = result[FACE_AXIS]
    assert (face.images, face.prompts) == (7, 3)
    assert face.agreement == pytest.approx((3 / 4 + 1 / 2 + 1) / 3) and face.pooled == pytest.approx(5 / 7)
    assert face.kappa == pytest.approx((5 / 7 - 37 / 49) / (1 - 37 / 49))  # -1/6: below chance


def test_one_prompt_has_no_interval_and_one_label_has_no_kappa():
    rows = [("images/p1/00000.png", True, "male", "", ""), ("images/p1/00001.png", True, "male", "", "")]
    gender = classifier_agreement(labels_frame(rows, "a"), labels_frame(rows, "b"), axes=("gender",))["gender"]
    assert (gender.agreement, gender.pooled) == (1.0, 1.0)
    assert math.isnan(gender.low) and math.isnan(gender.high) and math.isnan(gender.kappa)  # chance agreement is 1


def slow_agreement(first: pd.DataFrame, second: pd.DataFrame, prompt_ids: dict, axis: str):
    """Per-prompt shares, pooled share and kappa by explicit loops over the rows and a confusion matrix."""
    second_rows = {row["image_path"]: row for _, row in second.iterrows()}
    per_prompt_agree, per_prompt_total, labels_a, labels_b = {}, {}, [], []
    for _, row in first.iterrows():
        other = second_rows[row["image_path"]]
        if axis == FACE_AXIS:
            a, b = row["face_detected"], other["face_detected"]
        else:
            if row["face_detected"] != "1" or other["face_detected"] != "1" or row[axis] == "" or other[axis] == "":
                continue
            a, b = row[axis], other[axis]
        prompt = prompt_ids[row["image_path"]]
        per_prompt_total[prompt] = per_prompt_total.get(prompt, 0) + 1
        per_prompt_agree[prompt] = per_prompt_agree.get(prompt, 0) + (a == b)
        labels_a.append(a)
        labels_b.append(b)
    shares = [per_prompt_agree[prompt] / per_prompt_total[prompt] for prompt in per_prompt_total]
    classes = sorted(set(labels_a) | set(labels_b))
    confusion = np.zeros((len(classes), len(classes)))
    for a, b in zip(labels_a, labels_b):
        confusion[classes.index(a), classes.index(b)] += 1
    total = confusion.sum()
    observed = np.trace(confusion) / total
    chance = float((confusion.sum(axis=1) * confusion.sum(axis=0)).sum()) / total ** 2
    return shares, observed, (observed - chance) / (1 - chance), int(total)


def test_matches_a_slow_count_on_random_labels():
    rng = np.random.default_rng(3)
    genders, races = ["male", "female"], ["white", "asian", "black", "indian"]
    rows_a, rows_b, prompt_ids = [], [], {}
    for prompt in range(15):
        for index in range(int(rng.integers(1, 7))):
            image_path = f"out/{prompt}-{index}.png"  # not the images/<prompt_id>/ layout: prompt ids are passed
            prompt_ids[image_path] = f"prompt{prompt % 12}"  # some prompts hold images of two path groups
            for rows in (rows_a, rows_b):
                face = bool(rng.random() < 0.85)
                race = str(rng.choice(races)) if face and rng.random() < 0.9 else ""
                rows.append((image_path, face, str(rng.choice(genders)) if face else "", race, ""))
    first, second = labels_frame(rows_a, "a"), labels_frame(rows_b, "b").sample(frac=1.0, random_state=0)
    result = classifier_agreement(first, second, prompt_ids=prompt_ids, axes=("gender", "race", FACE_AXIS), num_resamples=500, seed=7)
    for axis in ("gender", "race", FACE_AXIS):
        shares, pooled, kappa, total = slow_agreement(first, second, prompt_ids, axis)
        found = result[axis]
        assert (found.images, found.prompts) == (total, len(shares))
        assert found.agreement == pytest.approx(sum(shares) / len(shares))
        assert found.pooled == pytest.approx(pooled) and found.kappa == pytest.approx(kappa)
        _, low, high = bootstrap_mean_ci(shares, num_resamples=500, seed=7)
        assert (found.low, found.high) == (pytest.approx(max(low, 0.0)), pytest.approx(min(high, 1.0)))
    assert list(result) == ["gender", "race", FACE_AXIS]


def test_prompt_read_from_the_image_folder_layout():
    assert prompt_of_image_path("images/0123456789abcdef/00003.png") == "0123456789abcdef"


def test_bad_input_names_the_file_and_row():
    first = labels_frame(A_ROWS, "a")
    with pytest.raises(InputError, match=r"^labels_b.csv: no row for image 'images/p3/00000.png' \(1 image\(s\) missing\)"):
        classifier_agreement(first, labels_frame(B_ROWS[:-1], "b"))
    with pytest.raises(InputError, match=r"^labels_a.csv: row 4: image 'images/p1/00000.png' appears twice"):
        classifier_agreement(labels_frame([A_ROWS[0], A_ROWS[1], A_ROWS[0]], "a"), labels_frame(B_ROWS, "b"))
    broken = first.copy()
    broken.loc[4, "face_detected"] = "yes"
    with pytest.raises(InputError, match=r"^labels_deepface.csv: row 6: face_detected must be 1 or 0, got 'yes'"):
        classifier_agreement(broken, labels_frame(B_ROWS, "b"), names=("labels_deepface.csv", "labels_age_gender.csv"))
    with pytest.raises(InputError, match=r"^labels_b.csv: missing column\(s\) age"):
        classifier_agreement(first, labels_frame(B_ROWS, "b").drop(columns=["age"]))
    with pytest.raises(InputError, match=r"image 'images/p1/00000.png' has no prompt id"):
        classifier_agreement(first, labels_frame(B_ROWS, "b"), prompt_ids={})
    with pytest.raises(ValueError, match="unknown axis 'height'"):
        classifier_agreement(first, labels_frame(B_ROWS, "b"), axes=("height",))
