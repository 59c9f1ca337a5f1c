"""The trainer end to end on tiny random-weight SDXL- and SD-shaped pipelines (CPU, offline)."""

import csv
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bad_input_world import snapshot
from popalign.io import InputError
from popalign.training.config import TrainConfig
from popalign.training.trainer import UNetCondition, denoising_prediction, prepare_run, run_training, train

REPO_ROOT = Path(__file__).resolve().parent.parent
COLOURS = [(220, 40, 40), (40, 200, 60), (30, 60, 220), (240, 220, 30), (30, 220, 220), (200, 40, 200)]
SIZES = [(40, 32), (32, 48), (32, 32), (64, 40), (36, 36), (50, 32)]  # (width, height): crops differ per image


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory) -> dict:
    """Six coloured images of different shapes; a pairs file (one absolute path) and a winners-only file."""
    root = tmp_path_factory.mktemp("pairs")
    for index, (colour, size) in enumerate(zip(COLOURS, SIZES)):
        image = Image.new("RGB", size, colour)
        image.paste((255, 255, 255), (0, 0, size[0] // 3, size[1] // 3))  # some structure for the VAE
        (root / "images").mkdir(exist_ok=True)
        image.save(root / "images" / f"{index}.png")
    rows = [("images/0.png", "images/1.png", "a photo of a doctor"), ("images/2.png", "images/3.png", "a photo of a nurse"),
            ("images/4.png", str(root / "images" / "5.png"), "a photo of a doctor"), ("images/1.png", "images/2.png", "a photo of a chef")]
    with open(root / "pairs.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["winner_path", "loser_path", "caption", "diverse_genders", "base_genders"])
        writer.writerows([(*row, 2, 1) for row in rows])
    with open(root / "winners.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["winner_path", "caption"])
        writer.writerows([(f"images/{index}.png", f"a picture number {index}") for index in range(6)])
    for name, winner_prompt in (("same_prompt.csv", lambda caption: caption), ("identity_prompt.csv", lambda caption: caption.replace("a ", "a female ", 1))):
        with open(root / name, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(["winner_path", "loser_path", "caption", "winner_prompt"])
            writer.writerows([(*row, winner_prompt(row[2])) for row in rows])
    return {"pairs": root / "pairs.csv", "winners": root / "winners.csv", "cache": root / "cache",
            "same_prompt": root / "same_prompt.csv", "identity_prompt": root / "identity_prompt.csv"}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; accelerate's process-wide state must not leak between them."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_config(model_path, pairs_data, output_dir, **overrides) -> TrainConfig:
    values = dict(pairs_file=str(pairs_data["pairs"]), output_dir=str(output_dir), cache_dir=str(pairs_data["cache"]),
                  pretrained_model=str(model_path), resolution=32, mixed_precision="no", report_to="none",
                  learning_rate=1e-3, lr_warmup_steps=0, max_train_steps=1, checkpointing_steps=0, seed=0, vae="",
                  use_8bit_adam=False, resume_from_checkpoint="")
    values.update(overrides)
    return TrainConfig(**values)


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def unet_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(output_dir) / "unet" / "diffusion_pytorch_model.safetensors"))


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max(float((first[name].float() - second[name].float()).abs().max()) for name in first)


def test_one_full_step_moves_the_policy_never_the_reference(tiny_sdxl_path, pairs_data, tmp_path):
    run = prepare_run(make_config(tiny_sdxl_path, pairs_data, tmp_path / "run", loss="popalign", lambda_winner=1.0, lambda_loser=0.5))
    policy_before = {name: tensor.detach().clone() for name, tensor in run.accelerator.unwrap_model(run.unet).state_dict().items()}
    reference_before = {name: tensor.detach().clone() for name, tensor in run.reference.state_dict().items()}
    assert max_difference(policy_before, reference_before) == 0.0  # fp32 run: the reference is an exact copy
    result = run_training(run)

    assert result.finished and result.global_step == 1
    assert max_difference(run.accelerator.unwrap_model(run.unet).state_dict(), policy_before) > 1e-4
    assert max_difference(run.reference.state_dict(), reference_before) == 0.0
    assert not any(parameter.requires_grad for parameter in run.reference.parameters())
    # policy == reference at step 1, so every g is 0 and every term is -log sigmoid(0) = log 2,
    # weighted: mean over winners (x1.0) and losers (x0.5) = log 2 * (1.0 + 0.5) / 2
    [first] = metrics(tmp_path / "run")
    assert first["loss"] == pytest.approx(math.log(2) * 0.75, abs=1e-6)
    assert first["anchor"] == 0.0 and first["implicit_accuracy"] == 0.5
    assert max_difference(unet_weights(tmp_path / "run"), policy_before) > 1e-4
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["lambda_loser"] == 0.5

    # the saved U-Net is a stock diffusers U-Net that a stock pipeline generates with
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, unet=UNet2DConditionModel.from_pretrained(tmp_path / "run" / "unet"))
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a photo of a nurse", num_inference_steps=2, height=32, width=32, output_type="pil",
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_prior_preservation_denoises_each_winner_under_its_own_prompt(tiny_sdxl_path, pairs_data, tmp_path):
    first_steps = {}
    for name in ("same_prompt", "identity_prompt"):
        config = make_config(tiny_sdxl_path, pairs_data, tmp_path / name, loss="sft", pairs_file=str(pairs_data[name]),
                             caption_dropout=0.0, train_batch_size=2, prior_preservation_weight=0.5)
        run_training(prepare_run(config))
        [first_steps[name]] = metrics(tmp_path / name)
    # loss = mean m_w + 0.5 * mean m_id, with the pair's noise and t
    for first in first_steps.values():
        assert first["loss"] == pytest.approx(first["model_err_winner"] + 0.5 * first["model_err_identity_prompt"], rel=1e-5)
    same, identity = first_steps["same_prompt"], first_steps["identity_prompt"]
    # winner_prompt == caption: the identity term is the SFT term itself; another prompt gives another error
    assert same["model_err_identity_prompt"] == pytest.approx(same["model_err_winner"], rel=1e-6)
    assert identity["model_err_winner"] == pytest.approx(same["model_err_winner"], rel=1e-6)
    assert abs(identity["model_err_identity_prompt"] - identity["model_err_winner"]) > 1e-6


@pytest.mark.parametrize("loss, lora_rank", [("sft", 0), ("popalign", 4)])
def test_prior_preservation_towards_the_reference_starts_at_zero_and_pulls_back(tiny_sdxl_path, pairs_data, tmp_path, loss, lora_rank):
    # The reference is a frozen copy (SFT loads one only for this term) or the adapters-off view (LoRA).
    config = make_config(tiny_sdxl_path, pairs_data, tmp_path / "run", loss=loss, lora_rank=lora_rank, max_train_steps=3,
                         pairs_file=str(pairs_data["identity_prompt"]), caption_dropout=0.0, train_batch_size=2,
                         prior_preservation_weight=0.5, prior_preservation_target="reference", learning_rate=1e-2)
    assert config.needs_reference
    run_training(prepare_run(config))
    steps = metrics(tmp_path / "run")
    # step 1: policy == reference, so each winner's error towards the reference's prediction is exactly 0
    assert steps[0]["model_err_identity_prompt"] == 0.0
    # once the weights moved, the policy departs from the reference under the identity-specific prompts
    assert steps[-1]["model_err_identity_prompt"] > 0.0
    if loss == "sft":  # loss = mean m_w + 0.5 * mean || eps_theta(x_t, c_id) - eps_ref(x_t, c_id) ||^2
        for step in steps:
            assert step["loss"] == pytest.approx(step["model_err_winner"] + 0.5 * step["model_err_identity_prompt"], rel=1e-5)


@pytest.mark.parametrize("loss", ["dpo", "sudo"])
def test_first_loss_with_lora_equals_the_hand_value(tiny_sdxl_path, pairs_data, tmp_path, loss):
    config = make_config(tiny_sdxl_path, pairs_data, tmp_path / "run", loss=loss, lora_rank=4, train_batch_size=2)
    run_training(prepare_run(config))
    [first] = metrics(tmp_path / "run")
    if loss == "dpo":  # -log sigmoid(0)
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    else:  # 0.5 * DPO + 0.5 * mean winner error
        assert first["loss"] == pytest.approx(0.5 * math.log(2) + 0.5 * first["model_err_winner"], abs=1e-6)


def test_lora_trains_only_the_adapter_and_loads_into_a_stock_pipeline(tiny_sdxl_path, pairs_data, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    config = make_config(tiny_sdxl_path, pairs_data, tmp_path / "lora", loss="popalign", lora_rank=4, learning_rate=1e-2,
                         max_train_steps=3, beta=50.0)
    run = prepare_run(config)
    unet = run.accelerator.unwrap_model(run.unet)
    before = {name: tensor.detach().clone() for name, tensor in unet.state_dict().items()}
    generator = torch.Generator().manual_seed(5)
    latents, noise = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 4, 16, 16, generator=generator)
    condition = UNetCondition(torch.randn(2, 77, 64, generator=generator), torch.randn(2, 32, generator=generator),
                              torch.tensor([[32.0, 40, 0, 4, 32, 32]] * 2))
    probe = lambda predict: denoising_prediction(predict, latents, noise, torch.tensor([10, 700]), condition, "sdxl",  # noqa: E731
                                                 run.alphas_cumprod)
    with torch.no_grad():
        reference_before, policy_before = probe(run.reference), probe(unet)
    torch.testing.assert_close(policy_before, reference_before, rtol=0, atol=0)
    run_training(run)

    with torch.no_grad():
        reference_after, policy_after = probe(run.reference), probe(unet)
    torch.testing.assert_close(reference_after, reference_before, rtol=0, atol=0)
    assert not torch.equal(policy_after, policy_before)
    after = unet.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("lora" in name for name in changed)

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipeline.set_progress_bar_config(disable=True)
    arguments = dict(prompt="a photo of a doctor", num_inference_steps=2, height=32, width=32, output_type="np")
    base_image = pipeline(**arguments, generator=torch.Generator().manual_seed(0)).images[0]
    pipeline.load_lora_weights(str(tmp_path / "lora"))
    tuned_image = pipeline(**arguments, generator=torch.Generator().manual_seed(0)).images[0]
    assert tuned_image.shape == (32, 32, 3) and bool(torch.isfinite(torch.from_numpy(tuned_image)).all())
    assert float(abs(tuned_image - base_image).max()) > 0


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_sdxl_path, pairs_data, tmp_path, lora_rank):
    settings = dict(loss="popalign", lora_rank=lora_rank, max_train_steps=4, checkpointing_steps=2, checkpoints_total_limit=1,
                    lr_scheduler="cosine", lr_warmup_steps=1, caption_dropout=0.5)
    train(make_config(tiny_sdxl_path, pairs_data, tmp_path / "straight", **settings))
    stopped = train(make_config(tiny_sdxl_path, pairs_data, tmp_path / "resumed", stop_after_steps=3, **settings))
    assert not stopped.finished and stopped.global_step == 3
    assert sorted(path.name for path in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = train(make_config(tiny_sdxl_path, pairs_data, tmp_path / "resumed", resume_from_checkpoint="latest", **settings))
    assert resumed.finished and resumed.global_step == 4
    assert sorted(path.name for path in (tmp_path / "straight").glob("checkpoint-*")) == ["checkpoint-4"]
    assert json.loads((tmp_path / "straight" / "checkpoint-4" / "train_config.json").read_text())["max_train_steps"] == 4

    straight_log, resumed_log = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    # step 3, logged by the stopped process after its last checkpoint, was trained again: one line per step
    assert [line["step"] for line in resumed_log] == [1, 2, 3, 4]
    assert resumed_log == straight_log
    if lora_rank:
        straight = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
        resumed_weights = load_file(str(tmp_path / "resumed" / "pytorch_lora_weights.safetensors"))
    else:
        straight, resumed_weights = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "resumed")
    assert max_difference(straight, resumed_weights) == 0.0


def test_a_finished_run_is_not_trained_again_unless_its_data_changed_and_other_settings_are_refused(tiny_sdxl_path, pairs_data, tmp_path):
    pairs = pairs_data["pairs"].parent / "pairs_to_change.csv"  # next to the images its paths point at
    shutil.copy(pairs_data["pairs"], pairs)
    run = tmp_path / "run"
    settings = dict(pairs_file=str(pairs), max_train_steps=2)
    train(make_config(tiny_sdxl_path, pairs_data, run, **settings))
    weights = run / "unet" / "diffusion_pytorch_model.safetensors"
    written = weights.stat().st_mtime_ns
    # launched again, with only how-to-run settings changed: nothing is trained
    again = train(make_config(tiny_sdxl_path, pairs_data, run, stop_after_steps=1, checkpointing_steps=5, **settings))
    assert again.finished and again.global_step == 2
    assert weights.stat().st_mtime_ns == written and len(metrics(run)) == 2
    # another learning rate: refused, naming it, unless the finished model may be replaced
    with pytest.raises(InputError, match=r"holds a finished run trained with other settings \(--learning_rate 0.001 -> 0.002\)"):
        train(make_config(tiny_sdxl_path, pairs_data, run, **{**settings, "learning_rate": 2e-3}))
    assert weights.stat().st_mtime_ns == written
    train(make_config(tiny_sdxl_path, pairs_data, run, **{**settings, "learning_rate": 2e-3, "allow_setting_change": True}))
    assert [line["step"] for line in metrics(run)] == [1, 2] and weights.stat().st_mtime_ns != written  # one line per step
    # the same settings on a changed pairs file: trained again (the data upstream was remade)
    pairs.write_text("".join(pairs.read_text(encoding="utf-8").splitlines(keepends=True)[:3]), encoding="utf-8")
    retrained = weights.stat().st_mtime_ns
    train(make_config(tiny_sdxl_path, pairs_data, run, **{**settings, "learning_rate": 2e-3}))
    assert [line["step"] for line in metrics(run)] == [1, 2] and weights.stat().st_mtime_ns != retrained
    # a run stopped before its end is not a finished one: a later launch resumes or retrains
    stopped = train(make_config(tiny_sdxl_path, pairs_data, run, **{**settings, "max_train_steps": 3, "stop_after_steps": 1,
                                                                     "allow_setting_change": True}))
    assert not stopped.finished and not (run / "finished.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("prior_preservation_weight, prior_preservation_target", [(0.0, "noise"), (0.5, "noise"), (0.5, "reference")])
def test_two_processes_with_one_pair_equal_one_process_with_two(tiny_sdxl_path, pairs_data, tmp_path, prior_preservation_weight,
                                                                prior_preservation_target):
    # A large Adam epsilon makes the update proportional to the gradient; with the default, Adam's
    # first step is lr * sign(g), which turns float noise in near-zero gradients into full-size steps.
    flags = dict(loss="popalign", max_train_steps=2, learning_rate=0.1, adam_epsilon=1.0, caption_dropout=0.5,
                 prior_preservation_weight=prior_preservation_weight, prior_preservation_target=prior_preservation_target,
                 pairs_file=str(pairs_data["identity_prompt"]))
    train(make_config(tiny_sdxl_path, pairs_data, tmp_path / "one", train_batch_size=2, **flags))
    config = make_config(tiny_sdxl_path, pairs_data, tmp_path / "two", train_batch_size=1, **flags)
    argv = [f"--{name}={('on' if value else 'off') if isinstance(value, bool) else value}" for name, value in config.to_dict().items()]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                                str(REPO_ROOT / "train_popalign.py"), *argv], cwd=REPO_ROOT, env=environment,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "1 pairs/process x 2 processes" in completed.stdout

    one, two = unet_weights(tmp_path / "one"), unet_weights(tmp_path / "two")
    base = load_file(str(Path(tiny_sdxl_path) / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max_difference(one, base) > 1e-3
    # Equal up to float rounding: two processes average their gradients in another order than one process
    # averaging over its batch; at lr 0.1 that reaches ~6e-6 on some CPUs, against updates of 1e-3 and more.
    assert max_difference(one, two) < 2e-5
    # The anchor is pooled over the global batch on both (a per-process anchor would differ by its whole size);
    # after the first step the same float rounding moves it by under 1%.
    assert [line["anchor"] for line in metrics(tmp_path / "one")] == pytest.approx([line["anchor"] for line in metrics(tmp_path / "two")],
                                                                                 rel=1e-2, abs=1e-7)


def launch_two_processes(config: TrainConfig, port: int) -> subprocess.CompletedProcess:
    """train_popalign.py with `config`'s flags under torchrun, 2 processes of one thread each."""
    argv = [f"--{name}={('on' if value else 'off') if isinstance(value, bool) else value}" for name, value in config.to_dict().items()]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                           str(REPO_ROOT / "train_popalign.py"), *argv], cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_fsdp_over_two_processes_trains_like_one_process_and_resumes_from_its_checkpoint(tiny_sdxl_path, pairs_data, tmp_path):
    # The same large-epsilon AdamW as above (updates proportional to the gradients), in fp32 so that the comparison is one
    # of float rounding (under --mixed_precision bf16 the reference is loaded in bf16 as in unsharded runs, and each
    # process's line then reads "reference whole, torch.bfloat16"; bf16 rounding moves these weights by ~3e-4). The third
    # step runs after a resume, so it uses the AdamW moments gathered into checkpoint-2 and scattered back.
    flags = dict(loss="popalign", max_train_steps=3, learning_rate=0.1, adam_epsilon=1.0, checkpointing_steps=1,
                 resume_from_checkpoint="latest")
    train(make_config(tiny_sdxl_path, pairs_data, tmp_path / "one", train_batch_size=2, **flags))

    sharded = make_config(tiny_sdxl_path, pairs_data, tmp_path / "fsdp", train_batch_size=1, fsdp=True, **flags)
    first = launch_two_processes(dataclasses.replace(sharded, stop_after_steps=2), port=29543)
    assert first.returncode == 0, first.stderr[-3000:]
    held = [line for line in first.stdout.splitlines() if "of the U-Net's" in line]
    assert len(held) == 2 and all("over 2 processes); reference whole, torch.float32" in line for line in held), first.stdout
    local, total = (int(number.replace(",", "")) for number in held[0].split("holds ")[1].split(" parameters")[0].split(" of the U-Net's "))
    assert 0.45 * total < local < 0.55 * total  # each process holds about half of every unit
    checkpoint = tmp_path / "fsdp" / "checkpoint-2"
    assert (checkpoint / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (checkpoint / "optimizer_state.safetensors").is_file() and not (tmp_path / "fsdp" / "unet").exists()
    # an unsharded run does not take a sharded run's checkpoint (its optimizer state is stored otherwise)
    with pytest.raises(InputError, match="checkpoint-2: saved by a --fsdp run; resume it with --fsdp"):
        train(dataclasses.replace(sharded, fsdp=False))

    # a damaged checkpoint: one line from every process, none left waiting for the main process's broadcast
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "fsdp", broken, ignore=shutil.ignore_patterns("*.lock"))
    state_file = broken / "checkpoint-2" / "optimizer_state.safetensors"
    state_file.write_bytes(state_file.read_bytes()[:100])
    failed = launch_two_processes(dataclasses.replace(sharded, output_dir=str(broken)), port=29545)
    assert failed.returncode != 0
    assert failed.stderr.count("checkpoint-2: cannot read the sharded run's state") == 2, failed.stderr[-3000:]

    second = launch_two_processes(sharded, port=29544)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at step 2" in second.stdout

    one, two = unet_weights(tmp_path / "one"), unet_weights(tmp_path / "fsdp")
    base = load_file(str(Path(tiny_sdxl_path) / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max_difference(one, base) > 1e-3
    assert max_difference(one, two) < 2e-5, max_difference(one, two)
    assert [line["loss"] for line in metrics(tmp_path / "one")] == pytest.approx([line["loss"] for line in metrics(tmp_path / "fsdp")],
                                                                               rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({}, "--fsdp shards over the launched processes, but this launch runs 1 process"),
    ({"lora_rank": 4}, "--fsdp shards the full U-Net's training: it does not combine with --rank"),
    ({"use_ema": True}, "it does not combine with --use_ema"),
    ({"use_8bit_adam": True}, "pass --use_8bit_adam off"),
])
def test_fsdp_refuses_what_it_cannot_shard_in_one_line(tiny_sdxl_path, pairs_data, tmp_path, overrides, message):
    with pytest.raises(InputError, match=re.escape(message)):
        train(make_config(tiny_sdxl_path, pairs_data, tmp_path / "run", fsdp=True, **overrides))
    assert not (tmp_path / "run").exists()


def test_sft_from_scratch_settings_on_a_v_prediction_sd_model(tiny_sd_path, pairs_data, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    model = tmp_path / "sd-v"
    shutil.copytree(tiny_sd_path, model)
    scheduler_config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps({**scheduler_config, "prediction_type": "v_prediction"}))
    config = make_config(model, pairs_data, tmp_path / "sft", pairs_file=str(pairs_data["winners"]), loss="sft", train_batch_size=3,
                         learning_rate=1e-3, lr_scheduler="cosine", lr_warmup_steps=2, max_train_steps=4, gradient_checkpointing=False,
                         caption_dropout=0.1)
    run = prepare_run(config)
    assert run.reference is None and run.kind == "sd" and run.prediction_type == "v_prediction"
    run_training(run)
    log = metrics(tmp_path / "sft")
    assert [line["lr"] for line in log] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])  # warmup 2, then half a cosine over 2 steps
    assert all(math.isfinite(line["loss"]) for line in log)

    pipeline = StableDiffusionPipeline.from_pretrained(model, unet=UNet2DConditionModel.from_pretrained(tmp_path / "sft" / "unet"),
                                                       safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a picture number 3", num_inference_steps=2, height=32, width=32, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3)


def test_encodings_are_cached_once_and_keyed_by_content(tiny_sdxl_path, pairs_data, tmp_path):
    cache = tmp_path / "cache"
    train(make_config(tiny_sdxl_path, pairs_data, tmp_path / "a", cache_dir=str(cache), loss="dpo", caption_dropout=0.2))
    latents_files = sorted((cache / "latents").rglob("*.safetensors"))
    text_files = sorted((cache / "text").rglob("*.safetensors"))
    assert len(latents_files) == 6 and len(text_files) == 4  # 6 images; 3 captions + the empty one
    stamps = {path: path.stat().st_mtime_ns for path in latents_files + text_files}

    # the same images under new names, in a new pairs file elsewhere: nothing is encoded again
    copy = tmp_path / "copy"
    shutil.copytree(pairs_data["pairs"].parent / "images", copy / "renamed")
    rows = list(csv.DictReader(open(pairs_data["pairs"], encoding="utf-8")))
    with open(copy / "pairs.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=["winner_path", "loser_path", "caption"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"winner_path": "renamed/" + Path(row["winner_path"]).name,
                             "loser_path": "renamed/" + Path(row["loser_path"]).name, "caption": row["caption"]})
    train(make_config(tiny_sdxl_path, {**pairs_data, "pairs": copy / "pairs.csv"}, tmp_path / "b", cache_dir=str(cache), loss="dpo"))
    assert sorted((cache / "latents").rglob("*.safetensors")) == latents_files
    assert {path: path.stat().st_mtime_ns for path in latents_files + text_files} == stamps

    # a different resolution is a different entry
    train(make_config(tiny_sdxl_path, pairs_data, tmp_path / "c", cache_dir=str(cache), loss="dpo", resolution=16))
    assert len(list((cache / "latents").rglob("*.safetensors"))) == 12
    entry = load_file(str(latents_files[0]))
    assert entry["latents"].shape[0] == 4 and entry["original_size"].dtype == torch.int64


@pytest.mark.slow
def test_4_train_sh_runs_one_accelerate_launch(tiny_sdxl_path, pairs_data, tmp_path):
    script = (REPO_ROOT / "4_train.sh").read_text()
    assert sum(1 for line in script.splitlines() if line.startswith("accelerate launch")) == 1
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                   "PAIRS_FILE": str(pairs_data["pairs"]), "OUTPUT_DIR": str(tmp_path / "run"), "MODEL": str(tiny_sdxl_path),
                   "VAE": "", "RESOLUTION": "32", "CACHE_DIR": str(pairs_data["cache"]), "MAX_TRAIN_STEPS": "2",
                   "LR_WARMUP_STEPS": "1", "MIXED_PRECISION": "no", "REPORT_TO": "tensorboard", "CHECKPOINTING_STEPS": "1",
                   "CHECKPOINTS_TOTAL_LIMIT": "1", "USE_8BIT_ADAM": "off"}
    completed = subprocess.run(["bash", str(REPO_ROOT / "4_train.sh")], env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "effective batch size: 1 pairs/process x 1 processes x 1 accumulation steps = 1" in completed.stdout
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (saved["beta"], saved["caption_dropout"], saved["learning_rate"], saved["use_8bit_adam"]) == (5000.0, 0.2, 5e-7, False)
    assert (tmp_path / "run" / "unet").is_dir() and [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-2"]
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))
    assert [line["lr"] for line in metrics(tmp_path / "run")] == pytest.approx([0.0, 5e-7])


