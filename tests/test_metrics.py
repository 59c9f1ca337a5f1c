import math
import random

import numpy as np
import pytest

from popalign.evaluate import metrics

GENDERS = ["male", "female"]
RACES = ["white", "asian", "black", "latino hispanic", "indian", "middle eastern"]


# Independent slow implementations, written from the definitions with plain Python loops.
def slow_distribution(labels, classes):
    kept = [label for label in labels if label not in (None, "")]
    return [sum(1 for label in kept if label == name) / len(kept) for name in classes]


def slow_discrepancy(labels, classes, target=None):
    p = slow_distribution(labels, classes)
    t = target or [1 / len(classes)] * len(classes)
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(p, t)))


def slow_total_variation(labels, classes, target=None):
    p = slow_distribution(labels, classes)
    t = target or [1 / len(classes)] * len(classes)
    return sum(abs(a - b) for a, b in zip(p, t)) / 2


def slow_kl(labels, classes, target=None):
    p = slow_distribution(labels, classes)
    t = target or [1 / len(classes)] * len(classes)
    return sum(a * math.log(a / b) for a, b in zip(p, t) if a > 0)


def random_labels(rng, classes, size, missing_rate=0.2):
    return [None if rng.random() < missing_rate else rng.choice(classes) for _ in range(size)]


def test_hand_computed_gender_values():
    labels = ["male", "male", "female", None]
    # p_hat = (2/3, 1/3); uniform (1/2, 1/2); difference (1/6, -1/6).
    assert metrics.discrepancy(labels, GENDERS) == pytest.approx(math.sqrt(2) / 6)
    assert metrics.total_variation(labels, GENDERS) == pytest.approx(1 / 6)
    expected_kl = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    assert metrics.kl_to_target(labels, GENDERS) == pytest.approx(expected_kl)
    assert metrics.empirical_distribution(labels, GENDERS) == pytest.approx([2 / 3, 1 / 3])


def test_fixed_class_list_one_observed_class_is_maximal_not_zero():
    labels = ["white"] * 5
    assert metrics.discrepancy(labels, RACES) == pytest.approx(math.sqrt(1 - 1 / 6))
    assert metrics.total_variation(labels, RACES) == pytest.approx(5 / 6)
    # The unobserved classes contribute 0 to KL (0 log 0 = 0); the maximum is log K.
    assert metrics.kl_to_target(labels, RACES) == pytest.approx(math.log(6))
    assert metrics.discrepancy(["male"] * 3, GENDERS) == pytest.approx(math.sqrt(0.5))


def test_balanced_population_is_zero():
    labels = RACES * 4 + ["", None]
    assert metrics.discrepancy(labels, RACES) == pytest.approx(0.0)
    assert metrics.total_variation(labels, RACES) == pytest.approx(0.0)
    assert metrics.kl_to_target(labels, RACES) == pytest.approx(0.0)


def test_missing_entries_ignored_and_all_missing_is_nan():
    assert metrics.discrepancy(["male", "", None, float("nan"), "female"], GENDERS) == pytest.approx(0.0)
    assert math.isnan(metrics.discrepancy([None, ""], GENDERS))
    assert math.isnan(metrics.total_variation([], GENDERS))
    assert math.isnan(metrics.kl_to_target([None], GENDERS))


@pytest.mark.parametrize("function", [metrics.discrepancy, metrics.total_variation, metrics.kl_to_target,
                                      metrics.empirical_distribution])
def test_label_outside_classes_raises(function):
    with pytest.raises(ValueError, match="Man"):
        function(["male", "Man"], GENDERS)
    with pytest.raises(ValueError):
        function(["hispanic"], RACES)


def test_against_independent_implementation_on_random_labels():
    rng = random.Random(123)
    for trial in range(50):
        classes = RACES if trial % 2 else GENDERS
        labels = random_labels(rng, classes, rng.randint(1, 60))
        if all(label is None for label in labels):
            labels.append(classes[0])
        assert metrics.discrepancy(labels, classes) == pytest.approx(slow_discrepancy(labels, classes))
        assert metrics.total_variation(labels, classes) == pytest.approx(slow_total_variation(labels, classes))
        assert metrics.kl_to_target(labels, classes) == pytest.approx(slow_kl(labels, classes))


def test_non_uniform_target_matches_independent_implementation():
    rng = random.Random(7)
    target = [0.6, 0.4]
    labels = random_labels(rng, GENDERS, 40)
    assert metrics.discrepancy(labels, GENDERS, target) == pytest.approx(slow_discrepancy(labels, GENDERS, target))
    assert metrics.total_variation(labels, GENDERS, {"male": 0.6, "female": 0.4}) == pytest.approx(
        slow_total_variation(labels, GENDERS, target))
    assert metrics.kl_to_target(labels, GENDERS, target) == pytest.approx(slow_kl(labels, GENDERS, target))
    # A population that exactly follows the target scores 0.
    assert metrics.discrepancy(["male"] * 3 + ["female"] * 2, GENDERS, target) == pytest.approx(0.0)
    # An observed class with target probability 0 has infinite KL.
    assert metrics.kl_to_target(["male", "female"], GENDERS, [1.0, 0.0]) == math.inf


@pytest.mark.parametrize("target", [[0.5, 0.6], [1.2, -0.2], [0.5], {"Man": 1.0}])
def test_invalid_target_raises(target):
    with pytest.raises(ValueError):
        metrics.discrepancy(["male"], GENDERS, target)


