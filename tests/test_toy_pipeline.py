"""A shortened run of the toy demo (demo.sh): the real numbered scripts 1 -> 2 -> 3 -> 4 -> eval on the
shipped toy base, with small image counts and a short PopAlign run.

It checks the direction of the result with a margin: on the same evaluation prompts and the same
per-image seeds, the PopAlign model's neutral-prompt discrepancy is clearly below the base
model's, on the 4 occupations the pairs were built from and on the 6 held out from training. The sizes keep that
difference well above the sampling noise of the evaluation (see the margin below), so the test can fail for real: a
trainer that does not update the U-Net leaves the discrepancy exactly where the base has it, and a loss with the wrong
sign (or pairs with winners and losers swapped) drives the tuned model away from the diverse populations: with these
sizes it drew a figure in 1 of 624 evaluation images and the run stopped with an error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # end to end: skipped by `pytest -m "not slow"`

REPO = Path(__file__).resolve().parent.parent

# Shortened demo settings (demo.sh reads them from the environment; eval.sh reads NUM_RESAMPLES, the bootstrap
# resamples of the report's intervals, which no assertion here reads).
SHORT_RUN = {
    "TRAIN_IMAGES_PER_NEUTRAL_PROMPT": "40",
    "TRAIN_IMAGES_PER_IDENTITY_PROMPT": "8",
    "PAIR_ITERATIONS": "400",
    "TRAIN_STEPS": "300",
    "TRAIN_BATCH_SIZE": "8",
    "TRAIN_WARMUP_STEPS": "20",
    "EVAL_IMAGES_PER_NEUTRAL_PROMPT": "40",
    "EVAL_IMAGES_PER_IDENTITY_PROMPT": "2",
    "NUM_RESAMPLES": "200",
    "NUM_PROCESSES": "2",
}
# Required drop of the mean (gender + race) / 2 neutral-prompt discrepancy, in discrepancy units.
# With 40 images per neutral prompt the standard error of one prompt's discrepancy is about 0.06 (0.05 at 60 images,
# times sqrt(60 / 40)), of the mean over 4 prompts and 2 attributes about 0.02, so 0.05 is 2 standard errors or more
# (less for the paired difference, as both models are evaluated on the same seeds; the base draws nearly one identity
# per prompt, and the bootstrap over its images puts the standard error of its mean at 0.01).
# Measured with these settings (training seeds 0 and 1): on the trained occupations base 0.736 -> PopAlign 0.294
# and 0.255; the standard error of PopAlign's mean, by the bootstrap over images, 0.027.
MARGIN = 0.05
# On the 6 held-out occupations (never in a pair) the same margin: with 6 prompts the standard error of the mean is
# smaller (0.021 for PopAlign's mean by the bootstrap). Measured: base 0.759 -> PopAlign 0.604 and 0.564 (seeds 0, 1).
HELDOUT_MARGIN = 0.05


def _mean_discrepancy(summary: pd.DataFrame, model: str) -> float:
    rows = summary[(summary["model"] == model) & (summary["kind"] == "neutral")
                   & summary["metric"].isin(["discrepancy_gender", "discrepancy_race"])]
    assert len(rows) == 2, f"summary.csv lacks neutral discrepancies of {model}"
    return float(rows["mean"].mean())


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_demo")
    env = {**os.environ, **SHORT_RUN, "OUT": str(out), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(REPO / "demo.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


@pytest.mark.parametrize("split, margin", [("train", MARGIN), ("heldout", HELDOUT_MARGIN)])
def test_popalign_lowers_neutral_prompt_discrepancy_on_the_same_seeds(short_demo, split, margin):
    out, _ = short_demo
    summary = pd.read_csv(out / "eval" / f"report_{split}" / "summary.csv")
    base, popalign = _mean_discrepancy(summary, "base"), _mean_discrepancy(summary, "popalign")
    assert popalign < base - margin, f"{split}: PopAlign {popalign:.3f} vs base {base:.3f}: not lower by {margin}"


def test_pairs_come_from_the_training_occupations_only(short_demo):
    out, _ = short_demo
    pairs = pd.read_csv(out / "preferences" / "pairs.csv", dtype=str, keep_default_na=False)
    world = pd.read_csv(REPO / "data" / "toy" / "occupations.csv", dtype=str)
    named = {occupation for occupation in world["occupation"] for prompt in set(pairs["neutral_prompt"]) if f" {occupation} " in prompt}
    assert named == set(world.loc[world["split"] == "train", "occupation"]) == {"doctor", "nurse", "engineer", "teacher"}


def test_short_demo_prints_every_split_and_the_base_skew_is_measured(short_demo):
    out, stdout = short_demo
    for split, prompts in (("train", 4), ("heldout", 6), ("validation", 2)):
        assert f"Occupations of split `{split}` ({prompts} neutral prompts)" in stdout
        assert str(out / "eval" / f"report_{split}" / "report.md") in stdout
    assert "| base |" in stdout and "| popalign |" in stdout
    summary = pd.read_csv(out / "eval" / "report_heldout" / "summary.csv")
    # The base model's skew is measured from its own pictures: far from uniform on neutral prompts
    # (uniform gender gives 0, one gender only 0.707), while it draws what identity prompts ask for.
    base_gender = summary[(summary["model"] == "base") & (summary["kind"] == "neutral") & (summary["metric"] == "discrepancy_gender")]
    assert float(base_gender["mean"].iloc[0]) > 0.3
    base_identity = summary[(summary["model"] == "base") & (summary["kind"] == "identity") & (summary["metric"] == "accuracy_race_x_gender")]
    assert float(base_identity["mean"].iloc[0]) > 0.9
