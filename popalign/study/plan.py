"""Which tasks a rater sees, in which order, and which option is on the left.

A rater's plan is fixed when they first join and stored with them (the server's `raters` table), so a restart
or a reload shows the same tasks in the same order with the same sides. Each entry is

    {"task": task id, "left": "a" or "b", "check": "" | "gold" | "repeat"}

- the regular tasks: `tasks_per_rater` consecutive tasks of the study's pool, starting where the previous rater's
  block ended (rater k starts at k * tasks_per_rater, wrapping), so every task is rated about equally often and
  tasks are rated by several raters once raters x tasks_per_rater exceeds the pool; shown in a random order;
- `gold_checks` gold pairs (one picture visibly broken) at random places;
- `repeat_checks` of the rater's regular tasks shown again later with the sides swapped.

The randomness is seeded by (the study's seed, the rater id), so a plan can be rebuilt and checked.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

# A repeated pair comes at least this many tasks after its first showing, so it is not recognised at once.
MIN_REPEAT_GAP = 3


def rater_rng(seed: int, rater_id: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{rater_id}".encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def build_plan(pool: Sequence[str], gold: Sequence[str], join_index: int, tasks_per_rater: int, gold_checks: int,
               repeat_checks: int, seed: int, rater_id: str) -> list[dict]:
    """The plan of the `join_index`-th rater (0-based) with id `rater_id` (see the module docstring)."""
    rng = rater_rng(seed, rater_id)
    count = min(tasks_per_rater, len(pool))
    start = (join_index * tasks_per_rater) % len(pool) if pool else 0
    regular = [pool[(start + offset) % len(pool)] for offset in range(count)]
    regular = [regular[index] for index in rng.permutation(len(regular))]
    plan = [{"task": task, "left": "a" if rng.random() < 0.5 else "b", "check": ""} for task in regular]
    # Gold pairs at random places.
    chosen_gold = [gold[index] for index in rng.permutation(len(gold))[:gold_checks]]
    for task in chosen_gold:
        position = int(rng.integers(0, len(plan) + 1))
        plan.insert(position, {"task": task, "left": "a" if rng.random() < 0.5 else "b", "check": "gold"})
    # Repeats: regular tasks from the first half of the plan, shown again later, the sides swapped.
    regular_positions = [index for index, entry in enumerate(plan) if entry["check"] == ""]
    candidates = regular_positions[: max(1, (len(regular_positions) + 1) // 2)] if regular_positions else []
    repeated = [candidates[index] for index in rng.permutation(len(candidates))[:repeat_checks]]
    repeats = [dict(plan[index], left="b" if plan[index]["left"] == "a" else "a", check="repeat") for index in repeated]
    for repeat in repeats:
        original_position = _position_of(plan, repeat["task"])
        earliest = min(len(plan), original_position + MIN_REPEAT_GAP + 1)
        position = int(rng.integers(earliest, len(plan) + 1))
        plan.insert(position, repeat)
    return plan


def _position_of(plan: list[dict], task: str) -> int:
    return next(index for index, entry in enumerate(plan) if entry["task"] == task and entry["check"] == "")