def test_intersectional_metrics_over_product_classes():
    classes = metrics.product_classes(RACES, GENDERS)
    assert len(classes) == 12 and classes[:2] == ["white|male", "white|female"]
    races = ["white", "white", "asian", None, "black"]
    genders = ["male", "female", "male", "male", None]
    joint = metrics.joint_labels(races, genders)
    assert joint == ["white|male", "white|female", "asian|male", None, None]
    # Three images with both labels, each in its own joint class of 12.
    expected = math.sqrt(3 * (1 / 3 - 1 / 12) ** 2 + 9 * (1 / 12) ** 2)
    assert metrics.intersectional_discrepancy(races, genders, RACES, GENDERS) == pytest.approx(expected)
    assert metrics.intersectional_total_variation(races, genders, RACES, GENDERS) == pytest.approx(
        slow_total_variation(joint, classes))
    assert metrics.intersectional_kl_to_target(races, genders, RACES, GENDERS) == pytest.approx(slow_kl(joint, classes))


def test_intersectional_against_independent_implementation():
    rng = random.Random(5)
    races = random_labels(rng, RACES, 200)
    genders = random_labels(rng, GENDERS, 200)
    joint = [f"{r}|{g}" if r and g else None for r, g in zip(races, genders)]
    classes = [f"{r}|{g}" for r in RACES for g in GENDERS]
    assert metrics.intersectional_discrepancy(races, genders, RACES, GENDERS) == pytest.approx(
        slow_discrepancy(joint, classes))


def test_face_detection_rate():
    assert metrics.face_detection_rate([1, 0, 1, 1]) == pytest.approx(0.75)
    assert metrics.face_detection_rate(["1", "0"]) == pytest.approx(0.5)
    assert metrics.face_detection_rate([True, True]) == 1.0
    assert math.isnan(metrics.face_detection_rate([]))
    with pytest.raises(ValueError):
        metrics.face_detection_rate(["yes"])


def test_attribute_accuracy_is_exact_match_never_substring():
    # 'male' is a substring of 'female': a substring test would count these as correct.
    assert metrics.attribute_accuracy(["female", "female"], ["male", "male"]) == 0.0
    assert metrics.attribute_accuracy(["male", "female", None, ""], ["male", "male", "male", "male"]) == 0.5
    assert math.isnan(metrics.attribute_accuracy([None], ["female"]))
    with pytest.raises(ValueError):
        metrics.attribute_accuracy(["Man"], ["male"], classes=GENDERS)
    with pytest.raises(ValueError):
        metrics.attribute_accuracy(["male"], [""])


def test_bootstrap_interval_covers_mean_and_narrows_with_more_prompts():
    rng = np.random.default_rng(0)
    population = rng.normal(0.3, 0.1, size=400)
    mean_small, low_small, high_small = metrics.bootstrap_mean_ci(population[:20], num_resamples=2000)
    mean_large, low_large, high_large = metrics.bootstrap_mean_ci(population, num_resamples=2000)
    assert low_small <= mean_small <= high_small
    assert low_large <= mean_large <= high_large
    assert mean_large == pytest.approx(population.mean())
    assert (high_large - low_large) < 0.5 * (high_small - low_small)
    # Independent check: for many prompts the percentile interval is close to mean +- 1.96 * sd / sqrt(n).
    half_width = 1.96 * population.std(ddof=1) / math.sqrt(len(population))
    assert (high_large - low_large) / 2 == pytest.approx(half_width, rel=0.1)
    # The same seed gives the same interval; a wider confidence gives a wider one.
    assert metrics.bootstrap_mean_ci(population, num_resamples=2000) == (mean_large, low_large, high_large)
    _, low_99, high_99 = metrics.bootstrap_mean_ci(population, num_resamples=2000, confidence=0.99)
    assert low_99 < low_large and high_99 > high_large


def test_bootstrap_edge_cases():
    assert all(math.isnan(value) for value in metrics.bootstrap_mean_ci([]))
    mean, low, high = metrics.bootstrap_mean_ci([0.25])
    assert mean == 0.25 and math.isnan(low) and math.isnan(high)  # one prompt has no spread
    assert metrics.bootstrap_mean_ci([0.4] * 5) == (0.4, 0.4, 0.4)
    # Ties (resamples of one repeated value) do not blow the interval up to infinity.
    mean, low, high = metrics.bootstrap_mean_ci([1.0, 1.0, 1.0, 0.9])
    assert math.isfinite(low) and math.isfinite(high) and low < mean < high
    with pytest.raises(ValueError):
        metrics.bootstrap_mean_ci([0.1, float("nan")])
    with pytest.raises(ValueError):
        metrics.bootstrap_mean_ci([0.1], confidence=1.5)


def test_bootstrap_interval_is_at_least_the_t_interval():
    values = np.array([0.2, 0.5, 0.35, 0.9, 0.41, 0.3])
    mean, low, high = metrics.bootstrap_mean_ci(values, num_resamples=3000)
    # t_{5, 0.975} = 2.5706 (tables)
    half_width = 2.5706 * values.std(ddof=1) / math.sqrt(len(values))
    assert low <= mean - half_width + 1e-4 and high >= mean + half_width - 1e-4


