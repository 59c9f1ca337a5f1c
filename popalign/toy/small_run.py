"""A small run of every stage on the shipped toy base, for the bad-input tests and the crash-and-resume script.

Run in a folder of its own (every path below is relative to it):

    occupations.csv, attributes.json                    step 1's inputs (two occupations, the toy attributes)
    prompts/train.csv                                   step 1
    images/train/ (images, manifest, labels_toy.csv, quality_toy.csv)   step 2: generation, classification, scoring
    preferences/pairs.csv                               step 3
    train/popalign/                                     step 4
    report/                                             evaluation (of images/train against a copy, images/tuned)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TOY_MODEL = REPO_ROOT / "models" / "toy_base"
TOY_ATTRIBUTES = REPO_ROOT / "data" / "toy" / "attributes.json"
OCCUPATIONS = "occupation,activity\ndoctor,in a clinic\nnurse,in a ward\n"
# The toy classifier reads these (popalign.toy.classifier), relative to the run's folder.
TOY_ENVIRONMENT = {"POPALIGN_TOY_ATTRIBUTES": "attributes.json", "POPALIGN_TOY_OCCUPATIONS": "occupations.csv"}
STAGES = ("prompts", "generate", "classify", "score", "pairs", "train", "evaluate", "report")
# How each stage is started: a script at the repository root or a module.
STAGE_ENTRY_POINTS = {"prompts": str(REPO_ROOT / "1_generate_diverse_prompts.py"), "generate": "-m popalign.generate",
                      "classify": "-m popalign.classify", "score": "-m popalign.score",
                      "pairs": str(REPO_ROOT / "3_generate_preferences.py"), "train": str(REPO_ROOT / "train_popalign.py"),
                      "evaluate": "-m popalign.evaluate", "report": "-m popalign.toy.report"}


def stage_arguments(images_per_neutral_prompt: int = 3, images_per_identity_prompt: int = 1, steps: int = 20,
                    max_train_steps: int = 1, checkpointing_steps: int = 0, batch_size: int = 8) -> dict[str, list[str]]:
    """The command line of each stage (without its entry point), paths relative to the run's folder."""
    return {
        "prompts": ["--input", "occupations.csv", "--attributes", "attributes.json", "--axes", "gender,race",
                    "--output", "prompts/train.csv"],
        "generate": ["--pretrained_model_name_or_path", str(TOY_MODEL), "--prompts_csv", "prompts/train.csv",
                     "--output_dir", "images/train", "--images_per_neutral_prompt", str(images_per_neutral_prompt),
                     "--images_per_identity_prompt", str(images_per_identity_prompt), "--steps", str(steps), "--guidance", "1.0",
                     "--width", "32", "--height", "32", "--precision", "fp32", "--batch_size", str(batch_size)],
        "classify": ["--output_dir", "images/train", "--classifier", "toy", "--batch_size", str(batch_size)],
        "score": ["--output_dir", "images/train", "--scorers", "toy", "--batch_size", str(batch_size)],
        "pairs": ["--image_dirs", "images/train", "--classifier", "toy", "--attributes", "attributes.json",
                  "--output", "preferences/pairs.csv", "--num_iterations", "20", "--population_size", "2", "--seed", "0"],
        "train": ["--pairs_file", "preferences/pairs.csv", "--output_dir", "train/popalign",
                  "--pretrained_model_name_or_path", str(TOY_MODEL), "--pretrained_vae_model_name_or_path", "",
                  "--resolution", "32", "--mixed_precision", "no", "--no_use_8bit_adam", "--no_gradient_checkpointing",
                  "--max_train_steps", str(max_train_steps), "--train_batch_size", "2", "--lr_warmup_steps", "0",
                  "--checkpointing_steps", str(checkpointing_steps), "--report_to", "none", "--resume_from_checkpoint", "latest"],
        "evaluate": ["--base", "images/train", "--tuned", "tuned=images/tuned", "--classifier", "toy", "--scorers", "toy",
                     "--attributes", "attributes.json", "--num_resamples", "50", "--output_dir", "report"],
        "report": ["report"],
    }


def stage_command(stage: str, arguments: list[str]) -> list[str]:
    """The command that runs `stage` with `arguments` in a process of its own."""
    return [sys.executable, *STAGE_ENTRY_POINTS[stage].split(), *arguments]


def write_inputs(folder: Path) -> None:
    """Step 1's inputs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "occupations.csv").write_text(OCCUPATIONS, encoding="utf-8")
    shutil.copy(TOY_ATTRIBUTES, folder / "attributes.json")
