"""The objective comparison's protocol: equal budgets, the declared selection rule, the table over seeds."""

import math
from pathlib import Path

import pytest

from popalign.toy import comparison

BASE = {"neutral_gender_discrepancy": 0.7, "neutral_race_discrepancy": 0.8, "identity_accuracy": 0.98,
        "neutral_toy_quality": 0.96}
# The ranges of the toy world's discrepancies: 2 genders, 3 races.
BOUNDS = comparison.discrepancy_bounds(("male", "female"), ("a", "b", "c"))


def measurement(gender, race, identity=0.98, quality=0.96):
    return {"neutral_gender_discrepancy": gender, "neutral_race_discrepancy": race, "identity_accuracy": identity,
            "neutral_toy_quality": quality}


def test_every_objective_grid_comes_from_one_rule_and_run_names_are_distinct():
    grids = {objective.name: objective.grid for objective in comparison.OBJECTIVES}
    assert set(grids) == {"popalign", "popalign_per_pair", "dpo", "sft"}
    # The same learning rates for every objective; the same temperatures for each that has one; the loser
    # weight 1 (Diffusion-DPO's, fixed by its loss) in PopAlign's grid.
    for name, grid in grids.items():
        assert sorted({point["learning_rate"] for point in grid}) == list(comparison.LEARNING_RATES), name
    for name in ("popalign", "popalign_per_pair", "dpo"):
        assert sorted({point["beta"] for point in grids[name]}) == list(comparison.TEMPERATURES)
    assert sorted({point["lambda_loser"] for point in grids["popalign"]}) == [0.1, 1.0]
    assert len(grids["popalign"]) == 2 * 2 * 4 and len(grids["dpo"]) == 2 * 4 and len(grids["sft"]) == 4
    assert comparison.grid_for(("learning_rate", "beta"))[0] == {"beta": 0.5, "learning_rate": 5e-5}
    with pytest.raises(ValueError):
        comparison.grid_for(("momentum",))
    names = [comparison.run_name(objective, point) for objective in comparison.OBJECTIVES for point in objective.grid]
    assert len(names) == len(set(names))
    logs = {comparison.training_log(Path("study/runs") / f"{name}_seed0") for name in names}
    assert len(logs) == len(names)  # each run its own log, though the names hold dots
    assert comparison.training_log(Path("runs/sft_learning_rate0.0001_seed0")) == Path("runs/sft_learning_rate0.0001_seed0.log")
    assert comparison.run_name(comparison.OBJECTIVES[0], {"beta": 0.5, "learning_rate": 2e-4}) == \
        "popalign_beta0.5_learning_rate0.0002"
    anchors = {objective.name: objective.fixed.get("popalign_anchor") for objective in comparison.OBJECTIVES}
    assert anchors["popalign"] == "pooled" and anchors["popalign_per_pair"] == "per_pair"