@pytest.mark.parametrize("num_prompts", [4, 12, 50])
@pytest.mark.parametrize("shape", ["normal", "exponential", "beta"])
def test_bootstrap_interval_covers_at_its_level_at_few_prompts(num_prompts, shape):
    """Simulated coverage of the 95% interval: >= 0.93 (a percentile bootstrap gave 0.81 at 4 prompts)."""
    rng = np.random.default_rng(num_prompts)
    draw, true_mean = {
        "normal": (lambda: rng.normal(0.3, 0.1, num_prompts), 0.3),
        "exponential": (lambda: rng.exponential(0.2, num_prompts), 0.2),  # skewness 2
        "beta": (lambda: rng.beta(2, 5, num_prompts), 2 / 7),
    }[shape]
    replications = 800
    covered = 0
    for replication in range(replications):
        _, low, high = metrics.bootstrap_mean_ci(draw(), num_resamples=800, seed=replication)
        covered += low <= true_mean <= high
    assert covered / replications >= 0.93


def slow_sign_flip_p_value(differences):
    """All 2^n sign patterns with itertools: share with |sum s_i d_i| >= |sum d_i|."""
    import itertools

    observed = abs(sum(differences))
    patterns = list(itertools.product([-1, 1], repeat=len(differences)))
    return sum(abs(sum(s * d for s, d in zip(signs, differences))) >= observed - 1e-12 for signs in patterns) / len(patterns)


def test_paired_test_exact_p_values_by_hand():
    # Four prompts that all improve: only the all-plus and all-minus patterns are as extreme: p = 2/16.
    result = metrics.paired_test([0.5, 0.6, 0.7, 0.8], [0.1, 0.2, 0.15, 0.3])
    assert result.exact and result.num_pairs == 4
    assert result.p_value == pytest.approx(2 / 16) and result.min_p_value == pytest.approx(2 / 16)
    assert result.mean_difference == pytest.approx(-0.4625)
    assert result.ci_low <= -0.4625 <= result.ci_high < 0
    # d = (1, 2, -3): |sum| = 0, every pattern is as extreme: p = 1.
    assert metrics.paired_test([0, 0, 0], [1, 2, -3]).p_value == pytest.approx(1.0)
    # d = (1, 2, 3): sums of the 8 patterns: +-6, +-4, +-2, +-0 -> |S| >= 6 for 2 of 8.
    assert metrics.paired_test([0, 0, 0], [1, 2, 3]).p_value == pytest.approx(2 / 8)
    # d = (1, 1, 1, -1): S = sum of four +-1 terms: -4, -2, 0, 2, 4 for 1, 4, 6, 4, 1 patterns; |S| >= 2 for 10.
    assert metrics.paired_test([0, 0, 0, 0], [1, 1, 1, -1]).p_value == pytest.approx(10 / 16)


@pytest.mark.parametrize("seed", range(5))
def test_paired_test_matches_slow_enumeration(seed):
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 11))
    base = rng.uniform(size=count)
    tuned = base + rng.normal(0.05, 0.1, size=count)
    assert metrics.paired_test(base, tuned).p_value == pytest.approx(slow_sign_flip_p_value(list(tuned - base)))


def test_paired_test_monte_carlo_beyond_the_exact_limit():
    rng = np.random.default_rng(4)
    differences = rng.normal(0.03, 0.1, size=14)
    base = rng.uniform(size=14)
    exact = metrics.paired_test(base, base + differences)
    sampled = metrics.paired_test(base, base + differences, num_resamples=40000, max_exact_pairs=10)
    assert exact.exact and not sampled.exact
    assert sampled.p_value == pytest.approx(exact.p_value, abs=0.01)
    many = metrics.paired_test(np.zeros(60), np.full(60, -0.1) + rng.normal(0, 0.02, 60), num_resamples=5000)
    assert not many.exact and many.p_value == pytest.approx(1 / 5001)


def test_paired_test_detects_a_consistent_shift_and_not_a_null_one():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.7, size=60)
    tuned = base - 0.1 + rng.normal(0, 0.02, size=60)
    result = metrics.paired_test(base, tuned, num_resamples=4000)
    assert result.ci_low <= result.mean_difference <= result.ci_high < 0 and result.p_value < 0.001
    noise = rng.normal(0, 0.05, size=80)
    null = metrics.paired_test(base[:1].repeat(80), base[:1].repeat(80) + noise - noise.mean(), num_resamples=4000)
    assert null.ci_low < 0 < null.ci_high and null.p_value > 0.9
    identical = metrics.paired_test(base, base)
    assert identical.mean_difference == 0 and identical.p_value == 1.0


def test_paired_test_is_valid_under_the_null():
    """Rejection rate at level 0.05 under H0 (symmetric differences) stays at or below 0.05 (+ simulation noise)."""
    rng = np.random.default_rng(7)
    rejections = sum(metrics.paired_test(np.zeros(8), rng.normal(0, 1, 8)).p_value <= 0.05 for _ in range(600))
    assert rejections / 600 <= 0.07


def test_paired_test_needs_matching_lengths():
    with pytest.raises(ValueError):
        metrics.paired_test([0.1, 0.2], [0.1])
    empty = metrics.paired_test([], [])
    assert empty.num_pairs == 0 and math.isnan(empty.p_value)


