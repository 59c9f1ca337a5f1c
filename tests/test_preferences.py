"""Step 3 on hand-built manifests and label files (the pairing reads only paths, never pixels)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from popalign.attributes import load_attributes
from popalign.io import InputError
from popalign.preferences import PAIR_COLUMNS, count_distinct, generate_preferences, summary_path_for

REPO_ROOT = Path(__file__).resolve().parent.parent
ATTRIBUTES = load_attributes()
MANIFEST_HEADER = ["image_path", "prompt_id", "kind", "prompt", "neutral_prompt", "occupation", "activity", "gender",
                   "race", "age", "image_index", "seed", "model", "scheduler", "steps", "guidance", "width", "height",
                   "negative_prompt", "precision"]
LABELS_HEADER = ["image_path", "face_detected", "gender", "gender_score", "race", "race_score", "age", "age_score",
                 "classifier"]


def image(neutral, kind, classified=("male", "white"), prompted=("", ""), face=True):
    """One image record: the prompt is built from the neutral prompt, the labels given explicitly."""
    prompted_gender, prompted_race = prompted
    prompt = neutral if kind == "neutral" else f"{neutral} ({prompted_race} {prompted_gender})"
    gender, race = classified if face else ("", "")
    return {"neutral": neutral, "kind": kind, "prompt": prompt, "prompted_gender": prompted_gender,
            "prompted_race": prompted_race, "face": face, "gender": gender, "race": race}


def write_image_dir(folder: Path, images: list[dict], classifier="deepface") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as manifest, \
            open(folder / f"labels_{classifier}.csv", "w", newline="", encoding="utf-8") as labels:
        manifest_writer, labels_writer = csv.writer(manifest), csv.writer(labels)
        manifest_writer.writerow(MANIFEST_HEADER)
        labels_writer.writerow(LABELS_HEADER)
        for index, record in enumerate(images):
            path = f"images/{index:05d}.png"
            manifest_writer.writerow([path, "0" * 16, record["kind"], record["prompt"], record["neutral"], "doctor", "",
                                      record["prompted_gender"], record["prompted_race"], "", index, 1, "m", "s", 2, 5.0,
                                      64, 64, "", "fp32"])
            labels_writer.writerow([path, int(record["face"]), record["gender"], 0.9 if record["face"] else "",
                                    record["race"], 0.8 if record["face"] else "", "", "", classifier])
    return folder


DOCTOR, NURSE, PILOT = "a photo of a doctor", "a photo of a nurse", "a photo of a pilot"


def standard_images() -> list[dict]:
    images = []
    # doctor: homogeneous identity images against a varied base -> the base usually wins (swap)
    images += [image(DOCTOR, "identity", ("male", "white"), ("male", "white")) for _ in range(2)]
    images += [image(DOCTOR, "neutral", classified) for classified in
               [("male", "white"), ("female", "asian"), ("male", "black"), ("female", "indian")]]
    # nurse: varied identity images against a homogeneous base -> the diverse side wins
    images += [image(NURSE, "identity", classified, classified) for classified in
               [("male", "asian"), ("female", "black"), ("female", "white"), ("male", "indian")]]
    images += [image(NURSE, "neutral", ("female", "white")) for _ in range(3)]
    # pilot: fewer races on the diverse side but never strictly fewer genders -> never swapped
    images += [image(PILOT, "identity", classified, classified) for classified in [("male", "white"), ("female", "white")]]
    images += [image(PILOT, "neutral", classified) for classified in [("male", "white"), ("male", "asian"), ("male", "black")]]
    # no-face images on both sides of the doctor prompt
    images += [image(DOCTOR, "identity", prompted=("female", "black"), face=False),
               image(DOCTOR, "neutral", face=False), image(DOCTOR, "neutral", face=False)]
    return images


@pytest.fixture
def image_dir(tmp_path):
    return write_image_dir(tmp_path / "images" / "train", standard_images())


def run(image_dirs, output, **options):
    return generate_preferences([str(d) for d in image_dirs], "deepface", output, ATTRIBUTES, **options)


def read_pairs(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def records_by_path(image_dirs) -> dict:
    """Absolute image path -> (manifest row, labels row), read straight from the files."""
    lookup = {}
    for folder in image_dirs:
        manifest = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
        labels = pd.read_csv(folder / "labels_deepface.csv", dtype=str, keep_default_na=False).set_index("image_path")
        for row in manifest.to_dict("records"):
            lookup[os.path.realpath(folder / row["image_path"])] = (row, labels.loc[row["image_path"]])
    return lookup


def test_count_distinct_ignores_empty_labels():
    assert count_distinct(["male", "male", "", "female"]) == 2
    assert count_distinct(["", ""]) == 0


def test_same_seed_gives_an_identical_file_and_another_seed_does_not(image_dir, tmp_path):
    run([image_dir], tmp_path / "a" / "pairs.csv", num_iterations=50, seed=3)
    run([image_dir], tmp_path / "b" / "pairs.csv", num_iterations=50, seed=3)
    run([image_dir], tmp_path / "c" / "pairs.csv", num_iterations=50, seed=4)
    first = (tmp_path / "a" / "pairs.csv").read_bytes()
    assert first == (tmp_path / "b" / "pairs.csv").read_bytes()
    assert first != (tmp_path / "c" / "pairs.csv").read_bytes()


def test_pairs_follow_the_swap_rule_and_record_the_deciding_statistics(image_dir, tmp_path):
    output = tmp_path / "prefs" / "pairs.csv"
    run([image_dir], output, num_iterations=300, population_size=5, seed=0)
    pairs = read_pairs(output)
    assert list(pairs.columns) == PAIR_COLUMNS
    assert len(pairs) == 300 * 5
    lookup = records_by_path([image_dir])
    sides_seen = {DOCTOR: set(), NURSE: set(), PILOT: set()}
    for iteration, group in pairs.groupby("iteration"):
        assert len(group) == 5
        (winner_side,) = set(group["winner_side"])
        winners = [lookup[os.path.realpath(output.parent / path)] for path in group["winner_path"]]
        losers = [lookup[os.path.realpath(output.parent / path)] for path in group["loser_path"]]
        diverse, base = (winners, losers) if winner_side == "diverse" else (losers, winners)
        assert {manifest["kind"] for manifest, _ in diverse} == {"identity"}
        assert {manifest["kind"] for manifest, _ in base} == {"neutral"}
        diverse_genders = len({labels["gender"] for _, labels in diverse})
        diverse_races = len({labels["race"] for _, labels in diverse})
        base_genders = len({labels["gender"] for _, labels in base})
        base_races = len({labels["race"] for _, labels in base})
        row = group.iloc[0]
        assert [int(row[name]) for name in ["diverse_distinct_genders", "diverse_distinct_races",
                                            "base_distinct_genders", "base_distinct_races"]] == \
            [diverse_genders, diverse_races, base_genders, base_races]
        swapped = diverse_races < base_races and diverse_genders < base_genders
        assert winner_side == ("base" if swapped else "diverse")
        sides_seen[row["neutral_prompt"]].add(winner_side)
    assert sides_seen[DOCTOR] == {"base", "diverse"}  # "diverse" when a base draw happens to be homogeneous
    assert sides_seen[NURSE] == {"diverse"}
    assert sides_seen[PILOT] == {"diverse"}


def test_caption_is_always_the_neutral_prompt_of_both_images(image_dir, tmp_path):
    output = tmp_path / "pairs.csv"
    run([image_dir], output, num_iterations=200, seed=1)
    pairs = read_pairs(output)
    lookup = records_by_path([image_dir])
    assert (pairs["caption"] == pairs["neutral_prompt"]).all()
    assert set(pairs["caption"]) == {DOCTOR, NURSE, PILOT}
    for row in pairs.to_dict("records"):
        winner, _ = lookup[os.path.realpath(output.parent / row["winner_path"])]
        loser, _ = lookup[os.path.realpath(output.parent / row["loser_path"])]
        assert winner["neutral_prompt"] == loser["neutral_prompt"] == row["caption"]
        assert (winner["prompt"], loser["prompt"]) == (row["winner_prompt"], row["loser_prompt"])


@pytest.mark.parametrize("where", ["elsewhere/deeper", "images/train", "images/train/images"])
def test_paths_are_relative_to_the_pairs_file_folder(image_dir, tmp_path, where):
    output = tmp_path / where / "pairs.csv"
    run([image_dir], output, num_iterations=20)
    pairs = read_pairs(output)
    manifest_paths = {os.path.realpath(image_dir / path) for path in
                      pd.read_csv(image_dir / "manifest.csv", dtype=str)["image_path"]}
    for path in pd.concat([pairs["winner_path"], pairs["loser_path"]]):
        assert not os.path.isabs(path)
        assert os.path.realpath(output.parent / path) in manifest_paths


def test_no_face_images_are_excluded_by_default_and_kept_on_request(image_dir, tmp_path):
    no_face_paths = {path for path, (_, labels) in records_by_path([image_dir]).items() if labels["face_detected"] == "0"}
    assert len(no_face_paths) == 3

    def used_paths(output):
        pairs = read_pairs(output)
        return {os.path.realpath(output.parent / path) for path in pd.concat([pairs["winner_path"], pairs["loser_path"]])}

    summary = run([image_dir], tmp_path / "default" / "pairs.csv", num_iterations=400, seed=2)
    assert summary["images_excluded_no_face"] == {"diverse": 1, "base": 2}
    assert not used_paths(tmp_path / "default" / "pairs.csv") & no_face_paths
    assert summary["population_sizes"][DOCTOR] == {"diverse": 2, "base": 4}

    summary = run([image_dir], tmp_path / "kept" / "pairs.csv", num_iterations=400, seed=2, keep_no_face=True)
    assert summary["images_excluded_no_face"] == {"diverse": 0, "base": 0}
    assert no_face_paths <= used_paths(tmp_path / "kept" / "pairs.csv")
    assert summary["population_sizes"][DOCTOR] == {"diverse": 3, "base": 6}
    written = json.loads(summary_path_for(tmp_path / "kept" / "pairs.csv").read_text())
    assert written["keep_no_face"] is True and written["seed"] == 2 and written["num_pairs"] == 2000


def test_a_neutral_prompt_with_an_empty_side_is_reported_not_a_crash(tmp_path):
    images = standard_images()
    images += [image("a photo of a chef", "neutral") for _ in range(3)]  # no identity images at all
    images += [image("a photo of a firefighter", "identity", prompted=("male", "white"), face=False),  # no face found
               image("a photo of a firefighter", "neutral")]
    images += [image("a photo of a judge", "identity", prompted=("male", "white")),
               image("a photo of a judge", "identity", prompted=("female", "asian"), face=False),
               image("a photo of a judge", "neutral")]
    folder = write_image_dir(tmp_path / "images", images)
    summary = run([folder], tmp_path / "pairs.csv", num_iterations=100)
    skipped = {entry["neutral_prompt"]: entry for entry in summary["skipped_neutral_prompts"]}
    assert skipped == {
        "a photo of a chef": {"neutral_prompt": "a photo of a chef", "diverse_images": 0, "base_images": 3},
        "a photo of a firefighter": {"neutral_prompt": "a photo of a firefighter", "diverse_images": 0, "base_images": 1},
    }
    assert summary["neutral_prompts_used"] == 4  # doctor, nurse, pilot and the judge
    captions = set(read_pairs(tmp_path / "pairs.csv")["caption"])
    assert "a photo of a judge" in captions and "a photo of a firefighter" not in captions
    assert "a photo of a chef" not in set(read_pairs(tmp_path / "pairs.csv")["caption"])


def test_every_neutral_prompt_empty_on_one_side_is_an_error(tmp_path):
    folder = write_image_dir(tmp_path / "images", [image(DOCTOR, "neutral"), image(NURSE, "identity", prompted=("male", "white"))])
    with pytest.raises(InputError, match="no neutral prompt has images"):
        run([folder], tmp_path / "pairs.csv", num_iterations=10)


def test_require_attribute_match_drops_misdrawn_identity_images(tmp_path):
    images = [image(DOCTOR, "identity", ("male", "white"), ("male", "white")),
              image(DOCTOR, "identity", ("male", "white"), ("female", "white")),  # wrong gender
              image(DOCTOR, "identity", ("female", "indian"), ("female", "black")),  # wrong race
              image(DOCTOR, "neutral", ("male", "white"))]
    folder = write_image_dir(tmp_path / "images", images)
    summary = run([folder], tmp_path / "all" / "pairs.csv", num_iterations=50)
    assert summary["images_excluded_attribute_mismatch"] == 0
    assert len(set(read_pairs(tmp_path / "all" / "pairs.csv")["winner_prompt"])) == 3
    summary = run([folder], tmp_path / "matched" / "pairs.csv", num_iterations=50, require_attribute_match=True)
    assert summary["images_excluded_attribute_mismatch"] == 2
    assert set(read_pairs(tmp_path / "matched" / "pairs.csv")["winner_prompt"]) == {images[0]["prompt"]}


def _unequal_identity_images() -> list[dict]:
    """A nurse whose identity-specific prompts kept 9 images (Asian man) and 1 image (Black woman), as when
    filtering dropped more pictures of one identity; a homogeneous base, so the diverse side always wins."""
    return ([image(NURSE, "identity", ("male", "asian"), ("male", "asian")) for _ in range(9)]
            + [image(NURSE, "identity", ("female", "black"), ("female", "black"))]
            + [image(NURSE, "neutral", ("female", "white")) for _ in range(3)])


@pytest.mark.parametrize("diverse_draw, black_woman_share", [("per_identity_prompt", 0.5), ("per_image", 0.1)])
def test_diverse_draw_weights_identity_prompts_equally_or_images_equally(tmp_path, diverse_draw, black_woman_share):
    folder = write_image_dir(tmp_path / "images", _unequal_identity_images())
    summary = run([folder], tmp_path / "pairs.csv", num_iterations=2000, diverse_draw=diverse_draw)
    assert summary["diverse_draw"] == diverse_draw and summary["iterations_won_by_base"] == 0
    winners = read_pairs(tmp_path / "pairs.csv")
    # 10000 winners: the share's standard error is at most 0.005
    assert abs(winners["winner_prompt"].str.contains("black").mean() - black_woman_share) < 0.03
    shares = summary["winner_label_shares"][NURSE]
    assert shares["race"]["black"] == pytest.approx(winners["winner_prompt"].str.contains("black").mean(), abs=1e-4)
    assert shares["gender"]["female"] == shares["race"]["black"] and set(shares["race"]) == {"asian", "black"}
    asian_man_images = winners.loc[winners["winner_prompt"].str.contains("asian"), "winner_path"].value_counts()
    assert len(asian_man_images) == 9  # within a prompt, every image is drawn
    assert asian_man_images.max() / asian_man_images.min() < 1.5


def test_diverse_draw_must_be_known(tmp_path):
    folder = write_image_dir(tmp_path / "images", _unequal_identity_images())
    with pytest.raises(InputError, match="--diverse_draw 'per_race'"):
        run([folder], tmp_path / "pairs.csv", diverse_draw="per_race")
    assert not (tmp_path / "pairs.csv").exists()


def test_populations_can_come_from_several_folders(tmp_path):
    images = standard_images()
    diverse = write_image_dir(tmp_path / "diverse", [r for r in images if r["kind"] == "identity"])
    base = write_image_dir(tmp_path / "base", [r for r in images if r["kind"] == "neutral"])
    summary = run([diverse, base], tmp_path / "pairs.csv", num_iterations=30)
    assert summary["neutral_prompts_used"] == 3 and not summary["skipped_neutral_prompts"]


def _rewrite(path: Path, row: int, column: str, value: str) -> None:
    """Set one cell; `row` is the file's line number (the header is line 1)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[row - 2, column] = value
    frame.to_csv(path, index=False)