def test_8bit_adam_without_cuda_is_refused_before_anything_is_written(tiny_sdxl_path, pairs_data, tmp_path):
    from popalign.io import InputError

    with pytest.raises(InputError, match="--use_8bit_adam: 8-bit AdamW needs a CUDA device .* --use_8bit_adam off"):
        train(make_config(tiny_sdxl_path, pairs_data, tmp_path / "run", use_8bit_adam=True))
    assert not (tmp_path / "run").exists()


def test_a_failed_launch_leaves_a_finished_run_as_it_was(tiny_sdxl_path, pairs_data, tmp_path):
    from popalign.io import InputError

    run = tmp_path / "run"
    train(make_config(tiny_sdxl_path, pairs_data, run, max_train_steps=1))
    before = snapshot(run)
    bad_pairs = tmp_path / "bad.csv"
    bad_pairs.write_text("winner_path,loser_path,caption\nimages/0.png,images/missing.png,a picture\n", encoding="utf-8")
    with pytest.raises(InputError, match="bad.csv"):
        train(make_config(tiny_sdxl_path, pairs_data, run, pairs_file=str(bad_pairs), learning_rate=2e-3))
    with pytest.raises(InputError, match="--resume_from_checkpoint .*no_such_checkpoint"):
        train(make_config(tiny_sdxl_path, pairs_data, run, learning_rate=2e-3, resume_from_checkpoint=str(tmp_path / "no_such_checkpoint")))
    assert snapshot(run) == before