def test_paired_verdict():
    four = metrics.paired_test([0.5, 0.6, 0.7, 0.8], [0.1, 0.2, 0.15, 0.3])
    assert metrics.paired_verdict(four, "lower") == "too few prompts for a verdict (n=4: p cannot go below 0.125)"
    # 6 prompts, one of them unchanged (both models draw one identity only): 2 / 2^5, not 2 / 2^6
    six = metrics.paired_test([0.707, 0.6, 0.7, 0.8, 0.65, 0.7], [0.707, 0.2, 0.15, 0.3, 0.25, 0.3])
    assert six.min_p_value == pytest.approx(2 / 2 ** 5)
    assert metrics.paired_verdict(six, "lower") == "too few prompts for a verdict (n=6, 1 of them unchanged: p cannot go below 0.0625)"
    unchanged = metrics.paired_test([0.707, 0.707], [0.707, 0.707])
    assert metrics.paired_verdict(unchanged, "lower") == "no prompt changed (n=2)"
    # every prompt tied (identity accuracy 100% -> 100%): said so, not "too few prompts"
    assert metrics.paired_verdict(metrics.paired_test([1.0] * 34, [1.0] * 34), "higher") == "no prompt changed (n=34)"
    one_changed = metrics.paired_test([0.707, 0.707], [0.707, 0.5])
    assert metrics.paired_verdict(one_changed, "lower") == "too few prompts for a verdict (n=2, at most one of them changed: p cannot go below 1)"
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.8, 12)
    better = metrics.paired_test(base, base - 0.3 + rng.normal(0, 0.01, 12))
    assert better.p_value == pytest.approx(2 / 2 ** 12)
    assert metrics.paired_verdict(better, "lower") == "better"
    assert metrics.paired_verdict(better, "higher") == "worse"
    assert metrics.paired_verdict(better, "neither") == "lower"
    mixed = metrics.paired_test(base, base + rng.normal(0, 0.1, 12))
    assert metrics.paired_verdict(mixed, "lower") == "no clear change"
    assert metrics.paired_verdict(metrics.paired_test([], []), "lower") == "n/a"


# Sample size and classifier error


def test_unbiased_squared_discrepancy_by_hand():
    # n = 3, counts (2, 1), K = 2: sum n_k (n_k - 1) / (n (n - 1)) = 2 / 6; minus 1/K = 1/2 -> -1/6.
    assert metrics.unbiased_squared_discrepancy(["male", "male", "female"], GENDERS) == pytest.approx(-1 / 6)
    # One class only, n = 4: 12 / 12 - 1/2 = 0.5 = the true squared discrepancy of a one-class population.
    assert metrics.unbiased_squared_discrepancy(["male"] * 4, GENDERS) == pytest.approx(0.5)
    # A non-uniform target: counts (3, 1), t = (0.75, 0.25): 6/12 - 2 * (0.75 * 0.75 + 0.25 * 0.25) + 0.625.
    assert metrics.unbiased_squared_discrepancy(["male"] * 3 + ["female"], GENDERS, [0.75, 0.25]) == pytest.approx(
        0.5 - 2 * 0.625 + 0.625)
    assert math.isnan(metrics.unbiased_squared_discrepancy(["male", None], GENDERS))


@pytest.mark.parametrize("true_shares", [[0.5, 0.5], [0.8, 0.2], [0.4, 0.3, 0.2, 0.1, 0.0, 0.0]])
def test_unbiased_squared_discrepancy_is_unbiased(true_shares):
    classes = GENDERS if len(true_shares) == 2 else RACES
    rng = np.random.default_rng(0)
    truth = float(np.sum((np.array(true_shares) - 1 / len(classes)) ** 2))
    estimates, plug_in = [], []
    for _ in range(20000):
        labels = list(rng.choice(classes, size=20, p=true_shares))
        estimates.append(metrics.unbiased_squared_discrepancy(labels, classes))
        plug_in.append(metrics.discrepancy(labels, classes) ** 2)
    standard_error = np.std(estimates) / math.sqrt(len(estimates))
    assert abs(np.mean(estimates) - truth) < 4 * standard_error
    # The plug-in square is biased upwards by (1 - sum p^2) / n.
    assert np.mean(plug_in) - truth == pytest.approx((1 - np.sum(np.square(true_shares))) / 20, abs=4 * standard_error)


def test_discrepancy_floor_by_hand_and_by_simulation():
    # n = 2, gender: p_hat in {0, 1/2, 1} with probability 1/4, 1/2, 1/4; D = sqrt(2) * |p_hat - 1/2|.
    assert metrics.discrepancy_floor(2, GENDERS) == pytest.approx(0.5 * math.sqrt(2) * 0.5)
    assert metrics.discrepancy_floor(1, GENDERS) == pytest.approx(math.sqrt(0.5))
    assert math.isnan(metrics.discrepancy_floor(0, GENDERS))
    rng = np.random.default_rng(1)
    for classes, num_images in [(GENDERS, 100), (RACES[:3], 40), (RACES, 100)]:
        draws = [metrics.discrepancy(list(rng.choice(classes, size=num_images)), classes) for _ in range(6000)]
        standard_error = np.std(draws) / math.sqrt(len(draws))
        assert metrics.discrepancy_floor(num_images, classes) == pytest.approx(np.mean(draws), abs=4 * standard_error)
        # Below the root mean square (Jensen).
        assert metrics.discrepancy_floor(num_images, classes) < math.sqrt((1 - 1 / len(classes)) / num_images)
    with pytest.raises(ValueError):
        metrics.discrepancy_floor(-1, GENDERS)


def slow_pairwise_gap(labels, classes):
    p = slow_distribution(labels, classes)
    gaps = [abs(p[i] - p[j]) for i in range(len(p)) for j in range(i + 1, len(p))]
    return sum(gaps) / len(gaps)


