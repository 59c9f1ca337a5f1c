"""The study's votes: raters (with their plans) and votes in one SQLite file, votes.sqlite in the study folder.

One row per vote: rater, position in the rater's plan, task, which check it was (gold, repeat or none), which option
was on the left, the choice clicked (left, right, tie), the option it names (a, b, tie), the time the rater took,
and when it arrived. (rater, position) is unique: a vote sent twice counts once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from popalign.study import VOTES_FILE
from popalign.study.plan import build_plan

VOTE_COLUMNS = ["rater", "position", "task", "check_kind", "left_option", "choice", "chosen_option", "time_ms", "received_at"]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS raters (
    rater TEXT PRIMARY KEY,
    join_index INTEGER NOT NULL UNIQUE,
    plan TEXT NOT NULL,
    joined_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS votes (
    rater TEXT NOT NULL REFERENCES raters(rater),
    position INTEGER NOT NULL,
    task TEXT NOT NULL,
    check_kind TEXT NOT NULL,
    left_option TEXT NOT NULL CHECK (left_option IN ('a', 'b')),
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie')),
    chosen_option TEXT NOT NULL CHECK (chosen_option IN ('a', 'b', 'tie')),
    time_ms INTEGER NOT NULL,
    received_at REAL NOT NULL,
    UNIQUE (rater, position)
);
"""


def chosen_option(left_option: str, choice: str) -> str:
    """The option (a, b or tie) a click names, given which option was on the left."""
    if choice == "tie":
        return "tie"
    right_option = "b" if left_option == "a" else "a"
    return left_option if choice == "left" else right_option


class VoteStore:
    """Raters (with their plans) and votes in one SQLite file. Writes are serialised by a lock (and SQLite's own);
    each call opens its own connection, so the store is safe to share between the server's threads."""

    def __init__(self, path: str | Path, pool: list[str], gold: list[str], settings: dict):
        self.path = str(path)
        self.pool, self.gold, self.settings = pool, gold, settings
        self._lock = threading.Lock()
        with self._connect() as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        connection.execute("PRAGMA busy_timeout=30000")
        connection.execute("PRAGMA synchronous=FULL")
        return connection

    def plan(self, rater: str) -> list[dict]:
        """The rater's plan, made and stored the first time the rater asks."""
        connection = self._connect()
        try:
            row = connection.execute("SELECT plan FROM raters WHERE rater = ?", (rater,)).fetchone()
            if row:
                return json.loads(row[0])
            with self._lock:
                connection.execute("BEGIN IMMEDIATE")
                try:
                    row = connection.execute("SELECT plan FROM raters WHERE rater = ?", (rater,)).fetchone()
                    if row:
                        connection.execute("COMMIT")
                        return json.loads(row[0])
                    join_index = connection.execute("SELECT COUNT(*) FROM raters").fetchone()[0]
                    settings = self.settings
                    plan = build_plan(self.pool, self.gold, join_index, settings["tasks_per_rater"], settings["gold_checks"],
                                      settings["repeat_checks"], settings["seed"], rater)
                    connection.execute("INSERT INTO raters (rater, join_index, plan, joined_at) VALUES (?, ?, ?, ?)",
                                       (rater, join_index, json.dumps(plan), time.time()))
                    connection.execute("COMMIT")
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise
            return plan
        finally:
            connection.close()

    def answered_positions(self, rater: str) -> set[int]:
        connection = self._connect()
        try:
            return {row[0] for row in connection.execute("SELECT position FROM votes WHERE rater = ?", (rater,))}
        finally:
            connection.close()

    def record_vote(self, rater: str, position: int, entry: dict, choice: str, time_ms: int) -> bool:
        """Store one vote; False when the rater already voted at this position (the first vote stands)."""
        connection = self._connect()
        try:
            with self._lock:
                cursor = connection.execute(
                    "INSERT OR IGNORE INTO votes (rater, position, task, check_kind, left_option, choice, chosen_option, "
                    "time_ms, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (rater, position, entry["task"], entry["check"], entry["left"], choice,
                     chosen_option(entry["left"], choice), time_ms, time.time()))
                return cursor.rowcount == 1
        finally:
            connection.close()

    def votes(self) -> list[dict]:
        connection = self._connect()
        try:
            rows = connection.execute(f"SELECT {', '.join(VOTE_COLUMNS)} FROM votes ORDER BY received_at, rater, position")
            return [dict(zip(VOTE_COLUMNS, row)) for row in rows]
        finally:
            connection.close()


def read_votes(study_dir: str | Path) -> list[dict]:
    """Every vote of a study's votes.sqlite (none when nobody voted yet)."""
    path = Path(study_dir) / VOTES_FILE
    if not path.is_file():
        return []
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        rows = connection.execute(f"SELECT {', '.join(VOTE_COLUMNS)} FROM votes ORDER BY received_at, rater, position")
        return [dict(zip(VOTE_COLUMNS, row)) for row in rows]
    finally:
        connection.close()
