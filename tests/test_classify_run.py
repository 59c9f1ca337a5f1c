"""The resumable, sharded labelling runner and the popalign.classify script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from popalign.classify.base import NO_FACE, Classification, Classifier
from popalign.classify.run import LABEL_COLUMNS, classify_image_folder
from popalign.io import InputError

REPO = Path(__file__).resolve().parent.parent
COLOURS = [(200, 10, 10), (10, 200, 10), (210, 20, 0), (0, 0, 0), (150, 150, 150), (20, 30, 40), (250, 0, 5)]


class ColourClassifier(Classifier):
    """Labels from a solid colour (a dark image has no face); remembers every colour it saw."""

    name = "colour"

    def __init__(self, fail_on_call=None):
        self.seen = []
        self.calls = 0
        self.fail_on_call = fail_on_call

    def classify(self, images):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # as if the run were killed mid-way
        results = []
        for image in images:
            red, green, blue = image.getpixel((0, 0))
            self.seen.append((red, green, blue))
            if red + green + blue < 100:
                results.append(NO_FACE)
            else:
                results.append(Classification(True, "male" if red > green else "female", red / 255, "white", 0.5))
        return results


def expected_cells(colour):
    """face_detected, gender, gender_score, race, race_score, age, age_score as the CSV holds them."""
    red, green, blue = colour
    if red + green + blue < 100:
        return ["0", "", "", "", "", "", ""]
    return ["1", "male" if red > green else "female", red / 255, "white", 0.5, "", ""]


def make_folder(root: Path, colours=COLOURS) -> Path:
    """An image folder as generation writes it: images/<prompt_id>/<index>.png and manifest.csv."""
    rows = []
    for index, colour in enumerate(colours):
        image_path = f"images/{index % 3:016x}/{index:05d}.png"
        (root / image_path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), colour).save(root / image_path)
        rows.append({"image_path": image_path, "prompt_id": f"{index % 3:016x}", "kind": "neutral", "prompt": "a photo of a doctor",
                     "gender": "", "race": "", "age": "", "image_index": index, "seed": 1000 + index})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def read_labels(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_labels_file_has_documented_columns_in_manifest_order(tmp_path):
    folder = make_folder(tmp_path)
    summary = classify_image_folder(folder, ColourClassifier(), batch_size=3)
    labels = read_labels(folder / "labels_colour.csv")
    assert list(labels.columns) == LABEL_COLUMNS
    assert list(labels["image_path"]) == list(pd.read_csv(folder / "manifest.csv", dtype=str)["image_path"])
    assert set(labels["classifier"]) == {"colour"}
    for cells, colour in zip(labels[LABEL_COLUMNS[1:-1]].itertuples(index=False), COLOURS):
        for cell, expected in zip(cells, expected_cells(colour)):
            if isinstance(expected, float):
                assert float(cell) == pytest.approx(expected)
            else:
                assert cell == expected
    # the two dark images are kept and counted, not dropped
    assert (summary.images, summary.faces_detected) == (7, 5)
    assert summary.detection_rate == pytest.approx(5 / 7)


def test_interrupted_run_resumes_with_only_the_rest(tmp_path):
    folder = make_folder(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        classify_image_folder(folder, ColourClassifier(fail_on_call=3), batch_size=2)
    assert not (folder / "labels_colour.csv").exists()
    part = folder / ".labels_colour.part0.jsonl"
    assert len(part.read_text().splitlines()) == 4  # two batches of two finished before the kill
    with open(part, "a") as stream:
        stream.write('{"image_path": "images/0000')  # a line cut off by the kill

    resumed = ColourClassifier()
    classify_image_folder(folder, resumed, batch_size=2)
    assert resumed.seen == COLOURS[4:]

    fresh = make_folder(tmp_path / "fresh")
    classify_image_folder(fresh, ColourClassifier(), batch_size=5)
    assert read_labels(folder / "labels_colour.csv").equals(read_labels(fresh / "labels_colour.csv"))

    again = ColourClassifier()
    classify_image_folder(folder, again, batch_size=2)
    assert again.seen == []  # all done: nothing is classified twice


def test_missing_image_names_manifest_and_row(tmp_path):
    folder = make_folder(tmp_path)
    os.unlink(folder / "images" / f"{2:016x}" / "00002.png")
    with pytest.raises(InputError, match=r"manifest\.csv: row 4: image 'images/0000000000000002/00002.png' not found"):
        classify_image_folder(folder, ColourClassifier(), batch_size=2)


def test_settings_change_refuses_to_mix_rows(tmp_path):
    class Strict(ColourClassifier):
        def __init__(self, threshold):
            super().__init__()
            self.threshold = threshold

        @property
        def settings(self):
            return {"threshold": self.threshold}

    folder = make_folder(tmp_path)
    classify_image_folder(folder, Strict(0.5), batch_size=4)
    with pytest.raises(InputError, match="threshold"):
        classify_image_folder(folder, Strict(0.9), batch_size=4)


def test_script_reports_bad_input_and_exits_2(tmp_path, capsys):
    from popalign.classify import __main__ as classify_entry_point

    code = classify_entry_point.main(["--out_dir", str(tmp_path), "--classifier", "clip", "--clip_model", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'manifest.csv'}: file not found"


@pytest.mark.slow
def test_two_processes_give_the_same_labels_as_one_and_resume_with_one(tmp_path, tiny_clip_path):
    from popalign.classify.clip_backend import ClipZeroShotClassifier

    many_colours = [((37 * index) % 256, (91 * index) % 256, (53 * index) % 256) for index in range(9)]
    two = make_folder(tmp_path / "two", many_colours)
    one = make_folder(tmp_path / "one", many_colours)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "popalign.classify",
               "--out_dir", str(two), "--classifier", "clip", "--clip_model", str(tiny_clip_path), "--batch_size", "2",
               "--face_threshold", "0"]  # every image gets labels to compare
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    # both processes did part of the work
    part_rows = {rank: (two / f".labels_clip.part{rank}.jsonl").read_text().splitlines() for rank in (0, 1)}
    assert sorted(len(rows) for rows in part_rows.values()) == [4, 5]

    classifier = ClipZeroShotClassifier(str(tiny_clip_path), face_threshold=0.0, device="cpu")
    classify_image_folder(one, classifier, batch_size=2)
    from_two, from_one = read_labels(two / "labels_clip.csv"), read_labels(one / "labels_clip.csv")
    label_columns = ["image_path", "face_detected", "gender", "race", "age", "classifier"]
    assert from_two[label_columns].equals(from_one[label_columns])
    for column in ("gender_score", "race_score", "age_score"):
        scores_two = pd.to_numeric(from_two[column], errors="coerce")
        scores_one = pd.to_numeric(from_one[column], errors="coerce")
        assert ((scores_two - scores_one).abs().fillna(0) < 1e-5).all()
        assert scores_two.isna().equals(scores_one.isna())

    # lose the rank-1 rows and resume with one process: only those images are classified again
    (two / ".labels_clip.part1.jsonl").write_text("")
    os.unlink(two / "labels_clip.csv")
    lost = {json.loads(row)["image_path"] for row in part_rows[1]}
    seen = []
    original_classify = classifier.classify

    def counting_classify(images):
        seen.extend(images)
        return original_classify(images)

    classifier.classify = counting_classify
    classify_image_folder(two, classifier, batch_size=4)
    assert len(seen) == len(lost)
    resumed = read_labels(two / "labels_clip.csv")
    assert resumed[label_columns].equals(from_one[label_columns])


def test_a_complete_folder_is_not_classified_again_nor_its_model_loaded(tmp_path, monkeypatch):
    import popalign.classify.run as classify_run

    folder = make_folder(tmp_path)
    first = classify_run.run_classification(folder, "toy", {}, batch_size=4)
    written = (folder / "labels_toy.csv").read_bytes()

    def no_loading(*args, **kwargs):
        raise AssertionError("the classifier was built for a folder whose labels are complete")

    monkeypatch.setattr(classify_run, "build_classifier", no_loading)
    again = classify_run.run_classification(folder, "toy", {}, batch_size=4)
    assert again == first and (folder / "labels_toy.csv").read_bytes() == written
    # other options, or an image more in the manifest: the model is needed again
    assert classify_run.complete_labels(folder, "toy", {"other": 1}, list(pd.read_csv(folder / "manifest.csv")["image_path"])) is None
    assert classify_run.complete_labels(folder, "toy", {}, [*pd.read_csv(folder / "manifest.csv")["image_path"], "images/x.png"]) is None
