"""Bad input is one line naming the file (and row) or the flag, exit code 2, and nothing already written changes.

Every case runs a stage's real entry point, in a copy of a small valid run of the whole pipeline
(tests/bad_input_world.py), with one flag or one file broken, and checks: exit code 2; stderr is one line,
`error: ...`, holding the expected words; every file in the world is byte-identical afterwards and no file was
added (the stages check before they write).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
from PIL import Image

from bad_input_world import REPO_ROOT, TOY_MODEL, snapshot, stage_arguments, stage_mains
from popalign.attributes import load_attributes
from popalign.io import InputError


@pytest.fixture
def world(small_run_copy):
    return small_run_copy


# ----- how a case breaks the world -----------------------------------------------------------------------------------

def write(path: str, text: str) -> Callable[[Path], None]:
    def edit(world: Path) -> None:
        target = world / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return edit


def make_folder(path: str) -> Callable[[Path], None]:
    return lambda world: (world / path).mkdir(parents=True, exist_ok=True)


def set_cell(path: str, position: int, column: str, value: str) -> Callable[[Path], None]:
    """Data row `position` (0-based; the file's row position + 2) of a CSV gets `value` in `column`."""
    def edit(world: Path) -> None:
        frame = pd.read_csv(world / path, dtype=str, keep_default_na=False)
        frame.loc[position, column] = value
        frame.to_csv(world / path, index=False)
    return edit


def drop_column(path: str, column: str) -> Callable[[Path], None]:
    def edit(world: Path) -> None:
        frame = pd.read_csv(world / path, dtype=str, keep_default_na=False)
        frame.drop(columns=[column]).to_csv(world / path, index=False)
    return edit


def drop_row(path: str, position: int) -> Callable[[Path], None]:
    def edit(world: Path) -> None:
        frame = pd.read_csv(world / path, dtype=str, keep_default_na=False)
        frame.drop(index=position).to_csv(world / path, index=False)
    return edit


def duplicate_row(path: str, position: int) -> Callable[[Path], None]:
    def edit(world: Path) -> None:
        frame = pd.read_csv(world / path, dtype=str, keep_default_na=False)
        pd.concat([frame, frame.iloc[[position]]]).to_csv(world / path, index=False)
    return edit


def remove(path: str) -> Callable[[Path], None]:
    def edit(world: Path) -> None:
        target = world / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return edit


def first_image(folder: str = "images/train") -> Callable[[Path], str]:
    return lambda world: pd.read_csv(world / folder / "manifest.csv")["image_path"].iloc[0]


def truncate_first_image(world: Path) -> None:
    path = world / "images/train" / first_image()(world)
    path.write_bytes(path.read_bytes()[:40])


def unclassified_truncated_image(world: Path) -> None:
    """A folder whose labels are not made yet and whose first image is cut short."""
    for name in ("labels_toy.csv", ".labels_toy.settings.json", ".labels_toy.part0.jsonl"):
        (world / "images/train" / name).unlink()
    truncate_first_image(world)


def symlink_to_outside(path: str) -> Callable[[Path], None]:
    """`path` becomes a link to a file outside the world's stage folders (a planted link)."""
    def edit(world: Path) -> None:
        (world / "outside.txt").write_text("not the pipeline's\n", encoding="utf-8")
        target = world / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        target.symlink_to(world / "outside.txt")
    return edit


def unet_with_a_wrongly_shaped_tensor(world: Path) -> None:
    """train/bad_unet: the trained U-Net with its first tensor replaced by one of another shape."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(world / "train/popalign/unet", world / "train/bad_unet")
    weights_path = world / "train/bad_unet/diffusion_pytorch_model.safetensors"
    weights = load_file(weights_path)
    weights[sorted(weights)[0]] = torch.zeros(3, 3)
    save_file(weights, weights_path)


def base_model_with_a_wrongly_shaped_unet_tensor(world: Path) -> None:
    """bad_base: the toy base with its U-Net's first tensor replaced by one of another shape."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(TOY_MODEL, world / "bad_base")
    weights_path = world / "bad_base/unet/diffusion_pytorch_model.safetensors"
    weights = load_file(weights_path)
    weights[sorted(weights)[0]] = torch.zeros(3, 3)
    save_file(weights, weights_path)


def vae_of_8_latent_channels(world: Path) -> None:
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=[16], down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"],
                  latent_channels=8, norm_num_groups=8).save_pretrained(world / "vae8")