@pytest.mark.parametrize("file_name,row,column,value,message", [
    ("labels_deepface.csv", 3, "gender", "Man", r"labels_deepface.csv: row 3: gender 'Man' is not a gender label"),
    ("labels_deepface.csv", 4, "race", "hispanic", r"labels_deepface.csv: row 4: race 'hispanic'"),
    ("labels_deepface.csv", 5, "face_detected", "yes", r"labels_deepface.csv: row 5: face_detected 'yes'"),
    ("labels_deepface.csv", 2, "race", "", r"labels_deepface.csv: row 2: a face was detected but race is empty"),
    ("manifest.csv", 6, "kind", "diverse", r"manifest.csv: row 6: kind 'diverse'"),
    ("manifest.csv", 2, "gender", "man", r"manifest.csv: row 2: gender 'man'"),
    ("manifest.csv", 4, "neutral_prompt", "", r"manifest.csv: row 4: empty neutral_prompt"),
])
def test_bad_cells_name_the_file_and_row(image_dir, tmp_path, file_name, row, column, value, message):
    _rewrite(image_dir / file_name, row, column, value)
    with pytest.raises(InputError, match=message):
        run([image_dir], tmp_path / "pairs.csv", num_iterations=5)
    assert not (tmp_path / "pairs.csv").exists()


