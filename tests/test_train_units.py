"""Trainer building blocks without a model: config, pairs file, image geometry, sample stream, targets, cache, checkpoints."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from popalign.io import InputError
from popalign.training.cache import EncodingCache, caption_cache_key, file_sha256, fill_missing, image_cache_key, memoized_file_sha256
from popalign.training.checkpoints import (
    finish_checkpoint,
    list_checkpoints,
    partial_checkpoint_dir,
    prune_checkpoints,
    resolve_resume_checkpoint,
)
from popalign.training.config import TrainConfig, build_parser, config_from_args
from popalign.training.data import (
    derive_seed,
    process_stream_positions,
    read_pairs,
    resize_and_center_crop,
    sample_randomness,
    stream_pair_indices,
)
from popalign.training.models import add_noise, denoising_target, model_kind, sdxl_time_ids

# ---------------------------------------------------------------- config


def test_flags_parse_into_config_with_original_defaults():
    config = config_from_args(["--pairs_file", "p.csv", "--output_dir", "out"])
    assert (config.loss, config.beta, config.learning_rate, config.lr_warmup_steps, config.max_train_steps) == ("popalign", 5000.0, 5e-7, 200, 750)
    assert (config.train_batch_size, config.mixed_precision, config.gradient_checkpointing, config.caption_dropout) == (1, "bf16", True, 0.2)
    assert (config.max_grad_norm, config.checkpointing_steps, config.lora_rank) == (1.0, 250, 0)
    off = config_from_args(["--pairs_file", "p", "--output_dir", "o", "--gradient_checkpointing", "off", "--use_8bit_adam"])
    assert off.gradient_checkpointing is False and off.use_8bit_adam is True


@pytest.mark.parametrize("argv, message", [
    (["--train_batch_size", "0"], "--train_batch_size"),
    (["--caption_dropout", "1.5"], "--caption_dropout"),
    (["--loss", "sudo"], "--train_batch_size must be >= 2"),
    (["--resolution", "100"], "multiple of 8"),
])
def test_bad_values_raise_input_error_naming_the_flag(argv, message):
    with pytest.raises(InputError, match=message):
        config_from_args(["--pairs_file", "p", "--output_dir", "o", *argv])


def test_unknown_choice_is_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--pairs_file", "p", "--output_dir", "o", "--loss", "ipo"])


def test_every_config_field_is_a_flag_and_round_trips_through_json():
    config = TrainConfig(pairs_file="p.csv", output_dir="o", lora_rank=4, loss="dpo")
    assert TrainConfig(**json.loads(config.to_json())) == config
    flags = {action.dest for action in build_parser()._actions}
    assert set(config.to_dict()) <= flags


# ---------------------------------------------------------------- pairs file


def _png(path: Path, size=(8, 8), colour=(255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_pairs_paths_are_relative_to_the_pairs_folder_unless_absolute(tmp_path):
    winner = _png(tmp_path / "images" / "w.png")
    loser = _png(tmp_path / "elsewhere" / "l.png")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"winner_path,loser_path,caption,diverse_races\nimages/w.png,{loser},a photo of a doctor,3\n", encoding="utf-8")
    [record] = read_pairs(pairs, needs_losers=True)
    assert record.winner_path == winner and record.loser_path == loser and record.caption == "a photo of a doctor"


def test_sft_pairs_need_no_loser_column(tmp_path):
    _png(tmp_path / "w.png")
    pairs = tmp_path / "winners.csv"
    pairs.write_text("winner_path,caption\nw.png,a cat\n", encoding="utf-8")
    [record] = read_pairs(pairs, needs_losers=False)
    assert record.loser_path is None
    with pytest.raises(InputError, match="loser_path"):
        read_pairs(pairs, needs_losers=True)


def test_winner_prompts_are_read_only_for_prior_preservation(tmp_path):
    _png(tmp_path / "w.png")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("winner_path,loser_path,caption,winner_prompt\nw.png,w.png,a doctor,a female doctor\nw.png,w.png,a doctor,\n",
                     encoding="utf-8")
    assert [record.winner_prompt for record in read_pairs(pairs, needs_losers=True)] == [None, None]
    with pytest.raises(InputError, match=r"pairs.csv: row 3: empty winner_prompt"):
        read_pairs(pairs, needs_losers=True, needs_winner_prompts=True)
    no_column = tmp_path / "old.csv"
    no_column.write_text("winner_path,loser_path,caption\nw.png,w.png,a doctor\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"old.csv: missing column\(s\) winner_prompt"):
        read_pairs(no_column, needs_losers=True, needs_winner_prompts=True)


def test_prior_preservation_target_decides_whether_sft_reads_a_reference():
    config = lambda **values: TrainConfig(pairs_file="p.csv", output_dir="o", loss="sft", **values)  # noqa: E731
    assert not config().needs_reference
    assert not config(prior_preservation_weight=0.5).needs_reference  # towards the noise: no reference
    assert config(prior_preservation_weight=0.5, prior_preservation_target="reference").needs_reference
    assert not config(prior_preservation_target="reference").needs_reference  # the term is off
    with pytest.raises(InputError, match="--prior_preservation_target"):
        config(prior_preservation_target="base").validate()


def test_missing_image_names_file_and_row(tmp_path):
    _png(tmp_path / "w.png")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("winner_path,loser_path,caption\nw.png,w.png,a\nw.png,gone.png,b\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"pairs.csv: row 3: image not found: .*gone.png"):
        read_pairs(pairs, needs_losers=True)


# ---------------------------------------------------------------- geometry and SDXL time ids


def test_resize_and_center_crop_records_original_size_and_crop():
    landscape = Image.new("RGB", (64, 40))  # width 64, height 40
    cropped, geometry = resize_and_center_crop(landscape, 32)
    # shorter side 40 -> 32, so 64 -> 51 wide; the centred 32 columns start at (51 - 32) // 2 = 9
    assert cropped.size == (32, 32)
    assert geometry.original_size == (40, 64) and geometry.crop_top_left == (0, 9)
    portrait = Image.new("RGB", (32, 48))
    _, geometry = resize_and_center_crop(portrait, 32)
    assert geometry.original_size == (48, 32) and geometry.crop_top_left == (8, 0)
    _, geometry = resize_and_center_crop(Image.new("RGB", (1024, 1024)), 1024)
    assert geometry.original_size == (1024, 1024) and geometry.crop_top_left == (0, 0)


def test_center_crop_keeps_the_middle_of_the_image():
    image = Image.new("RGB", (30, 10), (0, 0, 255))
    image.paste((255, 0, 0), (10, 0, 20, 10))  # red middle third
    cropped, _ = resize_and_center_crop(image, 10)
    assert cropped.getpixel((5, 5)) == (255, 0, 0)


def test_sdxl_time_ids_are_original_size_crop_and_target():
    time_ids = sdxl_time_ids(torch.tensor([[40, 64], [48, 32]]), torch.tensor([[0, 9], [8, 0]]), 32)
    assert time_ids.tolist() == [[40, 64, 0, 9, 32, 32], [48, 32, 8, 0, 32, 32]]


# ---------------------------------------------------------------- model kind, noise, targets


def test_model_kind_comes_from_the_unet_config():
    assert model_kind({"addition_embed_type": "text_time"}) == "sdxl"
    assert model_kind({"addition_embed_type": None}) == "sd"
    with pytest.raises(ValueError, match="addition_embed_type"):
        model_kind({"addition_embed_type": "image"})


def test_noise_and_targets_match_the_diffusers_scheduler():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 5, 5, generator=generator), torch.randn(3, 4, 5, 5, generator=generator)
    timesteps = torch.tensor([0, 500, 999])
    torch.testing.assert_close(add_noise(scheduler.alphas_cumprod, latents, noise, timesteps), scheduler.add_noise(latents, noise, timesteps))
    assert torch.equal(denoising_target("epsilon", scheduler.alphas_cumprod, latents, noise, timesteps), noise)
    velocity = denoising_target("v_prediction", scheduler.alphas_cumprod, latents, noise, timesteps)
    torch.testing.assert_close(velocity, scheduler.get_velocity(latents, noise, timesteps))
    # by hand at t = 999: v = sqrt(a) eps - sqrt(1 - a) x0
    alpha_bar = float(scheduler.alphas_cumprod[999])
    torch.testing.assert_close(velocity[2], math.sqrt(alpha_bar) * noise[2] - math.sqrt(1 - alpha_bar) * latents[2])
    with pytest.raises(ValueError, match="sample"):
        denoising_target("sample", scheduler.alphas_cumprod, latents, noise, timesteps)


# ---------------------------------------------------------------- sample stream


def test_two_processes_see_the_samples_one_process_sees():
    for micro_step in range(5):
        one = list(process_stream_positions(micro_step, 0, 1, 2))
        two = list(process_stream_positions(micro_step, 0, 2, 1)) + list(process_stream_positions(micro_step, 1, 2, 1))
        assert one == two == [2 * micro_step, 2 * micro_step + 1]


def test_stream_visits_every_pair_once_per_epoch_in_a_seeded_order():
    first_epoch = stream_pair_indices(7, seed=3, start=0, count=7)
    assert sorted(first_epoch) == list(range(7))
    assert sorted(stream_pair_indices(7, seed=3, start=7, count=7)) == list(range(7))
    assert stream_pair_indices(7, seed=3, start=0, count=14) == first_epoch + stream_pair_indices(7, 3, 7, 7)
    assert stream_pair_indices(7, seed=3, start=5, count=4) == stream_pair_indices(7, seed=3, start=0, count=9)[5:]
    assert first_epoch != stream_pair_indices(7, seed=4, start=0, count=7)


def test_sample_randomness_is_a_function_of_seed_and_position():
    a = sample_randomness(1, 10, (4, 2, 2), (0, 1000), 0.2)
    b = sample_randomness(1, 10, (4, 2, 2), (0, 1000), 0.2)
    c = sample_randomness(1, 11, (4, 2, 2), (0, 1000), 0.2)
    assert torch.equal(a.noise, b.noise) and a.timestep == b.timestep and a.drop_caption == b.drop_caption
    assert not torch.equal(a.noise, c.noise)
    draws = [sample_randomness(0, position, (1,), (0, 10), 0.2) for position in range(3000)]
    assert {draw.timestep for draw in draws} == set(range(10))  # t ~ U{0..T-1}
    dropped = sum(draw.drop_caption for draw in draws) / len(draws)
    assert 0.17 < dropped < 0.23
    assert not any(sample_randomness(0, position, (1,), (0, 10), 0.0).drop_caption for position in range(200))


# ---------------------------------------------------------------- cache


def test_cache_keys_follow_content_not_names():
    assert image_cache_key("abc", "vae1", 1024) == image_cache_key("abc", "vae1", 1024)
    assert len({image_cache_key("abc", "vae1", 1024), image_cache_key("abd", "vae1", 1024),
                image_cache_key("abc", "vae2", 1024), image_cache_key("abc", "vae1", 512)}) == 4
    assert caption_cache_key("a doctor", "enc") != caption_cache_key("a doctor", "enc2")
    assert caption_cache_key("a doctor", "enc") != caption_cache_key("a doctor ", "enc")


def test_processes_fill_disjoint_shares_that_cover_everything(tmp_path):
    cache = EncodingCache(tmp_path)
    items = {f"{index:02d}" + "0" * 62: index for index in range(7)}
    encoded_by = {}

    def encoder(process):
        def encode(values):
            for value in values:
                encoded_by.setdefault(value, []).append(process)
            return [{"value": torch.tensor([float(value)])} for value in values]
        return encode

    written = [fill_missing(cache, "latents", items, encoder(process), 2, process, 3) for process in range(3)]
    assert sum(written) == 7 and all(len(processes) == 1 for processes in encoded_by.values())
    assert all(float(cache.read("latents", key)["value"]) == value for key, value in items.items())
    assert fill_missing(cache, "latents", items, encoder(9), 2, 0, 1) == 0  # all cached: nothing re-encoded


def test_file_hash_memo_notices_a_changed_file(tmp_path):
    import os

    image = _png(tmp_path / "a.png", colour=(1, 2, 3))
    first = memoized_file_sha256(image, tmp_path / "memo")
    assert first == file_sha256(image) and len(list((tmp_path / "memo").rglob("*.json"))) == 1
    assert memoized_file_sha256(image, tmp_path / "memo") == first
    _png(image, colour=(9, 9, 9))
    os.utime(image, ns=(1, 1))  # a new modification time, as any rewrite gives
    assert memoized_file_sha256(image, tmp_path / "memo") == file_sha256(image) != first


# ---------------------------------------------------------------- checkpoints


def test_latest_checkpoint_ignores_partial_ones_and_pruning_keeps_the_newest(tmp_path):
    assert resolve_resume_checkpoint(tmp_path, "latest") is None
    assert resolve_resume_checkpoint(tmp_path, "") is None
    for step in (2, 4, 10):
        partial_checkpoint_dir(tmp_path, step).mkdir()
        finish_checkpoint(tmp_path, step, "{}")
    partial_checkpoint_dir(tmp_path, 12).mkdir()  # a save that was interrupted
    assert resolve_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-10"
    assert prune_checkpoints(tmp_path, 2) == [tmp_path / "checkpoint-2"]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 10]
    with pytest.raises(InputError, match="not a complete checkpoint"):
        resolve_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-12.partial"))


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
    deepspeed = load_config_from_file(str(root / "deepspeed_zero2.yaml"))
    assert deepspeed.distributed_type == "DEEPSPEED" and deepspeed.deepspeed_config["zero_stage"] == 2
    fsdp = load_config_from_file(str(root / "fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "BasicTransformerBlock"


def test_batch_timestep_sharing_draws_one_t_per_micro_step_for_every_process():
    from popalign.training.trainer import micro_step_timestep

    shared = TrainConfig(pairs_file="p.csv", output_dir="o", timestep_sharing="batch", seed=3)
    draws = [micro_step_timestep(shared, step, (0, 1000)) for step in range(400)]
    # A pure function of (seed, micro-step): every process computes the same t for a micro-step.
    assert draws == [micro_step_timestep(shared, step, (0, 1000)) for step in range(400)]
    assert all(0 <= t < 1000 for t in draws) and len(set(draws)) > 300
    assert min(draws) < 100 and max(draws) >= 900
    assert micro_step_timestep(TrainConfig(pairs_file="p.csv", output_dir="o"), 5, (0, 1000)) is None  # default: per pair
    with pytest.raises(InputError, match="--timestep_sharing"):
        TrainConfig(pairs_file="p.csv", output_dir="o", timestep_sharing="step").validate()


def test_timesteps_are_drawn_within_the_configured_range():
    from popalign.training.data import timestep_bounds
    from popalign.training.trainer import micro_step_timestep

    assert timestep_bounds(1000) == (0, 1000)
    assert timestep_bounds(1000, 200, 799) == (200, 800)
    draws = [sample_randomness(0, position, (1,), (200, 800), 0.0).timestep for position in range(2000)]
    assert min(draws) == 200 and max(draws) == 799
    # The full range draws exactly what the stream drew before ranges existed: noise, then t ~ U{0..T-1}.
    generator = torch.Generator().manual_seed(derive_seed(4, "sample", 7))
    torch.randn((1,), generator=generator, dtype=torch.float32)
    assert sample_randomness(4, 7, (1,), timestep_bounds(1000), 0.0).timestep == int(torch.randint(0, 1000, (), generator=generator))
    shared = TrainConfig(pairs_file="p.csv", output_dir="o", timestep_sharing="batch", min_timestep=600, max_timestep=999)
    bounds = timestep_bounds(1000, shared.min_timestep, shared.max_timestep)
    assert all(600 <= micro_step_timestep(shared, step, bounds) <= 999 for step in range(300))
    with pytest.raises(InputError, match="--min_timestep"):
        timestep_bounds(1000, 0, 1000)
    with pytest.raises(InputError, match="--min_timestep"):
        TrainConfig(pairs_file="p.csv", output_dir="o", min_timestep=500, max_timestep=100).validate()


@pytest.mark.parametrize("settings, flag", [
    ({"beta": 0.0}, "--beta must be > 0"), ({"beta": -5.0, "loss": "dpo"}, "--beta must be > 0"),
    ({"learning_rate": -1e-5}, "--learning_rate must be > 0"), ({"learning_rate": 0.0}, "--learning_rate must be > 0"),
    ({"lambda_loser": -1.0}, "--lambda_loser must be >= 0"), ({"lambda_winner": 0.0, "lambda_loser": 0.0}, "both 0"),
    ({"beta": float("nan")}, "--beta must be a finite number"), ({"learning_rate": float("inf")}, "--learning_rate must be a finite"),
    ({"adam_beta2": 1.0}, r"--adam_beta2 must be in \[0, 1\)"), ({"adam_epsilon": 0.0}, "--adam_epsilon must be > 0"),
    ({"max_grad_norm": -1.0}, "--max_grad_norm must be >= 0"), ({"max_train_steps": 0}, "--max_train_steps must be >= 1"),
])
def test_hyperparameters_out_of_range_are_refused_naming_the_flag(settings, flag):
    with pytest.raises(InputError, match=flag):
        TrainConfig(pairs_file="p.csv", output_dir="o", **settings).validate()
    TrainConfig(pairs_file="p.csv", output_dir="o", loss="sft", beta=0.0).validate()  # SFT has no temperature


def test_push_to_hub_is_opt_in_and_refused_offline(monkeypatch):
    assert TrainConfig().push_to_hub is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="--push_to_hub needs the network"):
        TrainConfig(pairs_file="p.csv", output_dir="o", push_to_hub=True).validate()


def test_a_run_stored_before_a_setting_existed_reads_that_setting_at_its_default(tmp_path):
    """An older finished run or checkpoint lacks the settings added since: it is compared as if it held their defaults,
    so it stays finished and resumable."""
    import json

    from popalign.training.checkpoints import FINISHED_NAME, finished_run_differences, training_settings
    from popalign.training.config import TrainConfig

    settings = TrainConfig(pairs_file="p.csv", output_dir=str(tmp_path)).to_dict()
    older = {name: value for name, value in training_settings(settings).items()
             if name not in ("train_text_encoder", "text_encoder_lr", "train_unet")}
    (tmp_path / FINISHED_NAME).write_text(json.dumps({"fingerprint": {"settings": older}, "weights": "unet"}), encoding="utf-8")
    assert finished_run_differences(tmp_path, settings) == {}
    assert finished_run_differences(tmp_path, {**settings, "train_text_encoder": True}) == {"train_text_encoder": (False, True)}
