import json
import os
import shutil
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from popalign.generate import GenerationSettings, fine_tuned_weights_sha256, generate_images, image_seed
from popalign.prompts import read_prompt_table
from popalign.io import InputError

TINY = ["--steps", "2", "--width", "64", "--height", "64", "--precision", "fp32"]


def run_generation(repo_root, *args, launcher=(sys.executable,), env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([*launcher, "-m", "popalign.generate", *args], cwd=repo_root, capture_output=True, text=True, env=env)


def load_images(folder):
    manifest = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
    return {path: np.asarray(Image.open(folder / path)) for path in manifest["image_path"]}


@pytest.fixture(scope="module")
def prompts_csv(tmp_path_factory, repo_root):
    folder = tmp_path_factory.mktemp("prompts")
    (folder / "neutral.csv").write_text("occupation,activity\ndoctor,reading a chart\nengineer,\n", encoding="utf-8")
    subprocess.run([sys.executable, "1_generate_diverse_prompts.py", "--input", str(folder / "neutral.csv"),
                    "--output", str(folder / "prompts.csv"), "--axes", "gender"], cwd=repo_root, check=True)
    return folder / "prompts.csv"


@pytest.fixture(scope="module")
def reference_images(tmp_path_factory, repo_root, prompts_csv, tiny_sdxl_path):
    """One process, batch size 1: the reference every other run is compared with."""
    out_dir = tmp_path_factory.mktemp("reference")
    result = run_generation(repo_root, "--model", str(tiny_sdxl_path), "--prompts_csv", str(prompts_csv), "--out_dir", str(out_dir),
                            "--images_per_neutral_prompt", "3", "--images_per_identity_prompt", "2", "--batch_size", "1", *TINY)
    assert result.returncode == 0, result.stderr
    return out_dir, load_images(out_dir)


def test_seed_is_a_pure_function_of_seed_prompt_index():
    assert image_seed(0, "a photo of a doctor", 3) == image_seed(0, "a photo of a doctor", 3)
    seeds = {image_seed(base, prompt, index) for base in (0, 1) for prompt in ("a", "b") for index in range(5)}
    assert len(seeds) == 20
    assert all(0 <= seed < 2**60 for seed in seeds)


def test_manifest_records_every_image(reference_images, prompts_csv, tiny_sdxl_path):
    out_dir, images = reference_images
    manifest = pd.read_csv(out_dir / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(manifest) == 2 * 3 + 4 * 2 == len(images)
    prompts = read_prompt_table(prompts_csv).set_index("prompt_id")
    for row in manifest.itertuples():
        assert row.prompt == prompts.loc[row.prompt_id, "prompt"]
        assert row.gender == prompts.loc[row.prompt_id, "gender"]
        assert int(row.seed) == image_seed(0, row.prompt, int(row.image_index))
        assert row.image_path == f"images/{row.prompt_id}/{int(row.image_index):05d}.png"
        assert (row.model, row.steps, row.width, row.guidance) == (str(tiny_sdxl_path), "2", "64", "5.0")
    assert all(image.shape == (64, 64, 3) for image in images.values())
    # different seeds give different images
    assert len({image.tobytes() for image in images.values()}) == len(images)


@pytest.mark.slow
def test_two_processes_give_the_same_bytes(reference_images, repo_root, prompts_csv, tiny_sdxl_path, tmp_path):
    _, reference = reference_images
    result = run_generation(repo_root, "--model", str(tiny_sdxl_path), "--prompts_csv", str(prompts_csv), "--out_dir", str(tmp_path),
                            "--images_per_neutral_prompt", "3", "--images_per_identity_prompt", "2", "--batch_size", "1", *TINY,
                            launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"))
    assert result.returncode == 0, result.stderr
    assert "14 to generate on 2 process(es)" in result.stdout  # really sharded, not two full copies
    images = load_images(tmp_path)
    assert images.keys() == reference.keys()
    for path, image in images.items():
        assert np.array_equal(image, reference[path]), path


def test_batch_size_moves_pixels_by_at_most_one_level(reference_images, prompts_csv, tiny_sdxl_path, tmp_path):
    _, reference = reference_images
    settings = GenerationSettings(model=str(tiny_sdxl_path), steps=2, width=64, height=64, precision="fp32")
    generate_images(prompts_csv, tmp_path, settings, 3, 2, batch_size=3)
    images = load_images(tmp_path)
    assert images.keys() == reference.keys()
    for path, image in images.items():
        difference = np.abs(image.astype(int) - reference[path].astype(int))
        assert difference.max() <= 1, path
        assert (difference > 0).mean() < 0.01, path


def test_interrupted_generation_resumes_to_the_same_images(reference_images, repo_root, prompts_csv, tiny_sdxl_path, tmp_path):
    _, reference = reference_images
    args = ["--model", str(tiny_sdxl_path), "--prompts_csv", str(prompts_csv), "--out_dir", str(tmp_path),
            "--images_per_neutral_prompt", "3", "--images_per_identity_prompt", "2", "--batch_size", "1", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "popalign.generate", *args], cwd=repo_root, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "images").glob("*/*.png"))) < 4:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before_resume = len(list((tmp_path / "images").glob("*/*.png")))
    assert 4 <= finished_before_resume < len(reference), "the run was not interrupted midway"
    assert not (tmp_path / "manifest.csv").exists()
    for png in (tmp_path / "images").glob("*/*.png"):  # every file under a final name is a whole image
        assert np.array_equal(np.asarray(Image.open(png)), reference[str(png.relative_to(tmp_path))])
    result = run_generation(repo_root, *args)
    assert result.returncode == 0, result.stderr
    assert f"{finished_before_resume} already exist" in result.stdout
    images = load_images(tmp_path)
    assert images.keys() == reference.keys()
    assert all(np.array_equal(image, reference[path]) for path, image in images.items())
    assert not list(tmp_path.rglob("*.tmp"))


