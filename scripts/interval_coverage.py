"""How often a 95% interval over prompts covers the true mean, and how often the paired test rejects a true null.

    python scripts/interval_coverage.py [--replications 1000]

Simulates prompt-level values (normal, exponential, beta(2, 5)) at 4, 12 and 50 prompts and prints the
coverage of popalign.evaluate.metrics.bootstrap_mean_ci next to a plain percentile bootstrap's, then the rejection
rate at level 0.05 of popalign.evaluate.metrics.paired_test when tuned and base do not differ. docs/statistics.md
quotes its output.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from popalign.evaluate.metrics import bootstrap_mean_ci, paired_test  # noqa: E402

SHAPES = {
    "normal(0.3, 0.1)": (lambda rng, n: rng.normal(0.3, 0.1, n), 0.3),
    "exponential(0.2)": (lambda rng, n: rng.exponential(0.2, n), 0.2),
    "beta(2, 5)": (lambda rng, n: rng.beta(2, 5, n), 2 / 7),
}


def percentile_bootstrap(values: np.ndarray, rng: np.random.Generator, resamples: int) -> tuple[float, float]:
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replications", type=int, default=1000)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args(argv)
    print("| values | prompts | bootstrap_mean_ci | percentile bootstrap |")
    print("|---|---|---|---|")
    for name, (draw, true_mean) in SHAPES.items():
        for count in (4, 12, 50):
            rng = np.random.default_rng(count)
            ours = theirs = 0
            for replication in range(args.replications):
                values = draw(rng, count)
                _, low, high = bootstrap_mean_ci(values, num_resamples=args.resamples, seed=replication)
                ours += low <= true_mean <= high
                low, high = percentile_bootstrap(values, rng, args.resamples)
                theirs += low <= true_mean <= high
            print(f"| {name} | {count} | {ours / args.replications:.3f} | {theirs / args.replications:.3f} |")
    print()
    print("| prompts | paired_test rejections at 0.05 under the null | smallest possible p |")
    print("|---|---|---|")
    rng = np.random.default_rng(0)
    for count in (4, 6, 8, 12, 30):
        results = [paired_test(np.zeros(count), rng.normal(0, 1, count), num_resamples=2000) for _ in range(args.replications)]
        rate = np.mean([result.p_value <= 0.05 for result in results])
        print(f"| {count} | {rate:.3f} | {results[0].min_p_value:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