def test_a_resume_under_other_training_settings_is_refused_unless_forced(tiny_sdxl_path, pairs_data, tmp_path):
    from popalign.io import InputError

    run = tmp_path / "run"
    settings = dict(max_train_steps=3, checkpointing_steps=1, resume_from_checkpoint="latest")
    stopped = train(make_config(tiny_sdxl_path, pairs_data, run, stop_after_steps=1, **settings))
    assert not stopped.finished
    before = snapshot(run)
    with pytest.raises(InputError, match=r"checkpoint-1: it was trained with other settings \(--beta 5000.0 -> 100.0, "
                                         r"--learning_rate 0.001 -> 0.002\).*--allow_setting_change"):
        train(make_config(tiny_sdxl_path, pairs_data, run, learning_rate=2e-3, beta=100.0, **settings))
    assert snapshot(run) == before
    # run-control settings (how often to checkpoint, when to stop) may change freely
    train(make_config(tiny_sdxl_path, pairs_data, run, **{**settings, "checkpointing_steps": 5, "stop_after_steps": 1}))
    forced = train(make_config(tiny_sdxl_path, pairs_data, run, learning_rate=2e-3, allow_setting_change=True, **settings))
    assert forced.finished and forced.global_step == 3
    [change] = [json.loads(line) for line in (run / "settings_changes.jsonl").read_text().splitlines()]
    assert change["step"] == 1 and change["changes"] == {"learning_rate": {"checkpoint": 1e-3, "now": 2e-3}}


