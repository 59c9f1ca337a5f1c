"""Property tests (hypothesis) of the population metrics, the paired test and the pairing algorithm: invariance to
the order of the labels and to renaming them, invariance to duplicating the whole population, bounds, and
determinism for a seed."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from popalign.evaluate.metrics import (bootstrap_mean_ci, discrepancy, discrepancy_floor, kl_to_target, pairwise_gap, paired_test,
                              total_variation, unbiased_squared_discrepancy)
from popalign.preferences import build_populations, sample_preference_pairs

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)
CLASSES = ["a", "b", "c", "d"]


@st.composite
def populations(draw, min_size=1):
    """(classes, labels, a permutation of the labels' positions, a renaming of the classes)."""
    num_classes = draw(st.integers(2, len(CLASSES)))
    classes = CLASSES[:num_classes]
    labels = draw(st.lists(st.sampled_from(classes), min_size=min_size, max_size=40))
    order = draw(st.permutations(range(len(labels))))
    renaming = dict(zip(classes, draw(st.permutations(classes))))
    return classes, labels, order, renaming


DISTANCES = [discrepancy, total_variation, kl_to_target, pairwise_gap]


@PROPERTY_SETTINGS
@given(populations())
def test_distances_ignore_label_order_and_class_names_and_duplication(population):
    classes, labels, order, renaming = population
    for distance in DISTANCES:
        value = distance(labels, classes)
        assert math.isclose(distance([labels[index] for index in order], classes), value, abs_tol=1e-12)
        # renaming the classes with a bijection (a uniform target has no favourite class)
        assert math.isclose(distance([renaming[label] for label in labels], classes), value, abs_tol=1e-12)
        # the whole population twice: the same shares
        assert math.isclose(distance(labels + labels, classes), value, abs_tol=1e-12)


@PROPERTY_SETTINGS
@given(populations())
def test_distances_stay_in_their_ranges(population):
    classes, labels, _, _ = population
    k = len(classes)
    assert -1e-12 <= discrepancy(labels, classes) <= math.sqrt(1 - 1 / k) + 1e-12
    assert -1e-12 <= total_variation(labels, classes) <= 1 - 1 / k + 1e-12
    assert -1e-12 <= kl_to_target(labels, classes) <= math.log(k) + 1e-12
    assert -1e-12 <= pairwise_gap(labels, classes) <= 2 / k + 1e-12


@PROPERTY_SETTINGS
@given(populations(min_size=2))
def test_the_unbiased_squared_discrepancy_ignores_order_and_names_and_stays_in_range(population):
    classes, labels, order, renaming = population
    value = unbiased_squared_discrepancy(labels, classes)
    assert math.isclose(unbiased_squared_discrepancy([labels[index] for index in order], classes), value, abs_tol=1e-12)
    assert math.isclose(unbiased_squared_discrepancy([renaming[label] for label in labels], classes), value, abs_tol=1e-12)
    # sum_k n_k (n_k - 1) / (n (n - 1)) lies in [0, 1], so the estimate lies in [-1/K, 1 - 1/K]
    k = len(classes)
    assert -1 / k - 1e-12 <= value <= 1 - 1 / k + 1e-12
    # it never exceeds the plug-in squared discrepancy (their difference is (1 - sum p_hat^2) / (n - 1) >= 0)
    assert value <= discrepancy(labels, classes) ** 2 + 1e-12


@PROPERTY_SETTINGS
@given(st.integers(1, 200), st.integers(2, 4))
def test_the_floor_is_positive_and_shrinks_with_more_images(num_images, num_classes):
    classes = CLASSES[:num_classes]
    floor = discrepancy_floor(num_images, classes)
    assert 0 < floor <= math.sqrt(1 - 1 / num_classes) + 1e-12
    assert discrepancy_floor(4 * num_images, classes) < floor


prompt_values = st.lists(st.floats(-1, 1, allow_nan=False, allow_infinity=False), min_size=2, max_size=12)


@PROPERTY_SETTINGS
@given(prompt_values, st.integers(0, 2**31))
def test_the_interval_is_deterministic_for_a_seed_and_holds_the_mean(values, seed):
    first = bootstrap_mean_ci(values, num_resamples=200, seed=seed)
    assert first == bootstrap_mean_ci(values, num_resamples=200, seed=seed)
    mean, low, high = first
    assert math.isclose(mean, float(np.mean(values)), abs_tol=1e-12)
    assert low <= mean + 1e-12 and mean - 1e-12 <= high


@st.composite
def paired_values(draw):
    base = draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=10))
    tuned = draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=len(base), max_size=len(base)))
    order = draw(st.permutations(range(len(base))))
    return base, tuned, order