def vae_of_another_scaling(world: Path) -> None:
    shutil.copytree(TOY_MODEL / "vae", world / "vae_scaled")
    config = json.loads((world / "vae_scaled/config.json").read_text())
    (world / "vae_scaled/config.json").write_text(json.dumps({**config, "scaling_factor": 0.13025}))


# ----- the cases -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    stage: str
    name: str
    message: str                                   # words the one error line holds
    flags: dict = field(default_factory=dict)      # flag -> new value (None: the flag is left out)
    extra: tuple = ()                              # arguments added at the end
    edit: Callable[[Path], None] | None = None     # what is broken in the world before the run


def C(stage, name, message, edit=None, extra=(), **flags):
    return Case(stage, name, message, {f"--{flag}": value for flag, value in flags.items()}, tuple(extra), edit)


CASES = [
    # Step 1: prompts.
    C("prompts", "input missing", "no_such.csv: file not found", input="no_such.csv"),
    C("prompts", "input without occupation column", "occupations.csv: missing column(s) occupation",
      write("occupations.csv", "job,activity\ndoctor,in a clinic\n")),
    C("prompts", "input with an empty occupation", "occupations.csv: row 3", write("occupations.csv", "occupation,activity\ndoctor,in a clinic\n,in a ward\n")),
    C("prompts", "input empty", "occupations.csv", write("occupations.csv", "occupation,activity\n")),
    C("prompts", "attributes missing", "nothing.json: file not found", attributes="nothing.json"),
    C("prompts", "attributes not JSON", "attributes.json", write("attributes.json", "{not json")),
    C("prompts", "attributes of the wrong shape", "attributes.json: expected an object", write("attributes.json", "[1, 2]")),
    C("prompts", "unknown axis", "--axes", axes="gender,colour"),
    C("prompts", "unknown restricted value", "--restrict", extra=("--restrict", "race=green")),
    C("prompts", "template without a person", "--template", extra=("--template", "a photo of a doctor")),
    C("prompts", "unknown split", "--split", extra=("--split", "train")),
    C("prompts", "a file where the output folder should be", "is a file, not a folder", write("out", "x"), output="out/prompts.csv"),
    C("prompts", "a folder where the output file should be", "a folder is in the way", output="images"),
    C("prompts", "an unknown flag", "unrecognized arguments: --ouput", extra=("--ouput", "x.csv")),
    C("prompts", "template with an unknown field", "unknown field {place}", extra=("--template", "a photo of {person} at {place}")),
    C("prompts", "template with a lone brace", "--template", extra=("--template", "a photo of { {person}")),
    C("prompts", "template with a lone closing brace", "Single '}'", extra=("--template", "a photo of {person} }")),
    C("prompts", "template reaching an attribute", "unknown field {person.__class__.__mro__}", extra=("--template", "{person.__class__.__mro__}")),
    C("prompts", "template indexing a field", "unknown field {person[0]}", extra=("--template", "a photo of {person[0]}")),
    C("prompts", "a link where the output file should be", "prompts/train.csv: is a symbolic link", symlink_to_outside("prompts/train.csv")),
    # Step 2: generation (checked before any model loads).
    C("generate", "prompts missing", "missing.csv: file not found", prompts_csv="missing.csv"),
    C("generate", "prompts with an unknown kind", "prompts/train.csv: row 2", set_cell("prompts/train.csv", 0, "kind", "neutrall")),
    C("generate", "prompts without a prompt column", "missing column(s) prompt", drop_column("prompts/train.csv", "prompt")),
    C("generate", "unknown scheduler", "--scheduler", scheduler="eulerr"),
    C("generate", "unknown precision", "--precision", precision="fp8"),
    C("generate", "zero steps", "--steps", steps="0"),
    C("generate", "width not a multiple of 8", "--width", width="30"),
    C("generate", "negative image count", "--images_per_neutral_prompt", images_per_neutral_prompt="-1"),
    C("generate", "zero images asked", "no image", images_per_neutral_prompt="0", images_per_identity_prompt="0"),
    C("generate", "zero batch", "--batch_size", batch_size="0"),
    C("generate", "guidance not a number", "--guidance", guidance="nan"),
    C("generate", "model path typo", "no such file or folder", pretrained_model_name_or_path="./models/toy_bsae"),
    C("generate", "unet folder missing", "--unet", extra=("--unet", "train/popalign/unet_missing")),
    C("generate", "lora folder missing", "--lora", extra=("--lora", "train/lora_missing")),
    C("generate", "unknown kind asked", "--kinds", kinds="neutral,identiti"),
    C("generate", "a file where the image folder should be", "a file is in the way", write("images/new", "x"), output_dir="images/new"),
    C("generate", "other settings in a finished folder", "other settings", seed="7"),
    C("generate", "steps not an integer", "argument --steps: invalid int value", steps="twenty"),
    C("generate", "negative seed", "argument --seed: seed -1 is out of range", seed="-1"),
    C("generate", "seed of 2**32", "argument --seed: seed 4294967296 is out of range", seed="4294967296"),
    C("generate", "unet folder holding a VAE", "holds a model of class AutoencoderKL, not of class UNet2DConditionModel", extra=("--unet", str(TOY_MODEL / "vae"))),
    C("generate", "unet with a wrongly shaped tensor", "bad_unet/diffusion_pytorch_model.safetensors: tensor", unet_with_a_wrongly_shaped_tensor,
      extra=("--unet", "train/bad_unet")),
    C("generate", "base model with a wrongly shaped U-Net tensor", "bad_base/unet/diffusion_pytorch_model.safetensors: tensor",
      base_model_with_a_wrongly_shaped_unet_tensor, pretrained_model_name_or_path="bad_base"),
    C("generate", "a link where the manifest should be", "manifest.csv: is a symbolic link", symlink_to_outside("images/train/manifest.csv")),
    # Step 2: classification.
    C("classify", "zero batch", "--batch_size", batch_size="0"),
    C("classify", "unknown DeepFace detector", "--detector", classifier="deepface", detector="yunett"),
    C("classify", "CLIP model path typo", "--clip_model ./models/clip_typo", classifier="clip", clip_model="./models/clip_typo"),
    C("classify", "face threshold above 1", "--face_threshold", classifier="clip", face_threshold="1.5", clip_model=str(TOY_MODEL)),
    C("classify", "unknown classifier", "argument --classifier: invalid choice", classifier="deepfake"),
    C("classify", "no manifest", "manifest.csv: file not found", output_dir="prompts"),
    C("classify", "manifest without image_path", "manifest.csv: missing column(s) image_path", drop_column("images/train/manifest.csv", "image_path")),
    C("classify", "an image listed twice", "manifest.csv: row 20", duplicate_row("images/train/manifest.csv", 0)),
    C("classify", "a listed image missing", "manifest.csv: row 2", lambda world: (world / "images/train" / first_image()(world)).unlink()),
    C("classify", "labels file is a folder", "a folder is in the way", lambda world: (remove("images/train/labels_toy.csv")(world), make_folder("images/train/labels_toy.csv")(world))),
    # Step 2: scoring.
    C("score", "unknown scorer", "--scorers: unknown scorer(s) hps", scorers="toy,hps"),
    C("score", "no scorer", "--scorers", scorers=","),
    C("score", "malformed option", "expected SCORER.KEY=VALUE", extra=("--option", "toyweights=1")),
    C("score", "option for an unknown scorer", "unknown scorer(s) hspv2", extra=("--option", "hspv2.version=v2.0")),
    C("score", "options file missing", "--options_json none.json", extra=("--options_json", "none.json")),
    C("score", "options file not an object", "expected an object", write("options.json", "[1]"), extra=("--options_json", "options.json")),
    C("score", "zero batch", "--batch_size must be >= 1", batch_size="0"),
    C("score", "unknown precision", "--precision", extra=("--precision", "fp8")),
    C("score", "no manifest", "manifest.csv: file not found", output_dir="prompts"),
    C("score", "manifest without prompt", "missing column(s) prompt", drop_column("images/train/manifest.csv", "prompt")),
    # Step 3: pairs.
    C("pairs", "image folder missing", "images/none", image_dirs="images/none"),
    C("pairs", "labels of another classifier", "labels_deepface.csv: file not found", classifier="deepface"),
    C("pairs", "unknown gender label", "labels_toy.csv: row 3", set_cell("images/train/labels_toy.csv", 1, "gender", "Woman")),
    C("pairs", "face_detected not 0/1", "labels_toy.csv: row 2", set_cell("images/train/labels_toy.csv", 0, "face_detected", "maybe")),
    C("pairs", "an image without labels", "no row for image_path", drop_row("images/train/labels_toy.csv", 0)),
    C("pairs", "unknown kind in the manifest", "manifest.csv: row 4", set_cell("images/train/manifest.csv", 2, "kind", "diverse")),
    C("pairs", "zero iterations", "--num_iterations", num_iterations="0"),
    C("pairs", "zero population", "--population_size", population_size="0"),
    C("pairs", "attributes of the wrong shape", "attributes.json", write("attributes.json", '{"attributes": ["gender"]}')),
    C("pairs", "a folder where the pairs file should be", "a folder is in the way", output="images"),
    C("pairs", "negative seed", "argument --seed: seed -1 is out of range", seed="-1"),
    C("pairs", "seed of 2**32", "argument --seed: seed 4294967296 is out of range", seed="4294967296"),
    C("pairs", "a link where the summary should be", "pairs.summary.json: is a symbolic link", symlink_to_outside("preferences/pairs.summary.json")),
    # Step 4: training (a finished run lies in train/popalign; new runs go elsewhere unless the case is about it).
    C("train", "pairs file missing", "none.csv: file not found", pairs_file="none.csv", output_dir="train/new"),
    C("train", "pairs file without winner_path", "missing column(s) winner_path", drop_column("preferences/pairs.csv", "winner_path"), output_dir="train/new"),
    C("train", "a pair's image missing", "pairs.csv: row 2", set_cell("preferences/pairs.csv", 0, "winner_path", "../images/none.png"), output_dir="train/new"),
    C("train", "pairs file empty", "pairs.csv", write("preferences/pairs.csv", "winner_path,loser_path,caption\n"), output_dir="train/new"),
    C("train", "beta 0", "--beta", beta="0", output_dir="train/new"),
    C("train", "negative learning rate", "--learning_rate", learning_rate="-1e-4", output_dir="train/new"),
    C("train", "zero steps", "--max_train_steps", max_train_steps="0", output_dir="train/new"),
    C("train", "zero batch", "--train_batch_size", train_batch_size="0", output_dir="train/new"),
    C("train", "resolution not a multiple of 8", "--resolution", resolution="30", output_dir="train/new"),
    C("train", "negative loser weight", "--lambda_loser", lambda_loser="-1", output_dir="train/new"),
    C("train", "caption dropout above 1", "--caption_dropout", caption_dropout="1.5", output_dir="train/new"),
    C("train", "unknown loss", "argument --loss: invalid choice", loss="dop", output_dir="train/new"),
    C("train", "unknown mixed precision", "--mixed_precision", mixed_precision="fp8", output_dir="train/new"),
    C("train", "model path typo", "no such file or folder", pretrained_model_name_or_path="./models/toy_bsae", output_dir="train/new"),
    C("train", "8-bit Adam without CUDA", "--use_8bit_adam", extra=("--use_8bit_adam",), output_dir="train/new"),
    C("train", "checkpoint to resume missing", "--resume_from_checkpoint", resume_from_checkpoint="checkpoint-9"),
    C("train", "checkpoint to resume missing in a new run", "--resume_from_checkpoint", resume_from_checkpoint="checkpoint-9", output_dir="train/new"),
    C("train", "resume under another learning rate", "learning_rate", learning_rate="5e-4", resume_from_checkpoint="latest"),
    C("train", "a file where the output folder should be", "a file is in the way", write("train/file", "x"), output_dir="train/file"),
    C("train", "seed of 2**32", "argument --seed: seed 4294967296 is out of range", seed="4294967296", output_dir="train/new"),
    C("train", "negative validation seed", "argument --validation_seed: seed -1 is out of range", validation_seed="-1", output_dir="train/new"),
    C("train", "VAE of other latent channels", "a VAE of 8 latent channels, but the U-Net", vae_of_8_latent_channels,
      pretrained_vae_model_name_or_path="vae8", output_dir="train/new"),
    C("train", "VAE of another latent scaling", "scales its latents by 0.13025", vae_of_another_scaling,
      pretrained_vae_model_name_or_path="vae_scaled", output_dir="train/new"),
    C("train", "base model with a wrongly shaped U-Net tensor", "bad_base/unet/diffusion_pytorch_model.safetensors: tensor",
      base_model_with_a_wrongly_shaped_unet_tensor, pretrained_model_name_or_path="bad_base", output_dir="train/new"),
    C("train", "VAE folder holding a U-Net", "holds a model of class UNet2DConditionModel, not of class AutoencoderKL",
      pretrained_vae_model_name_or_path=str(TOY_MODEL / "unet"), output_dir="train/new"),
    # Evaluation.
    C("evaluate", "base folder missing", "images/none", base="images/none"),
    C("evaluate", "tuned entry without a name", "--tuned", tuned="images/tuned"),
    C("evaluate", "tuned folder lacks an image", "differ", drop_row("images/tuned/manifest.csv", 0)),
    C("evaluate", "labels of another classifier", "labels_clip.csv", classifier="clip"),
    C("evaluate", "quality scores missing", "quality_toy.csv", remove("images/tuned/quality_toy.csv")),
    C("evaluate", "confidence above 1", "--confidence", extra=("--confidence", "1.5")),
    C("evaluate", "zero resamples", "--num_resamples", num_resamples="0"),
    C("evaluate", "unknown axis", "--axes", extra=("--axes", "gender,colour")),
    C("evaluate", "split without a splits file", "--split", extra=("--split", "train")),
    C("evaluate", "a file where the report folder should be", "--output_dir", write("report_file", "x"), output_dir="report_file"),
    # The toy report.
    C("report", "report folder without summary", "summary.csv: file not found", edit=make_folder("empty_report"), extra=()),
    C("report", "summary without its metric column", "summary.csv: missing column(s) metric", drop_column("report/summary.csv", "metric")),
]