def test_pairwise_gap_by_hand_and_against_slow():
    assert metrics.pairwise_gap(["male", "male", "male", "female"], GENDERS) == pytest.approx(0.5)
    assert metrics.pairwise_gap(["male"] * 3, GENDERS) == pytest.approx(1.0)
    # Shares (2/3, 1/3, 0): gaps 1/3, 2/3, 1/3 -> 4/9.
    assert metrics.pairwise_gap(["white", "white", "asian"], RACES[:3]) == pytest.approx(4 / 9)
    assert metrics.pairwise_gap(["white"], RACES) == pytest.approx(2 / 6)
    assert math.isnan(metrics.pairwise_gap([None], GENDERS))
    rng = random.Random(3)
    for _ in range(20):
        labels = random_labels(rng, RACES, 30, missing_rate=0.1)
        assert metrics.pairwise_gap(labels, RACES) == pytest.approx(slow_pairwise_gap(labels, RACES))
    with pytest.raises(ValueError):
        metrics.pairwise_gap(["male"], ["male"])


def test_confusion_counts_and_rates():
    counts = metrics.confusion_counts(["male", "male", "male", "female", "female"],
                                      ["male", "female", None, "female", "female"], GENDERS)
    assert counts.tolist() == [[1, 1], [0, 2]]
    assert metrics.confusion_rates(counts).tolist() == [[0.5, 0.5], [0.0, 1.0]]
    # A class never prompted keeps the identity row.
    assert metrics.confusion_rates([[3, 1], [0, 0]]).tolist() == [[0.75, 0.25], [0.0, 1.0]]
    with pytest.raises(ValueError):
        metrics.confusion_counts(["male"], ["Man"], GENDERS)
    with pytest.raises(ValueError):
        metrics.confusion_counts([None], ["male"], GENDERS)


def test_project_to_simplex():
    assert metrics.project_to_simplex([0.2, 0.3, 0.5]) == pytest.approx([0.2, 0.3, 0.5])
    assert metrics.project_to_simplex([2.0, 0.0, 0.0]) == pytest.approx([1.0, 0.0, 0.0])
    assert metrics.project_to_simplex([0.5, 0.6, -0.1]) == pytest.approx([0.45, 0.55, 0.0])
    # Against a brute-force search of the simplex on a grid.
    rng = np.random.default_rng(0)
    grid = np.array([(a, b, 1 - a - b) for a in np.linspace(0, 1, 201) for b in np.linspace(0, 1, 201) if a + b <= 1 + 1e-12])
    for _ in range(5):
        vector = rng.normal(0.3, 0.5, 3)
        nearest = grid[np.argmin(np.sum((grid - vector) ** 2, axis=1))]
        assert metrics.project_to_simplex(vector) == pytest.approx(nearest, abs=0.006)


def test_adjusted_shares_recover_known_shares_from_a_known_confusion():
    confusion = np.array([[0.8, 0.15, 0.05], [0.2, 0.7, 0.1], [0.05, 0.25, 0.7]])
    truth = np.array([0.6, 0.1, 0.3])
    observed = confusion.T @ truth
    assert metrics.adjusted_shares(observed, confusion) == pytest.approx(truth)
    assert metrics.adjusted_shares(observed, np.eye(3)) == pytest.approx(observed)
    assert metrics.adjusted_shares(np.array([observed, observed]), confusion) == pytest.approx(np.array([truth, truth]))


def slow_partial_corrected_shares(observed, confusion_counts):
    """partial_corrected_shares by another route: the named classes' conditional system solved by inversion
    (C_S is square and invertible in these tests), the nearest point of a fine simplex grid to that solution,
    scaled by the named classes' observed mass; the other classes as observed."""
    observed = np.asarray(observed, dtype=float)
    counts = np.asarray(confusion_counts, dtype=float)
    named = [index for index in range(len(counts)) if counts[index].sum() > 0]
    result = observed.copy()
    if len(named) < 2:
        return result
    block = counts[np.ix_(named, named)]
    rates = block / block.sum(axis=1, keepdims=True)
    mass = observed[named].sum()
    solution = np.linalg.inv(rates.T) @ (observed[named] / mass)
    steps = np.linspace(0, 1, 401)
    if len(named) == 2:
        grid = np.stack([steps, 1 - steps], axis=1)
    else:  # three named classes at most in these tests
        first, second = np.meshgrid(steps, steps, indexing="ij")
        keep = first + second <= 1 + 1e-12
        grid = np.stack([first[keep], second[keep], 1 - first[keep] - second[keep]], axis=1)
    result[named] = mass * grid[np.argmin(np.sum((grid - solution) ** 2, axis=1))]
    return result


def test_partial_corrected_shares_correct_only_the_named_classes():
    # Every class named: the plain adjusted shares.
    counts = np.array([[80, 20], [10, 90]])
    truth = np.array([0.3, 0.7])
    observed = metrics.confusion_rates(counts).T @ truth
    assert metrics.partial_corrected_shares(observed, counts) == pytest.approx(truth)
    # Six race labels, three named, a fair population read with symmetric 20% confusions among the named three:
    # the observed shares are uniform and so are the corrected ones (the unnamed labels keep 1/6 each).
    named = np.zeros((6, 6), dtype=int)
    named[:3, :3] = [[80, 10, 10], [10, 80, 10], [10, 10, 80]]
    assert metrics.partial_corrected_shares(np.full(6, 1 / 6), named) == pytest.approx(np.full(6, 1 / 6))
    # A named class read into an unnamed label, and an unnamed label keeping its observed share, by hand:
    # named (a, b) with C_S = [[.8, .2], [.25, .75]] after dropping a's reads into c; observed (.5, .3, .2):
    # mass .8, conditional (.625, .375) -> p_S solves C_S^T p = q: p_a = (.625 - .25) / (.8 - .25) = .6818...
    counts = np.array([[40, 10, 5], [10, 30, 0], [0, 0, 0]])
    corrected = metrics.partial_corrected_shares([0.5, 0.3, 0.2], counts)
    assert corrected[2] == pytest.approx(0.2)
    assert corrected[0] == pytest.approx(0.8 * (0.625 - 0.25) / (0.8 - 0.25))
    assert corrected.sum() == pytest.approx(1.0)
    # One named class: nothing to correct among.
    assert metrics.partial_corrected_shares([0.6, 0.4], [[5, 5], [0, 0]]) == pytest.approx([0.6, 0.4])
    # Against the brute-force version on random inputs (the projection included).
    rng = np.random.default_rng(4)
    for _ in range(6):
        counts = rng.integers(1, 30, size=(4, 4))
        counts[3] = 0
        observed = rng.dirichlet(np.ones(4))
        assert metrics.partial_corrected_shares(observed, counts) == pytest.approx(
            slow_partial_corrected_shares(observed, counts), abs=0.004)