def test_missing_files_columns_and_labels_are_input_errors(image_dir, tmp_path):
    with pytest.raises(InputError, match="not found"):
        run([tmp_path / "nowhere"], tmp_path / "pairs.csv")
    with pytest.raises(InputError, match=r"labels_clip.csv: file not found"):
        generate_preferences([str(image_dir)], "clip", tmp_path / "pairs.csv", ATTRIBUTES)
    labels = pd.read_csv(image_dir / "labels_deepface.csv", dtype=str, keep_default_na=False)
    labels.drop(index=4).to_csv(image_dir / "labels_deepface.csv", index=False)
    with pytest.raises(InputError, match=r"labels_deepface.csv: no row for image_path .*manifest.csv row 6\)"):
        run([image_dir], tmp_path / "pairs.csv")
    labels.drop(columns=["face_detected"]).to_csv(image_dir / "labels_deepface.csv", index=False)
    with pytest.raises(InputError, match=r"labels_deepface.csv: missing column\(s\) face_detected"):
        run([image_dir], tmp_path / "pairs.csv")


def test_bad_numbers_are_input_errors(image_dir, tmp_path):
    with pytest.raises(InputError, match="--population_size"):
        run([image_dir], tmp_path / "pairs.csv", population_size=0)
    with pytest.raises(InputError, match="--num_iterations"):
        run([image_dir], tmp_path / "pairs.csv", num_iterations=0)


