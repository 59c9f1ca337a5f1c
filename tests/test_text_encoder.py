"""Training the text encoder(s) with LoRA (--train_text_encoder) on tiny SDXL- and SD-shaped pipelines: what moves and
what stays, the loss at the first step, resume, and the output loading in stock diffusers and step 2's generation."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import fresh_accelerate_state, make_config, metrics, pairs_data  # noqa: F401  (fixtures)

from popalign.io import InputError
from popalign.training.trainer import prepare_run, run_training, train


def text_embedding(pipeline, prompt="a photo of a doctor") -> torch.Tensor:
    with torch.no_grad():
        return pipeline.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]


@pytest.mark.parametrize("train_unet", [True, False])
def test_the_text_encoders_train_and_load_into_a_stock_sdxl_pipeline(tiny_sdxl_path, pairs_data, tmp_path, train_unet):  # noqa: F811
    from diffusers import StableDiffusionXLPipeline

    config = make_config(tiny_sdxl_path, pairs_data, tmp_path / "run", loss="popalign", lora_rank=4, train_text_encoder=True,
                         train_unet=train_unet, learning_rate=1e-2, text_encoder_lr=5e-2, max_train_steps=3, beta=50.0, caption_dropout=0.0)
    run = prepare_run(config)
    assert len(run.text.encoders) == 2
    encoders = [run.accelerator.unwrap_model(encoder) for encoder in run.text.encoders]
    before = [{name: tensor.clone() for name, tensor in encoder.state_dict().items()} for encoder in encoders]
    unet_before = {name: tensor.clone() for name, tensor in run.accelerator.unwrap_model(run.unet).state_dict().items()}
    # the captions are not cached: only image latents are
    assert not (Path(config.resolved_cache_dir()) / "text").exists() or not any((Path(config.resolved_cache_dir()) / "text").rglob("*.safetensors"))
    run_training(run)
    for encoder, state in zip(encoders, before):
        changed = {name for name, tensor in encoder.state_dict().items() if not torch.equal(tensor, state[name])}
        assert changed and all("lora" in name for name in changed)
    unet_changed = {name for name, tensor in run.accelerator.unwrap_model(run.unet).state_dict().items() if not torch.equal(tensor, unet_before[name])}
    assert bool(unet_changed) == train_unet and all("lora" in name for name in unet_changed)
    # step 1: policy == reference, so each PopAlign term is log 2
    assert metrics(tmp_path / "run")[0]["loss"] == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-6)

    layers = load_file(str(tmp_path / "run" / "pytorch_lora_weights.safetensors"))
    prefixes = {name.split(".")[0] for name in layers}
    assert prefixes == ({"unet", "text_encoder", "text_encoder_2"} if train_unet else {"text_encoder", "text_encoder_2"})
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    base = text_embedding(pipeline)
    pipeline.load_lora_weights(str(tmp_path / "run"))
    assert not torch.allclose(text_embedding(pipeline), base)


def test_text_encoder_alone_on_sd_resumes_to_the_weights_of_an_uninterrupted_run(tiny_sd_path, pairs_data, tmp_path):  # noqa: F811
    settings = dict(loss="dpo", lora_rank=4, train_text_encoder=True, train_unet=False, text_encoder_lr=1e-2, max_train_steps=3,
                    checkpointing_steps=1, beta=50.0, resume_from_checkpoint="latest")
    train(make_config(tiny_sd_path, pairs_data, tmp_path / "whole", **settings))
    fresh_accelerate_state_reset()
    stopped = train(make_config(tiny_sd_path, pairs_data, tmp_path / "parts", stop_after_steps=2, **settings))
    fresh_accelerate_state_reset()
    assert not stopped.finished
    resumed = train(make_config(tiny_sd_path, pairs_data, tmp_path / "parts", **settings))
    assert resumed.finished
    whole = load_file(str(tmp_path / "whole" / "pytorch_lora_weights.safetensors"))
    parts = load_file(str(tmp_path / "parts" / "pytorch_lora_weights.safetensors"))
    assert set(whole) == set(parts) and {name.split(".")[0] for name in whole} == {"text_encoder"}
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], rtol=0, atol=1e-7)
    assert [line["step"] for line in metrics(tmp_path / "parts")] == [1, 2, 3]


def fresh_accelerate_state_reset():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_the_generation_stage_draws_with_the_trained_text_encoder(tiny_sd_path, pairs_data, tmp_path, repo_root):  # noqa: F811
    """Step 2's generation (and so eval.sh's lora kind) loads the text-encoder LoRA: other pictures than the base's."""
    train(make_config(tiny_sd_path, pairs_data, tmp_path / "run", loss="sft", beta=0.0, lora_rank=4, train_text_encoder=True,
                      train_unet=False, text_encoder_lr=5e-1, max_train_steps=3))
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt_id,kind,prompt\n0a,neutral,a photo of a doctor\n", encoding="utf-8")
    from popalign.generate.__main__ import main as generate

    images = {}
    for name, extra in (("base", []), ("tuned", ["--lora", str(tmp_path / "run")])):
        fresh_accelerate_state_reset()
        assert generate(["--pretrained_model_name_or_path", str(tiny_sd_path), "--prompts_csv", str(prompts), "--output_dir",
                         str(tmp_path / name), "--images_per_neutral_prompt", "1", "--steps", "2", "--width", "32", "--height", "32",
                         "--precision", "fp32", *extra]) == 0
        images[name] = (tmp_path / name / "images" / "0a" / "00000.png").read_bytes()
    fresh_accelerate_state_reset()
    assert images["base"] != images["tuned"]