def test_sd15_shaped_pipeline_generates(tiny_sd_path, prompts_csv, tmp_path):
    settings = GenerationSettings(model=str(tiny_sd_path), steps=2, width=64, height=64, precision="fp32", scheduler="ddim")
    manifest = generate_images(prompts_csv, tmp_path, settings, 1, 1, batch_size=2, kinds=["identity"])
    assert len(manifest) == 4 and set(manifest["kind"]) == {"identity"}
    assert all(Image.open(tmp_path / path).size == (64, 64) for path in manifest["image_path"])


def test_other_settings_in_the_same_folder_are_refused(reference_images, prompts_csv, tiny_sdxl_path, repo_root):
    out_dir, _ = reference_images
    result = run_generation(repo_root, "--model", str(tiny_sdxl_path), "--prompts_csv", str(prompts_csv), "--out_dir", str(out_dir),
                            "--images_per_neutral_prompt", "3", "--images_per_identity_prompt", "2", "--steps", "3",
                            "--width", "64", "--height", "64", "--precision", "fp32")
    assert result.returncode == 2
    assert "--steps 2 -> 3" in result.stderr and "generation_config.json" in result.stderr


@pytest.mark.parametrize("content, message", [
    ("prompt_id,kind,prompt\nabc,neutral,a\nabc,identity,b\n", "row 3: duplicate prompt_id abc"),
    ("prompt_id,kind,prompt\nabc,person,a\n", "row 2: kind 'person'"),
    ("prompt_id,kind,prompt\nab/../c,neutral,a\n", "row 2: prompt_id"),
    ("prompt_id,prompt\nabc,a\n", "missing column(s) kind"),
])
def test_bad_prompt_tables(tmp_path, content, message):
    path = tmp_path / "prompts.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=re.escape(message)):
        read_prompt_table(path)


def test_fine_tuned_weights_sha256_follows_the_bytes_not_the_path(tmp_path):
    assert fine_tuned_weights_sha256("", "") == ""
    assert fine_tuned_weights_sha256(str(tmp_path / "missing"), "") == ""
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text("{}", encoding="utf-8")
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 10)
    first = fine_tuned_weights_sha256(str(unet), "")
    assert len(first) == 64
    (unet / "notes.txt").write_text("not a weight file", encoding="utf-8")
    (unet / "checkpoint-1").mkdir()
    (unet / "checkpoint-1" / "model.safetensors").write_bytes(b"\x01")
    assert fine_tuned_weights_sha256(str(unet), "") == first
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (copy / name).write_bytes((unet / name).read_bytes())
    assert fine_tuned_weights_sha256(str(copy), "") == first
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 9 + b"\x01")
    assert fine_tuned_weights_sha256(str(unet), "") != first
    # The same file as a LoRA is a different model from it as a U-Net.
    assert fine_tuned_weights_sha256("", str(copy)) != first