def test_check_confusion_refuses_a_nearly_singular_or_thin_estimate():
    good = metrics.check_confusion([[90, 10], [15, 85]], GENDERS)
    assert good.usable and good.smallest_singular_value == pytest.approx(
        np.linalg.svd([[0.9, 0.1], [0.15, 0.85]], compute_uv=False).min())
    singular = metrics.check_confusion([[55, 45], [45, 55]], GENDERS)
    assert not singular.usable and singular.smallest_singular_value == pytest.approx(0.1)
    assert "nearly singular" in singular.reason
    thin = metrics.check_confusion([[9, 1], [1, 9]], GENDERS)
    assert not thin.usable and "10 identity-specific faces" in thin.reason
    one = metrics.check_confusion([[9, 1], [0, 0]], GENDERS, min_images_per_class=1)
    assert not one.usable and "fewer than two classes" in one.reason
    # A named class read only as an unnamed label: no face of it read inside the named classes, and 23% of the
    # named classes' faces read outside them.
    leaking = metrics.check_confusion([[30, 0, 10, 0], [0, 0, 0, 25], [5, 0, 40, 0], [0, 0, 0, 0]], RACES[:4])
    assert not leaking.usable and leaking.fewest_images == 0
    assert "23% of the named classes' faces were read as labels no prompt names" in leaking.reason


def _simulated_corrected_coverage(confusion, truth, identity_prompts, faces_per_identity_prompt, repetitions,
                                  neutral_prompts=6, faces=50, seed=0):
    rng = np.random.default_rng(seed)
    classes = len(truth)
    covered = np.zeros(classes)
    for repetition in range(repetitions):
        neutral = []
        for _ in range(neutral_prompts):
            drawn = rng.multinomial(faces, truth)
            neutral.append(sum(rng.multinomial(count, confusion[k]) for k, count in enumerate(drawn)))
        identity = [rng.multinomial(faces_per_identity_prompt, confusion[k])
                    for k in range(classes) for _ in range(identity_prompts)]
        named = [k for k in range(classes) for _ in range(identity_prompts)]
        shares = metrics.prompt_bootstrap_corrected_shares(neutral, identity, named, num_resamples=300, seed=repetition)
        covered += (shares.ci_low <= truth) & (truth <= shares.ci_high)
    return covered / repetitions


def test_corrected_pooled_share_interval_covers_with_the_confusion_re_estimated():
    # 6 neutral prompts, 40 identity-specific faces per class (4 prompts of 10), a well-conditioned classifier.
    coverage = _simulated_corrected_coverage(np.array([[0.9, 0.1], [0.15, 0.85]]), np.array([0.7, 0.3]), 4, 10, 120)
    assert np.all(coverage >= 0.93), coverage
    # The point estimate and the degenerate inputs.
    shares = metrics.prompt_bootstrap_corrected_shares([[30, 10], [20, 20]], [[9, 1], [2, 8]], [0, 1], 200)
    assert shares.observed == pytest.approx([50 / 80, 30 / 80])
    assert shares.corrected == pytest.approx(metrics.partial_corrected_shares([50 / 80, 30 / 80], [[9, 1], [2, 8]]))
    assert np.all(shares.ci_low >= 0) and np.all(shares.ci_high <= 1)
    empty = metrics.prompt_bootstrap_corrected_shares([[0, 0]], [[9, 1], [2, 8]], [0, 1], 50)
    assert np.isnan(empty.corrected).all()
    with pytest.raises(ValueError, match="2 identity-specific prompts but 1"):
        metrics.prompt_bootstrap_corrected_shares([[3, 1]], [[9, 1], [2, 8]], [0], 50)


def test_changed_readings_counts_the_pictures_read_differently():
    first = [[(True, "doctor", "male", "white"), (True, "doctor", "female", "asian")], [(False, "nurse", None, None)]]
    second = [[[True, "doctor", "male", "white"], [True, "doctor", "male", "asian"]], [[True, "nurse", "female", "black"]]]
    assert metrics.changed_readings(first, second) == (2, 3)
    assert metrics.changed_readings(first, first) == (0, 3)
    assert metrics.changed_readings([], []) == (0, 0)
    with pytest.raises(ValueError, match="prompt 1: 1 pictures against 2"):
        metrics.changed_readings(first, [second[0], second[0]])
    with pytest.raises(ValueError, match="2 prompts against 1"):
        metrics.changed_readings(first, first[:1])


