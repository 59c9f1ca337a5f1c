"""The objective comparison's protocol: equal budgets, the declared selection rule, the table over seeds."""

import math

import pytest

from popalign.toy import comparison

BASE = {"neutral_gender_discrepancy": 0.7, "neutral_race_discrepancy": 0.8, "identity_accuracy": 0.98,
        "neutral_toy_quality": 0.96}


def measurement(gender, race, identity=0.98, quality=0.96):
    return {"neutral_gender_discrepancy": gender, "neutral_race_discrepancy": race, "identity_accuracy": identity,
            "neutral_toy_quality": quality}


def test_every_objective_gets_the_same_budget_and_distinct_run_names():
    sizes = {objective.name: len(objective.grid) for objective in comparison.OBJECTIVES}
    assert set(sizes) == {"popalign", "popalign_per_pair", "dpo", "sft"} and len(set(sizes.values())) == 1
    names = [comparison.run_name(objective, point) for objective in comparison.OBJECTIVES for point in objective.grid]
    assert len(names) == len(set(names))
    assert comparison.run_name(comparison.OBJECTIVES[0], {"beta": 0.5, "learning_rate": 2e-4}) == \
        "popalign_beta0.5_learning_rate0.0002"
    anchors = {objective.name: objective.fixed.get("popalign_anchor") for objective in comparison.OBJECTIVES}
    assert anchors["popalign"] == "pooled" and anchors["popalign_per_pair"] == "per_pair"


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
    summary = comparison.seed_summary(held_out["popalign"])
    mean, low, high = summary["neutral_gender_discrepancy"]
    assert mean == pytest.approx(0.12)
    # At least the t-interval: sd 0.02, t_{2, 0.975} = 4.3027.
    assert low <= 0.12 - 4.3027 * 0.02 / math.sqrt(3) + 1e-5 and high >= 0.12 + 4.3027 * 0.02 / math.sqrt(3) - 1e-5
    table = comparison.comparison_table(BASE, {"popalign": "popalign_beta0.5_learning_rate0.0002"}, held_out,
                                        {"popalign": False})
    lines = table.splitlines()
    assert lines[2].startswith("| base | - | - | 0.700 | 0.800 | 98.0% | 0.960 |")
    assert lines[3].startswith("| popalign | popalign_beta0.5_learning_rate0.0002 (no run met the constraints) | 3 | 0.120 [")


def test_the_script_refuses_an_unknown_objective(capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("compare_objectives", Path(__file__).resolve().parent.parent / "scripts" / "compare_objectives.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--objectives", "popalign,ppo"]) == 2
    assert "--objectives: unknown ppo (known: popalign, popalign_per_pair, dpo, sft)" in capsys.readouterr().err


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