@pytest.mark.parametrize("overrides, message", [
    (dict(train_text_encoder=True, lora_rank=0), "--train_text_encoder trains LoRA adapters of rank --rank"),
    (dict(train_unet=False), "--no_train_unet leaves nothing to train"),
    (dict(train_text_encoder=True, lora_rank=4, text_encoder_lr=0.0), "--text_encoder_lr must be"),
])
def test_text_encoder_flags_are_checked(tiny_sd_path, pairs_data, tmp_path, overrides, message):  # noqa: F811
    with pytest.raises(InputError, match=message):
        make_config(tiny_sd_path, pairs_data, tmp_path / "run", **overrides).validate()


@pytest.mark.slow
def test_two_processes_train_the_sdxl_text_encoders_of_one(tiny_sdxl_path, pairs_data, tmp_path, repo_root):  # noqa: F811
    """Under DDP the adapters of CLIP-L's last layer get no gradient (SDXL reads its penultimate layer): the run must not
    stop on them, and two processes of one pair end with the weights of one process of two pairs."""
    import os
    import subprocess
    import sys

    flags = dict(loss="popalign", lora_rank=4, train_text_encoder=True, learning_rate=0.1, text_encoder_lr=0.1, adam_epsilon=1.0,
                 max_train_steps=2, beta=50.0, caption_dropout=0.0)
    train(make_config(tiny_sdxl_path, pairs_data, tmp_path / "one", train_batch_size=2, **flags))
    fresh_accelerate_state_reset()
    config = make_config(tiny_sdxl_path, pairs_data, tmp_path / "two", train_batch_size=1, **flags)
    argv = [f"--{name}={('on' if value else 'off') if isinstance(value, bool) else value}" for name, value in config.to_dict().items()]
    completed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537",
                                str(repo_root / "train_popalign.py"), *argv], cwd=repo_root,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    one = load_file(str(tmp_path / "one" / "pytorch_lora_weights.safetensors"))
    two = load_file(str(tmp_path / "two" / "pytorch_lora_weights.safetensors"))
    assert set(one) == set(two) and any(name.startswith("text_encoder_2.") for name in one)
    assert max(float((one[name] - two[name]).abs().max()) for name in one) < 2e-5
