"""The study server, run for real (`python -m popalign.study serve` on 127.0.0.1, SQLite on disk): restart and
resume, a vote sent twice, the admin token, blindness of every response, no path to files outside the study,
and 50 raters voting at once."""

import sqlite3
import threading
import time

import httpx
import pytest

from popalign.study import read_study
from popalign.study.prepare import StudySettings, prepare_study
from test_study_world import MARKUP_PROMPT, StudyServer, admin_token, make_image_folders

MODEL_NAMES = ("base", "popalign")


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    folders = make_image_folders(root / "images")
    prepare_study(folders, root / "study", StudySettings(image_tasks=6, population_tasks=2, grid_size=4, tasks_per_rater=8))
    return root / "study"


@pytest.fixture(scope="module")
def server(study_dir):
    with StudyServer(study_dir) as running:
        yield running


def vote(client, url, rater, position, choice="left", time_ms=1000):
    return client.post(f"{url}/api/raters/{rater}/votes", json={"position": position, "choice": choice, "time_ms": time_ms})


def stored_votes(study_dir, rater=None):
    with sqlite3.connect(study_dir / "votes.sqlite") as connection:
        query = "SELECT rater, position, task, check_kind, left_option, choice, chosen_option, time_ms FROM votes"
        rows = connection.execute(query + (" WHERE rater = ?" if rater else ""), (rater,) if rater else ()).fetchall()
    return rows


def test_restart_keeps_votes_and_resumes(tmp_path):
    folders = make_image_folders(tmp_path / "images")
    study = tmp_path / "study"
    prepare_study(folders, study, StudySettings(image_tasks=4, population_tasks=1, grid_size=4, tasks_per_rater=6))
    running = StudyServer(study).start()
    try:
        with httpx.Client(timeout=10) as client:
            first = [client.get(f"{running.url}/api/raters/ana/next").json()]
            for position in range(3):
                assert vote(client, running.url, "ana", position, ["left", "right", "tie"][position]).json()["accepted"]
                first.append(client.get(f"{running.url}/api/raters/ana/next").json())
        running.stop(kill=True)  # no clean shutdown: what was acknowledged must be on disk
        running.start()
        with httpx.Client(timeout=10) as client:
            resumed = client.get(f"{running.url}/api/raters/ana/next").json()
            assert resumed == first[3]  # the same task, the same sides, 3 of N answered
            assert resumed["position"] == 3 and resumed["answered"] == 3
            assert not vote(client, running.url, "ana", 1, "tie").json()["accepted"]  # answered before the restart
    finally:
        running.stop()
    assert [(row[1], row[5]) for row in stored_votes(study, "ana")] == [(0, "left"), (1, "right"), (2, "tie")]


def test_a_vote_sent_twice_counts_once(server, study_dir):
    with httpx.Client(timeout=10) as client:
        task = client.get(f"{server.url}/api/raters/dup/next").json()
        answers = [vote(client, server.url, "dup", task["position"], "right").json() for _ in range(3)]
        answers.append(vote(client, server.url, "dup", task["position"], "left").json())
        assert [answer["accepted"] for answer in answers] == [True, False, False, False]
        assert answers[-1]["answered"] == 1
        # Sent at the same moment from several threads: still one row.
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            vote(httpx.Client(timeout=10), server.url, "dup", 1, "tie").json()["accepted"])) for _ in range(8)]
        [thread.start() for thread in threads]
        [thread.join() for thread in threads]
        assert sorted(results) == [False] * 7 + [True]
    rows = stored_votes(study_dir, "dup")
    assert [(row[1], row[5]) for row in rows] == [(0, "right"), (1, "tie")]
    # The stored row says which option was on the left and which option the click named.
    for _, _, _, _, left_option, choice, chosen, _ in rows:
        assert chosen == ("tie" if choice == "tie" else left_option if choice == "left" else {"a": "b", "b": "a"}[left_option])


def test_bad_votes_are_refused(server):
    with httpx.Client(timeout=10) as client:
        assert vote(client, server.url, "bad", 0, "up").status_code == 422
        assert vote(client, server.url, "bad", 10_000).status_code == 422
        assert vote(client, server.url, "bad", 0, time_ms=-5).status_code == 422
        assert client.get(f"{server.url}/api/raters/{'x' * 65}/next").status_code == 404
        assert client.get(f"{server.url}/r/a%3Cb%3E").status_code == 404  # ids are letters, digits, '_', '-'


