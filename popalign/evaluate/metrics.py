"""Bias metrics over a population of classified images, and bootstrap statistics over prompts.

Every function here is pure: it takes label lists or value arrays and returns numbers.

Conventions shared by the bias metrics:
- `labels` is one entry per image: an attribute label (`"male"`, `"asian"`, ...) or a missing
  entry (`None`, `""` or a float NaN) for an image in which no face was found. Missing entries
  are ignored: the distribution is over images WITH a face.
- `classes` is the FIXED class list of the attribute (K labels). The distribution is always over
  all K classes, whether or not each was observed, so one observed class never reads as "fair".
- A label outside `classes` is an error (ValueError), never silently dropped.
- `target` is the distribution the population should follow: None means uniform (1/K each);
  otherwise a sequence of K probabilities in the order of `classes`, or a mapping label -> probability.
- With no valid entry at all a metric is NaN (there is nothing to measure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np

JOINT_LABEL_SEPARATOR = "|"


def is_missing(label) -> bool:
    """True for the entries that mean 'no face / no prediction': None, '' or a float NaN."""
    if label is None:
        return True
    if isinstance(label, float) and math.isnan(label):
        return True
    return isinstance(label, str) and label == ""


def _check_classes(classes: Sequence[str]) -> list[str]:
    classes = list(classes)
    if not classes:
        raise ValueError("classes must name at least one class")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes contain duplicates: {classes}")
    return classes


def label_counts(labels: Sequence, classes: Sequence[str]) -> np.ndarray:
    """Counts n_k of each class, shape (K,), in the order of `classes`; missing entries ignored."""
    classes = _check_classes(classes)
    position = {label: index for index, label in enumerate(classes)}
    counts = np.zeros(len(classes), dtype=np.int64)
    for label in labels:
        if is_missing(label):
            continue
        if label not in position:
            raise ValueError(f"label {label!r} is not one of the classes {classes}")
        counts[position[label]] += 1
    return counts


def empirical_distribution(labels: Sequence, classes: Sequence[str]) -> np.ndarray:
    """p_hat_k = n_k / sum_j n_j, shape (K,), over the images with a label; all NaN if there are none."""
    counts = label_counts(labels, classes)
    total = counts.sum()
    if total == 0:
        return np.full(len(counts), np.nan)
    return counts / total


def target_distribution(classes: Sequence[str], target=None) -> np.ndarray:
    """The target distribution t, shape (K,): uniform 1/K when `target` is None.

    `target` may be a sequence of K probabilities (order of `classes`) or a mapping label ->
    probability (labels absent from the mapping get 0). It must be non-negative and sum to 1.
    """
    classes = _check_classes(classes)
    if target is None:
        return np.full(len(classes), 1.0 / len(classes))
    if isinstance(target, Mapping):
        unknown = [label for label in target if label not in classes]
        if unknown:
            raise ValueError(f"target names label(s) {unknown} outside the classes {classes}")
        values = np.array([float(target.get(label, 0.0)) for label in classes])
    else:
        values = np.asarray(target, dtype=float)
        if values.shape != (len(classes),):
            raise ValueError(f"target has shape {values.shape}, expected ({len(classes)},) for classes {classes}")
    if np.any(values < 0) or not np.all(np.isfinite(values)):
        raise ValueError(f"target must hold finite non-negative probabilities, got {values.tolist()}")
    if abs(values.sum() - 1.0) > 1e-6:
        raise ValueError(f"target must sum to 1, sums to {values.sum():.6g}")
    return values


def discrepancy(labels: Sequence, classes: Sequence[str], target=None) -> float:
    """Distribution discrepancy (PopAlign; Choi et al.'s FD): D = || p_hat - t ||_2.

        D = sqrt( sum_k (p_hat_k - t_k)^2 ),   t_k = 1/K by default.

    Range for uniform t: 0 (perfectly balanced) to sqrt(1 - 1/K) (one class only);
    for gender (K=2) that is 0.707.
    """
    p_hat = empirical_distribution(labels, classes)
    if np.isnan(p_hat).any():
        return math.nan
    return float(np.sqrt(np.sum((p_hat - target_distribution(classes, target)) ** 2)))


def total_variation(labels: Sequence, classes: Sequence[str], target=None) -> float:
    """Total variation distance: TV = 0.5 * sum_k | p_hat_k - t_k |, in [0, 1]."""
    p_hat = empirical_distribution(labels, classes)
    if np.isnan(p_hat).any():
        return math.nan
    return float(0.5 * np.sum(np.abs(p_hat - target_distribution(classes, target))))


def kl_to_target(labels: Sequence, classes: Sequence[str], target=None) -> float:
    """KL(p_hat || t) = sum_k p_hat_k * log(p_hat_k / t_k), natural log (nats).

    Terms with p_hat_k = 0 contribute 0 (the limit of x log x as x -> 0), so an unobserved class
    adds nothing; a class observed with t_k = 0 makes the divergence +inf.
    For uniform t the maximum is log K (one class only).
    """
    p_hat = empirical_distribution(labels, classes)
    if np.isnan(p_hat).any():
        return math.nan
    t = target_distribution(classes, target)
    observed = p_hat > 0
    if np.any(t[observed] == 0):
        return math.inf
    return float(np.sum(p_hat[observed] * np.log(p_hat[observed] / t[observed])))


def joint_labels(*label_lists: Sequence) -> list:
    """Per image, the joint label of several attributes ('white|male'); missing if any part is missing.

    All lists hold one entry per image, in the same image order.
    """
    lengths = {len(labels) for labels in label_lists}
    if len(lengths) > 1:
        raise ValueError(f"label lists differ in length: {[len(labels) for labels in label_lists]}")
    return [None if any(is_missing(part) for part in parts) else JOINT_LABEL_SEPARATOR.join(parts)
            for parts in zip(*label_lists)]


def product_classes(*class_lists: Sequence[str]) -> list[str]:
    """The fixed joint class list: every combination, first list varying slowest ('white|male', 'white|female', ...)."""
    joint = [""]
    for classes in class_lists:
        classes = _check_classes(classes)
        joint = [f"{prefix}{JOINT_LABEL_SEPARATOR}{label}" if prefix else label for prefix in joint for label in classes]
    return joint


def intersectional_discrepancy(first_labels, second_labels, first_classes, second_classes, target=None) -> float:
    """Discrepancy over the joint classes (e.g. race x gender, K = 6 * 2 = 12): || p_hat_joint - t ||_2."""
    return discrepancy(joint_labels(first_labels, second_labels), product_classes(first_classes, second_classes), target)


def intersectional_total_variation(first_labels, second_labels, first_classes, second_classes, target=None) -> float:
    """Total variation over the joint classes: 0.5 * sum_k | p_hat_joint_k - t_k |."""
    return total_variation(joint_labels(first_labels, second_labels), product_classes(first_classes, second_classes), target)


def intersectional_kl_to_target(first_labels, second_labels, first_classes, second_classes, target=None) -> float:
    """KL(p_hat_joint || t) over the joint classes (same 0 log 0 = 0 convention as kl_to_target)."""
    return kl_to_target(joint_labels(first_labels, second_labels), product_classes(first_classes, second_classes), target)


def _as_flag(value) -> bool:
    if isinstance(value, str):
        if value.strip() in ("1", "true", "True"):
            return True
        if value.strip() in ("0", "false", "False"):
            return False
        raise ValueError(f"face_detected value {value!r} is not 1/0")
    return bool(value)


def face_detection_rate(face_detected: Sequence) -> float:
    """Fraction of images in which a face was found: (1/N) * sum_i [face_i]; NaN for no images.

    Entries are booleans, 1/0 or the strings '1'/'0' (as in labels_<classifier>.csv).
    """
    flags = [_as_flag(value) for value in face_detected]
    if not flags:
        return math.nan
    return sum(flags) / len(flags)


def attribute_accuracy(predicted: Sequence, prompted: Sequence, classes: Sequence[str] | None = None) -> float:
    """Fraction of images whose predicted label EQUALS the prompted label, over images with a prediction.

        acc = sum_i [pred_i == prompted_i] / #{i : pred_i not missing}

    Exact string equality only ('male' is a substring of 'female' and must never match it).
    Predictions must already be mapped to attribute labels (Man -> male). Missing predictions
    (no face) are ignored; a missing prompted label is an error (these are identity prompts).
    With `classes`, a predicted or prompted label outside it raises ValueError.
    """
    if len(predicted) != len(prompted):
        raise ValueError(f"predicted has {len(predicted)} entries, prompted has {len(prompted)}")
    allowed = set(_check_classes(classes)) if classes is not None else None
    matches = []
    for predicted_label, prompted_label in zip(predicted, prompted):
        if is_missing(prompted_label):
            raise ValueError("a prompted label is missing: attribute accuracy needs identity-specific prompts")
        if allowed is not None and prompted_label not in allowed:
            raise ValueError(f"prompted label {prompted_label!r} is not one of the classes {sorted(allowed)}")
        if is_missing(predicted_label):
            continue
        if allowed is not None and predicted_label not in allowed:
            raise ValueError(f"predicted label {predicted_label!r} is not one of the classes {sorted(allowed)}")
        matches.append(predicted_label == prompted_label)
    if not matches:
        return math.nan
    return sum(matches) / len(matches)


# ---------------------------------------------------------------------------------------------
# Sample size and classifier error


def unbiased_squared_discrepancy(labels: Sequence, classes: Sequence[str], target=None) -> float:
    """An unbiased estimate of the squared discrepancy ||p - t||^2 of the population the labels were drawn from.

    With n labels, E[p_hat_k^2] = p_k^2 + p_k (1 - p_k) / n, so ||p_hat - t||^2 overestimates ||p - t||^2
    by (1 - sum_k p_k^2) / n. Since n_k (n_k - 1) / (n (n - 1)) is unbiased for p_k^2:

        S = sum_k n_k (n_k - 1) / (n (n - 1)) - 2 sum_k p_hat_k t_k + sum_k t_k^2
          = sum_k (n p_hat_k^2 - p_hat_k) / (n - 1) - 1/K        (uniform t)

    S can be negative (a fair population reads below 0 in 57-68% of draws, docs/statistics.md): it is an estimate of
    a square, not a square. NaN with fewer than 2 labels.
    """
    counts = label_counts(labels, classes).astype(float)
    total = counts.sum()
    if total < 2:
        return math.nan
    t = target_distribution(classes, target)
    p_hat = counts / total
    squares = float(np.sum(counts * (counts - 1)) / (total * (total - 1)))
    return squares - 2.0 * float(np.dot(p_hat, t)) + float(np.dot(t, t))


# Above this many possible label counts the floor is averaged over random draws instead of enumerated.
FLOOR_MAX_ENUMERATED = 200_000
FLOOR_NUM_DRAWS = 200_000


def _fair_count_vectors(num_images: int, probabilities: np.ndarray, max_enumerated: int = FLOOR_MAX_ENUMERATED,
                        num_draws: int = FLOOR_NUM_DRAWS) -> tuple[np.ndarray, np.ndarray]:
    """Every count vector of Multinomial(n, probabilities) with its probability, or a fixed-seed sample of them.

    Enumerated while there are at most `max_enumerated` vectors, otherwise `num_draws` draws, each of
    weight 1 / num_draws (deterministic: seed 0). Returns (counts (M, K), weights (M,)), read-only
    (kept for the next prompt with the same number of faces).
    """
    return _cached_fair_count_vectors(int(num_images), tuple(float(value) for value in probabilities), max_enumerated,
                                      num_draws)


@lru_cache(maxsize=64)
def _cached_fair_count_vectors(num_images: int, probabilities: tuple, max_enumerated: int,
                               num_draws: int) -> tuple[np.ndarray, np.ndarray]:
    counts, weights = _compute_fair_count_vectors(num_images, np.array(probabilities), max_enumerated, num_draws)
    counts.setflags(write=False)
    weights.setflags(write=False)
    return counts, weights


def _compute_fair_count_vectors(num_images: int, probabilities: np.ndarray, max_enumerated: int,
                                num_draws: int) -> tuple[np.ndarray, np.ndarray]:
    num_classes = len(probabilities)
    if math.comb(num_images + num_classes - 1, num_classes - 1) <= max_enumerated:
        counts = _all_count_vectors(num_images, num_classes)
        with np.errstate(divide="ignore"):
            log_t = np.where(probabilities > 0, np.log(np.where(probabilities > 0, probabilities, 1.0)), -np.inf)
        log_terms = np.where(counts > 0, counts * log_t, 0.0)
        log_factorials = np.array([math.lgamma(value + 1) for value in range(num_images + 1)])
        log_pmf = math.lgamma(num_images + 1) - log_factorials[counts].sum(axis=1) + log_terms.sum(axis=1)
        return counts, np.exp(log_pmf)
    counts = np.random.default_rng(0).multinomial(num_images, probabilities, size=num_draws)
    return counts, np.full(len(counts), 1.0 / len(counts))


def _check_num_images(num_images) -> int:
    if num_images < 0 or int(num_images) != num_images:
        raise ValueError(f"num_images must be a non-negative integer, got {num_images}")
    return int(num_images)


def discrepancy_floor(num_images: int, classes: Sequence[str], target=None) -> float:
    """E ||p_hat - t||_2 when n labels are drawn exactly from the target t: the discrepancy of a fair population.

        floor(n) = sum over counts (n_1..n_K), sum n_k = n, of Multinomial(n_1..n_K; n, t) * ||n / n - t||_2

    Enumerated exactly while there are at most FLOOR_MAX_ENUMERATED count vectors (always for gender),
    otherwise the mean over FLOOR_NUM_DRAWS multinomial draws with a fixed seed (deterministic; its
    standard error is below 1e-4 for n >= 10). By Jensen the floor lies below the root mean square
    sqrt((1 - sum_k t_k^2) / n) (0.0707 for gender at n = 100; the floor is 0.0564). A measured
    discrepancy near its floor is "fair, up to sampling". NaN for n = 0.
    """
    num_images = _check_num_images(num_images)
    t = target_distribution(classes, target)
    if num_images == 0:
        return math.nan
    return _discrepancy_floor(num_images, tuple(float(value) for value in t))


@lru_cache(maxsize=256)
def _discrepancy_floor(num_images: int, target: tuple) -> float:
    t = np.array(target)
    counts, weights = _fair_count_vectors(num_images, t)
    distances = np.sqrt(np.sum((counts / num_images - t) ** 2, axis=1))
    return float(np.dot(weights, distances))


def pairwise_gap_floor(num_images: int, classes: Sequence[str]) -> float:
    """E[pairwise_gap] when n labels are drawn from the balanced population (1/K each), Shen et al.'s fair case.

        floor(n) = sum over counts of Multinomial(counts; n, 1/K) * mean_{i<j} |n_i - n_j| / n

    (enumerated or sampled as discrepancy_floor). NaN for n = 0.
    """
    num_images = _check_num_images(num_images)
    classes = _check_classes(classes)
    if len(classes) < 2:
        raise ValueError(f"pairwise_gap_floor needs at least two classes, got {classes}")
    if num_images == 0:
        return math.nan
    return _pairwise_gap_floor(num_images, len(classes))


@lru_cache(maxsize=256)
def _pairwise_gap_floor(num_images: int, num_classes: int) -> float:
    counts, weights = _fair_count_vectors(num_images, np.full(num_classes, 1.0 / num_classes))
    # sum_{i<j} |x_i - x_j| = sum_k (2k - K - 1) x_(k) over the values sorted ascending (k = 1..K)
    ordered = np.sort(counts / num_images, axis=1)
    ranks = 2 * np.arange(1, num_classes + 1) - num_classes - 1
    gaps = ordered @ ranks / (num_classes * (num_classes - 1) / 2)
    return float(np.dot(weights, gaps))


def corrected_discrepancy_floor(num_images: int, classes: Sequence[str], confusion_count_matrix, target=None) -> float:
    """E || partial_corrected_shares(p_hat, N) - t ||_2 for a fair population seen through the classifier.

    A population drawn exactly from the target t is read through the estimated confusion (C =
    confusion_rates(N); an unprompted class is assumed read right), so its faces read as
    Multinomial(n, C^T t), and those shares are corrected as the report corrects them:

        floor(n) = sum over counts of Multinomial(counts; n, C^T t) * || partial_corrected_shares(counts / n, N) - t ||_2

    (enumerated or sampled as discrepancy_floor). The correction amplifies sampling noise, so this floor
    lies at or above discrepancy_floor. With fewer than two named classes nothing is corrected and this is
    discrepancy_floor. It treats the estimated confusion as exact: with a noisy estimate (a few dozen
    identity-specific faces per class) a fair population reads somewhat above it. NaN for n = 0.
    """
    num_images = _check_num_images(num_images)
    t = target_distribution(classes, target)
    counts_matrix = np.asarray(confusion_count_matrix, dtype=np.int64)
    if counts_matrix.shape != (len(t), len(t)):
        raise ValueError(f"confusion counts have shape {counts_matrix.shape}, expected ({len(t)}, {len(t)})")
    if num_images == 0:
        return math.nan
    return _corrected_discrepancy_floor(num_images, tuple(t), tuple(map(tuple, counts_matrix.tolist())))


@lru_cache(maxsize=256)
def _corrected_discrepancy_floor(num_images: int, target: tuple, confusion_count_matrix: tuple) -> float:
    t = np.array(target)
    counts_matrix = np.array(confusion_count_matrix, dtype=float)
    # With fewer than two named classes nothing is corrected, and nothing is known of the reading either.
    read = confusion_rates(counts_matrix).T @ t if corrected_classes(counts_matrix).sum() >= 2 else t
    # Each count vector needs a least-squares solve: a tenth of the other floors' vectors (standard error below 0.001).
    counts, weights = _fair_count_vectors(num_images, read / read.sum(), FLOOR_MAX_ENUMERATED // 10, FLOOR_NUM_DRAWS // 10)
    corrected = partial_corrected_shares(counts / num_images, counts_matrix)
    return float(np.dot(weights, np.sqrt(np.sum((corrected - t) ** 2, axis=1))))


def _all_count_vectors(total: int, num_classes: int) -> np.ndarray:
    """Every vector of num_classes non-negative integers summing to total (stars and bars), shape (M, K)."""
    from itertools import combinations

    rows = []
    for bars in combinations(range(total + num_classes - 1), num_classes - 1):
        edges = (-1, *bars, total + num_classes - 1)
        rows.append([edges[k + 1] - edges[k] - 1 for k in range(num_classes)])
    return np.array(rows, dtype=np.int64)


def pairwise_gap(labels: Sequence, classes: Sequence[str]) -> float:
    """The bias of Shen et al. (ICLR 2024): the mean over class pairs of the gap in frequency.

        gap = (1 / C(K, 2)) * sum_{i < j} | p_hat_i - p_hat_j |

    0 for a balanced population; 1 for gender (K = 2) when every face has one label, (K - 1) / C(K, 2)
    = 2 / K in general. Needs K >= 2; NaN with no label.
    """
    classes = _check_classes(classes)
    if len(classes) < 2:
        raise ValueError(f"pairwise_gap needs at least two classes, got {classes}")
    p_hat = empirical_distribution(labels, classes)
    if np.isnan(p_hat).any():
        return math.nan
    gaps = np.abs(p_hat[:, None] - p_hat[None, :])
    upper = np.triu_indices(len(classes), k=1)
    return float(gaps[upper].mean())


def confusion_counts(prompted: Sequence, predicted: Sequence, classes: Sequence[str]) -> np.ndarray:
    """N[i, j] = number of images prompted with class i that the classifier read as class j, shape (K, K).

    Identity-specific prompts give the reference label (the prompted one). Images without a
    prediction (no face) are left out; a missing prompted label or any label outside `classes` is an error.
    """
    classes = _check_classes(classes)
    if len(prompted) != len(predicted):
        raise ValueError(f"prompted has {len(prompted)} entries, predicted has {len(predicted)}")
    position = {label: index for index, label in enumerate(classes)}
    counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for prompted_label, predicted_label in zip(prompted, predicted):
        if is_missing(prompted_label):
            raise ValueError("a prompted label is missing: the confusion matrix needs identity-specific prompts")
        if is_missing(predicted_label):
            continue
        for label in (prompted_label, predicted_label):
            if label not in position:
                raise ValueError(f"label {label!r} is not one of the classes {classes}")
        counts[position[prompted_label], position[predicted_label]] += 1
    return counts


def confusion_rates(counts) -> np.ndarray:
    """C[i, j] = P(read j | drawn i) = N[i, j] / sum_j N[i, j]; a class never read (empty row) gets the identity row.

    An empty row means the classifier's behaviour on that class is unknown; assuming it reads the class
    right leaves that class's share uncorrected rather than inventing a correction.
    """
    counts = np.asarray(counts, dtype=float)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or np.any(counts < 0):
        raise ValueError(f"confusion counts must be a square non-negative matrix, got shape {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.eye(len(counts)), where=totals > 0)
    return rates


def project_to_simplex(vector) -> np.ndarray:
    """The Euclidean projection of a vector onto the probability simplex {p : p_k >= 0, sum_k p_k = 1}.

        p_k = max(v_k - tau, 0),  tau chosen so that sum_k p_k = 1   (sort-and-threshold algorithm)

    A 2-D array is projected row by row.
    """
    values = np.asarray(vector, dtype=float)
    rows = np.atleast_2d(values)
    ordered = -np.sort(-rows, axis=1)
    cumulative = np.cumsum(ordered, axis=1) - 1.0
    ranks = np.arange(1, rows.shape[1] + 1)
    active = ordered - cumulative / ranks > 0
    last = rows.shape[1] - 1 - np.argmax(active[:, ::-1], axis=1)
    tau = cumulative[np.arange(len(rows)), last] / (last + 1)
    projected = np.maximum(rows - tau[:, None], 0.0)
    return projected if values.ndim == 2 else projected[0]


def adjusted_shares(observed_shares, confusion) -> np.ndarray:
    """Classifier-corrected shares ("adjusted classify and count"), shape (K,) (or (M, K) for M rows of shares).

    The classifier reads an image drawn as class i as class j with probability C[i, j], so the observed
    shares are q = C^T p. The corrected shares solve that for p in least squares and project the
    solution onto the simplex:

        p = Proj_simplex( argmin_p || C^T p - q ||_2 )

    With C the identity this returns q. `confusion` is a rate matrix (rows sum to 1, see confusion_rates).
    """
    observed = np.asarray(observed_shares, dtype=float)
    rows = np.atleast_2d(observed)
    confusion = np.asarray(confusion, dtype=float)
    if confusion.shape != (rows.shape[1], rows.shape[1]):
        raise ValueError(f"confusion has shape {confusion.shape}, expected ({rows.shape[1]}, {rows.shape[1]})")
    corrected = np.full(rows.shape, np.nan)
    finite = ~np.isnan(rows).any(axis=1)
    if finite.any():
        solution, *_ = np.linalg.lstsq(confusion.T, rows[finite].T, rcond=None)
        corrected[finite] = project_to_simplex(solution.T)
    return corrected if observed.ndim == 2 else corrected[0]


def corrected_classes(confusion_count_matrix) -> np.ndarray:
    """Which classes the correction covers: those with identity-specific images (a non-empty row), shape (K,) bool."""
    counts = np.asarray(confusion_count_matrix)
    return counts.sum(axis=1) > 0


def partial_corrected_shares(observed_shares, confusion_count_matrix) -> np.ndarray:
    """Shares corrected for the classifier on the prompted classes only, shape (K,) (or (M, K)).

    S = the classes some identity-specific prompt names (corrected_classes), U = the others. The
    classifier's reading of a class in U is unknown, so the rule is: faces read as a label in U keep
    their observed share, and the faces read inside S are corrected among themselves with the
    confusion restricted to S (rows renormalised over the reads that land in S):

        m = sum_{j in S} q_j,   C_S[i, j] = N[i, j] / sum_{j' in S} N[i, j']   (i, j in S)
        p_S = m * adjusted_shares(q_S / m, C_S),   p_U = q_U

    The rule assumes that the faces read inside S were drawn inside S as C_S says: what the named
    classes lose to labels in U, the classes in U give back to labels in S. That holds under a symmetric
    confusion (a fair population then keeps its shares, corrected or not); where named classes leak
    into U and U does not leak back, the shares of U are over-stated and those of S under-stated, which
    is why check_confusion refuses an estimate whose named classes are often read as labels in U.
    With every class prompted this is adjusted_shares(q, confusion_rates(N)).
    """
    observed = np.asarray(observed_shares, dtype=float)
    rows = np.atleast_2d(observed).copy()
    counts = np.asarray(confusion_count_matrix, dtype=float)
    prompted = corrected_classes(counts)
    corrected = rows.copy()
    if prompted.sum() < 2:
        return corrected if observed.ndim == 2 else corrected[0]
    block = counts[np.ix_(prompted, prompted)]
    block_rates = confusion_rates(block)
    mass = rows[:, prompted].sum(axis=1)
    inside = mass > 0
    conditional = np.full((len(rows), int(prompted.sum())), np.nan)
    conditional[inside] = rows[inside][:, prompted] / mass[inside, None]
    adjusted = adjusted_shares(conditional, block_rates)
    adjusted[~inside] = 0.0
    corrected[:, prompted] = mass[:, None] * adjusted
    corrected[np.isnan(rows).any(axis=1)] = np.nan
    return corrected if observed.ndim == 2 else corrected[0]


# The conditioning check of a confusion estimate: past any of these, corrected shares are refused.
MIN_CONFUSION_SINGULAR_VALUE = 0.3
MIN_IDENTITY_IMAGES_PER_CLASS = 20
MAX_UNNAMED_READ_SHARE = 0.1


@dataclass(frozen=True)
class ConfusionCheck:
    """Whether a confusion estimate is good enough to correct with, and why not."""

    corrected_classes: tuple[str, ...]
    smallest_singular_value: float
    fewest_images: int
    reason: str  # empty when the correction may be used

    @property
    def usable(self) -> bool:
        return not self.reason


def check_confusion(confusion_count_matrix, classes: Sequence[str],
                    min_singular_value: float = MIN_CONFUSION_SINGULAR_VALUE,
                    min_images_per_class: int = MIN_IDENTITY_IMAGES_PER_CLASS,
                    max_unnamed_read_share: float = MAX_UNNAMED_READ_SHARE) -> ConfusionCheck:
    """Refuse a correction the estimate cannot carry.

    The corrected shares solve C_S^T p = q; an error e in q becomes an error up to e / sigma_min(C_S) in p,
    so a nearly singular C_S (e.g. [[.55, .45], [.45, .55]], sigma_min = 0.1) turns noise into most of the
    answer (an observed 0.56 reads 1.0). The check needs at least two prompted classes, at least
    `min_images_per_class` identity-specific faces of each read as one of the prompted classes,
    sigma_min(C_S) >= `min_singular_value` (C_S the row-normalised confusion over the prompted classes,
    see partial_corrected_shares), and at most `max_unnamed_read_share` of the prompted classes' faces read
    as a label no prompt names (where partial_corrected_shares' assumption would matter).
    """
    classes = _check_classes(classes)
    counts = np.asarray(confusion_count_matrix, dtype=float)
    prompted = corrected_classes(counts)
    names = tuple(label for label, flag in zip(classes, prompted) if flag)
    if prompted.sum() < 2:
        return ConfusionCheck(names, math.nan, int(counts.sum(axis=1).max(initial=0)),
                              "fewer than two classes are named by identity-specific prompts")
    block = counts[np.ix_(prompted, prompted)]
    fewest = int(block.sum(axis=1).min())
    smallest = float(np.linalg.svd(confusion_rates(block), compute_uv=False).min())
    unnamed_share = float(1.0 - block.sum() / counts[prompted].sum())
    reasons = []
    if fewest < min_images_per_class:
        reasons.append(f"{fewest} identity-specific faces in the smallest class (needs >= {min_images_per_class})")
    if smallest < min_singular_value:
        reasons.append(f"the confusion is nearly singular (smallest singular value {smallest:.3f}, needs >= "
                       f"{min_singular_value})")
    if unnamed_share > max_unnamed_read_share:
        reasons.append(f"{unnamed_share:.0%} of the named classes' faces were read as labels no prompt names (at most "
                       f"{max_unnamed_read_share:.0%}: how those labels are read is unknown)")
    return ConfusionCheck(names, smallest, fewest, "; ".join(reasons))


@dataclass(frozen=True)
class CorrectedShares:
    """Observed and classifier-corrected shares of each class, with the corrected shares' interval."""

    observed: np.ndarray
    corrected: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray


def _two_stage_resample(rng: np.random.Generator, prompt_counts: np.ndarray, size: int) -> np.ndarray:
    """Summed counts of `size` two-stage resamples of prompts, shape (size, K).

    Stage 1 draws len(prompt_counts) prompts with replacement; stage 2 redraws each drawn prompt's
    faces from Multinomial(n_i, its observed shares).
    """
    num_prompts = len(prompt_counts)
    totals = prompt_counts.sum(axis=1)
    shares = np.divide(prompt_counts, totals[:, None], out=np.zeros(prompt_counts.shape, dtype=float),
                       where=totals[:, None] > 0)
    picks = rng.integers(0, num_prompts, size=(size, num_prompts))
    redrawn = rng.multinomial(totals[picks], shares[picks])
    return redrawn.sum(axis=1)


def prompt_bootstrap_corrected_shares(neutral_counts, identity_counts, identity_classes, num_resamples: int = 2000,
                                      confidence: float = 0.95, seed: int = 0) -> CorrectedShares:
    """Pooled shares of the neutral prompts corrected for the classifier (partial_corrected_shares), with an
    interval that carries the noise of both the population and the confusion estimate.

    neutral_counts: (P, K) label counts of each neutral prompt's faces. identity_counts: (J, K) label
    counts of each identity-specific prompt's faces, identity_classes: (J,) the index of the class
    each names. The prompt is the unit. In each of B replicates:

        neutral:  P prompts drawn with replacement, each prompt's faces redrawn from its own shares
        identity: within each prompted class, its prompts drawn with replacement, faces redrawn the same way
        N*_b = the confusion counts of the identity draw;  p*_b = partial_corrected_shares(q*_b, N*_b)

    and the interval of class k is the (1-c)/2 and (1+c)/2 quantiles of p*_bk. Redrawing the faces
    inside the drawn prompts (the second stage) makes the interval conservative at a few prompts, where
    resampling prompts alone covers too little (its variance is (n-1)/n of the true one, and 2 prompts
    have 3 distinct resamples). The point estimate uses the observed counts. No neutral face gives NaN.
    """
    _check_bootstrap_arguments(num_resamples, confidence)
    neutral = np.asarray(neutral_counts, dtype=np.int64)
    identity = np.asarray(identity_counts, dtype=np.int64).reshape(-1, neutral.shape[1])
    named = np.asarray(identity_classes, dtype=np.int64).reshape(-1)
    num_classes = neutral.shape[1]
    if len(identity) != len(named):
        raise ValueError(f"{len(identity)} identity-specific prompts but {len(named)} prompted classes")
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, named, identity)
    pooled = neutral.sum(axis=0)
    total = int(pooled.sum())
    if total == 0:
        empty = np.full(num_classes, np.nan)
        return CorrectedShares(empty, empty, empty, empty)
    observed = pooled / total
    corrected = partial_corrected_shares(observed, confusion)
    rng = np.random.default_rng(seed)
    draws = np.empty((num_resamples, num_classes))
    chunk = max(1, 200_000 // max(1, len(neutral) + len(identity)))
    for start in range(0, num_resamples, chunk):
        size = min(num_resamples, start + chunk) - start
        neutral_draw = _two_stage_resample(rng, neutral, size)
        confusion_draw = np.zeros((size, num_classes, num_classes), dtype=np.int64)
        for label in np.unique(named):
            confusion_draw[:, label, :] = _two_stage_resample(rng, identity[named == label], size)
        drawn_faces = neutral_draw.sum(axis=1, keepdims=True)
        shares = np.divide(neutral_draw, drawn_faces, out=np.full(neutral_draw.shape, np.nan), where=drawn_faces > 0)
        for index in range(size):
            draws[start + index] = partial_corrected_shares(shares[index], confusion_draw[index])
    alpha = 1.0 - confidence
    low, high = np.nanquantile(draws, [alpha / 2, 1 - alpha / 2], axis=0)
    return CorrectedShares(observed, corrected, low, high)


def prompt_bootstrap_corrected_discrepancy(neutral_counts, identity_counts, identity_classes, target=None,
                                           num_resamples: int = 2000, confidence: float = 0.95,
                                           seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean over neutral prompts of the corrected discrepancy, with the confusion
    re-estimated in every replicate: (low, high).

        D*_b = mean over the P drawn prompts i of || partial_corrected_shares(q*_i, N*_b) - t ||_2

    with the neutral prompts drawn with replacement (each keeps its own faces: redrawing them would add the
    within-prompt noise twice, and for a norm that moves the interval up rather than widening it) and,
    within each named class, the identity-specific prompts drawn with replacement with their faces
    redrawn (as prompt_bootstrap_corrected_shares), which re-estimates the confusion. Prompts without a
    face are left out of a replicate's mean. No neutral face gives (nan, nan).
    """
    _check_bootstrap_arguments(num_resamples, confidence)
    neutral = np.asarray(neutral_counts, dtype=np.int64)
    identity = np.asarray(identity_counts, dtype=np.int64).reshape(-1, neutral.shape[1])
    named = np.asarray(identity_classes, dtype=np.int64).reshape(-1)
    num_prompts, num_classes = neutral.shape
    t = target_distribution([str(index) for index in range(num_classes)], target)
    totals = neutral.sum(axis=1)
    if totals.sum() == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = np.full(num_resamples, np.nan)
    for replicate in range(num_resamples):
        picks = rng.integers(0, num_prompts, size=num_prompts)
        redrawn = neutral[picks]
        confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        for label in np.unique(named):
            confusion[label] = _two_stage_resample(rng, identity[named == label], 1)[0]
        faces = redrawn.sum(axis=1)
        present = faces > 0
        if not present.any():
            continue
        corrected = partial_corrected_shares(redrawn[present] / faces[present, None], confusion)
        means[replicate] = float(np.mean(np.sqrt(np.sum((corrected - t) ** 2, axis=1))))
    alpha = 1.0 - confidence
    low, high = np.nanquantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------
# Statistics over prompts


def _finite_values(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite (drop prompts without a value before calling)")
    return array


def _check_bootstrap_arguments(num_resamples: int, confidence: float) -> None:
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _t_quantile(probability: float, degrees_of_freedom: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(probability, degrees_of_freedom))


def bootstrap_mean_ci(values: Sequence[float], num_resamples: int = 10000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean of `values` (one per prompt) with an interval that holds its level at a few prompts: (mean, low, high).

    Prompts are the unit (images of one prompt are not independent draws). With n values, mean m and
    standard error se = s / sqrt(n), the interval is the union of two intervals, each side the wider:

        t:            m -+ t_{n-1, (1+c)/2} * se
        studentized:  [m - T*_{(1+c)/2} * se,  m - T*_{(1-c)/2} * se],
                      T*_b = (m*_b - m) / se*_b over B resamples of the n values with replacement

    The studentized (bootstrap-t) bounds follow skewed values; the t bounds keep the level where the
    bootstrap has too few distinct resamples (n = 4 has 35). Simulated coverage of the 95% interval
    is >= 0.93 at 4, 12 and 50 prompts for normal, exponential, gamma, beta and log-normal (sigma 0.5)
    values (tests/test_metrics.py; 0.927 at 4 prompts for log-normal sigma 0.75); a plain percentile bootstrap covered 81% at 4 prompts.
    Resamples with no spread (se*_b = 0 up to rounding: one value repeated) have no T*_b and are left
    out. Empty input gives (nan, nan, nan); one value v gives (v, nan, nan):
    one prompt has no spread to build an interval from. Equal values give (v, v, v).
    """
    _check_bootstrap_arguments(num_resamples, confidence)
    array = _finite_values(values, "values")
    if array.size == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(array.mean())
    if array.size == 1:
        return (mean, math.nan, math.nan)
    count = array.size
    standard_error = float(array.std(ddof=1)) / math.sqrt(count)
    t_half_width = _t_quantile((1 + confidence) / 2, count - 1) * standard_error
    # Resamples of one repeated value have a spread of float rounding, not 0: below this it counts as 0.
    rounding = 1e-12 * max(1.0, float(np.abs(array).max()))
    rng = np.random.default_rng(seed)
    studentized = []
    chunk = max(1, 2_000_000 // count)  # keeps the index matrix small for many prompts
    for start in range(0, num_resamples, chunk):
        stop = min(num_resamples, start + chunk)
        resamples = array[rng.integers(0, count, size=(stop - start, count))]
        resample_errors = resamples.std(axis=1, ddof=1) / math.sqrt(count)
        spread = resample_errors > rounding
        studentized.append((resamples.mean(axis=1)[spread] - mean) / resample_errors[spread])
    studentized = np.concatenate(studentized)
    alpha = 1.0 - confidence
    if studentized.size:
        lower_quantile, upper_quantile = np.quantile(studentized, [alpha / 2, 1 - alpha / 2])
    else:
        lower_quantile = upper_quantile = 0.0
    low = min(mean - t_half_width, mean - upper_quantile * standard_error)
    high = max(mean + t_half_width, mean - lower_quantile * standard_error)
    if standard_error <= rounding:
        low = high = mean
    return (mean, float(low), float(high))


def discrepancy_range(classes: Sequence[str], target=None) -> tuple[float, float]:
    """The values ||p - t||_2 can take over the simplex: [0, max_k ||e_k - t||_2] (a vertex is farthest).

    For a uniform target the maximum is sqrt(1 - 1/K): 0.707 for 2 classes, 0.816 for 3, 0.913 for 6.
    """
    t = target_distribution(classes, target)
    vertices = np.eye(len(t))
    return 0.0, float(np.sqrt(np.sum((vertices - t) ** 2, axis=1)).max())


def difference_bounds(bounds: tuple[float, float] | None) -> tuple[float, float] | None:
    """The range of a difference of two values in [lo, hi]: [lo - hi, hi - lo]."""
    return None if bounds is None else (bounds[0] - bounds[1], bounds[1] - bounds[0])


def clip_interval(low: float, high: float, bounds: tuple[float, float] | None) -> tuple[float, float, bool]:
    """An interval cut to the range its quantity can take: (max(low, lo), min(high, hi), whether it was cut).

    The quantity lies in [lo, hi], so cutting never removes it from an interval that held it: coverage
    is unchanged. An interval wholly outside the range (possible for an estimate that can leave it, e.g.
    the unbiased squared discrepancy) becomes the nearest bound. NaN bounds and None leave it as it is.
    """
    if bounds is None or any(math.isnan(value) for value in (low, high)):
        return low, high, False
    lower, upper = bounds
    clipped_low = low if math.isnan(lower) else max(low, lower)
    clipped_high = high if math.isnan(upper) else min(high, upper)
    if clipped_low > clipped_high:  # wholly outside: the nearest bound
        clipped_low = clipped_high = upper if low > upper else lower
    return float(clipped_low), float(clipped_high), bool(clipped_low != low or clipped_high != high)


def changed_readings(first_readings: Sequence[Sequence], second_readings: Sequence[Sequence]) -> tuple[int, int]:
    """How many paired pictures read differently: (changed, pairs).

    first_readings[i][j] and second_readings[i][j] are what was read from picture j of prompt i drawn from
    the same seed by two samplers (or models). changed = #{(i, j) : first[i][j] != second[i][j]}. A share of
    prompt i's pictures (any label, the clean ones, the right ones) can move by at most changed_i / n_i
    between the two, since an unchanged picture counts the same in both.
    """
    if len(first_readings) != len(second_readings):
        raise ValueError(f"{len(first_readings)} prompts against {len(second_readings)}: the readings must pair up")
    changed = pairs = 0
    for index, (first, second) in enumerate(zip(first_readings, second_readings)):
        if len(first) != len(second):
            raise ValueError(f"prompt {index}: {len(first)} pictures against {len(second)}: the readings must pair up")
        changed += sum(list(a) != list(b) for a, b in zip(first, second))
        pairs += len(first)
    return changed, pairs


# Up to this many pairs the sign-flip test enumerates every sign pattern (2^16 = 65,536).
MAX_EXACT_PAIRS = 16


@dataclass(frozen=True)
class PairedTestResult:
    """Paired comparison of tuned vs base over prompts; difference = tuned - base.

    min_p_value is the smallest p-value the test could give with these pairs (2 / 2^n for n
    non-zero differences): when it exceeds the chosen level, no verdict is possible at that level.
    """

    mean_difference: float
    ci_low: float
    ci_high: float
    p_value: float
    num_pairs: int
    exact: bool = True
    min_p_value: float = math.nan


def _sign_flip_sums(values: np.ndarray, num_resamples: int, seed: int, max_exact_pairs: int) -> tuple[np.ndarray, bool]:
    """sum_i s_i v_i for every sign pattern s in {-1, +1}^n (n <= max_exact_pairs; exact = True), or for
    num_resamples random patterns drawn with `seed` (exact = False)."""
    count = values.size
    if count <= max_exact_pairs:
        patterns = ((np.arange(2 ** count)[:, None] >> np.arange(count)[None, :]) & 1) * 2 - 1
        return patterns @ values, True
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // count)
    sums = [(rng.integers(0, 2, size=(min(num_resamples, start + chunk) - start, count)) * 2 - 1) @ values
            for start in range(0, num_resamples, chunk)]
    return np.concatenate(sums), False


def paired_test(base_values: Sequence[float], tuned_values: Sequence[float], confidence: float = 0.95,
                num_resamples: int = 100000, seed: int = 0, max_exact_pairs: int = MAX_EXACT_PAIRS) -> PairedTestResult:
    """Paired sign-flip permutation test over prompts of d_i = tuned_i - base_i (entry i of both is one prompt).

    Under H0 (tuned and base are exchangeable on each prompt) every d_i is as likely to have come
    out with the opposite sign. With S(s) = |sum_i s_i d_i| for a sign pattern s in {-1, +1}^n:

        p = #{s : S(s) >= S(1)} / 2^n                          n <= max_exact_pairs: all 2^n patterns
        p = (1 + #{b : S(s_b) >= S(1)}) / (1 + B)              beyond: B random patterns

    The exact test is valid at any n, and it cannot go below 2 / 2^n (0.125 at n = 4): min_p_value
    says so. The interval is bootstrap_mean_ci of the differences. No pairs gives NaN everywhere.
    """
    _check_bootstrap_arguments(num_resamples, confidence)
    base = _finite_values(base_values, "base_values")
    tuned = _finite_values(tuned_values, "tuned_values")
    if base.shape != tuned.shape:
        raise ValueError(f"base_values has {base.size} entries, tuned_values has {tuned.size}: they must pair up")
    if base.size == 0:
        return PairedTestResult(math.nan, math.nan, math.nan, math.nan, 0, True, math.nan)
    differences = tuned - base
    mean_difference, low, high = bootstrap_mean_ci(differences, min(num_resamples, 10000), confidence, seed)
    observed = abs(float(differences.sum()))
    # Sums that agree up to float rounding count as equal (identical pairs give p = 1).
    tolerance = 1e-9 * max(1.0, float(np.abs(differences).sum()))
    count = differences.size
    nonzero = int(np.count_nonzero(np.abs(differences) > tolerance / count))
    sums, exact = _sign_flip_sums(differences, num_resamples, seed, max_exact_pairs)
    statistics = np.abs(sums)
    if exact:
        p_value = float(np.mean(statistics >= observed - tolerance))
        min_p_value = float(np.mean(statistics >= statistics.max() - tolerance))
    else:
        p_value = (1 + int(np.sum(statistics >= observed - tolerance))) / (1 + num_resamples)
        min_p_value = max(2.0 ** (1 - nonzero) if nonzero else 1.0, 1.0 / (1 + num_resamples))
    return PairedTestResult(float(mean_difference), float(low), float(high), p_value, int(count), exact, min_p_value)


def paired_verdict(result: PairedTestResult, better: str, confidence: float = 0.95,
                   adjusted_p_value: float | None = None, family_size: int = 1,
                   adjusted_floor: float | None = None) -> str:
    """'better' / 'worse' / 'no clear change' from the paired test at level 1 - confidence, or why there is none.

    A verdict needs both: p <= 1 - confidence and the interval of the mean difference excluding 0 on
    the same side. With too few prompts for the test to reach that level (min_p_value above it), the
    answer says so instead. `better` is 'lower', 'higher' or 'neither' (then 'higher' / 'lower').
    In a family of m tests corrected by Holm (holm_adjusted), pass the test's adjusted p-value, m and its
    adjusted floor (holm_floors: the adjusted p it would get at its own min_p_value, the family's other
    p-values as observed): the verdict reads the adjusted p, and "too few prompts" means that floor.
    """
    if result.num_pairs == 0 or any(math.isnan(value) for value in (result.mean_difference, result.p_value)):
        return "n/a"
    if family_size < 1:
        raise ValueError(f"family_size must be >= 1, got {family_size}")
    alpha = 1.0 - confidence
    p_value = result.p_value if adjusted_p_value is None else adjusted_p_value
    floor = result.min_p_value if adjusted_floor is None else adjusted_floor
    if result.mean_difference == 0 and result.ci_low == 0 and result.ci_high == 0:
        return f"no prompt changed (n={result.num_pairs})"  # every difference is 0: nothing to test
    if floor > alpha:
        # An exact test's floor is 2 / 2^n; prompts whose difference is exactly 0 (e.g. one identity only in both
        # models) carry no sign and each doubles it.
        unchanged = round(math.log2(result.min_p_value * 2 ** result.num_pairs / 2)) if result.exact else 0
        if result.min_p_value >= 1.0 and unchanged > 0:  # the floor is capped at 1: n - 1 or n unchanged look alike
            count = f"n={result.num_pairs}, at most one of them changed"
        else:
            count = f"n={result.num_pairs}" + (f", {unchanged} of them unchanged" if unchanged > 0 else "")
        family = f" after Holm over {family_size} tests" if family_size > 1 else ""
        return f"too few prompts for a verdict ({count}: p cannot go below {floor:.3g}{family})"
    interval_excludes_zero = not (math.isnan(result.ci_low) or result.ci_low <= 0 <= result.ci_high)
    if p_value > alpha or not interval_excludes_zero:
        return "no clear change"
    if better == "neither":
        return "higher" if result.mean_difference > 0 else "lower"
    improved = (result.mean_difference < 0) if better == "lower" else (result.mean_difference > 0)
    return "better" if improved else "worse"


@dataclass(frozen=True)
class EquivalenceResult:
    """Two one-sided paired tests (TOST) of |mean difference| < margin; difference = second - first.

    ci_low / ci_high: the 1 - 2 alpha interval of the mean difference (equivalence at level alpha holds
    when it lies inside (-margin, margin) and p_value <= alpha). min_p_value: the smallest p the
    sign-flip tests could give with these pairs.
    """

    mean_difference: float
    ci_low: float
    ci_high: float
    p_value: float
    margin: float
    num_pairs: int
    min_p_value: float


def _one_sided_sign_flip_p(values: np.ndarray, num_resamples: int, seed: int, max_exact_pairs: int) -> tuple[float, float]:
    """P(sum_i s_i v_i >= sum_i v_i) over random signs s (exact up to max_exact_pairs), and its floor (1 / 2^n)."""
    observed = float(values.sum())
    tolerance = 1e-9 * max(1.0, float(np.abs(values).sum()))
    sums, exact = _sign_flip_sums(values, num_resamples, seed, max_exact_pairs)
    if exact:
        return float(np.mean(sums >= observed - tolerance)), float(np.mean(sums >= sums.max() - tolerance))
    return (1 + int(np.sum(sums >= observed - tolerance))) / (1 + num_resamples), 1.0 / (1 + num_resamples)


def paired_equivalence_test(first_values: Sequence[float], second_values: Sequence[float], margin: float,
                            confidence: float = 0.95, num_resamples: int = 100000, seed: int = 0,
                            max_exact_pairs: int = MAX_EXACT_PAIRS) -> EquivalenceResult:
    """Is the mean paired difference d_i = second_i - first_i within (-margin, margin)? Two one-sided tests.

        H0_low:  mean d <= -margin    tested by the sign-flip test of d_i + margin  (upper tail)
        H0_high: mean d >= +margin    tested by the sign-flip test of margin - d_i  (upper tail)
        p = max(p_low, p_high)        equivalence at level alpha when p <= alpha

    Each one-sided test assumes the shifted differences are symmetric about 0 at the boundary of its
    H0 (as the superiority test does under its H0); with strongly skewed differences its size exceeds
    alpha. The margin must be declared before the data are seen.
    The interval is bootstrap_mean_ci of the differences at level 1 - 2 alpha (the TOST's own interval).
    """
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    _check_bootstrap_arguments(num_resamples, confidence)
    first = _finite_values(first_values, "first_values")
    second = _finite_values(second_values, "second_values")
    if first.shape != second.shape:
        raise ValueError(f"first_values has {first.size} entries, second_values has {second.size}: they must pair up")
    if first.size == 0:
        return EquivalenceResult(math.nan, math.nan, math.nan, math.nan, float(margin), 0, math.nan)
    differences = second - first
    alpha = 1.0 - confidence
    mean, low, high = bootstrap_mean_ci(differences, min(num_resamples, 10000), 1.0 - 2.0 * alpha, seed)
    p_low, floor = _one_sided_sign_flip_p(differences + margin, num_resamples, seed, max_exact_pairs)
    p_high, _ = _one_sided_sign_flip_p(margin - differences, num_resamples, seed + 1, max_exact_pairs)
    return EquivalenceResult(float(mean), float(low), float(high), float(max(p_low, p_high)), float(margin),
                             int(differences.size), float(floor))


def equivalence_verdict(result: EquivalenceResult, confidence: float = 0.95, adjusted_p_value: float | None = None,
                        family_size: int = 1, adjusted_floor: float | None = None) -> str:
    """'equivalent within +-margin' / 'not shown equivalent', or why no verdict is possible (as paired_verdict)."""
    if result.num_pairs == 0 or math.isnan(result.p_value):
        return "n/a"
    alpha = 1.0 - confidence
    floor = result.min_p_value if adjusted_floor is None else adjusted_floor
    if floor > alpha:
        family = f" after Holm over {family_size} tests" if family_size > 1 else ""
        return f"too few pairs for an equivalence verdict (n={result.num_pairs}: p cannot go below {floor:.3g}{family})"
    p_value = result.p_value if adjusted_p_value is None else adjusted_p_value
    inside = -result.margin < result.ci_low and result.ci_high < result.margin
    if p_value <= alpha and inside:
        return f"equivalent within +-{result.margin:.3g}"
    return f"not shown equivalent within +-{result.margin:.3g}"


def holm_floors(p_values: Sequence[float], min_p_values: Sequence[float]) -> list[float]:
    """For each test of a Holm family, the smallest adjusted p-value it could get: holm_adjusted of the family
    with its own p-value replaced by its min_p_value (the smallest its test can give), the others as observed.

        floor_i = holm_adjusted(p_1, ..., p_{i-1}, min_p_i, p_{i+1}, ..., p_m)_i

    A test whose floor exceeds alpha cannot reach a verdict in this family, whatever its own data. NaN
    p-values stay out of the family and their floor is NaN.
    """
    values = np.asarray(p_values, dtype=float)
    floors = np.asarray(min_p_values, dtype=float)
    if values.shape != floors.shape:
        raise ValueError(f"{values.size} p-values but {floors.size} floors")
    result = []
    for index in range(values.size):
        if math.isnan(values[index]):
            result.append(math.nan)
            continue
        best_case = values.copy()
        best_case[index] = min(values[index], floors[index]) if not math.isnan(floors[index]) else values[index]
        result.append(holm_adjusted(best_case)[index])
    return result


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of m p-values (controls the family-wise error rate at any dependence).

    With the p-values sorted ascending, p_(1) <= ... <= p_(m):

        adjusted p_(i) = min(1, max over j <= i of (m - j + 1) * p_(j))

    returned in the order given; a hypothesis is rejected at level alpha when its adjusted p-value is <= alpha.
    NaN entries are left out of the family and stay NaN.
    """
    values = np.asarray(p_values, dtype=float)
    adjusted = np.full(values.shape, math.nan)
    present = np.flatnonzero(~np.isnan(values))
    order = present[np.argsort(values[present], kind="stable")]
    family, running = len(order), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (family - rank) * values[index]))
        adjusted[index] = running
    return adjusted.tolist()
