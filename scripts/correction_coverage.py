"""Coverage of the classifier-corrected pooled share's interval (popalign.evaluate.metrics.prompt_bootstrap_corrected_shares).

    python scripts/correction_coverage.py            # the numbers in docs/statistics.md (about 1 minute)

Simulated studies: 6 neutral prompts of 50 faces drawn with shares (0.7, 0.3) (or, with heterogeneity, each
prompt's shares drawn from a Dirichlet around them), read through a classifier C = [[.9, .1], [.15, .85]];
identity-specific prompts per class read through the same C. Prints the share of studies whose 95% interval
holds the true share, per class, with the interval's mean width and the RMSE of the corrected and observed shares.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from popalign.evaluate import metrics  # noqa: E402


def simulate(confusion, truth, identity_prompts, faces_per_identity_prompt, repetitions=300, neutral_prompts=6,
             faces=50, concentration=0.0, resamples=500, seed=1):
    rng = np.random.default_rng(seed)
    covered, widths, corrected_errors, observed_errors = np.zeros(len(truth)), [], [], []
    for repetition in range(repetitions):
        neutral = []
        for _ in range(neutral_prompts):
            shares = truth if concentration == 0 else rng.dirichlet(truth * concentration)
            drawn = rng.multinomial(faces, shares)
            neutral.append(sum(rng.multinomial(count, confusion[k]) for k, count in enumerate(drawn)))
        identity = [rng.multinomial(faces_per_identity_prompt, confusion[k]) for k in range(len(truth))
                    for _ in range(identity_prompts)]
        named = [k for k in range(len(truth)) for _ in range(identity_prompts)]
        result = metrics.prompt_bootstrap_corrected_shares(neutral, identity, named, resamples, seed=repetition)
        covered += (result.ci_low <= truth) & (truth <= result.ci_high)
        widths.append(result.ci_high - result.ci_low)
        corrected_errors.append(result.corrected - truth)
        observed_errors.append(result.observed - truth)
    return (covered / repetitions, np.mean(widths, axis=0), float(np.sqrt(np.mean(np.square(corrected_errors)))),
            float(np.sqrt(np.mean(np.square(observed_errors)))))


def main() -> int:
    confusion, truth = np.array([[0.9, 0.1], [0.15, 0.85]]), np.array([0.7, 0.3])
    cases = [("4 identity prompts x 10 faces per class", dict(identity_prompts=4, faces_per_identity_prompt=10)),
             ("2 x 20", dict(identity_prompts=2, faces_per_identity_prompt=20)),
             ("8 x 5", dict(identity_prompts=8, faces_per_identity_prompt=5)),
             ("4 x 10, prompts vary (Dirichlet 20)", dict(identity_prompts=4, faces_per_identity_prompt=10, concentration=20.0))]
    print("| case | coverage | mean width | RMSE corrected | RMSE observed |\n|---|---|---|---|---|")
    for name, options in cases:
        coverage, width, corrected_rmse, observed_rmse = simulate(confusion, truth, **options)
        print(f"| {name} | {coverage.round(3).tolist()} | {width.round(3).tolist()} | {corrected_rmse:.3f} | {observed_rmse:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