def test_a_retrained_unet_at_the_same_path_is_not_mixed_into_its_old_images(tiny_sd_path, prompts_csv, repo_root, tmp_path):
    from safetensors.torch import load_file, save_file

    unet = tmp_path / "unet"
    shutil.copytree(tiny_sd_path / "unet", unet)
    out_dir = tmp_path / "images"
    args = ["--model", str(tiny_sd_path), "--unet", str(unet), "--prompts_csv", str(prompts_csv), "--out_dir", str(out_dir),
            "--kinds", "neutral", "--images_per_neutral_prompt", "1", "--steps", "2", "--width", "64", "--height", "64",
            "--precision", "fp32"]
    first = run_generation(repo_root, *args)
    assert first.returncode == 0, first.stderr
    config = json.loads((out_dir / "generation_config.json").read_text(encoding="utf-8"))
    assert config["weights_sha256"] == fine_tuned_weights_sha256(str(unet), "")
    weights_file = unet / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1.0
    save_file(weights, weights_file)
    again = run_generation(repo_root, *args)
    assert again.returncode == 2
    assert "generation_config.json" in again.stderr and "the weights at --unet / --lora changed" in again.stderr


def test_a_folder_written_before_weights_were_hashed_resumes_only_without_fine_tuned_weights(tmp_path):
    from dataclasses import asdict
    from popalign.generate import CONFIG_FILE, check_or_write_config

    settings = GenerationSettings(model="base", steps=2)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(asdict(settings)), encoding="utf-8")  # no weights_sha256 key
    (tmp_path / "images" / "ab").mkdir(parents=True)
    (tmp_path / "images" / "ab" / "00000.png").write_bytes(b"an image made with those settings")
    check_or_write_config(tmp_path, settings)
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"\x02" * 8)
    digest = fine_tuned_weights_sha256("", str(lora))
    with pytest.raises(InputError, match=re.escape(f"weights at --unet / --lora changed (sha256 '' -> '{digest[:12]}')")):
        check_or_write_config(tmp_path, GenerationSettings(model="base", steps=2, lora=str(lora)))
    with pytest.raises(InputError, match="--steps 2 -> 3"):
        check_or_write_config(tmp_path, GenerationSettings(model="base", steps=3))


@pytest.mark.parametrize("flags, message", [
    (["--scheduler", "eulerr"], "error: --scheduler 'eulerr': expected default, ddim"),
    (["--precision", "fp8"], "error: --precision 'fp8': expected auto, fp32"),
    (["--unet", "runs/no_such_run/unet"], "error: --unet runs/no_such_run/unet: no such file or folder"),
    (["--images_per_neutral_prompt", "0", "--images_per_identity_prompt", "0"], "no images to generate"),
    (["--width", "60"], "error: --width must be a positive multiple of 8 (got 60)"),
])
def test_bad_settings_are_one_line_errors_before_anything_is_written(repo_root, prompts_csv, tiny_sdxl_path, tmp_path, flags, message):
    out_dir = tmp_path / "images"
    result = run_generation(repo_root, "--model", str(tiny_sdxl_path), "--prompts_csv", str(prompts_csv), "--out_dir", str(out_dir),
                            "--images_per_neutral_prompt", "1", "--images_per_identity_prompt", "1", *TINY, *flags)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out_dir.exists()


def test_a_model_path_typo_is_named_not_looked_up_on_the_hub(repo_root, prompts_csv, tmp_path):
    result = run_generation(repo_root, "--model", "./models/toy_bsae", "--prompts_csv", str(prompts_csv), "--out_dir", str(tmp_path / "x"), *TINY)
    assert result.returncode == 2 and "error: --model ./models/toy_bsae: no such file or folder" in result.stderr
    assert not (tmp_path / "x").exists()


