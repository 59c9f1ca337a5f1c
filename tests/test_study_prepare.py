"""`python -m popalign.study prepare`: the study folder, its blindness, the raters' plans, and bad input."""

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from popalign.study import read_key, read_study
from popalign.study.__main__ import main
from popalign.study.plan import MIN_REPEAT_GAP, build_plan
from popalign.study.prepare import StudySettings, broken_image, parse_model_folders, prepare_study
from test_study_world import REPO_ROOT, make_image_folders


@pytest.fixture
def folders(tmp_path):
    return make_image_folders(tmp_path / "images")


def test_prepare_writes_a_blind_study(tmp_path, folders):
    out = tmp_path / "study"
    assert main(["prepare", "--image_dirs", *map(str, folders.values()), "--output_dir", str(out),
                 "--image_tasks", "5", "--population_tasks", "2", "--grid_size", "4", "--gold_tasks", "4"]) == 0
    study, tasks = read_study(out)
    key = read_key(out)
    kinds = Counter(task["kind"] for task in tasks)
    assert kinds == {"image": 10, "population": 2, "gold": 4}  # 5 pictures x 2 questions, 2 grids, 4 gold pairs
    assert set(study["questions"]) == {"better", "prompt", "varied"}
    assert study["family"]["tests"] == 3 and "Holm" in study["family"]["text"]
    assert "failed more than 1 attention check" in study["exclusion_rule"]
    assert key["models"] == ["base", "popalign"]
    # The same prompt and seed on both sides of an image task; each side one model.
    for task in tasks:
        assert {key["tasks"][task["id"]]["a"], key["tasks"][task["id"]]["b"]} <= {"base", "popalign", "(broken)"}
        if task["kind"] == "image":
            a, b = key["images"][task["a"]], key["images"][task["b"]]
            assert (a["prompt_id"], a["image_index"], a["seed"]) == (b["prompt_id"], b["image_index"], b["seed"])
            assert {a["model"], b["model"]} == {"base", "popalign"}
    # Nothing a server reads, nor any image, names a model: the source PNGs carried the name in a text chunk.
    public = (out / "study.json").read_text() + (out / "tasks.json").read_text()
    for image in (out / "images").iterdir():
        data = image.read_bytes()
        for model in ("base", "popalign"):
            assert model.encode() not in data and model not in image.name
    for model in ("base", "popalign"):
        assert model not in public
    # Population grids: 4 images of 32 px enlarged to 96 px tiles, 2 x 2 with a small gap.
    grid_task = next(task for task in tasks if task["kind"] == "population")
    assert Image.open(out / "images" / f"{grid_task['a']}.png").size == (2 * 96 + 3, 2 * 96 + 3)


def test_gold_pair_is_visibly_broken(tmp_path, folders):
    prepare_study(folders, tmp_path / "study", StudySettings(image_tasks=2, population_tasks=0, gold_tasks=2, gold_checks=1))
    _, tasks = read_study(tmp_path / "study")
    for task in (task for task in tasks if task["kind"] == "gold"):
        intact = np.asarray(Image.open(tmp_path / "study" / "images" / f"{task['a']}.png"), dtype=float)
        broken = np.asarray(Image.open(tmp_path / "study" / "images" / f"{task['b']}.png"), dtype=float)
        assert intact.shape == broken.shape and np.abs(intact - broken).mean() > 40
    picture = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3)))
    assert np.abs(np.asarray(broken_image(picture, 0), dtype=float) - np.asarray(picture, dtype=float)).mean() > 40


def test_plans_are_fixed_balanced_and_checked():
    pool = [f"t{index}" for index in range(25)]
    gold = ["g1", "g2", "g3", "g4"]
    plans = [build_plan(pool, gold, index, 10, 3, 2, 7, f"rater{index}") for index in range(5)]
    assert plans[0] == build_plan(pool, gold, 0, 10, 3, 2, 7, "rater0")  # rebuilt the same
    for plan in plans:
        assert len(plan) == 15
        assert Counter(entry["check"] for entry in plan) == {"": 10, "gold": 3, "repeat": 2}
        for position, entry in enumerate(plan):
            if entry["check"] == "repeat":
                first = next(i for i, other in enumerate(plan) if other["task"] == entry["task"] and other["check"] == "")
                assert position - first > MIN_REPEAT_GAP and plan[first]["left"] != entry["left"]
    # Rater k's block starts where rater k-1's ended: 5 raters x 10 tasks cover the pool of 25 twice.
    counts = Counter(entry["task"] for plan in plans for entry in plan if entry["check"] == "")
    assert set(counts) == set(pool) and set(counts.values()) == {2}
    # Sides are random per rater: both options appear on the left.
    assert {entry["left"] for plan in plans for entry in plan} == {"a", "b"}