@PROPERTY_SETTINGS
@given(paired_values(), st.integers(0, 2**31))
def test_the_exact_paired_test_ignores_prompt_order_and_sides_and_respects_its_floor(values, seed):
    base, tuned, order = values
    result = paired_test(base, tuned, seed=seed)
    assert 0 < result.p_value <= 1
    assert result.p_value >= result.min_p_value - 1e-12
    assert paired_test(base, tuned, seed=seed) == result
    reordered = paired_test([base[index] for index in order], [tuned[index] for index in order], seed=seed)
    assert math.isclose(reordered.p_value, result.p_value, abs_tol=1e-12)
    swapped = paired_test(tuned, base, seed=seed)
    assert math.isclose(swapped.p_value, result.p_value, abs_tol=1e-12)
    # the whole set of prompts twice: the same mean change
    twice = paired_test(base + base, tuned + tuned, seed=seed)
    assert math.isclose(twice.mean_difference, result.mean_difference, abs_tol=1e-9)


# ----- the pairing algorithm -------------------------------------------------------------------------------------------

GENDERS, RACES = ["male", "female"], ["white", "asian", "black"]


@st.composite
def image_records(draw):
    """Image records of 1-3 neutral prompts, each with identity-prompted and neutral images, in a random order."""
    rows = []
    for prompt_index in range(draw(st.integers(1, 3))):
        neutral = f"a photo of a worker {prompt_index}"
        for kind, count in (("identity", draw(st.integers(1, 8))), ("neutral", draw(st.integers(1, 8)))):
            for image_index in range(count):
                gender, race = draw(st.sampled_from(GENDERS)), draw(st.sampled_from(RACES))
                prompted = (gender, race) if kind == "identity" else ("", "")
                prompt = neutral if kind == "neutral" else f"{neutral} ({race} {gender})"
                rows.append({"path": f"/images/{prompt_index}/{kind}/{image_index:03d}.png", "kind": kind, "prompt": prompt,
                             "neutral_prompt": neutral, "face_detected": True, "gender": gender, "race": race,
                             "prompted_gender": prompted[0], "prompted_race": prompted[1]})
    order = draw(st.permutations(range(len(rows))))
    return pd.DataFrame(rows), list(order)


def pairs_of(records: pd.DataFrame, seed: int, **options) -> pd.DataFrame:
    return sample_preference_pairs(build_populations(records, ["gender", "race"]), num_iterations=15, population_size=3,
                                   seed=seed, **options)


@PROPERTY_SETTINGS
@given(image_records(), st.integers(0, 2**31), st.sampled_from(["per_identity_prompt", "per_image"]))
def test_pairs_are_deterministic_for_a_seed_and_ignore_the_order_of_the_images(records_and_order, seed, diverse_draw):
    records, order = records_and_order
    pairs = pairs_of(records, seed, diverse_draw=diverse_draw)
    pd.testing.assert_frame_equal(pairs, pairs_of(records, seed, diverse_draw=diverse_draw))
    shuffled = records.iloc[order].reset_index(drop=True)
    pd.testing.assert_frame_equal(pairs_of(shuffled, seed, diverse_draw=diverse_draw), pairs)


@PROPERTY_SETTINGS
@given(image_records(), st.integers(0, 2**31), st.permutations(GENDERS), st.permutations(RACES))
def test_renaming_the_labels_changes_no_pair(records_and_order, seed, genders, races):
    records, _ = records_and_order
    renamed = records.copy()
    gender_names, race_names = dict(zip(GENDERS, genders)), dict(zip(RACES, races))
    for column, names in (("gender", gender_names), ("prompted_gender", gender_names), ("race", race_names), ("prompted_race", race_names)):
        renamed[column] = renamed[column].map(lambda label: names.get(label, label))
    pd.testing.assert_frame_equal(pairs_of(renamed, seed), pairs_of(records, seed))


@PROPERTY_SETTINGS
@given(image_records(), st.integers(0, 2**31))
def test_every_pair_follows_the_swap_rule_within_its_bounds(records_and_order, seed):
    records, _ = records_and_order
    pairs = pairs_of(records, seed)
    assert len(pairs) == 15 * 3
    for column, top in (("diverse_distinct_genders", 2), ("diverse_distinct_races", 3), ("base_distinct_genders", 2), ("base_distinct_races", 3)):
        assert pairs[column].between(1, top).all()
    base_wins = (pairs["diverse_distinct_races"] < pairs["base_distinct_races"]) & (pairs["diverse_distinct_genders"] < pairs["base_distinct_genders"])
    assert (pairs["winner_side"] == np.where(base_wins, "base", "diverse")).all()
    kinds = records.set_index("path")["kind"]
    winner_kinds = pairs["winner_path"].map(kinds)
    assert (winner_kinds == np.where(pairs["winner_side"] == "diverse", "identity", "neutral")).all()