def test_a_non_finite_loss_stops_with_the_step_and_no_checkpoint_after_it(tiny_sdxl_path, pairs_data, tmp_path):
    from popalign.training.trainer import TrainingDiverged

    run = tmp_path / "run"
    # A learning rate of 1e30 with Adam moves every weight by about 1e30 in the first step: the second loss overflows.
    with pytest.raises(TrainingDiverged, match=r"at step 2; training stopped, the last checkpoint is .*checkpoint-1 "):
        train(make_config(tiny_sdxl_path, pairs_data, run, learning_rate=1e30, max_train_steps=4, checkpointing_steps=1))
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (run / "finished.json").exists()


def test_resuming_never_unpickles_what_the_checkpoint_holds(tiny_sdxl_path, pairs_data, tmp_path):
    """A payload planted in every pickle-based file of a checkpoint does not run when the run resumes."""
    import pickle

    from popalign.io import InputError

    run, marker = tmp_path / "run", tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    settings = dict(max_train_steps=2, checkpointing_steps=1, resume_from_checkpoint="latest")
    train(make_config(tiny_sdxl_path, pairs_data, run, stop_after_steps=1, **settings))
    checkpoint = run / "checkpoint-1"
    planted = [path for path in checkpoint.iterdir() if path.suffix in (".pkl", ".bin", ".pt")]
    assert planted, sorted(path.name for path in checkpoint.iterdir())
    # and a scheduler state as older accelerate checkpoints stored it (custom_checkpoint_0.pkl)
    planted.append(checkpoint / "custom_checkpoint_0.pkl")
    for path in planted:
        torch.save({"state": Payload()}, path)
    with pytest.raises(InputError, match="refusing a checkpoint file that holds more than tensors"):
        train(make_config(tiny_sdxl_path, pairs_data, run, **settings))
    assert not marker.exists()
    for path in planted:  # a bare pickle, not torch's zip format, the same
        path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(InputError, match="refusing a checkpoint file that holds more than tensors"):
        train(make_config(tiny_sdxl_path, pairs_data, run, **settings))
    assert not marker.exists()


