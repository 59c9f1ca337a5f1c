"""Rounds of identity-specific images (popalign.evaluate.precision): the Wilson interval, the stopping rule, the plan over
several models' folders, and generation of the planned counts."""

import numpy as np
import pandas as pd
import pytest

from popalign.io import InputError
from popalign.evaluate.precision import identity_accuracy_counts, next_image_count, read_image_counts, wilson_interval


def slow_wilson(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The score interval by its definition, on a fine grid: every p with |p_hat - p| <= z sqrt(p (1 - p) / n)."""
    grid = np.linspace(0, 1, 2_000_001)
    inside = grid[np.abs(successes / trials - grid) <= z * np.sqrt(grid * (1 - grid) / trials)]
    return float(inside.min()), float(inside.max())


def test_wilson_interval_hand_values():
    low, high = wilson_interval(10, 10)
    assert low == pytest.approx(0.72246, abs=1e-5) and high == 1.0  # width z^2 / (n + z^2) at p = 1
    assert high - low == pytest.approx(1.959964 ** 2 / (10 + 1.959964 ** 2), abs=1e-6)
    assert wilson_interval(10, 20) == pytest.approx((0.29930, 0.70070), abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("successes, trials", [(0, 5), (3, 7), (19, 20), (40, 40), (1, 100)])
def test_wilson_interval_equals_the_score_test_inversion(successes, trials):
    assert wilson_interval(successes, trials) == pytest.approx(slow_wilson(successes, trials), abs=2e-6)


def test_the_rule_doubles_until_narrow_enough_or_at_the_cap():
    # 10 of 10 right: width 0.278 > 0.1 -> 20; 40 of 40: width 0.088 <= 0.1 -> stop
    assert next_image_count(10, 10, 10, 0.1, 100) == 20
    assert next_image_count(40, 40, 40, 0.1, 100) == 40
    assert next_image_count(80, 40, 80, 0.1, 100) == 100  # p = 0.5 stays wide: up to the cap
    assert next_image_count(100, 50, 100, 0.1, 100) == 100
    assert next_image_count(10, 0, 0, 0.1, 100) == 20  # no face yet: more images


def test_identity_accuracy_counts_read_both_prompted_attributes(tmp_path):
    from popalign.attributes import load_attributes

    attributes = load_attributes()
    rows = []
    for index, (face, gender, race) in enumerate([(True, "male", "white"), (True, "female", "white"), (False, "", ""), (True, "male", "white")]):
        rows.append({"prompt_id": "a" * 16, "kind": "identity", "face_detected": face, "gender": "male", "race": "white", "age": "",
                     "predicted_gender": gender, "predicted_race": race, "predicted_age": ""})
    rows.append({"prompt_id": "b" * 16, "kind": "neutral", "face_detected": True, "gender": "", "race": "", "age": "",
                 "predicted_gender": "male", "predicted_race": "white", "predicted_age": ""})
    counts = identity_accuracy_counts(pd.DataFrame(rows), attributes)
    assert counts.to_dict("records") == [{"prompt_id": "a" * 16, "drawn": 4, "faces": 3, "right": 2}]


def test_counts_files_are_checked(tmp_path):
    path = tmp_path / "counts.csv"
    path.write_text("prompt_id,images\nabc,20\nabd,x\n")
    with pytest.raises(InputError, match=r"counts.csv: row 3: images must be a whole number"):
        read_image_counts(path)
    path.write_text("prompt_id,images\nabc,20\nabc,40\n")
    with pytest.raises(InputError, match=r"row 3: prompt_id abc listed twice"):
        read_image_counts(path)
    path.write_text("prompt_id,images\nabc,20\n")
    assert read_image_counts(path) == {"abc": 20}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from bad_input_world import build_world_apart

    return build_world_apart(tmp_path_factory.mktemp("precision") / "world")


@pytest.mark.slow
def test_a_planned_round_draws_the_images_a_fixed_count_would(small_run, tmp_path, monkeypatch, capsys):
    """The plan over two models' folders, then generation of the planned counts: the new images are those a run
    with that fixed count draws (same seeds), and the folder's manifest lists them."""
    import shutil

    from PIL import Image

    from bad_input_world import TOY_ENVIRONMENT, reset_accelerate, stage_arguments
    import popalign.evaluate.precision as precision
    import popalign.generate.__main__ as generate

    world = tmp_path / "world"
    shutil.copytree(small_run, world)
    monkeypatch.chdir(world)
    for name, value in TOY_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    # one image per identity-specific prompt: no interval is 0.5 wide yet, every prompt doubles to 2
    assert precision.main(["--output_dir", "images/train", "--output_dir", "images/tuned", "--classifier", "toy",
                           "--attributes", "attributes.json", "--target_interval_width", "0.5", "--max_images_per_prompt", "2",
                           "--counts_csv", "counts.csv"]) == 0
    assert capsys.readouterr().out.strip() == "12"
    counts = read_image_counts("counts.csv")
    assert len(counts) == 12 and set(counts.values()) == {2}
    arguments = stage_arguments()["generate"]
    reset_accelerate()
    assert generate.main([*arguments, "--images_per_prompt_csv", "counts.csv"]) == 0
    reset_accelerate()
    fixed = [*arguments, "--images_per_identity_prompt", "2", "--output_dir", "images/fixed"]
    assert generate.main(fixed) == 0
    manifest = pd.read_csv("images/train/manifest.csv")
    assert manifest.equals(pd.read_csv("images/fixed/manifest.csv"))
    assert (manifest[manifest["kind"] == "identity"].groupby("prompt_id").size() == 2).all()
    for image_path in manifest["image_path"]:
        first = np.asarray(Image.open(f"images/train/{image_path}"), dtype=int)
        second = np.asarray(Image.open(f"images/fixed/{image_path}"), dtype=int)
        assert np.abs(first - second).max() <= 1, image_path
    # counts of prompts that are not in the prompts file are refused
    pd.DataFrame({"prompt_id": ["f" * 16], "images": [3]}).to_csv("bad_counts.csv", index=False)
    reset_accelerate()
    assert generate.main([*arguments, "--images_per_prompt_csv", "bad_counts.csv"]) == 2
    assert "--images_per_prompt_csv: prompt_id ffffffffffffffff is not a prompt" in capsys.readouterr().err