def test_script_writes_pairs_and_reports_bad_input(image_dir, tmp_path):
    output = tmp_path / "preferences" / "pairs.csv"
    command = [sys.executable, str(REPO_ROOT / "3_generate_preferences.py"), "--image_dirs", str(image_dir),
               "--classifier", "deepface", "--output", str(output), "--num_iterations", "40", "--seed", "0"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert "200 pairs" in result.stdout and "excluded without a face: 1 diverse, 2 base" in result.stdout
    assert len(read_pairs(output)) == 200
    assert json.loads((output.parent / "pairs.summary.json").read_text())["num_iterations"] == 40
    _rewrite(image_dir / "labels_deepface.csv", 3, "gender", "Woman")
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "labels_deepface.csv: row 3" in result.stderr


def test_labels_left_on_a_no_face_image_add_no_class(tmp_path):
    images = [image(DOCTOR, "identity", ("male", "white"), ("male", "white")),
              image(DOCTOR, "identity", prompted=("female", "asian"), face=False),
              image(DOCTOR, "neutral", ("male", "white"))]
    images[1].update(gender="female", race="asian")  # a classifier that leaves labels behind without a face
    folder = write_image_dir(tmp_path / "images", images)
    run([folder], tmp_path / "pairs.csv", num_iterations=50, keep_no_face=True)
    pairs = read_pairs(tmp_path / "pairs.csv")
    assert images[1]["prompt"] in set(pairs["winner_prompt"])
    # a draw of only the no-face image counts 0 classes, any other draw 1: never the leftover labels' 2
    assert set(pairs["diverse_distinct_genders"]) == {"0", "1"} and set(pairs["diverse_distinct_races"]) == {"0", "1"}


def test_generic_prompt_images_are_ignored_and_counted(tmp_path):
    images = standard_images()
    generic = image("", "neutral", face=False)
    generic.update(kind="generic", prompt="a photo of a lighthouse at dusk")
    folder = write_image_dir(tmp_path / "images", images + [generic, dict(generic)])
    summary = run([folder], tmp_path / "pairs.csv", num_iterations=100)
    assert summary["images_ignored_generic"] == 2
    assert summary["images_total"] == len(images) + 2
    assert summary["images_excluded_no_face"] == {"diverse": 1, "base": 2}
    assert not summary["skipped_neutral_prompts"]
    assert generic["prompt"] not in set(read_pairs(tmp_path / "pairs.csv")["loser_prompt"])


def test_paths_resolve_like_the_trainer_when_the_output_folder_is_a_symlink(image_dir, tmp_path):
    real_folder = tmp_path / "real" / "a" / "b"
    real_folder.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real_folder)
    output = tmp_path / "link" / "pairs.csv"
    run([image_dir], output, num_iterations=10)
    pairs = read_pairs(output)
    manifest_paths = {os.path.realpath(image_dir / path) for path in
                      pd.read_csv(image_dir / "manifest.csv", dtype=str)["image_path"]}
    # the trainer joins each path to the pairs file's resolved folder
    for path in pairs["winner_path"]:
        assert os.path.normpath(output.resolve().parent / path) in manifest_paths