def test_4_train_sh_bad_input_is_one_line_and_exit_2_with_the_run_folder_untouched(tiny_sdxl_path, pairs_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "finished.json").write_text("{}")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                   "PAIRS_FILE": str(tmp_path / "no_pairs.csv"), "OUTPUT_DIR": str(run), "MODEL": str(tiny_sdxl_path), "VAE": "",
                   "USE_8BIT_ADAM": "off", "MIXED_PRECISION": "no", "REPORT_TO": "none"}
    completed = subprocess.run(["bash", str(REPO_ROOT / "4_train.sh")], env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    [line] = completed.stderr.strip().splitlines()
    assert line.startswith("error: ") and "no_pairs.csv" in line
    assert sorted(path.name for path in run.iterdir()) == ["finished.json"]
    # The original recipe's 8-bit Adam on a machine without CUDA: refused, not silently replaced.
    environment.update(PAIRS_FILE=str(pairs_data["pairs"]), USE_8BIT_ADAM="on")
    completed = subprocess.run(["bash", str(REPO_ROOT / "4_train.sh")], env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2 and "error: --use_8bit_adam: 8-bit AdamW needs a CUDA device" in completed.stderr


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_every_checkpoint_loads_in_stock_diffusers_and_generates_through_eval_sh_path(tiny_sdxl_path, pairs_data, tmp_path, lora_rank):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from popalign.generate import GenerationSettings, generate_images

    run = tmp_path / "run"
    train(make_config(tiny_sdxl_path, pairs_data, run, lora_rank=lora_rank, max_train_steps=2, checkpointing_steps=1))
    checkpoint = run / "checkpoint-1"
    assert not (checkpoint / "model.safetensors").exists()  # the weights are stored once, in the diffusers layout
    base = load_file(str(Path(tiny_sdxl_path) / "unet" / "diffusion_pytorch_model.safetensors"))
    if lora_rank:
        pipeline = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_path))
        pipeline.load_lora_weights(str(checkpoint))
        assert any("lora" in name for name in pipeline.unet.state_dict())
        weights = {"lora": str(checkpoint)}
    else:
        unet = UNet2DConditionModel.from_pretrained(str(checkpoint / "unet"))
        step_1 = unet.state_dict()
        assert max_difference({name: step_1[name] for name in base}, base) > 0  # trained one step
        assert max_difference(unet_weights(checkpoint), unet_weights(run)) > 0  # and not the final weights
        weights = {"unet": str(checkpoint / "unet")}
    # eval.sh generates each tuned model with popalign.generate --unet / --lora: the same call here.
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt_id,kind,prompt,neutral_prompt,occupation,activity,gender,race,age\n"
                       "ab12,neutral,a photo of a doctor,a photo of a doctor,doctor,,,,\n", encoding="utf-8")
    settings = GenerationSettings(model=str(tiny_sdxl_path), steps=2, width=32, height=32, precision="fp32", **weights)
    manifest = generate_images(prompts, tmp_path / "images", settings, 1, 0, batch_size=1)
    assert len(manifest) == 1 and (tmp_path / "images" / manifest["image_path"][0]).is_file()