def test_a_broken_image_is_made_again_on_resume_and_a_failed_start_binds_nothing(reference_images, repo_root, prompts_csv,
                                                                                  tiny_sdxl_path, tmp_path):
    reference_dir, reference = reference_images
    args = ["--model", str(tiny_sdxl_path), "--prompts_csv", str(prompts_csv), "--out_dir", str(tmp_path / "run"),
            "--images_per_neutral_prompt", "3", "--images_per_identity_prompt", "2", "--batch_size", "1", *TINY]
    # A folder whose first run stopped before its first image (its settings file says steps 7): the corrected run is not refused.
    (tmp_path / "run").mkdir()
    saved = json.loads((reference_dir / "generation_config.json").read_text())
    (tmp_path / "run" / "generation_config.json").write_text(json.dumps({**saved, "steps": 7}))
    assert run_generation(repo_root, *args).returncode == 0
    # One image cut short under its final name: on resume that image alone is made again.
    broken = sorted((tmp_path / "run" / "images").glob("*/*.png"))[1]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    result = run_generation(repo_root, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 existing image(s) did not decode" in result.stdout and f"{len(reference) - 1} already exist" in result.stdout
    images = load_images(tmp_path / "run")
    assert images.keys() == reference.keys()
    assert all(np.array_equal(image, reference[path]) for path, image in images.items())


def test_2_generate_images_sh_bad_setting_is_one_line_and_exit_2(repo_root, prompts_csv, tiny_sdxl_path, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "MODEL": str(tiny_sdxl_path), "PROMPTS_CSV": str(prompts_csv), "OUT_DIR": str(tmp_path / "images"), "SCHEDULER": "eulerr"}
    result = subprocess.run(["bash", "2_generate_images.sh"], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --scheduler 'eulerr': expected default, ddim, ddpm, dpmsolver++, euler, "
                                                  "euler_ancestral, pndm, unipc"]
    assert not (tmp_path / "images").exists()


@pytest.mark.slow
def test_two_simulated_nodes_give_the_same_bytes_into_one_shared_folder(reference_images, repo_root, prompts_csv, tiny_sdxl_path, tmp_path):
    from multinode import run_two_nodes

    _, reference = reference_images
    nodes = run_two_nodes(["-m", "popalign.generate", "--model", str(tiny_sdxl_path), "--prompts_csv", str(prompts_csv), "--out_dir",
                           str(tmp_path), "--images_per_neutral_prompt", "3", "--images_per_identity_prompt", "2", "--batch_size", "1",
                           *TINY], repo_root, port=29541)
    assert all(node.returncode == 0 for node in nodes), nodes[0].stderr[-2000:] + nodes[1].stderr[-2000:]
    assert "14 to generate on 2 process(es)" in nodes[0].stdout + nodes[1].stdout
    images = load_images(tmp_path)
    assert images.keys() == reference.keys()
    assert all(np.array_equal(image, reference[path]) for path, image in images.items())
    # the shared files are written once, by the global main process
    assert not list(tmp_path.rglob("*.tmp")) and "wrote" not in nodes[1].stdout


def test_speed_options_change_how_not_what(reference_images, repo_root, prompts_csv, tiny_sdxl_path, tmp_path):
    _, reference = reference_images
    result = run_generation(repo_root, "--model", str(tiny_sdxl_path), "--prompts_csv", str(prompts_csv), "--out_dir", str(tmp_path),
                            "--images_per_neutral_prompt", "3", "--images_per_identity_prompt", "2", "--batch_size", "2", *TINY,
                            "--channels_last", "--vae_slicing", "--vae_tiling")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "channels_last" not in (tmp_path / "generation_config.json").read_text()  # not a setting of the pixels
    images = load_images(tmp_path)
    assert images.keys() == reference.keys()
    for path, image in images.items():  # memory layout and batch size move pixels by at most one 8-bit level
        assert np.abs(image.astype(int) - reference[path].astype(int)).max() <= 1, path


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory, tiny_sd_path):
    """A VAE of the tiny pipelines' architecture with other random weights."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("other-vae") / "vae"
    AutoencoderKL.from_config(AutoencoderKL.load_config(str(tiny_sd_path / "vae"))).save_pretrained(folder)
    return folder


def test_another_vae_draws_other_pixels_the_own_vae_the_same_and_a_folder_of_it_is_refused(tiny_sd_path, prompts_csv, other_vae, tmp_path):
    settings = GenerationSettings(model=str(tiny_sd_path), steps=1, width=32, height=32, precision="fp32")
    runs = {}
    for name, vae in (("own", ""), ("own_explicit", str(tiny_sd_path / "vae")), ("other", str(other_vae))):
        generate_images(prompts_csv, tmp_path / name, replace(settings, vae=vae), 1, 0, batch_size=2, kinds=["neutral"])
        runs[name] = load_images(tmp_path / name)
        assert json.loads((tmp_path / name / "generation_config.json").read_text(encoding="utf-8"))["vae"] == vae
        assert set(pd.read_csv(tmp_path / name / "manifest.csv", dtype=str, keep_default_na=False)["vae"]) == {vae}
    assert runs["own"].keys() == runs["other"].keys() and len(runs["own"]) == 2
    for path, image in runs["own"].items():
        assert np.array_equal(image, runs["own_explicit"][path]), path
        assert np.abs(image.astype(int) - runs["other"][path].astype(int)).max() > 8, path
    # The own VAE's folder drew the same pixels, but under another setting: each folder keeps to its VAE.
    with pytest.raises(InputError, match=re.escape(f"--pretrained_vae_model_name_or_path '' -> '{other_vae}'")):
        generate_images(prompts_csv, tmp_path / "own", replace(settings, vae=str(other_vae)), 1, 0, batch_size=2, kinds=["neutral"])


def test_a_vae_flag_naming_another_model_is_one_line(tiny_sd_path, prompts_csv, tmp_path, capsys):
    from popalign.generate.__main__ import main

    arguments = ["--model", str(tiny_sd_path), "--prompts_csv", str(prompts_csv), "--out_dir", str(tmp_path / "images"), *TINY]
    assert main([*arguments, "--pretrained_vae_model_name_or_path", str(tiny_sd_path / "unet")]) == 2
    assert capsys.readouterr().err == (f"error: --pretrained_vae_model_name_or_path {tiny_sd_path / 'unet'}: holds a model of class "
                                       "UNet2DConditionModel, not of class AutoencoderKL\n")
    assert main([*arguments, "--pretrained_vae_model_name_or_path", str(tmp_path / "no_vae")]) == 2
    assert capsys.readouterr().err == f"error: --pretrained_vae_model_name_or_path {tmp_path / 'no_vae'}: no such file or folder\n"
    # A VAE whose latents the U-Net does not draw: other channels, or another scale than the model's own VAE.
    own = json.loads((tiny_sd_path / "vae" / "config.json").read_text(encoding="utf-8"))
    for change, message in (({"latent_channels": 8}, "a VAE of 8 latent channels, but the U-Net of"),
                            ({"scaling_factor": 0.13025}, "scales its latents by 0.13025, but the own VAE of")):
        (tmp_path / "vae").mkdir(exist_ok=True)
        (tmp_path / "vae" / "config.json").write_text(json.dumps({**own, **change}), encoding="utf-8")
        assert main([*arguments, "--pretrained_vae_model_name_or_path", str(tmp_path / "vae")]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: --pretrained_vae_model_name_or_path {tmp_path / 'vae'}: {message}") and error.count("\n") == 1
    assert not (tmp_path / "images").exists()


def test_a_lora_is_fused_and_draws_what_stock_diffusers_draws_with_it(tiny_sd_path, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict

    from popalign.pipelines import load_text_to_image_pipeline

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd_path / "unet"))
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "lora"), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))

    def draw(pipeline):
        return pipeline(prompt=["a photo of a doctor"], num_inference_steps=2, width=32, height=32, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images

    fused = load_text_to_image_pipeline(str(tiny_sd_path), torch.float32, torch.device("cpu"), lora_path=str(tmp_path / "lora"))
    assert not [name for name, module in fused.unet.named_modules() if isinstance(module, BaseTunerLayer)]
    stock = StableDiffusionPipeline.from_pretrained(str(tiny_sd_path))
    stock.set_progress_bar_config(disable=True)
    without_lora = draw(stock)
    stock.load_lora_weights(str(tmp_path / "lora"))
    assert [name for name, module in stock.unet.named_modules() if isinstance(module, BaseTunerLayer)]  # stock keeps its LoRA layers
    with_lora = draw(stock)
    assert np.abs(with_lora - without_lora).max() > 1e-2  # the LoRA changes the images
    assert np.abs(draw(fused) - with_lora).max() < 1e-4
