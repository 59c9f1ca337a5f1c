"""The rating page in a real browser: Playwright drives Debian's chromium (`make install` installs it) against the
real server. Two raters click through a study, one with the keyboard, one with the mouse; the stored votes and the
admin's export must say exactly what they did."""

import csv
import io
import os
import shutil
from pathlib import Path

import httpx
import pytest

from popalign.study.prepare import StudySettings, prepare_study
from test_study_world import StudyServer, admin_token, make_image_folders

CHROMIUM = os.environ.get("POPALIGN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (requirements.txt; `make install`)"
    else:
        if Path(CHROMIUM).is_file():
            return
        reason = f"no chromium at {CHROMIUM} (`apt-get install chromium`; `make install` does it as root)"
    if os.environ.get("CI"):
        pytest.fail(f"browser tests cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    folders = make_image_folders(root / "images")
    prepare_study(folders, root / "study", StudySettings(image_tasks=4, population_tasks=1, grid_size=4, tasks_per_rater=5,
                                                          gold_checks=2, repeat_checks=1))
    with StudyServer(root / "study") as server:
        yield server, root / "study"


def _wait_ready(page, answered: int, total: int):
    """Until the page shows `answered` of `total` and its buttons take a vote again."""
    page.wait_for_function(f"document.getElementById('progress-text').textContent === '{answered} of {total} done'",
                           timeout=10_000)
    if answered < total:
        page.wait_for_selector("#left:not([disabled])", timeout=10_000)


def test_two_raters_keyboard_and_mouse(browser, served):
    server, study_dir = served
    total = 5 + 2 + 1
    dialogs = []
    # Rater 1: keyboard only. Arrow keys and letters, one of each kind of answer.
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(f"{server.url}/r/keys")
    _wait_ready(page, 0, total)
    # The prompt's markup is shown as text: no element was made from it, no script of it ran.
    assert "<b>doctor</b>" in page.inner_text("#prompt") and "<script>" in page.inner_text("#prompt")
    assert page.locator("#prompt b").count() == 0 and page.locator("#prompt script").count() == 0
    keys = ["ArrowLeft", "ArrowRight", "ArrowDown", "a", "l", "t", "1", "2"]
    for answered, key in enumerate(keys):
        page.keyboard.press(key)
        _wait_ready(page, answered + 1, total)
    assert page.is_visible("#done") and not page.is_visible("#task")
    # A reload after the end stays at the end.
    page.reload()
    _wait_ready(page, total, total)
    assert page.is_visible("#done")
    page.close()

    # Rater 2: mouse only, on a phone-sized screen: buttons and the pictures themselves.
    phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    phone.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    phone.goto(f"{server.url}/r/mouse")
    _wait_ready(phone, 0, total)
    assert phone.evaluate("document.scrollingElement.scrollWidth") <= 390  # nothing sideways off the screen
    for selector in ("#left-image", "#right-image", "#left", "#right", "#tie"):
        box = phone.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["width"] > 40, selector
    clicks = ["#left", "#right-image", "#tie", "#left-image", "#right"]
    for answered, selector in enumerate(clicks):
        phone.click(selector)
        _wait_ready(phone, answered + 1, total)
    # Leaves mid-way, comes back: resumes where it stopped.
    phone.goto(f"{server.url}/r/mouse")
    _wait_ready(phone, len(clicks), total)
    for answered, selector in enumerate(["#tie", "#left", "#right"], start=len(clicks)):
        phone.click(selector)
        _wait_ready(phone, answered + 1, total)
    phone.close()
    assert dialogs == []

    expected = {
        "keys": ["left", "right", "tie", "left", "right", "tie", "left", "right"],
        "mouse": ["left", "right", "tie", "left", "right", "tie", "left", "right"],
    }
    response = httpx.get(f"{server.url}/api/export", headers={"Authorization": f"Bearer {admin_token(study_dir)}"})
    assert response.status_code == 200
    rows = list(csv.DictReader(io.StringIO(response.text)))
    for rater, choices in expected.items():
        mine = sorted((row for row in rows if row["rater"] == rater), key=lambda row: int(row["position"]))
        assert [row["choice"] for row in mine] == choices
        assert [int(row["position"]) for row in mine] == list(range(total))
        assert {row["check_kind"] for row in mine} == {"", "gold", "repeat"}
        for row in mine:
            named = row["left_option"] if row["choice"] == "left" else "tie" if row["choice"] == "tie" else \
                {"a": "b", "b": "a"}[row["left_option"]]
            assert row["chosen_option"] == named and int(row["time_ms"]) >= 0
    assert httpx.get(f"{server.url}/api/export").status_code == 401