def command_line(case: Case) -> list[str]:
    arguments = list(stage_arguments()[case.stage])
    if case.stage == "report" and case.name == "report folder without summary":
        arguments = ["empty_report"]
    for flag, value in case.flags.items():
        if flag in arguments:
            position = arguments.index(flag)
            if value is None:
                del arguments[position:position + 2]
            else:
                arguments[position + 1] = value
        elif value is not None:
            arguments += [flag, value]
    return arguments + list(case.extra)


@pytest.mark.parametrize("case", CASES, ids=[f"{case.stage}: {case.name}" for case in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, capsys, case):
    if case.edit is not None:
        case.edit(world)
    before = snapshot(world)
    main = stage_mains()[case.stage]
    capsys.readouterr()
    try:
        code = main(command_line(case))
    except SystemExit as stop:  # argparse's own rejections
        code = stop.code
    error = capsys.readouterr().err
    lines = [line for line in error.strip().splitlines() if line.strip()]
    assert code == 2, error[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), error[-2000:]
    assert case.message in lines[0], lines[0]
    after = snapshot(world)
    assert sorted(after) == sorted(before), f"files added or removed: {sorted(set(after) ^ set(before))}"
    assert [name for name in before if after[name] != before[name]] == []


def test_the_suite_covers_every_stage_with_60_cases_or_more():
    assert len(CASES) >= 60
    assert {case.stage for case in CASES} == set(stage_mains())


def test_a_truncated_image_found_while_classifying_is_named_and_nothing_before_changes(world, capsys):
    """An image cut short after generation (a copy gone wrong): classification names it and stops; what was there
    before is unchanged (the labels of the batches before it may be added)."""
    unclassified_truncated_image(world)
    before = snapshot(world)
    assert stage_mains()["classify"](stage_arguments()["classify"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("error: ") and first_image()(world) in line and "re-run generation" in line
    after = snapshot(world)
    assert {name: after.get(name) for name in before} == before


@pytest.mark.parametrize("content, message", [
    ([1, 2], "expected an object with a non-empty 'attributes' object"),
    ({"attributes": ["gender"]}, "expected an object with a non-empty 'attributes' object"),
    ({"attributes": {"gender": ["male", "female"]}}, "attribute 'gender' must be an object with 'values'"),
    ({"attributes": {"gender": {"values": {"male": "male"}, "classifier_labels": ["Man"]}}}, "'classifier_labels' must map"),
    ({"attributes": {"gender": {"values": {"male": "male"}}}, "word_order": "gender"}, "'word_order' must be a list"),
    ({"attributes": {"gender`<b>": {"values": {"male": "male"}}}}, "attribute name 'gender`<b>': use lowercase letters"),
])
def test_attribute_files_of_the_wrong_shape(tmp_path, content, message):
    path = tmp_path / "attributes.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InputError, match=f"{path}: .*{message}"):
        load_attributes(path)


def test_a_truncated_image_is_named_when_read(tmp_path):
    from popalign.image_jobs import load_rgb

    path = tmp_path / "00000.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(InputError, match=f"{path}: not a readable image .* re-run generation"):
        load_rgb(path)
    (tmp_path / "text.png").write_text("not a picture")
    with pytest.raises(InputError, match="text.png: not a readable image"):
        load_rgb(tmp_path / "text.png")


def wrapper_environment(**variables) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", **variables}


@pytest.mark.parametrize("variables, message", [
    ({"DETECTOR": "yunett", "CLASSIFIER": "deepface"}, "--detector: unknown DeepFace detector 'yunett'"),
    ({"CLASSIFY_BATCH_SIZE": "0"}, "--batch_size must be >= 1"),
    ({"STEPS": "0"}, "--steps"),
])
def test_2_generate_images_sh_checks_classification_before_generating(world, variables, message):
    """Through the wrapper: one line, exit 2, before any image is made (the classification settings included)."""
    out_dir = world / "images" / "fresh"
    completed = subprocess.run(["bash", str(REPO_ROOT / "2_generate_images.sh")], cwd=REPO_ROOT, capture_output=True, text=True,
                               env=wrapper_environment(RECIPE="configs/toy_recipe.sh", PROMPTS_CSV=str(world / "prompts/train.csv"),
                                                       OUT_DIR=str(out_dir), NUM_PROCESSES="1", **variables))
    assert completed.returncode == 2, completed.stderr[-2000:]
    [line] = completed.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert not out_dir.exists()


@pytest.mark.parametrize("variables, message", [
    ({"SCORERS": "toy,hps"}, "error: --scorers: unknown scorer(s) hps"),
    ({"TARGET_INTERVAL_WIDTH": "2"}, "error: --target_interval_width must be in (0, 1), got 2.0"),
])
def test_eval_sh_checks_scoring_and_rounds_before_any_file(world, variables, message):
    out_dir = world / "eval"
    completed = subprocess.run(["bash", str(REPO_ROOT / "eval.sh")], cwd=REPO_ROOT, capture_output=True, text=True,
                               env=wrapper_environment(RECIPE="configs/toy_recipe.sh", OUT_DIR=str(out_dir), NUM_PROCESSES="1",
                                                       TUNED_MODELS="", **variables))
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert completed.stderr.strip().splitlines()[-1].startswith(message)
    assert not out_dir.exists()  # not even the prompt files


def test_eval_sh_names_the_generic_prompts_row_and_keeps_the_prompt_files(world):
    """A bad row of GENERIC_PROMPTS is named in its own file; prompt files of an earlier evaluation stay as they were."""
    out_dir = world / "eval"
    (out_dir / "prompts").mkdir(parents=True)
    earlier = {name: f"earlier {name}\n" for name in ("eval_prompts_diverse.csv", "eval_prompts_all.csv")}
    for name, text in earlier.items():
        (out_dir / "prompts" / name).write_text(text)
    header = (REPO_ROOT / "data/toy/generic_prompts.csv").read_text().splitlines()[0]
    generic = world / "generic.csv"
    generic.write_text(f"{header}\nab12,generic,a quiet street,a quiet street,,,,,\nab13,scenery,a lake,a lake,,,,,\n")
    completed = subprocess.run(["bash", str(REPO_ROOT / "eval.sh")], cwd=REPO_ROOT, capture_output=True, text=True,
                               env=wrapper_environment(RECIPE="configs/toy_recipe.sh", OUT_DIR=str(out_dir), NUM_PROCESSES="1",
                                                       TUNED_MODELS="", GENERIC_PROMPTS=str(generic)))
    assert completed.returncode == 2, completed.stderr[-2000:]
    [line] = completed.stderr.strip().splitlines()
    assert line.startswith(f"error: {generic}: row 3: kind 'scenery' is not one of"), line
    assert {path.name: path.read_text() for path in (out_dir / "prompts").iterdir()} == earlier
    assert sorted(path.name for path in out_dir.iterdir()) == ["prompts"]
