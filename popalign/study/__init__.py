"""A blind A/B study of the models' pictures, rated by people: prepare it, serve it, analyze the votes.

    prepare.py   the study folder from eval.sh's image folders (tasks, attention checks, images under opaque ids)
    plan.py      which tasks a rater sees, in which order, which side each option is on
    server.py    the rating page and its API (FastAPI; votes in SQLite)
    page.py      the page's HTML, CSS and script
    stats.py     the math: bootstrap over raters and prompts, Bradley-Terry, Krippendorff's alpha (pure functions)
    analyze.py   votes -> win rates, strengths, agreement, verdicts (analysis.json, analysis.md)
    report.py    the "Human study" section of the evaluation report
    __main__.py  `python -m popalign.study prepare|serve|analyze`

A study folder:

    <study>/study.json            settings, questions, the exclusion rule and the family of tests, fixed before any vote
    <study>/tasks.json            every task: id, kind, question, prompt text, prompt unit, the image ids of options a, b
    <study>/images/<id>.png       every image shown, under a random id, re-encoded without metadata
    <study>/private/key.json      which model drew each option and each image (never served)
    <study>/private/admin_token   the token the export of votes needs
    <study>/votes.sqlite          raters and votes, written by `serve`
    <study>/analysis/             analysis.json and analysis.md, written by `analyze`
"""

from __future__ import annotations

import json
from pathlib import Path

from popalign.io import InputError

STUDY_FILE = "study.json"
TASKS_FILE = "tasks.json"
IMAGES_DIR = "images"
PRIVATE_DIR = "private"
KEY_FILE = "key.json"
ADMIN_TOKEN_FILE = "admin_token"
VOTES_FILE = "votes.sqlite"
ANALYSIS_DIR = "analysis"

# question id -> what the rater reads; the population question is asked of grids, the others of single pictures.
QUESTIONS = {
    "better": "Which image is better?",
    "prompt": "Which image matches the text better?",
    "varied": "Which group of people is more varied?",
}
IMAGE_QUESTIONS = ("better", "prompt")
POPULATION_QUESTIONS = ("varied",)
GOLD_QUESTION = "better"


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: file not found (is this a folder written by `python -m popalign.study prepare`?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not readable JSON ({error})") from None


def read_study(folder: str | Path) -> tuple[dict, list[dict]]:
    """The study's settings and its tasks, as `prepare` wrote them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--study {folder}: no such folder")
    settings = read_json(folder / STUDY_FILE)
    tasks = read_json(folder / TASKS_FILE)["tasks"]
    return settings, tasks


def read_key(folder: str | Path) -> dict:
    """The private key: {"tasks": {task id: {"a": model, "b": model}}, "images": {image id: {...}}, "models": [...]}."""
    return read_json(Path(folder) / PRIVATE_DIR / KEY_FILE)