def test_export_needs_the_admin_token(server, study_dir):
    with httpx.Client(timeout=10) as client:
        vote(client, server.url, "exporter", 0, "left")
        assert client.get(f"{server.url}/api/export").status_code == 401
        assert client.get(f"{server.url}/api/export", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get(f"{server.url}/api/export?token={admin_token(study_dir)}").status_code == 401
        response = client.get(f"{server.url}/api/export", headers={"Authorization": f"Bearer {admin_token(study_dir)}"})
    assert response.status_code == 200
    lines = response.text.splitlines()
    assert lines[0] == "rater,position,task,check_kind,left_option,choice,chosen_option,time_ms,received_at"
    assert any(line.startswith("exporter,0,") for line in lines)


def test_no_response_names_a_model(server, study_dir):
    """A rater's whole session (page, tasks, images, answers) and every error page, searched for the models' names."""
    seen = []
    with httpx.Client(timeout=10) as client:
        for path in ("/", "/r/blind", "/healthz", "/images/nothing", "/r/", "/api/export", "/docs", "/openapi.json"):
            seen.append(client.get(server.url + path))
        while True:
            task = client.get(f"{server.url}/api/raters/blind/next")
            seen.append(task)
            if task.json()["done"]:
                break
            seen += [client.get(server.url + task.json()[side]) for side in ("left", "right")]
            seen.append(vote(client, server.url, "blind", task.json()["position"], "tie"))
    assert sum(response.headers["content-type"] == "image/png" for response in seen) >= 2 * 8
    for response in seen:
        raw = (str(response.headers) + str(response.url)).encode() + response.content
        for model in MODEL_NAMES:
            assert model.encode() not in raw.lower(), (response.url, model)
    # The prompt travels as data (the page sets it as text), markup and all.
    prompts = {response.json().get("prompt") for response in seen if "json" in response.headers["content-type"]}
    assert any(prompt and "<b>doctor</b>" in prompt for prompt in prompts)
    assert MARKUP_PROMPT.split("{")[0] in "".join(prompt for prompt in prompts if prompt)


def test_no_file_outside_the_study_is_reachable(server, study_dir):
    _, tasks = read_study(study_dir)
    with httpx.Client(timeout=10) as client:
        good = client.get(f"{server.url}/images/{tasks[0]['a']}")
        assert good.status_code == 200 and good.content[:4] == b"\x89PNG"
        attempts = ["../private/key.json", "..%2Fprivate%2Fkey.json", "%2e%2e%2fprivate%2fkey.json", "../study.json",
                    f"{tasks[0]['a']}.png", f"../images/{tasks[0]['a']}.png", "..%2F..%2F..%2Fetc%2Fpasswd",
                    "/etc/passwd", "%2Fetc%2Fpasswd", "....//....//private/key.json", "..\\private\\key.json"]
        for attempt in attempts:
            response = client.get(f"{server.url}/images/{attempt}")
            assert response.status_code == 404, attempt
            assert b"admin" not in response.content and b"root:" not in response.content
        for path in ("/private/key.json", "/study.json", "/votes.sqlite", "/images/", "/private/admin_token"):
            response = client.get(server.url + path)
            assert response.status_code == 404 and b"token" not in response.content.lower(), path


def test_fifty_raters_at_once_lose_nothing(tmp_path):
    """50 raters, each on its own connection and thread, click through their whole plan at once (every vote also
    sent a second time): every vote is stored exactly once. Bounded: 50 x 13 votes, 60 s at most."""
    folders = make_image_folders(tmp_path / "images")
    study = tmp_path / "study"
    prepare_study(folders, study, StudySettings(image_tasks=6, population_tasks=2, grid_size=4, tasks_per_rater=8))
    raters = [f"load{index:02d}" for index in range(50)]
    acknowledged, errors = {}, []
    deadline = time.monotonic() + 60
    barrier = threading.Barrier(len(raters))

    def rate(rater):
        try:
            with httpx.Client(timeout=30) as client:
                barrier.wait(timeout=30)
                count = 0
                while time.monotonic() < deadline:
                    task = client.get(f"{running.url}/api/raters/{rater}/next").json()
                    if task["done"]:
                        break
                    choice = ["left", "right", "tie"][(count + len(rater)) % 3]
                    first = vote(client, running.url, rater, task["position"], choice).json()
                    again = vote(client, running.url, rater, task["position"], choice).json()
                    assert first["accepted"] and not again["accepted"]
                    count += 1
                acknowledged[rater] = (count, task["total"])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(f"{rater}: {error!r}")

    with StudyServer(study) as running:
        started = time.monotonic()
        threads = [threading.Thread(target=rate, args=(rater,)) for rater in raters]
        [thread.start() for thread in threads]
        [thread.join(timeout=90) for thread in threads]
        elapsed = time.monotonic() - started
    assert not errors, errors[:3]
    assert all(acknowledged[rater][0] == acknowledged[rater][1] == 13 for rater in raters)
    rows = stored_votes(study)
    assert len(rows) == 50 * 13 and len({(row[0], row[1]) for row in rows}) == 50 * 13
    with sqlite3.connect(study / "votes.sqlite") as connection:
        assert connection.execute("SELECT COUNT(*), COUNT(DISTINCT join_index) FROM raters").fetchone() == (50, 50)
    print(f"50 raters x 13 votes (each sent twice): {elapsed:.1f} s")


def test_one_server_per_study(server, study_dir, capsys):
    from popalign.study.__main__ import main

    assert main(["serve", "--study", str(study_dir), "--port", "1"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "another run" in error and ".serve.lock" in error
