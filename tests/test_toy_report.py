"""The toy demo's closing table, from a hand-written popalign.evaluate summary and comparison."""

import json

import pandas as pd

from popalign.toy.report import demo_table, main


def write_report_folder(folder, split=""):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for model, gender, race, accuracy, quality in [("base", 0.5, 0.6, 0.95, 0.9), ("popalign", 0.05, 0.12, 0.93, 0.88)]:
        common = {"model": model, "kind": "neutral", "num_prompts": 6, "floor": ""}
        rows += [
            {**common, "metric": "discrepancy_gender", "mean": gender, "ci_low": gender - 0.01, "ci_high": gender + 0.01, "floor": 0.056},
            {**common, "metric": "discrepancy_race", "mean": race, "ci_low": race - 0.02, "ci_high": race + 0.02, "floor": 0.072},
            {**common, "metric": "face_detection_rate", "mean": 0.9, "ci_low": 0.8, "ci_high": 1.0},
            {**common, "metric": "quality_toy", "mean": quality, "ci_low": 0, "ci_high": 1},
            {**common, "kind": "identity", "metric": "accuracy_race_x_gender", "mean": accuracy, "ci_low": 0, "ci_high": 1},
            {**common, "kind": "identity", "metric": "quality_toy", "mean": quality, "ci_low": 0, "ci_high": 1},
        ]
    pd.DataFrame(rows).to_csv(folder / "summary.csv", index=False)
    pd.DataFrame([
        {"model": "popalign", "kind": "neutral", "metric": "discrepancy_gender", "p_value": 0.03125, "verdict": "better"},
        {"model": "popalign", "kind": "neutral", "metric": "discrepancy_race", "p_value": 0.03125, "verdict": "better"},
    ]).to_csv(folder / "comparison.csv", index=False)
    (folder / "evaluation.json").write_text(json.dumps({"settings": {"split": split}}))
    return folder


def test_demo_table_shows_intervals_changes_tests_floor_and_report_path(tmp_path):
    folder = write_report_folder(tmp_path / "report_heldout", split="heldout")
    table = demo_table(folder)
    lines = table.splitlines()
    assert lines[0] == "Occupations of split `heldout` (6 neutral prompts):"
    base_line, tuned_line = lines[4:6]
    assert base_line.startswith("| base | 0.500 [0.490, 0.510] |  | 0.600 [0.580, 0.620] |")
    assert ("| popalign | 0.050 [0.040, 0.060] | -90% (p 0.031: better) | 0.120 [0.100, 0.140] | -80% (p 0.031: better) "
            "| 93.0% | 90.0% | 0.880 | 0.880 |") in tuned_line
    assert "race_x_gender" in lines[2]
    assert "gender 0.056, race 0.072" in table
    assert str(folder / "report.md") in table


def test_several_report_folders_print_one_table_each(tmp_path, capsys):
    first = write_report_folder(tmp_path / "report_train", split="train")
    second = write_report_folder(tmp_path / "report_heldout", split="heldout")
    assert main([str(first), str(second)]) == 0
    output = capsys.readouterr().out
    assert "split `train`" in output and "split `heldout`" in output
    assert main([str(tmp_path / "missing")]) == 2


def test_a_model_that_drew_no_clean_figure_reads_as_dashes_not_a_crash(tmp_path):
    # popalign.evaluate leaves a metric's mean empty when nothing could be read (no clean figure on any prompt)
    folder = write_report_folder(tmp_path / "report_heldout", split="heldout")
    summary = pd.read_csv(folder / "summary.csv", dtype=str, keep_default_na=False)
    empty = (summary["model"] == "popalign") & (summary["metric"] != "face_detection_rate")
    summary.loc[empty, ["mean", "ci_low", "ci_high"]] = ""
    summary.to_csv(folder / "summary.csv", index=False)
    comparison = pd.read_csv(folder / "comparison.csv", dtype=str, keep_default_na=False)
    comparison["p_value"], comparison["verdict"] = "", ""
    comparison.to_csv(folder / "comparison.csv", index=False)
    tuned_line = demo_table(folder).splitlines()[5]
    assert tuned_line == "| popalign | - | - | - | - | - | 90.0% | - | - |"