def test_holm_adjusted_p_values_equal_hand_values_and_a_slow_definition():
    from popalign.evaluate.metrics import holm_adjusted

    # m = 4: sorted 0.01, 0.02, 0.03, 0.5 -> 4 x 0.01, max(0.04, 3 x 0.02), max(0.06, 2 x 0.03), max(0.06, 0.5)
    assert holm_adjusted([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    assert holm_adjusted([0.4, 0.6]) == pytest.approx([0.8, 0.8])  # the running maximum, capped at 1
    assert math.isnan(holm_adjusted([math.nan, 0.01])[0]) and holm_adjusted([math.nan, 0.01])[1] == pytest.approx(0.01)
    rng = np.random.default_rng(3)
    for _ in range(50):
        values = list(rng.uniform(0, 0.2, size=int(rng.integers(1, 8))))
        ranked = sorted(values)
        # The slow definition: reject H_(i) at alpha iff every p_(j), j <= i, is <= alpha / (m - j + 1).
        for alpha in (0.01, 0.05, 0.1):
            rejected = set()
            for rank, value in enumerate(ranked):
                if value > alpha / (len(values) - rank):
                    break
                rejected.add(rank)
            adjusted = holm_adjusted(values)
            for index, value in enumerate(values):
                assert (adjusted[index] <= alpha + 1e-12) == (ranked.index(value) in rejected)


def test_pairwise_gap_and_corrected_discrepancy_floors_by_hand_and_by_simulation():
    # n = 2, gender, balanced: gap 1 with probability 1/2 (both one label), 0 otherwise.
    assert metrics.pairwise_gap_floor(2, GENDERS) == pytest.approx(0.5)
    assert math.isnan(metrics.pairwise_gap_floor(0, GENDERS))
    rng = np.random.default_rng(3)
    for classes, num_images in [(GENDERS, 60), (RACES[:3], 30)]:
        draws = [metrics.pairwise_gap(list(rng.choice(classes, size=num_images)), classes) for _ in range(4000)]
        assert metrics.pairwise_gap_floor(num_images, classes) == pytest.approx(
            np.mean(draws), abs=4 * np.std(draws) / math.sqrt(len(draws)))
    # With a perfect classifier the corrected floor is the plain floor; with one named class too.
    assert metrics.corrected_discrepancy_floor(40, GENDERS, [[50, 0], [0, 50]]) == pytest.approx(
        metrics.discrepancy_floor(40, GENDERS))
    assert metrics.corrected_discrepancy_floor(40, GENDERS, [[50, 5], [0, 0]]) == pytest.approx(
        metrics.discrepancy_floor(40, GENDERS))
    # A fair population read through a confusion, then corrected, against a simulation of exactly that.
    confusion = np.array([[80, 20], [30, 70]])
    rates = confusion / confusion.sum(axis=1, keepdims=True)
    values = []
    for _ in range(4000):
        drawn = rng.multinomial(30, [0.5, 0.5])
        read = sum(rng.multinomial(count, rates[k]) for k, count in enumerate(drawn))
        values.append(np.linalg.norm(metrics.partial_corrected_shares(read / 30, confusion) - 0.5))
    floor = metrics.corrected_discrepancy_floor(30, GENDERS, confusion)
    assert floor == pytest.approx(np.mean(values), abs=4 * np.std(values) / math.sqrt(len(values)))
    assert floor > metrics.discrepancy_floor(30, GENDERS)


def test_metric_ranges_and_clipped_intervals():
    assert metrics.discrepancy_range(GENDERS) == pytest.approx((0.0, math.sqrt(0.5)))
    assert metrics.discrepancy_range(RACES[:3]) == pytest.approx((0.0, math.sqrt(2 / 3)))
    assert metrics.discrepancy_range(RACES)[1] == pytest.approx(math.sqrt(5 / 6))
    assert metrics.discrepancy_range(GENDERS, [0.8, 0.2])[1] == pytest.approx(math.sqrt(0.8 ** 2 + 0.8 ** 2))
    assert metrics.clip_interval(-0.075, 0.954, (0.0, 0.707)) == (0.0, 0.707, True)
    assert metrics.clip_interval(0.1, 0.2, (0.0, 0.707)) == (0.1, 0.2, False)
    assert metrics.clip_interval(-3.0, 5.0, None) == (-3.0, 5.0, False)
    # Wholly outside the range (an unbiased square's interval can be): the nearest bound.
    assert metrics.clip_interval(-0.019, -0.007, (0.0, 0.5)) == (0.0, 0.0, True)
    assert metrics.clip_interval(0.7, 0.9, (0.0, 0.5)) == (0.5, 0.5, True)
    low, high, clipped = metrics.clip_interval(math.nan, math.nan, (0.0, 1.0))
    assert math.isnan(low) and math.isnan(high) and not clipped


def test_paired_verdict_in_a_holm_family():
    six = metrics.paired_test([0.5, 0.6, 0.7, 0.8, 0.65, 0.7], [0.1, 0.2, 0.15, 0.3, 0.25, 0.3])
    assert six.p_value == pytest.approx(2 / 64) and metrics.paired_verdict(six, "lower") == "better"
    # Alone it is 'better'; in a family of two its adjusted p (0.0625) says 'no clear change', and with the
    # floor 2 x 2/64 above 0.05 the verdict says the family leaves too few prompts.
    adjusted = metrics.holm_adjusted([six.p_value, 0.5])[0]
    floor = metrics.holm_floors([six.p_value, 0.5], [six.min_p_value, 0.125])[0]
    assert adjusted == pytest.approx(0.0625) and floor == pytest.approx(0.0625)
    assert metrics.paired_verdict(six, "lower", adjusted_p_value=adjusted, family_size=2, adjusted_floor=floor) == (
        "too few prompts for a verdict (n=6: p cannot go below 0.0625 after Holm over 2 tests)")
    ten = metrics.paired_test(np.linspace(0.5, 0.9, 10), np.linspace(0.1, 0.3, 10))
    assert metrics.paired_verdict(ten, "lower", adjusted_p_value=0.004, family_size=3) == "better"
    assert metrics.paired_verdict(ten, "lower", adjusted_p_value=0.2, family_size=3) == "no clear change"
    with pytest.raises(ValueError):
        metrics.paired_verdict(ten, "lower", family_size=0)


def test_holm_floors_by_hand_and_by_definition():
    # A strong test beside one at its own floor: Holm tests the last one at alpha, so its floor is its own min p.
    assert metrics.holm_floors([1e-5, 0.0313], [1e-6, 0.03125]) == pytest.approx([2e-6, 0.03125])
    # Equal floors: the first-ranked one is multiplied by m.
    assert metrics.holm_floors([0.125, 0.125], [0.125, 0.125]) == pytest.approx([0.25, 0.25])
    # NaN stays out of the family.
    floors = metrics.holm_floors([0.01, math.nan, 0.2], [0.001, 0.5, 0.1])
    assert math.isnan(floors[1]) and floors[0] == pytest.approx(0.002) and floors[2] == pytest.approx(0.1)
    rng = np.random.default_rng(0)
    for _ in range(20):
        p_values = rng.uniform(0, 0.2, 4)
        minimum = p_values * rng.uniform(0, 1, 4)
        for index in range(4):
            changed = p_values.copy()
            changed[index] = minimum[index]
            assert metrics.holm_floors(p_values, minimum)[index] == pytest.approx(metrics.holm_adjusted(changed)[index])
    with pytest.raises(ValueError):
        metrics.holm_floors([0.1], [0.1, 0.2])


def slow_one_sided_p(values):
    """P(sum s_i v_i >= sum v_i) over all sign patterns, by enumeration in Python."""
    from itertools import product

    observed = sum(values)
    patterns = list(product((-1, 1), repeat=len(values)))
    return sum(sum(s * v for s, v in zip(signs, values)) >= observed - 1e-12 for signs in patterns) / len(patterns)


def test_paired_equivalence_test_by_hand_slow_and_by_simulation():
    first = np.array([0.50, 0.40, 0.60, 0.55, 0.45, 0.52, 0.48, 0.58])
    second = first + np.array([0.01, -0.02, 0.015, 0.0, -0.01, 0.02, -0.005, 0.01])
    result = metrics.paired_equivalence_test(first, second, margin=0.05)
    differences = second - first
    assert result.p_value == pytest.approx(max(slow_one_sided_p(differences + 0.05), slow_one_sided_p(0.05 - differences)))
    assert result.p_value == pytest.approx(1 / 256) and result.min_p_value == pytest.approx(1 / 256)
    assert metrics.equivalence_verdict(result) == "equivalent within +-0.05"
    far = metrics.paired_equivalence_test(first, second + 0.1, margin=0.05)
    assert far.p_value > 0.5 and metrics.equivalence_verdict(far) == "not shown equivalent within +-0.05"
    few = metrics.paired_equivalence_test(first[:3], second[:3], margin=0.05)
    assert metrics.equivalence_verdict(few).startswith("too few pairs for an equivalence verdict (n=3")
    with pytest.raises(ValueError, match="margin"):
        metrics.paired_equivalence_test(first, second, margin=0.0)
    # Size: with the true mean difference on the margin, 'equivalent' comes out at most ~5% of the time.
    rng = np.random.default_rng(5)
    wrong = 0
    for _ in range(300):
        noise = rng.normal(0.05, 0.03, size=12)
        base = rng.uniform(0.3, 0.6, size=12)
        test = metrics.paired_equivalence_test(base, base + noise, margin=0.05, num_resamples=2000)
        wrong += metrics.equivalence_verdict(test).startswith("equivalent")
    assert wrong / 300 <= 0.08


def test_corrected_discrepancy_interval_carries_the_confusion_noise():
    rng = np.random.default_rng(7)
    confusion = np.array([[0.9, 0.1], [0.15, 0.85]])
    neutral = [sum(rng.multinomial(count, confusion[k]) for k, count in enumerate(rng.multinomial(40, [0.7, 0.3])))
               for _ in range(6)]
    thin = [rng.multinomial(5, confusion[k]) for k in (0, 1) for _ in range(2)]
    thick = [rng.multinomial(200, confusion[k]) for k in (0, 1) for _ in range(2)]
    named = [0, 0, 1, 1]
    thin_low, thin_high = metrics.prompt_bootstrap_corrected_discrepancy(neutral, thin, named, num_resamples=300)
    thick_low, thick_high = metrics.prompt_bootstrap_corrected_discrepancy(neutral, thick, named, num_resamples=300)
    # A thinner confusion estimate gives a wider interval; both hold the per-prompt mean of the point estimate.
    assert thin_high - thin_low > thick_high - thick_low
    counts = np.zeros((2, 2), dtype=int)
    np.add.at(counts, named, thick)
    point = np.mean([np.linalg.norm(metrics.partial_corrected_shares(np.array(q) / sum(q), counts) - 0.5) for q in neutral])
    assert thick_low <= point <= thick_high
    assert all(math.isnan(value) for value in metrics.prompt_bootstrap_corrected_discrepancy([[0, 0]], thick, named, num_resamples=20))
