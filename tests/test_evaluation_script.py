"""eval.sh end to end on the tiny SD pipeline: generation, CLIP classification, the five quality
scorers on tiny random checkpoints, evaluation and the report, for the base and a tuned U-Net."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # end to end: skipped by `pytest -m "not slow"`

REPO_ROOT = Path(__file__).resolve().parent.parent
SCORERS = "hpsv2,pickscore,clip,aesthetic,imagereward"


def eval_environment(**variables) -> dict:
    env = dict(os.environ)
    # eval.sh calls `python` and `accelerate`: the ones of this interpreter's environment.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update({key: str(value) for key, value in variables.items()})
    return env


@pytest.fixture(scope="module")
def eval_run(tiny_sd_path, tmp_path_factory):
    import torch
    from diffusers import UNet2DConditionModel

    from popalign.score.tiny import build_tiny_scorer_assets

    root = tmp_path_factory.mktemp("eval_sh")
    # A "tuned" U-Net: the tiny pipeline's U-Net with perturbed weights, saved as train_popalign.py saves one.
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    unet.save_pretrained(root / "tuned_unet")
    # The run folder of a train_popalign.py run holds the model card, whose Evaluation section popalign.evaluate fills in.
    from popalign.training.model_card import EVALUATION_HEADING, NOT_EVALUATED

    (root / "README.md").write_text(f"# A tuned model\n\n{EVALUATION_HEADING}\n\n{NOT_EVALUATED}\n\n## Intended uses\n\nTests.\n")
    scorer_options = build_tiny_scorer_assets(root / "scorers")
    (root / "scorer_options.json").write_text(json.dumps(scorer_options))
    (root / "eval.csv").write_text("occupation,activity\ndoctor,\nengineer,\nastronomer,\n")
    generic = pd.read_csv(REPO_ROOT / "data" / "eval_generic_prompts.csv", dtype=str, keep_default_na=False)
    generic.head(2).to_csv(root / "generic.csv", index=False)

    env = eval_environment(
        BASE_MODEL=tiny_sd_path, TUNED_MODELS=f"tuned=unet:{root / 'tuned_unet'}", EVAL_PROMPTS=root / "eval.csv",
        GENERIC_PROMPTS=root / "generic.csv", IMAGES_PER_PROMPT=3, IMAGES_PER_IDENTITY_PROMPT=1, STEPS=2, WIDTH=64, HEIGHT=64, BATCH_SIZE=4, CLASSIFIER="clip",
        CLIP_MODEL=scorer_options["clip"]["model"], SCORERS=SCORERS, SCORER_OPTIONS_JSON=root / "scorer_options.json",
        NUM_RESAMPLES=300, OUT_DIR=root / "out", UPDATE_MODEL_CARDS=1)
    completed = subprocess.run(["bash", "eval.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    return root / "out", completed


def test_eval_sh_runs_end_to_end_and_writes_the_report(eval_run):
    out, completed = eval_run
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = (out / "report" / "report.md").read_text()
    assert "# Evaluation: `base` vs `tuned`" in report
    document = json.loads((out / "report" / "evaluation.json").read_text())
    assert set(document["models"]) == {"base", "tuned"}
    for name in ["base", "tuned"]:
        # 3 neutral prompts x 3 images + 18 identity prompts x 1 image + 2 generic prompts x 3 images
        assert document["models"][name]["num_images"] == 9 + 18 + 6
        assert set(document["models"][name]["scorers"]) == set(SCORERS.split(","))
    # the same prompts and seeds for both models: every image pairs up
    assert document["image_pairing"]["tuned"]["paired_images"] == 33
    assert document["image_pairing"]["tuned"]["same_seed"] == 33
    per_prompt = pd.read_csv(out / "report" / "per_prompt_tuned.csv")
    assert per_prompt["kind"].value_counts().to_dict() == {"identity": 18, "neutral": 3, "generic": 2}
    assert per_prompt["prompt"].str.startswith("best quality, a realistic photo of ").sum() == 21
    for scorer in SCORERS.split(","):
        assert np.isfinite(per_prompt[f"quality_{scorer}"]).all(), scorer
    comparison = pd.read_csv(out / "report" / "comparison.csv")
    assert {"discrepancy_gender", "accuracy_gender", "quality_hpsv2"} <= set(comparison["metric"])
    for name in [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert (out / "report" / name).is_file(), name


def test_tuned_model_used_its_own_unet_with_the_same_seeds(eval_run):
    out, completed = eval_run
    assert completed.returncode == 0, completed.stderr[-4000:]
    base = pd.read_csv(out / "images" / "base" / "manifest.csv", dtype=str, keep_default_na=False)
    tuned = pd.read_csv(out / "images" / "tuned" / "manifest.csv", dtype=str, keep_default_na=False)
    assert (base["unet"] == "").all() and tuned["unet"].str.endswith("tuned_unet").all()
    assert list(base["seed"]) == list(tuned["seed"])
    first_base = np.asarray(Image.open(out / "images" / "base" / base["image_path"][0]), dtype=float)
    first_tuned = np.asarray(Image.open(out / "images" / "tuned" / tuned["image_path"][0]), dtype=float)
    assert np.abs(first_base - first_tuned).mean() > 1.0  # different weights, different pixels


def test_eval_sh_rejects_a_bad_tuned_model_entry_before_any_work(tmp_path):
    for spec, message in [("popalign=outputs/unet", "expected NAME=unet:DIR"), ("x=checkpoint:dir", "unknown kind")]:
        completed = subprocess.run(["bash", "eval.sh"], cwd=REPO_ROOT, capture_output=True, text=True,
                                   env=eval_environment(TUNED_MODELS=spec, OUT_DIR=tmp_path / "out"))
        assert completed.returncode == 2
        assert message in completed.stderr
        assert not (tmp_path / "out").exists()


def test_the_tuned_run_model_card_gets_the_headline(eval_run):
    out, completed = eval_run
    assert completed.returncode == 0, completed.stderr[-4000:]
    card = (out.parent / "README.md").read_text()
    assert "Not evaluated yet" not in card and "- `tuned`, neutral prompts, `discrepancy_gender`" in card
    assert f"Full report: `{(out / 'report' / 'report.md').resolve()}`" in card and card.endswith("## Intended uses\n\nTests.\n")
    # A quick evaluation of the same folders into another report leaves the card alone unless asked.
    quick = subprocess.run([sys.executable, "-m", "popalign.evaluate", "--base", str(out / "images" / "base"), "--tuned",
                            f"tuned={out / 'images' / 'tuned'}", "--classifier", "clip", "--num_resamples", "50",
                            "--chart_prompts", "0", "--grid_prompts", "0", "--output_dir", str(out.parent / "quick")],
                           cwd=REPO_ROOT, capture_output=True, text=True, env=eval_environment())
    assert quick.returncode == 0, quick.stderr[-2000:]
    assert (out.parent / "README.md").read_text() == card and "updated the Evaluation section" not in quick.stdout


def test_eval_sh_draws_identity_prompts_in_rounds_until_precise_enough(tmp_path):
    """TARGET_INTERVAL_WIDTH on the toy base: identity-specific prompts start at MIN images and double until the
    Wilson interval of their identity accuracy is as narrow as asked (or the cap); both models get the same counts."""
    from popalign.attributes import load_attributes
    from popalign.evaluate.tables import load_image_folder
    from popalign.evaluate.precision import identity_accuracy_counts, wilson_interval

    (tmp_path / "occupations.csv").write_text("occupation,activity\ndoctor,in a clinic\nnurse,in a ward\n")
    env = eval_environment(RECIPE="configs/toy_recipe.sh", EVAL_PROMPTS=tmp_path / "occupations.csv", IDENTITY_RESTRICT="race=white,asian,black",
                           TUNED_MODELS="same=unet:models/toy_base/unet", IMAGES_PER_PROMPT=4, IMAGES_PER_IDENTITY_PROMPT=8,
                           MIN_IMAGES_PER_IDENTITY_PROMPT=2, TARGET_INTERVAL_WIDTH=0.6, NUM_PROCESSES=1, GUIDANCE=3.0, SEED=1,
                           NUM_RESAMPLES=200, OUT_DIR=tmp_path / "out", POPALIGN_TOY_OCCUPATIONS=tmp_path / "occupations.csv",
                           POPALIGN_TOY_ATTRIBUTES="data/toy/attributes.json")
    completed = subprocess.run(["bash", "eval.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    assert "identity-specific prompts needing more images: 0" in completed.stdout
    attributes = load_attributes(REPO_ROOT / "data" / "toy" / "attributes.json")
    base = load_image_folder(tmp_path / "out/images/base", "toy", attributes, scorers=[])
    same = load_image_folder(tmp_path / "out/images/same", "toy", attributes, scorers=[])
    assert sorted(base["image_path"]) == sorted(same["image_path"])  # like with like
    assert (base[base["kind"] == "neutral"].groupby("prompt_id").size() == 4).all()
    counts = identity_accuracy_counts(base, attributes)
    assert len(counts) == 12 and set(counts["drawn"]) <= {2, 4, 8}
    for row in counts.itertuples():  # stopped early only when precise enough (the same weights: the same readings)
        low, high = wilson_interval(row.right, row.faces)
        assert row.drawn == 8 or high - low <= 0.6, row
        if row.drawn > 2:  # the round before was not precise enough
            previous = identity_accuracy_counts(base[(base["prompt_id"] == row.prompt_id) & (base["image_index"] < row.drawn // 2)], attributes)
            [before] = previous.itertuples()
            low, high = wilson_interval(before.right, before.faces)
            assert high - low > 0.6
    assert (tmp_path / "out/report/report.md").is_file()
