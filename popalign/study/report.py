"""The "Human study" section of a report: markdown lines from a study folder's votes."""

from __future__ import annotations

import math
from pathlib import Path

from popalign.study.analyze import analyze_study


def _percent(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.0f}%"


def _interval(values) -> str:
    low, high = values
    return "n/a" if any(math.isnan(value) for value in (low, high)) else f"[{_percent(low)}, {_percent(high)}]"


def _p(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def _cell(text: str) -> str:
    """Text from the study as a markdown table cell: no pipe or line break can open a new cell or row."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def analysis_markdown_lines(analysis: dict, heading: str = "## Human study") -> list[str]:
    """Markdown lines of an analysis (popalign.study.analyze.analyze_study's result)."""
    level = int(analysis["confidence"] * 100)
    raters = analysis["raters"]
    seconds = analysis["median_seconds_per_vote"]
    median = "" if seconds is None or math.isnan(seconds) else f"; median {seconds:.1f} s a vote"
    lines = [heading, "",
             f"{raters['total']} raters voted, {raters['kept']} kept; {analysis['votes_counted']} votes counted "
             f"(attention checks and excluded raters left out{median}). "
             f"Exclusion rule, fixed before the study: {analysis['exclusion_rule']}", ""]
    if raters["excluded"]:
        lines += [f"Excluded: {', '.join(_cell(rater) for rater in raters['excluded'])}.", ""]
    lines += [f"Win rate: the share of decisive votes (ties left out) won by the first model, with a {level}% Wilson "
              f"interval over votes and a {level}% interval over raters and prompts (bootstraps over each, "
              f"{analysis['num_resamples']} resamples; docs/human_study.md). Verdicts: an exact sign-flip test over prompts, Holm-adjusted "
              f"over the family ({_cell(analysis['family'])}), at p <= {1 - analysis['confidence']:.2g}, and the interval "
              "over raters and prompts excluding 50% on the same side.", "",
              "| question | first vs second | votes (ties) | raters | prompts | first's win rate | Wilson | raters x prompts "
              "| p (Holm) | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for comparison in analysis["comparisons"]:
        lines.append(
            f"| {_cell(analysis['questions'][comparison['question']])} | {_cell(comparison['first'])} vs "
            f"{_cell(comparison['second'])} | {comparison['votes']} ({comparison['ties']}) | {comparison['raters']} | "
            f"{comparison['prompts']} | {_percent(comparison['win_rate'])} | {_interval(comparison['wilson'])} | "
            f"{_interval(comparison['bootstrap'])} | {_p(comparison['p_value'])} ({_p(comparison['p_holm'])}) | "
            f"{_cell(comparison['verdict'])} |")
    lines.append("")
    if len(analysis["models"]) > 2:
        lines += ["Each model against all others, and Bradley-Terry strengths (log scale, centred at 0; "
                  f"{level}% interval over raters and prompts; every compared pair counts half a virtual tie):", "",
                  "| question | model | win rate | Wilson | raters x prompts | strength |", "|---|---|---|---|---|---|"]
        for row in analysis["per_model"]:
            strength = analysis["bradley_terry"].get(row["question"], {}).get(row["model"])
            strength_text = "n/a" if not strength else \
                f"{strength['strength']:+.2f} [{strength['interval'][0]:+.2f}, {strength['interval'][1]:+.2f}]"
            lines.append(f"| {_cell(analysis['questions'][row['question']])} | {_cell(row['model'])} | "
                         f"{_percent(row['win_rate'])} | {_interval(row['wilson'])} | {_interval(row['bootstrap'])} | "
                         f"{strength_text} |")
        lines.append("")
    agreement = ", ".join(
        f"{_cell(analysis['questions'][question])} "
        f"{'n/a' if math.isnan(entry['alpha']) else format(entry['alpha'], '.2f')} ({entry['tasks_rated_twice_or_more']} tasks)"
        for question, entry in analysis["agreement"].items())
    lines += [f"Agreement between raters (Krippendorff's alpha, nominal: 1 = always the same answer, 0 = chance; over "
              f"tasks rated at least twice): {agreement}.", ""]
    return lines


def human_study_section(study_dir: str | Path, num_resamples: int = 2000, seed: int = 0) -> list[str]:
    """The report's "Human study" section (markdown lines, starting with its `## Human study` heading) from the votes
    stored in a study folder (`python -m popalign.study prepare` wrote it, `serve` collected the votes). Raises
    popalign.io.InputError when the folder is not a study."""
    return analysis_markdown_lines(analyze_study(study_dir, num_resamples=num_resamples, seed=seed))