def test_a_finished_run_has_a_model_card_that_evaluation_fills_in(tiny_sdxl_path, pairs_data, tmp_path):
    from huggingface_hub import ModelCard

    from popalign.training.model_card import NOT_EVALUATED, update_evaluation_section

    run = tmp_path / "run"
    train(make_config(tiny_sdxl_path, pairs_data, run, loss="dpo", beta=250.0, max_train_steps=2))
    card = ModelCard.load(str(run / "README.md"))
    assert card.data.base_model == str(tiny_sdxl_path) and card.data.library_name == "diffusers"
    assert {"popalign", "dpo", "text-to-image"} <= set(card.data.tags)
    assert "| `beta` | `250.0` |" in card.text and "| pairs | 4 |" in card.text and "| distinct captions | 3 |" in card.text
    assert f'UNet2DConditionModel.from_pretrained("{run / "unet"}"' in card.text and NOT_EVALUATED in card.text
    assert update_evaluation_section(run / "README.md", "| metric | base | tuned |\n|---|---|---|\n| discrepancy | 0.5 | 0.1 |")
    updated = ModelCard.load(str(run / "README.md"))
    assert NOT_EVALUATED not in updated.text and "| discrepancy | 0.5 | 0.1 |" in updated.text
    assert updated.text.count("## Evaluation") == 1 and "## Training settings" in updated.text