class _Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


@pytest.fixture
def run(capsys):
    """The command line in this process (argparse's own errors included): exit code and stderr."""
    def run(*args):
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        return _Result(code, capsys.readouterr().err)
    return run


def test_the_command_line_runs_as_a_module_without_torch(tmp_path, folders):
    """`python -m popalign.study` in its own process: it works, and neither it nor the server and analysis modules
    (which popalign.evaluate's report imports) load torch."""
    code = ("import sys, runpy; sys.argv = ['x', 'prepare', '--image_dirs', *sys.argv[1:3], '--output_dir', sys.argv[3]]\n"
            "import popalign.study.server, popalign.study.analyze, popalign.study.report\n"
            "try:\n    runpy.run_module('popalign.study', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code, *map(str, folders.values()), str(tmp_path / "study")],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "tasks (2 models)" in result.stdout and (tmp_path / "study" / "tasks.json").is_file()


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, folders, run):
    out = tmp_path / "study"
    # A seed that differs between the models: the file and row are named.
    manifest = pd.read_csv(folders["popalign"] / "manifest.csv", dtype=str, keep_default_na=False)
    manifest.loc[3, "seed"] = "999"
    manifest.to_csv(folders["popalign"] / "manifest.csv", index=False)
    result = run("prepare", "--image_dirs", *map(str, folders.values()), "--output_dir", str(out))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "manifest.csv: row 5:" in result.stderr and "seed" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".study.*"))
    manifest.loc[3, "seed"] = str(10_000 * 0 + 3)
    manifest.to_csv(folders["popalign"] / "manifest.csv", index=False)
    cases = [
        (["--image_dirs", str(folders["base"])], "at least two"),
        (["--image_dirs", *map(str, folders.values()), "--grid_size", "50"], "--grid_size 50"),
        (["--image_dirs", *map(str, folders.values()), "--gold_checks", "9"], "--gold_checks"),
        (["--image_dirs", *map(str, folders.values()), "--tasks_per_rater", "0"], "--tasks_per_rater"),
        (["--image_dirs", f"x/y={folders['base']}", str(folders["popalign"])], "model name"),
        (["--image_dirs", str(folders["base"]), str(tmp_path / "missing")], "missing"),
        (["--image_dirs", *map(str, folders.values()), "--image_tasks", "two"], "--image_tasks"),
        (["--image_dirs", *map(str, folders.values()), "--seed", "-1"], "--seed"),
        (["--image_dirs", *map(str, folders.values()), "--seed", "4294967296"], "out of range"),
    ]
    for flags, expected in cases:
        result = run("prepare", *flags, "--output_dir", str(out))
        assert result.returncode == 2, (flags, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and expected in result.stderr, flags
        assert not out.exists()
    # A study is never overwritten: a second prepare into it fails and leaves it as it was.
    assert run("prepare", "--image_dirs", *map(str, folders.values()), "--output_dir", str(out)).returncode == 0
    before = {path.name: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    result = run("prepare", "--image_dirs", *map(str, folders.values()), "--output_dir", str(out), "--seed", "1")
    assert result.returncode == 2 and "not empty" in result.stderr
    assert before == {path.name: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    # serve: a study missing an image, or its admin token, stops before anything listens.
    token = (out / "private" / "admin_token").read_text()
    (out / "private" / "admin_token").unlink()
    result = run("serve", "--study", str(out), "--port", "1")
    assert result.returncode == 2 and "admin_token" in result.stderr and result.stderr.count("\n") == 1
    (out / "private" / "admin_token").write_text(token)
    missing = next((out / "images").iterdir())
    missing.unlink()
    result = run("serve", "--study", str(out), "--port", "1")
    assert result.returncode == 2 and missing.stem in result.stderr and result.stderr.count("\n") == 1
    # analyze and serve: a folder that is not a study.
    result = run("analyze", "--study", str(out), "--seed", "-1")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--seed" in result.stderr
    for command in (["analyze", "--study", str(tmp_path / "nothing")], ["serve", "--study", str(tmp_path / "nothing")]):
        result = run(*command)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "nothing" in result.stderr


def test_model_names_from_folders():
    assert list(parse_model_folders(["outputs/eval/images/base", "tuned=runs/x/"])) == ["base", "tuned"]
    with pytest.raises(Exception, match="given twice"):
        parse_model_folders(["a/base", "b/base"])


def test_study_files_are_json(tmp_path, folders):
    prepare_study(folders, tmp_path / "study", StudySettings(image_tasks=1, population_tasks=1, grid_size=2))
    assert json.loads((tmp_path / "study" / "study.json").read_text())["settings"]["grid_size"] == 2
