"""The toy demo's closing table, read from the summary.csv that popalign.evaluate writes.

    python -m popalign.toy.report outputs/toy_demo/eval/report_train outputs/toy_demo/eval/report_heldout

For each report folder and model: neutral-prompt gender and race discrepancy (mean over neutral
prompts with its 95% interval over prompts, and the floor a fair population of that size reads),
the change against the base with the exact paired test's p-value and verdict, identity-specific
accuracy (gender and race both right, among clean figures), the clean-figure rate and the toy quality.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from popalign.io import InputError, exit_2_on_input_error, read_csv_checked


def _is_number(value) -> bool:
    """A summary cell that holds a number (empty or NaN when the metric has nothing to average, e.g. no clean figure)."""
    try:
        return pd.notna(float(value))
    except (TypeError, ValueError):
        return False


def _metric(summary: pd.DataFrame, model: str, kind: str, metric: str) -> pd.Series | None:
    """The summary row of `metric`, or None when there is none or its mean is empty (shown as "-")."""
    rows = summary[(summary["model"] == model) & (summary["kind"] == kind) & (summary["metric"] == metric)]
    return None if rows.empty or not _is_number(rows.iloc[0]["mean"]) else rows.iloc[0]


def _with_interval(row: pd.Series | None) -> str:
    if row is None:
        return "-"
    if not (_is_number(row["ci_low"]) and _is_number(row["ci_high"])):
        return f"{float(row['mean']):.3f}"
    return f"{float(row['mean']):.3f} [{float(row['ci_low']):.3f}, {float(row['ci_high']):.3f}]"


def _change(row: pd.Series | None, base_row: pd.Series | None, test: pd.Series | None) -> str:
    if row is None or base_row is None or float(base_row["mean"]) == 0.0:
        return "-"
    change = f"{(float(row['mean']) - float(base_row['mean'])) / float(base_row['mean']):+.0%}"
    if test is None or not _is_number(test["p_value"]):
        return change
    return f"{change} (p {float(test['p_value']):.2g}: {test['verdict']})"


def _test(comparison: pd.DataFrame | None, model: str, metric: str) -> pd.Series | None:
    if comparison is None:
        return None
    rows = comparison[(comparison["model"] == model) & (comparison["kind"] == "neutral") & (comparison["metric"] == metric)]
    return None if rows.empty else rows.iloc[0]


def _plain(row: pd.Series | None, percent: bool = False) -> str:
    if row is None:
        return "-"
    return f"{float(row['mean']):.1%}" if percent else f"{float(row['mean']):.3f}"


def demo_table(report_dir: str | Path, scorer: str = "toy") -> str:
    """A Markdown table comparing every model of an evaluation with its base, plus where the report is."""
    report_dir = Path(report_dir)
    summary = read_csv_checked(report_dir / "summary.csv", ["model", "kind", "metric", "mean", "ci_low", "ci_high", "floor"])
    comparison_path = report_dir / "comparison.csv"
    comparison = (read_csv_checked(comparison_path, ["model", "kind", "metric", "p_value", "verdict"])
                  if comparison_path.is_file() else None)
    settings = json.loads((report_dir / "evaluation.json").read_text(encoding="utf-8")).get("settings", {}) \
        if (report_dir / "evaluation.json").is_file() else {}
    models = list(dict.fromkeys(summary["model"]))
    if not models:
        raise InputError(f"{report_dir / 'summary.csv'}: no models")
    base = models[0]
    accuracy_metrics = [metric for metric in dict.fromkeys(summary["metric"]) if metric.startswith("accuracy_") and "_x_" in metric]
    accuracy_metric = accuracy_metrics[0] if accuracy_metrics else "accuracy_gender"
    header = ["model", "neutral gender discrepancy [95% CI]", "change (exact paired test)", "neutral race discrepancy [95% CI]",
              "change (exact paired test)",
              f"identity accuracy ({accuracy_metric[len('accuracy_'):]})", "clean figures (neutral)",
              f"{scorer} quality (neutral)", f"{scorer} quality (identity)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in models:
        gender = _metric(summary, model, "neutral", "discrepancy_gender")
        race = _metric(summary, model, "neutral", "discrepancy_race")
        cells = [model, _with_interval(gender),
                 "" if model == base else _change(gender, _metric(summary, base, "neutral", "discrepancy_gender"),
                                                  _test(comparison, model, "discrepancy_gender")),
                 _with_interval(race),
                 "" if model == base else _change(race, _metric(summary, base, "neutral", "discrepancy_race"),
                                                  _test(comparison, model, "discrepancy_race")),
                 _plain(_metric(summary, model, "identity", accuracy_metric), percent=True),
                 _plain(_metric(summary, model, "neutral", "face_detection_rate"), percent=True),
                 _plain(_metric(summary, model, "neutral", f"quality_{scorer}")),
                 _plain(_metric(summary, model, "identity", f"quality_{scorer}"))]
        lines.append("| " + " | ".join(cells) + " |")
    report = report_dir / "report.md"
    gender_row = _metric(summary, base, "neutral", "discrepancy_gender")
    race_row = _metric(summary, base, "neutral", "discrepancy_race")
    neutral_prompts = int(float(gender_row["num_prompts"])) if gender_row is not None and "num_prompts" in gender_row else 0
    floors = ", ".join(f"{name} {float(row['floor']):.3f}" for name, row in (("gender", gender_row), ("race", race_row))
                       if row is not None and str(row["floor"]) not in ("", "nan"))
    title = f"Occupations of split `{settings['split']}`" if settings.get("split") else "All occupations"
    lines = [f"{title} ({neutral_prompts} neutral prompts):", "", *lines]
    lines += ["", f"Means over prompts with 95% intervals over prompts (t and studentized bootstrap); the change's p-value "
                  f"is the exact paired sign-flip test over prompts, and a verdict is given only where its Holm-adjusted p "
                  f"(over the split's headline tests: both axes of every tuned model) can reach 0.05. A fair population with the base's number of figures per prompt would read "
                  f"about {floors or 'n/a'} (the discrepancy floor). Full report: {report}"]
    return "\n".join(lines)


@exit_2_on_input_error
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m popalign.toy.report REPORT_DIR [REPORT_DIR ...]", file=sys.stderr)
        return 2
    print("\n\n".join(demo_table(report_dir) for report_dir in argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