def test_ema_weights_differ_from_the_raw_ones_and_equal_them_at_decay_0(tiny_sdxl_path, pairs_data, tmp_path):
    settings = dict(loss="popalign", max_train_steps=3, learning_rate=1e-2, use_ema=True)
    train(make_config(tiny_sdxl_path, pairs_data, tmp_path / "ema", ema_decay=0.9999, **settings))
    ema, raw = unet_weights(tmp_path / "ema"), load_file(str(tmp_path / "ema" / "unet_raw" / "diffusion_pytorch_model.safetensors"))
    assert max_difference(ema, raw) > 1e-4
    # the EMA lies between the base and the raw weights: EMAModel's warm-up decay (1 + n) / (10 + n) from the second step
    base = load_file(str(Path(tiny_sdxl_path) / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max_difference(ema, base) > 1e-4
    train(make_config(tiny_sdxl_path, pairs_data, tmp_path / "decay0", ema_decay=0.0, **settings))
    # shadow -= (1 - decay) * (shadow - raw): at decay 0 the raw weights, up to float rounding
    assert max_difference(unet_weights(tmp_path / "decay0"), raw) < 1e-6


def test_a_run_with_ema_resumes_to_the_same_weights(tiny_sdxl_path, pairs_data, tmp_path):
    settings = dict(loss="popalign", max_train_steps=3, learning_rate=1e-2, use_ema=True, ema_decay=0.9, checkpointing_steps=1)
    train(make_config(tiny_sdxl_path, pairs_data, tmp_path / "straight", **settings))
    train(make_config(tiny_sdxl_path, pairs_data, tmp_path / "resumed", stop_after_steps=2, **settings))
    train(make_config(tiny_sdxl_path, pairs_data, tmp_path / "resumed", resume_from_checkpoint="latest", **settings))
    assert (tmp_path / "resumed" / "checkpoint-2" / "unet_ema").is_dir()
    assert max_difference(unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "resumed")) == 0.0


@pytest.mark.slow
def test_two_simulated_nodes_train_the_weights_of_one_process(tiny_sdxl_path, pairs_data, tmp_path):
    from multinode import run_two_nodes

    flags = dict(loss="popalign", max_train_steps=2, learning_rate=0.1, adam_epsilon=1.0, caption_dropout=0.5, checkpointing_steps=1,
                 pairs_file=str(pairs_data["identity_prompt"]))
    train(make_config(tiny_sdxl_path, pairs_data, tmp_path / "one", train_batch_size=2, **flags))
    config = make_config(tiny_sdxl_path, pairs_data, tmp_path / "two_nodes", train_batch_size=1, **flags)
    argv = [f"--{name}={('on' if value else 'off') if isinstance(value, bool) else value}" for name, value in config.to_dict().items()]
    nodes = run_two_nodes([str(REPO_ROOT / "train_popalign.py"), *argv], REPO_ROOT, port=29551)
    assert all(node.returncode == 0 for node in nodes), nodes[0].stderr[-3000:] + nodes[1].stderr[-3000:]
    assert max_difference(unet_weights(tmp_path / "one"), unet_weights(tmp_path / "two_nodes")) < 1e-6
    assert sorted(path.name for path in (tmp_path / "two_nodes").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not list((tmp_path / "two_nodes").glob("*.partial"))