def held_out_measurements(gender_shift, race_shift, seeds, prompts=8, seed=0):
    """Held-out measurements whose per-prompt discrepancies are the reference's plus a shift and noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    result = []
    for _ in range(seeds):
        rows = [{"occupation": f"o{index}", "gender_discrepancy": 0.5 + 0.02 * index + gender_shift + rng.normal(0, 0.005),
                 "race_discrepancy": 0.6 + race_shift + rng.normal(0, 0.005)} for index in range(prompts)]
        result.append({"neutral": rows})
    return result


def test_objective_tests_find_a_difference_and_an_equivalence_with_holm():
    held_out = {"popalign": held_out_measurements(0.0, 0.0, 5, seed=0),
                "sft": held_out_measurements(-0.1, 0.0, 5, seed=1),    # better on gender, the same on race
                "dpo": held_out_measurements(0.2, 0.3, 5, seed=2)}     # worse on both
    rows = {(row["objective"], row["metric"], row["unit"]): row for row in comparison.objective_tests(held_out, BOUNDS)}
    assert len(rows) == 2 * 2 * 2
    sft_gender = rows[("sft", "gender_discrepancy", "prompt")]
    assert sft_gender["num_pairs"] == 8 and sft_gender["difference"] == pytest.approx(-0.1, abs=0.01)
    # 8 prompts: exact p 2/256; Holm over 4 tests of this unit: 4 x 2/256 = 0.03125
    assert sft_gender["p_value"] == pytest.approx(2 / 256) and sft_gender["p_value_holm"] == pytest.approx(4 * 2 / 256)
    assert sft_gender["verdict"] == "better"
    sft_race = rows[("sft", "race_discrepancy", "prompt")]
    assert sft_race["equivalence"] == "equivalent within +-0.05"
    assert rows[("dpo", "race_discrepancy", "prompt")]["verdict"] == "worse"
    assert rows[("dpo", "race_discrepancy", "prompt")]["equivalence"].startswith("not shown equivalent")
    assert rows[("sft", "gender_discrepancy", "prompt x seed")]["num_pairs"] == 40
    table = comparison.tests_table(list(rows.values()))
    assert table.count("\n") == 1 + len(rows) and "| sft | popalign | gender | prompt | 8 | -0.1" in table
    with pytest.raises(ValueError, match="reference"):
        comparison.objective_tests({"sft": held_out["sft"]}, BOUNDS)


def test_intervals_are_cut_to_the_range_of_each_axis_and_of_a_difference():
    assert BOUNDS["gender_discrepancy"] == pytest.approx((0.0, math.sqrt(1 / 2)))
    assert BOUNDS["race_discrepancy"] == pytest.approx((0.0, math.sqrt(2 / 3)))
    # Seeds near gender's maximum of 0.707, one far below it: the interval over seeds would pass 0.707.
    seeds = [measurement(gender, 0.5) for gender in (0.70, 0.70, 0.69, 0.70, 0.40)]
    mean, low, high, clipped = comparison.seed_summary(seeds, BOUNDS)["neutral_gender_discrepancy"]
    assert clipped and high == pytest.approx(math.sqrt(1 / 2)) and low < mean < high
    assert comparison.table_metric_bounds("identity_accuracy", BOUNDS) == (0.0, 1.0)
    table = comparison.comparison_table(BASE, {"sft": "sft_learning_rate0.0004"}, {"sft": seeds}, {"sft": True}, BOUNDS)
    assert f"[{low:.3f}, 0.707]†" in table
    # A difference lies in [-0.707, +0.707] for gender: an objective at gender's maximum on most prompts
    # against a reference at 0 reads a difference interval that would leave that range.
    def one_seed(gender_values):
        return [{"neutral": [{"occupation": f"o{index}", "gender_discrepancy": value, "race_discrepancy": 0.3}
                             for index, value in enumerate(gender_values)]}]
    reference = one_seed([0.0] * 6)
    extreme = one_seed([0.7071] * 5 + [0.0])
    rows = comparison.objective_tests({"popalign": reference, "sft": extreme}, BOUNDS)
    gender = next(row for row in rows if row["metric"] == "gender_discrepancy" and row["unit"] == "prompt")
    assert -math.sqrt(1 / 2) - 1e-12 <= gender["ci_low"] <= gender["ci_high"] <= math.sqrt(1 / 2) + 1e-12
    assert gender["ci_clipped"] and "]†" in comparison.tests_table([gender])
    race = next(row for row in rows if row["metric"] == "race_discrepancy" and row["unit"] == "prompt")
    assert not race["ci_clipped"]


def test_a_chosen_rate_on_an_edge_of_the_rates_tried_is_bracketed():
    grid = [{"beta": beta, "learning_rate": rate} for beta in (0.5, 2.0) for rate in comparison.LEARNING_RATES]
    assert comparison.bracketing_point({"beta": 2.0, "learning_rate": 4e-4}, grid) == {"beta": 2.0, "learning_rate": 8e-4}
    assert comparison.bracketing_point({"beta": 0.5, "learning_rate": 5e-5}, grid) == {"beta": 0.5, "learning_rate": 2.5e-5}
    assert comparison.bracketing_point({"beta": 2.0, "learning_rate": 1e-4}, grid) is None
    # Only the rates tried with the chosen point's other values count: 8e-4 at beta 2 does not bracket beta 0.5.
    extended = grid + [{"beta": 2.0, "learning_rate": 8e-4}]
    assert comparison.bracketing_point({"beta": 2.0, "learning_rate": 4e-4}, extended) is None
    assert comparison.bracketing_point({"beta": 0.5, "learning_rate": 4e-4}, extended) == {"beta": 0.5, "learning_rate": 8e-4}
    sft = next(objective for objective in comparison.OBJECTIVES if objective.name == "sft")
    names = [comparison.run_name(sft, point) for point in comparison.candidate_points(sft, 2)]
    assert names == ["sft_learning_rate5e-05", "sft_learning_rate0.0001", "sft_learning_rate0.0002", "sft_learning_rate0.0004",
                     "sft_learning_rate0.0008", "sft_learning_rate2.5e-05", "sft_learning_rate0.0016", "sft_learning_rate1.25e-05"]
    assert len(comparison.candidate_points(sft)) == 4 + 2 * comparison.MAX_BRACKETING_RUNS
    assert comparison.candidate_points(sft, 0) == list(sft.grid)


def sft_validation(rate, breaks_from=None):
    """A validation measurement whose discrepancy falls with the learning rate and whose identity accuracy breaks at
    `breaks_from` and above."""
    broken = breaks_from is not None and rate >= breaks_from - 1e-12
    return measurement(0.5 - 100 * rate, 0.5 - 100 * rate, identity=0.5 if broken else 0.98)


def test_tuning_brackets_an_edge_rate_and_stops_after_its_runs():
    sft = next(objective for objective in comparison.OBJECTIVES if objective.name == "sft")
    measured = []

    def measuring(breaks_from):
        def measure_point(point):
            measured.append(point["learning_rate"])
            return sft_validation(point["learning_rate"], breaks_from)
        measured.clear()
        return measure_point

    # The grid's largest rate wins, 8e-4 wins in its turn, 1.6e-3 breaks identity: 8e-4 is bracketed.
    chosen, met, point, measurements, points = comparison.tune(sft, measuring(1.6e-3), BASE)
    assert measured == [5e-5, 1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3]
    assert chosen == "sft_learning_rate0.0008" and met and point == {"learning_rate": 8e-4}
    assert list(measurements) == list(points) and len(points) == 6
    assert comparison.bracketing_point(point, list(points.values())) is None
    # Nothing breaks: with a cap of 2, both bracketing runs are spent and the choice stays on the edge, which is
    # then reported; the default cap goes on doubling until its runs are spent too.
    chosen, _, point, _, points = comparison.tune(sft, measuring(None), BASE, max_bracketing_runs=2)
    assert chosen == "sft_learning_rate0.0016" and len(points) == 4 + 2
    assert comparison.bracketing_point(point, list(points.values())) == {"learning_rate": 3.2e-3}
    chosen, _, point, _, points = comparison.tune(sft, measuring(None), BASE)
    assert len(points) == 4 + comparison.MAX_BRACKETING_RUNS
    assert point == {"learning_rate": pytest.approx(4e-4 * 2 ** comparison.MAX_BRACKETING_RUNS)}
    # Identity breaks at 3.2e-3: the larger cap ends inside, at 1.6e-3, bracketed by the run that broke.
    chosen, met, point, _, points = comparison.tune(sft, measuring(3.2e-3), BASE)
    assert chosen == "sft_learning_rate0.0016" and met and len(points) == 4 + 3
    assert comparison.bracketing_point(point, list(points.values())) is None
    # An interior choice adds no run.
    chosen, _, _, _, points = comparison.tune(sft, measuring(2e-4), BASE)
    assert chosen == "sft_learning_rate0.0001" and measured == list(comparison.LEARNING_RATES)


def test_selection_takes_the_lowest_bias_among_runs_that_hold_identity_and_quality():
    runs = {
        "lowest_but_breaks_identity": measurement(0.05, 0.05, identity=0.95),  # 3 points below the base
        "lowest_but_breaks_quality": measurement(0.06, 0.06, quality=0.90),    # 6% below the base
        "eligible_worse": measurement(0.3, 0.3),
        "eligible_best": measurement(0.2, 0.1, identity=0.965, quality=0.913),  # 1.5 points, 4.9%: inside
    }
    assert comparison.select(runs, BASE) == ("eligible_best", True)
    # Nothing qualifies: the lowest bias overall, flagged.
    broken = {name: runs[name] for name in ("lowest_but_breaks_identity", "lowest_but_breaks_quality")}
    assert comparison.select(broken, BASE) == ("lowest_but_breaks_identity", False)
    # Ties go to the first run listed.
    tied = {"first": measurement(0.2, 0.2), "second": measurement(0.1, 0.3)}
    assert comparison.select(tied, BASE) == ("first", True)
    with pytest.raises(ValueError):
        comparison.select({}, BASE)


def test_table_gives_mean_and_interval_over_seeds():
    held_out = {"popalign": [measurement(0.10, 0.20), measurement(0.12, 0.18), measurement(0.14, 0.22)]}
    summary = comparison.seed_summary(held_out["popalign"], BOUNDS)
    mean, low, high, clipped = summary["neutral_gender_discrepancy"]
    assert not clipped
    assert mean == pytest.approx(0.12)
    # At least the t-interval: sd 0.02, t_{2, 0.975} = 4.3027.
    assert low <= 0.12 - 4.3027 * 0.02 / math.sqrt(3) + 1e-5 and high >= 0.12 + 4.3027 * 0.02 / math.sqrt(3) - 1e-5
    table = comparison.comparison_table(BASE, {"popalign": "popalign_beta0.5_learning_rate0.0002"}, held_out,
                                        {"popalign": False}, BOUNDS)
    lines = table.splitlines()
    assert lines[2].startswith("| base | - | - | 0.700 | 0.800 | 98.0% | 0.960 |")
    assert lines[3].startswith("| popalign | popalign_beta0.5_learning_rate0.0002 (no run met the constraints) | 3 | 0.120 [")
    given = comparison.comparison_table(BASE, {"popalign": "popalign_beta0.5_learning_rate0.0002"}, held_out,
                                        {"popalign": None}, BOUNDS).splitlines()[3]
    assert given.startswith("| popalign | popalign_beta0.5_learning_rate0.0002 (chosen by an earlier run of this protocol) | 3 |")


def test_a_setting_chosen_by_an_earlier_run_must_be_a_point_of_its_objectives_grid():
    given = comparison.parse_chosen_settings(" popalign=popalign_beta2_lambda_loser1_learning_rate0.0001 , sft=sft_learning_rate0.0004")
    assert given == {"popalign": "popalign_beta2_lambda_loser1_learning_rate0.0001", "sft": "sft_learning_rate0.0004"}
    assert comparison.parse_chosen_settings("") == {}
    with pytest.raises(ValueError, match="unknown objective 'ppo'"):
        comparison.parse_chosen_settings("ppo=ppo_learning_rate0.0001")
    with pytest.raises(ValueError, match="is not a point of sft's grid"):
        comparison.parse_chosen_settings("sft=sft_learning_rate0.003")
    # A point bracketing could have added: a grid edge rate doubled (or halved) up to the cap's number of times.
    assert comparison.parse_chosen_settings("sft=sft_learning_rate0.0016", max_bracketing_runs=2) == {"sft": "sft_learning_rate0.0016"}
    with pytest.raises(ValueError, match=r"bracketing \(a rate of the grid's edge times or divided by 2 to 2\^2\)"):
        comparison.parse_chosen_settings("sft=sft_learning_rate0.0032", max_bracketing_runs=2)
    assert comparison.parse_chosen_settings("sft=sft_learning_rate0.0032") == {"sft": "sft_learning_rate0.0032"}
    with pytest.raises(ValueError, match="is not a point of dpo's grid"):  # DPO has no loser-weight knob
        comparison.parse_chosen_settings("dpo=dpo_beta2_lambda_loser1_learning_rate0.0001")
    with pytest.raises(ValueError, match="sft given twice"):
        comparison.parse_chosen_settings("sft=sft_learning_rate0.0004,sft=sft_learning_rate0.0001")


def test_the_script_refuses_an_unknown_objective(capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("compare_objectives", Path(__file__).resolve().parent.parent / "scripts" / "compare_objectives.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--objectives", "popalign,ppo"]) == 2
    assert "--objectives: unknown ppo (known: popalign, popalign_per_pair, dpo, sft)" in capsys.readouterr().err
    assert script.main(["--seeds", "0,1,2"]) == 2
    assert "--seeds: give at least 5 distinct seeds (got 3)" in capsys.readouterr().err
    assert script.main(["--objectives", "popalign,dpo", "--chosen_settings", "sft=sft_learning_rate0.0004"]) == 2
    assert "--chosen_settings: sft not in --objectives" in capsys.readouterr().err
    assert script.main(["--chosen_settings", "popalign=popalign_learning_rate0.0001"]) == 2
    assert "--chosen_settings 'popalign=popalign_learning_rate0.0001': 'popalign_learning_rate0.0001' is not a point" in capsys.readouterr().err
    assert script.recorded_command(["--seeds", "0,1,2,3,4"], 6) == ("python scripts/compare_objectives.py --seeds 0,1,2,3,4 "
                                                                      "--max_bracketing_runs 6")
    assert script.recorded_command(["--max_bracketing_runs=2"], 2) == "python scripts/compare_objectives.py --max_bracketing_runs=2"
    assert script.main(["--max_bracketing_runs", "-1"]) == 2
    assert "--max_bracketing_runs -1: must be 0 or more" in capsys.readouterr().err
    assert script.main(["--objectives", "popalign,sft", "--max_bracketing_runs", "1", "--chosen_settings", "sft=sft_learning_rate0.0016"]) == 2
    assert "nor of its bracketing (a rate of the grid's edge times or divided by 2 to 2^1)" in capsys.readouterr().err


def load_script(name: str):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_generalization_study_takes_nested_subsets_of_the_pool_and_refuses_bad_sizes(tmp_path, capsys):
    import pandas as pd

    script = load_script("generalization")
    pool = ["doctor", "engineer", "nurse", "teacher"]
    order = script.training_order(pool, seed=3)
    assert sorted(order) == pool and order == script.training_order(pool, seed=3)  # a permutation, fixed by the seed
    (tmp_path / "images").mkdir()
    pd.DataFrame({"winner_path": ["images/a.png", "images/b.png"], "loser_path": ["images/c.png", "/abs/d.png"],
                  "caption": ["a photo of a doctor", "a photo of a nurse"]}).to_csv(tmp_path / "pairs.csv", index=False)
    assert script.subset_pairs(tmp_path / "pairs.csv", {"a photo of a nurse"}, tmp_path / "subset.csv") == 1
    subset = pd.read_csv(tmp_path / "subset.csv")
    assert list(subset["winner_path"]) == [str((tmp_path / "images" / "b.png").resolve())] and list(subset["loser_path"]) == ["/abs/d.png"]
    assert script.main(["--pairs_file", str(tmp_path / "pairs.csv"), "--sizes", "1,5", "--output_dir", str(tmp_path / "out")]) == 2
    assert "--sizes: the training pool has 4 occupations" in capsys.readouterr().err
    assert script.main(["--pairs_file", str(tmp_path / "pairs.csv"), "--methods", "ppo"]) == 2
    assert not (tmp_path / "out").exists()


def test_the_generalization_study_leaves_out_a_prompt_of_which_a_model_drew_no_clean_figure():
    import math

    import numpy as np

    script = load_script("generalization")
    nan = float("nan")

    def measurement(gender, race):
        return {"neutral": [{"gender_discrepancy": g, "race_discrepancy": r} for g, r in zip(gender, race)]}

    base = measurement([0.7, 0.6, 0.5], [0.8, 0.8, 0.7])
    seeds = [measurement([0.1, nan, nan], [0.2, 0.4, nan]), measurement([0.3, 0.5, nan], [0.4, 0.6, nan])]
    tuned, base_values = script.paired_prompt_values(base, seeds, "gender")
    # prompt 1: the mean of the seed that drew it; prompt 2: no seed drew it, so it leaves the row (and the base's value too)
    assert np.allclose(tuned, [0.2, 0.5]) and np.allclose(base_values, [0.7, 0.6])
    tuned, base_values = script.paired_prompt_values(base, seeds, "race")
    assert np.allclose(tuned, [0.3, 0.5]) and np.allclose(base_values, [0.8, 0.8])
    # a base without a clean figure on a prompt leaves it out too
    tuned, base_values = script.paired_prompt_values(measurement([0.7, 0.6, 0.5], [nan, 0.8, 0.7]), seeds[:1], "race")
    assert np.allclose(tuned, [0.4]) and np.allclose(base_values, [0.8])
    assert script.fewer_prompts({"gender_prompts": 11}, "gender", 12) == "; 11 of 12 prompts"
    assert script.fewer_prompts({"gender_prompts": 12}, "gender", 12) == ""
    assert not any(math.isnan(value) for value in tuned)


def test_the_generalization_study_tests_methods_against_the_first_at_each_size_they_share():
    """Only a size measured with two or more methods gets between-method tests, each against the first of --methods
    measured there; 12 prompts where SFT reads 0.1 lower on gender everywhere: exact p 2/4096, Holm over that size's
    4 superiority tests of a unit; race within the declared margin is shown equivalent."""
    script = load_script("generalization")
    runs = {("popalign_unet", 2): held_out_measurements(0.0, 0.0, 3, prompts=12, seed=0),
            ("popalign_unet", 20): held_out_measurements(0.0, 0.0, 3, prompts=12, seed=1),
            ("sft", 20): held_out_measurements(-0.1, 0.0, 3, prompts=12, seed=2),
            ("popalign_text_encoder", 20): held_out_measurements(0.15, 0.2, 3, prompts=12, seed=3)}
    rows = script.method_tests(runs, ["popalign_unet", "popalign_text_encoder", "sft"], BOUNDS)
    assert {row["size"] for row in rows} == {20} and {row["reference"] for row in rows} == {"popalign_unet"}
    assert len(rows) == 2 * 2 * 2  # 2 methods x 2 axes x 2 units
    by_key = {(row["objective"], row["metric"], row["unit"]): row for row in rows}
    sft_gender = by_key["sft", "gender_discrepancy", "prompt"]
    assert sft_gender["difference"] == pytest.approx(-0.1, abs=0.01) and sft_gender["num_pairs"] == 12
    assert sft_gender["p_value"] == pytest.approx(2 / 4096) and sft_gender["p_value_holm"] == pytest.approx(4 * 2 / 4096)
    assert sft_gender["verdict"] == "better"
    assert by_key["sft", "race_discrepancy", "prompt"]["equivalence"] == "equivalent within +-0.05"
    assert by_key["popalign_text_encoder", "race_discrepancy", "prompt"]["verdict"] == "worse"
    assert by_key["sft", "gender_discrepancy", "prompt x seed"]["num_pairs"] == 36
    table = comparison.tests_table(rows, leading=(("training occupations", "size"),), name_header="method")
    assert table.count("\n") == 1 + len(rows)
    sft_line = next(line for line in table.splitlines() if line.startswith("| 20 | sft | popalign_unet | gender | prompt | 12 | "))
    assert "| better |" in sft_line and "(0.00195)" in sft_line
    # the reference is the first of --methods measured at that size, whatever order the runs came in
    assert {row["reference"] for row in script.method_tests(runs, ["sft", "popalign_unet"], BOUNDS)} == {"sft"}
    assert script.method_tests({key: value for key, value in runs.items() if key[0] == "popalign_unet"}, ["popalign_unet"], BOUNDS) == []
    # a size without the first method: the next one measured there is the reference, and the table says so
    without_first = {key: value for key, value in runs.items() if key != ("popalign_unet", 20)}
    rows = script.method_tests(without_first, ["popalign_unet", "popalign_text_encoder", "sft"], BOUNDS)
    assert {(row["reference"], row["objective"]) for row in rows} == {("popalign_text_encoder", "sft")}


def test_each_generalization_variant_changes_one_setting_of_popalign_unet_and_its_own_setting_wins(tmp_path):
    import argparse
    import json

    script = load_script("generalization")
    reference = script.METHODS["popalign_unet"]
    for name, change in script.VARIANTS.items():
        assert name not in script.MAIN_METHODS and len(change) == 1
        differing = {key for key in set(script.METHODS[name]) | set(reference) if script.METHODS[name].get(key) != reference.get(key)}
        assert differing == set(change), name
    args = argparse.Namespace(pretrained_model="models/toy_base", max_train_steps=300, train_batch_size=32, num_processes=2,
                              validation_steps=100, num_validation_images=24, num_validation_identity_images=2, attributes="a.json",
                              steps=20, guidance=3.0, occupations="o.csv")
    environment = {method: script.training_environment(tmp_path / "run", method, tmp_path / "pairs.csv", tmp_path / "v.csv", 1, args)
                   for method in ("popalign_unet", "popalign_unet_600_steps", "popalign_unet_no_caption_dropout", "sft", "sft_600_steps",
                                  "popalign_unet_1200_steps")}
    assert environment["popalign_unet"]["MAX_TRAIN_STEPS"] == "300" and environment["popalign_unet_600_steps"]["MAX_TRAIN_STEPS"] == "600"
    # the longer trainings differ from their method in their length alone, and that length reaches the environment
    for longer, method, steps in (("sft_600_steps", "sft", "600"), ("popalign_unet_1200_steps", "popalign_unet", "1200")):
        keys = set(environment[longer]) | set(environment[method])
        assert {key for key in keys if environment[longer].get(key) != environment[method].get(key)} == {"MAX_TRAIN_STEPS"}, longer
        assert environment[longer]["MAX_TRAIN_STEPS"] == steps and environment[longer]["LOSS"] == environment[method]["LOSS"]
    assert environment["popalign_unet"]["CAPTION_DROPOUT"] == "0.2" and environment["popalign_unet_no_caption_dropout"]["CAPTION_DROPOUT"] == "0"
    # the selection's score of the measured weights: the best step's validation (mean over axes), the last one's otherwise
    records = [{"step": 0, "discrepancy_gender": 0.7, "discrepancy_race": 0.8, "discrepancy_gender_low": 0.1},
               {"step": 100, "discrepancy_gender": 0.3, "discrepancy_race": 0.5, "discrepancy_race_floor": 0.1}]
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert script.validation_score(tmp_path, 100) == pytest.approx(0.4)
    assert script.validation_score(tmp_path, 0) == pytest.approx(0.75)
    assert math.isnan(script.validation_score(tmp_path, 200))


TRAIN_CALLS = {
    "generalization": "script.training_environment = lambda *arguments: dict(os.environ)\n"
                      "script.train(Path(RUN), 'popalign_unet', None, None, 0, None)\n",
    "compare_objectives": "import argparse\n"
                          "script.train(Path(RUN), script.comparison.OBJECTIVES[0], script.comparison.OBJECTIVES[0].grid[0], 0, "
                          "argparse.Namespace(num_processes=2, pairs_file='p.csv', pretrained_model='m', max_train_steps=1))\n",
}


@pytest.mark.parametrize("study_script", sorted(TRAIN_CALLS))
@pytest.mark.parametrize("stop", ["SIGINT", "SIGHUP"])
def test_an_interrupted_study_stops_its_training_processes(tmp_path, stop, study_script):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    # a stand-in for 4_train.sh (the study's subprocess boundary) whose child would outlive an interrupted study
    (tmp_path / "4_train.sh").write_text(f"sleep 120 &\necho $! > {tmp_path / 'child.pid'}\nwait\n")
    script_path = Path(__file__).resolve().parent.parent / "scripts" / f"{study_script}.py"
    code = (f"import importlib.util, os, signal, sys\nfrom pathlib import Path\n"
            f"signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # even where the test runner ignores SIGINT
            f"spec = importlib.util.spec_from_file_location({study_script!r}, {str(script_path)!r})\n"
            f"script = importlib.util.module_from_spec(spec); spec.loader.exec_module(script)\n"
            f"script.REPO_ROOT = Path({str(tmp_path)!r})\n"
            f"RUN = {str(tmp_path / 'run')!r}\n" + TRAIN_CALLS[study_script])
    study = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    pid_file = tmp_path / "child.pid"
    child = None

    def running(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            return False
        return state != "Z"

    try:
        deadline = time.time() + 60
        while not (pid_file.is_file() and pid_file.read_text().strip()) and time.time() < deadline:
            time.sleep(0.1)
        child = int(pid_file.read_text())
        study.send_signal(getattr(signal, stop))
        _, stderr = study.communicate(timeout=30)
        assert study.returncode != 0 and (b"KeyboardInterrupt" in stderr or b"Terminated" in stderr)  # raised, not killed
        deadline = time.time() + 10
        while running(child) and time.time() < deadline:
            time.sleep(0.1)
        assert not running(child), "the training process outlived the interrupted study"
    finally:
        if study.poll() is None:
            study.kill()
        if child is not None and running(child):
            os.kill(child, signal.SIGKILL)


def test_a_cached_toy_measurement_is_reused_only_for_the_same_model_weights_and_prompts(tmp_path):
    import argparse
    import json

    import pandas as pd

    args = argparse.Namespace(images_per_neutral_prompt=100, images_per_identity_prompt=10, steps=20, guidance=3.0, measure_seed=1,
                              pretrained_model="models/toy_base_36")
    prompts = pd.DataFrame({"prompt": ["a photo of a doctor", "a photo of a nurse"]})

    def settings(study: str, step: int = 200, model: str = "models/toy_base_36", prompt_list=None):
        run = tmp_path / study / "runs" / "popalign_unet_size20_seed0"
        weights = {"unet_path": str(run / f"checkpoint-{step}" / "unet")}
        return comparison.measurement_settings(weights, pd.DataFrame({"prompt": prompt_list}) if prompt_list else prompts, "heldout",
                                               argparse.Namespace(**{**vars(args), "pretrained_model": model}), run / "measure_heldout.json")

    reference = settings("study")
    assert settings("copy_of_study") == reference  # a run folder copied with its cache keeps it
    assert settings("study", prompt_list=["a photo of a nurse", "a photo of a doctor"]) == reference  # the same prompts
    assert settings("study", step=300) != reference
    assert settings("study", model="models/toy_base") != reference
    assert settings("study", prompt_list=["a photo of a doctor", "a photo of a pilot"]) != reference
    # a matching cache is returned as stored, without loading a model
    cache = tmp_path / "base_heldout.json"
    stored = {"measure_settings": comparison.measurement_settings({}, prompts, "heldout", args, cache), "identity_accuracy": 0.5}
    cache.write_text(json.dumps(stored))
    assert comparison.measure_cached({}, prompts, "heldout", args, None, cache) == stored
