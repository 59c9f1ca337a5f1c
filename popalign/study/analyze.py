"""The study's votes -> who is kept, win rates, Bradley-Terry strengths, agreement and verdicts.

The rules were fixed when the study was prepared (study.json): the exclusion rule, the level, and the family of
tests (every question x every pair of models) that Holm's correction runs over. A verdict for a pair of models on
a question needs both

- the exact sign-flip test over prompts (popalign.evaluate.metrics.paired_test: per prompt, the share of decisive
  votes for each model), Holm-adjusted over the family, at p <= 1 - confidence, with its interval of the mean
  difference excluding 0 (the report's standard: popalign.evaluate.metrics.paired_verdict), and
- the interval over raters and prompts of the win rate (stats.two_way_bootstrap_win_rate) excluding 1/2 on the
  same side.
Ties count in the tie share, not in the win rate (the share of decisive votes won).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from popalign.evaluate.metrics import holm_adjusted, paired_test, paired_verdict
from popalign.evaluate.precision import wilson_interval
from popalign.io import InputError, csv_row_number
from popalign.study import read_key, read_study
from popalign.study.stats import (bradley_terry_strengths, failed_checks, krippendorff_alpha_nominal, rater_excluded,
                                  two_way_bootstrap_win_rate, two_way_interval, two_way_resample_counts, two_way_variance)
from popalign.study.votes import VOTE_COLUMNS, read_votes


def read_votes_csv(path: str | Path) -> list[dict]:
    """Votes from the server's export (GET /api/export)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--votes {path}: file not found")
    with open(path, encoding="utf-8", newline="") as stream:
        reader = csv.DictReader(stream)
        missing = [column for column in VOTE_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
        votes = []
        for index, row in enumerate(reader):
            try:
                row["position"], row["time_ms"] = int(row["position"]), int(row["time_ms"])
            except ValueError:
                raise InputError(f"{path}: row {csv_row_number(index)}: position and time_ms must be integers") from None
            if row["chosen_option"] not in ("a", "b", "tie"):
                raise InputError(f"{path}: row {csv_row_number(index)}: chosen_option {row['chosen_option']!r} is not a, b or tie")
            votes.append(row)
    return votes


def rater_checks(votes: Sequence[dict]) -> dict[str, dict]:
    """Per rater: gold checks passed (bool each) and repeated pairs answered as the first time (bool each); the
    caller applies the exclusion rule. A gold pair's option a is the intact picture."""
    by_rater: dict[str, list[dict]] = defaultdict(list)
    for vote in votes:
        by_rater[vote["rater"]].append(vote)
    checks = {}
    for rater, rater_votes in by_rater.items():
        first_answer = {vote["task"]: vote["chosen_option"] for vote in rater_votes if vote["check_kind"] == ""}
        gold = [vote["chosen_option"] == "a" for vote in rater_votes if vote["check_kind"] == "gold"]
        repeats = [vote["chosen_option"] == first_answer[vote["task"]] for vote in rater_votes
                   if vote["check_kind"] == "repeat" and vote["task"] in first_answer]
        checks[rater] = {"gold_passed": gold, "repeats_consistent": repeats,
                         "regular_votes": sum(vote["check_kind"] == "" for vote in rater_votes)}
    return checks


def _pair_outcomes(votes: Sequence[dict], tasks_by_id: dict, task_models: dict, question: str,
                   first: str, second: str) -> list[tuple[str, str, float | None]]:
    """(rater, prompt unit, 1 if `first` chosen / 0 if `second` / None for a tie) for the regular votes on `question`
    between the two models."""
    outcomes = []
    for vote in votes:
        task = tasks_by_id[vote["task"]]
        models = task_models[vote["task"]]
        if task["question"] != question or {models["a"], models["b"]} != {first, second}:
            continue
        chosen = vote["chosen_option"]
        outcome = None if chosen == "tie" else float(models[chosen] == first)
        outcomes.append((vote["rater"], task["unit"], outcome))
    return outcomes


def _index(values: Sequence[str]) -> np.ndarray:
    lookup = {value: index for index, value in enumerate(sorted(set(values)))}
    return np.array([lookup[value] for value in values], dtype=int)


def win_rate_summary(outcomes: Sequence[tuple], confidence: float, num_resamples: int, seed: int) -> dict:
    """Counts, the win rate with its Wilson interval over votes and its bootstrap interval over raters and prompts."""
    decisive = [(rater, unit, outcome) for rater, unit, outcome in outcomes if outcome is not None]
    wins = int(sum(outcome for _, _, outcome in decisive))
    summary = {"votes": len(outcomes), "ties": len(outcomes) - len(decisive), "wins": wins, "losses": len(decisive) - wins,
               "raters": len({rater for rater, _, _ in outcomes}), "prompts": len({unit for _, unit, _ in outcomes})}
    summary["tie_share"] = summary["ties"] / len(outcomes) if outcomes else math.nan
    if not decisive:
        summary.update(win_rate=math.nan, wilson=[math.nan, math.nan], bootstrap=[math.nan, math.nan])
        return summary
    low, high = wilson_interval(wins, len(decisive), confidence)
    rate, boot_low, boot_high = two_way_bootstrap_win_rate(
        [outcome for _, _, outcome in decisive], _index([rater for rater, _, _ in decisive]),
        _index([unit for _, unit, _ in decisive]), num_resamples, confidence, seed)
    summary.update(win_rate=rate, wilson=[low, high], bootstrap=[boot_low, boot_high])
    return summary


def prompt_test(outcomes: Sequence[tuple], confidence: float, seed: int):
    """The paired sign-flip test over prompts: per prompt, the share of its decisive votes won by each model."""
    per_unit: dict[str, list[float]] = defaultdict(list)
    for _, unit, outcome in outcomes:
        if outcome is not None:
            per_unit[unit].append(outcome)
    shares = np.array([np.mean(values) for _, values in sorted(per_unit.items())])
    return paired_test(1.0 - shares, shares, confidence=confidence, seed=seed)


def bradley_terry_with_intervals(outcomes_by_pair: dict, models: list[str], confidence: float, num_resamples: int,
                                 seed: int) -> dict:
    """Bradley-Terry strengths (log scale, centred) with intervals over raters and prompts: each model's strength
    refitted on resamples of the raters, of the prompts and of single votes, combined by stats.two_way_variance."""
    records = [(first, second, rater, unit, outcome) for (first, second), outcomes in outcomes_by_pair.items()
               for rater, unit, outcome in outcomes]
    if not records:
        return {}
    position = {model: index for index, model in enumerate(models)}
    rater_index = _index([record[2] for record in records])
    unit_index = _index([record[3] for record in records])
    # Each vote as (row, column, amount) entries of the win matrix: a win is 1 to the winner, a tie 1/2 each way.
    rows, columns, amounts, vote_of_entry = [], [], [], []
    for vote, (first, second, _, _, outcome) in enumerate(records):
        i, j = position[first], position[second]
        entries = [(i, j, 1.0)] if outcome == 1.0 else [(j, i, 1.0)] if outcome == 0.0 else [(i, j, 0.5), (j, i, 0.5)]
        for row, column, amount in entries:
            rows.append(row), columns.append(column), amounts.append(amount), vote_of_entry.append(vote)
    rows, columns, amounts, vote_of_entry = map(np.asarray, (rows, columns, amounts, vote_of_entry))

    def fit(vote_weights: np.ndarray) -> np.ndarray:
        wins = np.zeros((len(models), len(models)))
        np.add.at(wins, (rows, columns), amounts * vote_weights[vote_of_entry])
        return bradley_terry_strengths(wins)

    strengths = fit(np.ones(len(records)))
    rater_counts, unit_counts = two_way_resample_counts(int(rater_index.max()) + 1, int(unit_index.max()) + 1,
                                                        num_resamples, seed)
    vote_counts = np.random.default_rng(seed + 1).multinomial(len(records), np.full(len(records), 1 / len(records)),
                                                              size=num_resamples)
    by_rater = np.array([fit(rater_counts[b, rater_index].astype(float)) for b in range(num_resamples)])
    by_unit = np.array([fit(unit_counts[b, unit_index].astype(float)) for b in range(num_resamples)])
    by_vote = np.array([fit(vote_counts[b].astype(float)) for b in range(num_resamples)])
    result = {}
    for model, index in position.items():
        votes = by_vote[:, index][np.isfinite(by_vote[:, index])]
        variance = two_way_variance(by_rater[:, index], by_unit[:, index],
                                    float(np.var(votes, ddof=1)) if votes.size > 1 else 0.0)
        low, high = two_way_interval(float(strengths[index]), variance, len(set(rater_index)), len(set(unit_index)),
                                     confidence)
        result[model] = {"strength": float(strengths[index]), "interval": [low, high]}
    return result


def verdict_text(result, adjusted_p: float, family_size: int, bootstrap: Sequence[float], first: str, second: str,
                 confidence: float) -> str:
    """'<model> preferred', 'no clear preference', or why no verdict is possible (see the module docstring)."""
    adjusted = dataclasses.replace(result, p_value=adjusted_p)
    verdict = paired_verdict(adjusted, better="higher", confidence=confidence)
    if verdict not in ("better", "worse"):
        if verdict == "no clear change" and adjusted_p > 1 - confidence and result.min_p_value * family_size > 1 - confidence:
            # Holm multiplies the smallest p of the family by its size: with this few prompts none can pass.
            return (f"too few prompts for a verdict under Holm over {family_size} tests (n={result.num_pairs}: p cannot "
                    f"go below {result.min_p_value:.3g})")
        return "no clear preference" if verdict == "no clear change" else verdict
    low, high = bootstrap
    if not (low > 0.5 if verdict == "better" else high < 0.5):
        return "no clear preference (the interval over raters and prompts includes 1/2)"
    return f"{first} preferred" if verdict == "better" else f"{second} preferred"


def analyze_study(study_dir: str | Path, votes: Sequence[dict] | None = None, num_resamples: int = 2000,
                  seed: int = 0) -> dict:
    """Everything the study's votes say (see the module docstring); `votes` default to votes.sqlite's."""
    study, tasks = read_study(study_dir)
    key = read_key(study_dir)
    tasks_by_id = {task["id"]: task for task in tasks}
    votes = read_votes(study_dir) if votes is None else list(votes)
    unknown = [vote["task"] for vote in votes if vote["task"] not in tasks_by_id]
    if unknown:
        raise InputError(f"votes name task {unknown[0]!r}, which {Path(study_dir)} does not have (votes of another study?)")
    settings = study["settings"]
    confidence = settings["confidence"]
    models = key["models"]
    checks = rater_checks(votes)
    for rater, info in checks.items():
        info["failed"] = failed_checks(info["gold_passed"], info["repeats_consistent"])
        info["excluded"] = rater_excluded(info["gold_passed"], info["repeats_consistent"], settings["max_failed_checks"])
    kept = {rater for rater, info in checks.items() if not info["excluded"]}
    regular = [vote for vote in votes if vote["check_kind"] == "" and vote["rater"] in kept]
    questions = list(study["questions"])
    pairs = list(itertools.combinations(models, 2))
    comparisons = []
    for question, (first, second) in itertools.product(questions, pairs):
        outcomes = _pair_outcomes(regular, tasks_by_id, key["tasks"], question, first, second)
        summary = win_rate_summary(outcomes, confidence, num_resamples, seed)
        test = prompt_test(outcomes, confidence, seed)
        comparisons.append({"question": question, "first": first, "second": second, **summary,
                            "p_value": test.p_value, "min_p_value": test.min_p_value, "test": test, "outcomes": outcomes})
    adjusted = holm_adjusted([comparison["p_value"] for comparison in comparisons])
    for comparison, adjusted_p in zip(comparisons, adjusted):
        comparison["p_holm"] = adjusted_p
        comparison["verdict"] = verdict_text(comparison.pop("test"), adjusted_p, len(comparisons), comparison["bootstrap"],
                                             comparison["first"], comparison["second"], confidence)
    per_model = []
    strengths = {}
    for question in questions:
        for model in models:
            outcomes = []
            for comparison in comparisons:
                if comparison["question"] == question and model in (comparison["first"], comparison["second"]):
                    flip = model == comparison["second"]
                    outcomes += [(rater, unit, None if outcome is None else (1.0 - outcome if flip else outcome))
                                 for rater, unit, outcome in comparison["outcomes"]]
            per_model.append({"question": question, "model": model,
                              **win_rate_summary(outcomes, confidence, num_resamples, seed)})
        if len(models) > 2:
            by_pair = {(comparison["first"], comparison["second"]): comparison["outcomes"]
                       for comparison in comparisons if comparison["question"] == question}
            strengths[question] = bradley_terry_with_intervals(by_pair, models, confidence, min(num_resamples, 500), seed)
    agreement = {}
    for question in questions:
        units: dict[str, list[str]] = defaultdict(list)
        for vote in regular:
            if tasks_by_id[vote["task"]]["question"] == question:
                units[vote["task"]].append(vote["chosen_option"])
        values = list(units.values())
        agreement[question] = {"alpha": krippendorff_alpha_nominal(values),
                               "tasks_rated_twice_or_more": sum(len(entry) >= 2 for entry in values)}
    for comparison in comparisons:
        comparison.pop("outcomes")
    times = [int(vote["time_ms"]) for vote in regular]
    return {
        "models": models, "questions": study["questions"], "confidence": confidence,
        "exclusion_rule": study["exclusion_rule"], "family": study["family"]["text"],
        "raters": {"total": len(checks), "kept": len(kept), "excluded": sorted(set(checks) - kept)},
        "rater_checks": checks, "votes": len(votes), "votes_counted": len(regular),
        "median_seconds_per_vote": float(np.median(times)) / 1000 if times else math.nan,
        "comparisons": comparisons, "per_model": per_model, "bradley_terry": strengths, "agreement": agreement,
        "num_resamples": num_resamples,
    }
