"""The training run: set up under accelerate, then batch -> errors -> loss -> backward -> step -> log.

Distributed plumbing lives here and only here: the losses are pure functions of per-sample
errors (popalign.losses), and the data stream decides which samples a process sees
(popalign.training.data).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from popalign.distributed import global_rank, launched_processes
from popalign.io import (InputError, atomic_write_text, check_model_location, check_output_location, clear_for_writer, fresh_folder,
                         open_for_append, refuse_symlink, remove_orphaned_temporary_files, write_faults_named)
from popalign.locks import check_not_locked, output_lock
from popalign.losses import per_sample_denoising_error, with_prior_preservation
from popalign.training.checkpoints import (
    CONFIG_NAME,
    FINISHED_NAME,
    LORA_CHECKPOINT_NAME,
    METRICS_NAME,
    SETTINGS_CHANGES_NAME,
    checkpoint_weights,
    clear_finished,
    describe_differences,
    finish_checkpoint,
    finished_run_differences,
    finished_weights,
    list_checkpoints,
    mark_finished,
    partial_checkpoint_dir,
    prune_checkpoints,
    read_checkpoint_step,
    record_settings_change,
    resolve_resume_checkpoint,
    settings_differences,
    training_fingerprint,
    trim_metrics,
)
from popalign.training.config import TrainConfig
from popalign.training.model_card import MODEL_CARD_NAME
from popalign.training.data import derive_seed, process_stream_positions, read_pairs, timestep_bounds
from popalign.training.encodings import TrainingBatch, assemble_batch, build_encoded_pairs, with_embedded_captions
from popalign.training.objectives import Layout
from popalign.training.sharding import ShardedUNet, check_checkpoint_layout, shard_unet
from popalign.training.validation import (VALIDATION_NAME, TrainingValidation, check_validation_inputs, read_validations, select_best_step, trim_validations,
                                          validation_fingerprint)
from popalign.training.models import (AUTO_VAE, SD, SDXL, TEXT_ENCODER_NAMES, TextEncoderStack, add_lora_adapter, add_noise, add_text_encoder_lora_adapters, check_vae_fits_unet, denoising_target,
                                     load_noise_scheduler, load_text_encoders, load_unet, model_kind, resolve_vae)

# The files of a run folder that the trainer writes under a fixed name (atomically or by appending).
RUN_FILE_NAMES = (CONFIG_NAME, METRICS_NAME, FINISHED_NAME, SETTINGS_CHANGES_NAME, VALIDATION_NAME, MODEL_CARD_NAME)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Every schedule starts with a linear warmup; "constant" is the original's constant-after-warmup.
SCHEDULE_NAMES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


@dataclass
class TrainResult:
    global_step: int
    finished: bool  # False when the run stopped early (--stop_after_steps) and should be resumed
    output_dir: Path


@dataclass
class UNetCondition:
    """What the U-Net is conditioned on, for N samples: (N, L, D) text, and for SDXL (N, P) pooled text and (N, 6) time ids."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: Optional[torch.Tensor] = None
    time_ids: Optional[torch.Tensor] = None

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> "UNetCondition":
        """The same condition with `function` applied to each tensor it has (to move, cast or slice it)."""
        return UNetCondition(*(None if tensor is None else function(tensor)
                               for tensor in (self.prompt_embeds, self.pooled_prompt_embeds, self.time_ids)))

    def unet_kwargs(self, kind: str) -> dict:
        if kind == SDXL:
            return {"encoder_hidden_states": self.prompt_embeds,
                    "added_cond_kwargs": {"text_embeds": self.pooled_prompt_embeds, "time_ids": self.time_ids}}
        if kind == SD:
            return {"encoder_hidden_states": self.prompt_embeds}
        raise ValueError(f"unknown model kind {kind!r}")


def denoising_prediction(predict: Callable, latents, noise, timesteps, condition: UNetCondition, kind: str,
                         alphas_cumprod: torch.Tensor, input_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A U-Net's prediction for the latents noised to `timesteps`: (N, C, h, w), in the U-Net's output dtype.

    The U-Net's inputs are cast to `input_dtype` (the training dtype: engines such as DeepSpeed
    hold the weights in it without autocast).
    """
    noisy = add_noise(alphas_cumprod, latents, noise, timesteps).to(input_dtype)
    condition = condition.map(lambda tensor: tensor.to(input_dtype))
    return predict(noisy, timesteps, **condition.unet_kwargs(kind)).sample


def model_inputs(batch: TrainingBatch, layout: Layout, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, UNetCondition]:
    """Lay a batch out as the U-Net sees it: the objective's samples (its layout: winners, or winners then a second
    sample per pair), every one under its pair's caption, noise and t.

    Returns latents (N, C, h, w), noise (N, C, h, w), timesteps (N,), condition; N = B or 2B.
    """
    latents, time_ids = layout(batch, generator)
    repeats = latents.shape[0] // batch.winner_latents.shape[0]
    repeat = lambda tensor: None if tensor is None else torch.cat([tensor] * repeats)  # noqa: E731
    return latents, repeat(batch.noise), repeat(batch.timesteps), UNetCondition(repeat(batch.prompt_embeds), repeat(batch.pooled_prompt_embeds), time_ids)


def with_winners_under_their_prompts(latents, noise, timesteps, condition: UNetCondition, batch: TrainingBatch):
    """Append the B winners again, each under its own (identity-specific) prompt with its pair's noise and t.

    The first B samples of every objective's layout are the winners; the appended ones are what the
    prior-preservation term denoises, in the same U-Net pass as the objective's samples.
    """
    winners = batch.winner_latents.shape[0]
    join = lambda tensor, extra: None if tensor is None else torch.cat([tensor, extra])  # noqa: E731
    joined = UNetCondition(join(condition.prompt_embeds, batch.winner_prompt_embeds),
                           join(condition.pooled_prompt_embeds, batch.winner_pooled_prompt_embeds),
                           join(condition.time_ids, batch.winner_time_ids))
    return (torch.cat([latents, batch.winner_latents]), torch.cat([noise, noise[:winners]]),
            torch.cat([timesteps, timesteps[:winners]]), joined)


class AdaptersOffReference:
    """The LoRA reference: the policy U-Net itself with its adapters switched off for one forward pass."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, *args, **kwargs):
        self.unet.disable_adapters()
        try:
            return self.unet(*args, **kwargs)
        finally:
            self.unet.enable_adapters()


def check_8bit_adam(config: TrainConfig, device: torch.device) -> None:
    """--use_8bit_adam needs bitsandbytes and a CUDA device; without them the run is refused, never silently
    given 32-bit AdamW (on SDXL that is about 15 GB more optimizer state than asked for)."""
    if not config.use_8bit_adam:
        return
    if device.type != "cuda":
        raise InputError(f"--use_8bit_adam: 8-bit AdamW needs a CUDA device (this process runs on {device.type}); "
                         "pass --use_8bit_adam off (USE_8BIT_ADAM=off) for torch's 32-bit AdamW")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise InputError("--use_8bit_adam: bitsandbytes is not installed (pip install bitsandbytes), "
                         "or pass --use_8bit_adam off for torch's 32-bit AdamW") from None


def make_optimizer(parameters, config: TrainConfig):
    """AdamW; bitsandbytes' 8-bit AdamW with --use_8bit_adam (check_8bit_adam has made sure it can run)."""
    optimizer_class = torch.optim.AdamW
    if config.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    return optimizer_class(parameters, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                           weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)


def make_lr_scheduler(optimizer, config: TrainConfig, global_step: int = 0):
    """The learning-rate schedule, advanced to `global_step`: it is a function of the step, so a resumed run
    rebuilds it instead of unpickling a saved one."""
    import warnings

    from diffusers.optimization import get_scheduler

    if config.lr_scheduler not in SCHEDULE_NAMES:
        raise ValueError(f"unknown lr_scheduler {config.lr_scheduler!r}")
    scheduler = get_scheduler(SCHEDULE_NAMES[config.lr_scheduler], optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps,
                              num_training_steps=config.max_train_steps)
    with warnings.catch_warnings():  # stepping before optimizer.step(): intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(global_step):
            scheduler.step()
    return scheduler


def make_training_accelerator(config: TrainConfig):
    from accelerate.utils import ProjectConfiguration

    from popalign.distributed import make_accelerator

    output_dir = Path(config.output_dir)
    if config.report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise InputError("--report_to wandb needs the wandb package (pip install wandb)") from None
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    # SDXL reads CLIP-L's penultimate layer, so the adapters of its last layer get no gradient: DDP must expect that.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if config.train_text_encoder else []
    accelerator = make_accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=handlers,
    )
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        # DeepSpeed prepares one model only, and sharded weights can neither be drawn from as they are nor saved as a
        # checkpoint-N/unet folder for the best checkpoint.
        for flag, on in (("--train_text_encoder", config.train_text_encoder), ("--validation_prompts_file", config.validation_prompts_file)):
            if on:
                raise InputError(f"{flag} does not run under {accelerator.distributed_type.value}: use plain data-parallel "
                                 "(NUM_PROCESSES=N, no --config_file)")
    if config.fsdp and (accelerator.num_processes < 2 or accelerator.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)):
        raise InputError(f"--fsdp shards over the launched processes, but this launch runs {accelerator.num_processes} process(es) "
                         f"as {accelerator.distributed_type.value}: launch 2 or more (NUM_PROCESSES=N, no --config_file)")
    deepspeed_plugin = accelerator.state.deepspeed_plugin
    if deepspeed_plugin is not None:
        # No dataloader goes through accelerator.prepare, so DeepSpeed must be told the micro-batch size.
        deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.train_batch_size
    return accelerator


def save_lora_in_diffusers_format(kind: str, folder: Path, unwrapped_unet=None, text_encoders: Sequence = ()) -> Path:
    """<folder>/pytorch_lora_weights.safetensors with the adapters of the U-Net (when it trained through LoRA) and of the
    text encoders (--train_text_encoder), readable by pipeline.load_lora_weights(folder)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers(model):
        return {name: tensor.detach().float().cpu() for name, tensor in convert_state_dict_to_diffusers(get_peft_model_state_dict(model)).items()}

    arguments = {}
    for name, model in (("unet", unwrapped_unet), *zip(TEXT_ENCODER_NAMES, text_encoders)):
        if model is not None:
            arguments[f"{name}_lora_layers"] = layers(model)
            arguments[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    saver = {SDXL: StableDiffusionXLLoraLoaderMixin, SD: StableDiffusionLoraLoaderMixin}[kind]
    clear_for_writer(Path(folder) / "pytorch_lora_weights.safetensors")  # written fresh, never through a link
    saver.save_lora_weights(str(folder), **arguments)
    return Path(folder) / "pytorch_lora_weights.safetensors"


def register_lora_checkpoint_hooks(accelerator, kind: str, text_encoders: Sequence = ()) -> None:
    """Make accelerator.save_state / load_state store only the adapter weights, not the whole models: exactly (for
    resuming: unet_lora.safetensors, text_encoder[_2]_lora.safetensors) and in diffusers' LoRA format
    (pytorch_lora_weights.safetensors, for load_lora_weights and eval.sh). The prepared models are the U-Net when it
    trains and the text encoders when they train (`text_encoders`, unwrapped)."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def state_file(model) -> str:
        for name, encoder in zip(TEXT_ENCODER_NAMES, text_encoders):
            if model is encoder:
                return f"{name}_lora.safetensors"
        return LORA_CHECKPOINT_NAME

    def save_hook(models, weights, output_dir):
        unwrapped = [accelerator.unwrap_model(model) for model in models]
        if accelerator.is_main_process:
            for model in unwrapped:
                state = get_peft_model_state_dict(model)
                save_file({name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}, str(Path(output_dir) / state_file(model)))
            unet = next((model for model in unwrapped if state_file(model) == LORA_CHECKPOINT_NAME), None)
            save_lora_in_diffusers_format(kind, Path(output_dir), unet, [model for model in unwrapped if model is not unet])
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            result = set_peft_model_state_dict(model, load_file(str(Path(input_dir) / state_file(model))))
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"{input_dir}: LoRA checkpoint does not match the adapter: {result.unexpected_keys[:3]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def register_unet_checkpoint_hooks(accelerator) -> None:
    """Full fine-tuning: a checkpoint stores the U-Net as <checkpoint>/unet in diffusers format (what
    UNet2DConditionModel.from_pretrained and eval.sh read) instead of accelerate's model.safetensors, and resumes
    from it. Sharded runs (FSDP, DeepSpeed) keep accelerate's own layout."""
    from diffusers import UNet2DConditionModel

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            accelerator.unwrap_model(models[0]).save_pretrained(str(Path(output_dir) / "unet"))
        if weights:
            weights.pop()

    def load_hook(models, input_dir):
        if not (Path(input_dir) / "unet").is_dir():
            return  # a checkpoint in accelerate's layout: accelerate loads it
        saved = UNet2DConditionModel.from_pretrained(str(input_dir), subfolder="unet")
        accelerator.unwrap_model(models.pop()).load_state_dict(saved.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


EMA_FOLDER = "unet_ema"


def save_checkpoint(accelerator, output_dir: Path, step: int, config: TrainConfig, ema=None, sharded: Optional[ShardedUNet] = None) -> None:
    """All processes write their part of the state (a sharded run's weights and optimizer state gathered by `sharded`);
    the main process names it and prunes old ones (never the best so far)."""
    if accelerator.is_main_process:  # a killed run's partial folder is removed: every file is written fresh, never through a link
        refuse_symlink(partial_checkpoint_dir(output_dir, step))
        shutil.rmtree(partial_checkpoint_dir(output_dir, step), ignore_errors=True)
    accelerator.wait_for_everyone()
    with write_faults_named(partial_checkpoint_dir(output_dir, step)):  # the checkpoints before stay whole
        accelerator.save_state(str(partial_checkpoint_dir(output_dir, step)))
        if sharded is not None:
            sharded.save(partial_checkpoint_dir(output_dir, step))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:  # diffusers layout; its config holds the EMA's own state (decay, step)
            ema.save_pretrained(str(partial_checkpoint_dir(output_dir, step) / EMA_FOLDER))
        finish_checkpoint(output_dir, step, config.to_json())
        best = best_checkpoint(config, final_step=None)
        prune_checkpoints(output_dir, config.checkpoints_total_limit, frozenset() if best is None else frozenset({best["step"]}))
    accelerator.wait_for_everyone()


def best_checkpoint(config: TrainConfig, final_step: Optional[int]) -> Optional[dict]:
    """The best saved weights by the validation's rule (popalign.training.validation.select_best_step), as finished.json
    records it: {"step", "weights" (relative to the run folder, null when none is eligible), "lora", "rule"}; None
    without validation. `final_step`: the last step, whose weights are the final ones (None while training)."""
    if not config.validation_prompts_file:
        return None
    output_dir, lora = Path(config.output_dir), config.lora_rank > 0
    candidates = {step for step, _ in list_checkpoints(output_dir)} | ({final_step} if final_step is not None else set())
    step = select_best_step(read_validations(output_dir, validation_fingerprint(config)), candidates, config.best_checkpoint_accuracy_margin,
                            config.best_checkpoint_quality_margin)
    rule = (f"lowest mean validation discrepancy with identity accuracy >= step 0's - {config.best_checkpoint_accuracy_margin} "
            f"and quality >= step 0's - {config.best_checkpoint_quality_margin} x |step 0's|")
    if step is None:
        return {"step": None, "weights": None, "lora": lora, "rule": rule}
    if step == final_step:
        # the final weights that were validated: the run folder's LoRA file, or the raw U-Net (with --use_ema, unet/ holds the EMA)
        weights = Path(".") if lora else Path("unet_raw" if config.use_ema else "unet")
    else:
        weights = checkpoint_weights(output_dir, step, lora).relative_to(output_dir)
    return {"step": step, "weights": str(weights), "lora": lora, "rule": rule}


def save_final_weights(accelerator, run: "PreparedRun", output_dir: Path) -> Path:
    """Full: <output_dir>/unet in diffusers format. LoRA (U-Net and / or text encoders):
    <output_dir>/pytorch_lora_weights.safetensors."""
    from accelerate.utils import DistributedType

    unet = run.unet
    if run.config.lora_rank > 0:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_lora_in_diffusers_format(run.kind, output_dir, accelerator.unwrap_model(unet) if run.config.unet_lora else None,
                                          [accelerator.unwrap_model(encoder) for encoder in run.text.encoders] if run.text else [])
        accelerator.wait_for_everyone()
        return output_dir / "pytorch_lora_weights.safetensors"
    if run.sharded is not None:
        with write_faults_named(output_dir / "unet"):
            run.sharded.save_unet(output_dir / "unet")
        accelerator.wait_for_everyone()
        return output_dir / "unet"
    state_dict = accelerator.get_state_dict(unet)  # every process: gathers sharded (FSDP / ZeRO-3) weights
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        if accelerator.distributed_type == DistributedType.FSDP:
            # FSDP's module holds flattened shards; rebuild a plain U-Net from the gathered weights.
            model = type(model).from_config(model.config)
            model.load_state_dict(state_dict)
        with write_faults_named(output_dir / "unet"), fresh_folder(output_dir / "unet") as folder:
            model.save_pretrained(str(folder))
    accelerator.wait_for_everyone()
    return output_dir / "unet"


def _mean_statistics(accelerator, collected: list[dict]) -> dict[str, float]:
    """Statistics of an optimizer step: averaged over its micro-steps and over processes."""
    names = sorted(collected[0])
    local = torch.stack([torch.stack([stats[name].float() for name in names]) for stats in collected]).mean(dim=0)
    pooled = accelerator.reduce(local.to(accelerator.device), reduction="mean")
    return {name: float(value) for name, value in zip(names, pooled.tolist())}


@dataclass
class PreparedRun:
    """Everything a run needs, set up and (when resuming) restored; `run_training` consumes it."""

    config: TrainConfig
    accelerator: object
    unet: torch.nn.Module  # the policy, as prepared by accelerate (possibly wrapped)
    reference: Optional[Callable]  # frozen reference U-Net (full) / adapters-off view (LoRA); None for SFT
    trainable: list
    optimizer: object
    lr_scheduler: object
    pairs: object  # EncodedPairs
    kind: str
    prediction_type: str
    timestep_range: tuple[int, int]  # training t ~ U{low..high-1}
    alphas_cumprod: torch.Tensor
    global_step: int
    ema: Optional[object] = None  # diffusers EMAModel of the U-Net's weights (--use_ema)
    validation: Optional[TrainingValidation] = None  # --validation_prompts_file
    text: Optional[TextEncoderStack] = None  # the text encoders being trained (--train_text_encoder), as prepared
    sharded: Optional[ShardedUNet] = None  # --fsdp: the sharded U-Net and its optimizer (what checkpoints gather)

    @property
    def trained_models(self) -> list:
        """The modules whose parameters train (as prepared): what gradient accumulation synchronises."""
        return ([self.unet] if self.config.train_unet else []) + (list(self.text.encoders) if self.text is not None else [])

    def reference_text(self):
        """The text side of the reference: the trained encoders, unwrapped, with their adapters off (a context)."""
        base = TextEncoderStack(self.text.kind, self.text.tokenizers, [self.accelerator.unwrap_model(encoder) for encoder in self.text.encoders],
                                self.text.fingerprint)
        return base.adapters_disabled()


def check_run_inputs(config: TrainConfig, device: torch.device):
    """(pairs, checkpoint to resume or None, its settings that differ) after every check that needs no model:
    flags, output location, optimizer, pairs file and images, model folder, checkpoint. Raises InputError."""

    config.validate()
    output_dir = Path(config.output_dir)
    check_output_location(output_dir, "--output_dir", folder=True)
    for name in RUN_FILE_NAMES:  # the run's own files are read back and appended to: a link there would send them elsewhere
        refuse_symlink(output_dir / name)
    check_model_location("pretrained_model_name_or_path", config.pretrained_model)
    if config.vae != AUTO_VAE:
        check_model_location("pretrained_vae_model_name_or_path", config.vae)
    if (Path(config.pretrained_model) / "unet").is_dir():
        from popalign.pipelines import check_unet_folder

        check_unet_folder("--pretrained_model_name_or_path", Path(config.pretrained_model) / "unet")
    config.vae = resolve_vae(config.pretrained_model, config.vae)  # what the run records and compares: the VAE it uses
    check_vae_fits_unet(config.pretrained_model, config.vae)
    check_8bit_adam(config, device)
    records = read_pairs(config.pairs_file, needs_losers=config.needs_losers, needs_winner_prompts=config.needs_winner_prompts)
    check_validation_inputs(config, training_captions={record.caption for record in records})
    checkpoint = resolve_resume_checkpoint(output_dir, config.resume_from_checkpoint)
    if checkpoint is not None:
        check_checkpoint_layout(checkpoint, config.fsdp)
    differences = settings_differences(checkpoint, config.to_dict()) if checkpoint is not None else {}
    if differences and not config.allow_setting_change:
        raise InputError(f"--resume_from_checkpoint {checkpoint}: it was trained with other settings ({describe_differences(differences)}); "
                         "resume with the checkpoint's settings, start a new --output_dir, or pass --allow_setting_change")
    finished_differences = finished_run_differences(output_dir, config.to_dict()) if checkpoint is None else None
    if finished_differences and not config.allow_setting_change:
        raise InputError(f"--output_dir {output_dir}: holds a finished run trained with other settings "
                         f"({describe_differences(finished_differences)}); train into another --output_dir, "
                         "or pass --allow_setting_change to replace it")
    return records, checkpoint, differences


def prepare_run(config: TrainConfig, checked_inputs: Optional[tuple] = None) -> PreparedRun:
    """Accelerator, data encodings, policy and reference U-Nets, optimizer; restore a checkpoint if asked.
    `checked_inputs`: what check_run_inputs already returned for this config (train() checks before it decides
    whether there is anything to train), so the pairs and their images are not checked twice."""
    from accelerate.utils import DistributedType, set_seed

    config.validate()
    torch.set_num_threads(config.torch_threads)
    output_dir = Path(config.output_dir)
    accelerator = make_training_accelerator(config)
    say = accelerator.print
    set_seed(config.seed)
    # Everything that can be checked is checked before anything is written in the run folder.
    records, checkpoint, differences = checked_inputs if checked_inputs is not None else check_run_inputs(config, accelerator.device)
    unet = load_unet(config.pretrained_model, config.variant)
    kind = model_kind(unet.config)
    noise_scheduler = load_noise_scheduler(config.pretrained_model)
    timestep_range = timestep_bounds(noise_scheduler.config.num_train_timesteps, config.min_timestep, config.max_timestep)

    pairs = build_encoded_pairs(records, accelerator, config.resolved_cache_dir(), config.pretrained_model, config.vae, config.variant,
                                kind, config.resolution, config.caption_dropout, config.vae_encode_batch_size, config.max_memory_cache_gb,
                                cache_captions=not config.train_text_encoder)
    say(f"{len(records)} pairs; {kind} U-Net ({noise_scheduler.config.prediction_type}); encodings cached in "
        f"{config.resolved_cache_dir()} ({'held in memory' if pairs.encodings.in_memory else 'read from disk'})")

    weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
    reference: Optional[Callable] = None
    text = None
    if config.train_text_encoder:  # captions are embedded at every step by the encoders being trained
        text = load_text_encoders(config.pretrained_model, kind, config.variant, accelerator.device)
        add_text_encoder_lora_adapters(text, config.lora_rank, config.lora_alpha, config.seed)
        for encoder in text.encoders:
            encoder.train()
    if config.unet_lora:
        unet.to(accelerator.device, dtype=weight_dtype)
        add_lora_adapter(unet, config.lora_rank, config.lora_alpha, config.seed)
        for parameter in unet.parameters():
            if parameter.requires_grad:  # adapter weights train in fp32 while the frozen base stays in weight_dtype
                parameter.data = parameter.data.float()
    elif not config.train_unet:
        # The text encoders alone train: the frozen U-Net is also the reference's (under the base text encoders).
        unet.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
        reference = unet if config.needs_reference else None
    elif config.needs_reference:
        # A second frozen copy, resident on the device in the training dtype for the whole run.
        reference = load_unet(config.pretrained_model, config.variant, weight_dtype).requires_grad_(False).eval().to(accelerator.device)
    unet.train()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.fsdp:  # before the optimizer is made: sharding replaces the U-Net's parameters
        shard_policy(unet, accelerator, reference)

    unet_parameters = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    text_parameters = [parameter for encoder in (text.encoders if text else []) for parameter in encoder.parameters() if parameter.requires_grad]
    trainable = unet_parameters + text_parameters
    optimizer = make_optimizer([group for group in ({"params": unet_parameters}, {"params": text_parameters, "lr": config.text_encoder_lr})
                                if group["params"]], config)
    trained_models = ([unet] if config.train_unet else []) + (list(text.encoders) if text else [])
    sharded = None
    if config.fsdp:  # sharded by shard_policy: nothing for accelerate to wrap (it would add DDP); checkpoints through ShardedUNet
        sharded = ShardedUNet(unet, optimizer, accelerator.is_main_process)
    else:
        prepared = accelerator.prepare(*trained_models, optimizer)
        optimizer = prepared[-1]
        if config.train_unet:
            unet = prepared[0]
        if text is not None:
            text.encoders = list(prepared[int(config.train_unet):-1])
    if config.lora_rank > 0:
        register_lora_checkpoint_hooks(accelerator, kind, [accelerator.unwrap_model(encoder) for encoder in text.encoders] if text else [])
        if config.unet_lora and config.needs_reference:
            reference = AdaptersOffReference(accelerator.unwrap_model(unet))
    elif sharded is None and accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        register_unet_checkpoint_hooks(accelerator)

    ema = None
    if config.use_ema:
        from diffusers import UNet2DConditionModel
        from diffusers.training_utils import EMAModel

        unwrapped = accelerator.unwrap_model(unet)
        ema = EMAModel(unwrapped.parameters(), decay=config.ema_decay, model_cls=UNet2DConditionModel, model_config=unwrapped.config)
        ema.to(accelerator.device)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_orphaned_temporary_files(output_dir)  # a killed run's half-written files
        clear_finished(output_dir)
        atomic_write_text(output_dir / CONFIG_NAME, config.to_json())
    global_step = 0
    if checkpoint is not None:
        # Weights, optimizer and RNG states (read with torch's weights-only loader); nothing is unpickled.
        try:
            accelerator.load_state(str(checkpoint))
        except pickle.UnpicklingError as error:
            first_line = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise InputError(f"--resume_from_checkpoint {checkpoint}: refusing a checkpoint file that holds more than tensors "
                             f"({first_line})") from None
        if sharded is not None:
            sharded.load(checkpoint)
        global_step = read_checkpoint_step(checkpoint)
        if ema is not None:
            from diffusers import UNet2DConditionModel
            from diffusers.training_utils import EMAModel

            if not (checkpoint / EMA_FOLDER).is_dir():
                raise InputError(f"--use_ema: {checkpoint} holds no {EMA_FOLDER}/ (it was trained without EMA)")
            ema.load_state_dict(EMAModel.from_pretrained(str(checkpoint / EMA_FOLDER), model_cls=UNet2DConditionModel).state_dict())
            ema.to(accelerator.device)
        say(f"resumed from {checkpoint} at step {global_step}")
        if differences and accelerator.is_main_process:
            record_settings_change(output_dir, checkpoint, global_step, differences)
            say(f"--allow_setting_change: resumed with other settings ({describe_differences(differences)}); "
                f"recorded in {output_dir / 'settings_changes.jsonl'}")
    elif config.resume_from_checkpoint:
        say(f"no checkpoint in {output_dir}; starting a new run")
    if accelerator.is_main_process:
        trim_metrics(output_dir, global_step)
        if config.validation_prompts_file:
            trim_validations(output_dir, global_step, validation_fingerprint(config))
    accelerator.wait_for_everyone()  # every process reads the trimmed validations
    validation = TrainingValidation(config, accelerator) if config.validation_prompts_file else None
    if validation is not None and (config.checkpointing_steps == 0 or config.validation_steps % config.checkpointing_steps):
        say(f"note: only the validations at checkpoint steps and at the last step can be kept as the best checkpoint; "
            f"--validation_steps {config.validation_steps} is not a multiple of --checkpointing_steps {config.checkpointing_steps}")
    # Stepped once per optimizer step by the loop (a prepared scheduler would step once per process).
    lr_scheduler = make_lr_scheduler(optimizer, config, global_step)

    return PreparedRun(config=config, accelerator=accelerator, unet=unet, reference=reference, trainable=trainable, optimizer=optimizer,
                       lr_scheduler=lr_scheduler, pairs=pairs, kind=kind, prediction_type=noise_scheduler.config.prediction_type,
                       timestep_range=timestep_range,
                       alphas_cumprod=noise_scheduler.alphas_cumprod.to(accelerator.device), global_step=global_step, ema=ema,
                       validation=validation, text=text, sharded=sharded)


def shard_policy(unet, accelerator, reference) -> None:
    """--fsdp: shard the trained U-Net over the launched processes (popalign.training.sharding) and say, on every process,
    what it holds."""
    shards = shard_unet(unet, accelerator.device)
    kept = "no reference" if reference is None else f"reference whole, {next(reference.parameters()).dtype}"
    # One write of the whole line: every process prints one, and print's text and newline, written apart on an unbuffered
    # stdout, let two processes' lines run into each other.
    sys.stdout.write(f"process {accelerator.process_index}: holds {shards['local_parameters']:,} of the U-Net's "
                     f"{shards['parameters']:,} parameters ({shards['units']} FSDP2 units over {shards['processes']} processes); "
                     f"{kept}\n")
    sys.stdout.flush()


def micro_step_timestep(config: TrainConfig, micro_step: int, timestep_range: tuple[int, int]) -> Optional[int]:
    """With --timestep_sharing batch: the t ~ U{low..high-1} of this global micro-step, the same on every process; else None."""
    if config.timestep_sharing != "batch":
        return None
    generator = torch.Generator().manual_seed(derive_seed(config.seed, "batch_timestep", micro_step))
    return int(torch.randint(*timestep_range, (), generator=generator))


def unet_inputs(run: PreparedRun, batch: TrainingBatch, micro_step: int):
    """The U-Net's samples for a batch (the objective's layout, and the prior-preservation samples), on the device."""
    config, accelerator = run.config, run.accelerator
    generator = torch.Generator().manual_seed(derive_seed(config.seed, "derangement", micro_step, accelerator.process_index))
    latents, noise, timesteps, condition = model_inputs(batch, config.objective.layout, generator)
    objective_samples = latents.shape[0]
    if config.needs_winner_prompts:
        latents, noise, timesteps, condition = with_winners_under_their_prompts(latents, noise, timesteps, condition, batch)
    move = lambda tensor: tensor.to(accelerator.device)  # noqa: E731
    return move(latents), move(noise), move(timesteps), condition.map(move), objective_samples


def train_micro_step(run: PreparedRun, micro_step: int, reduce_mean: Optional[Callable]) -> dict:
    """One micro-batch of this process: errors of policy and reference, the loss, backward (and the optimizer step when due)."""
    config, accelerator = run.config, run.accelerator
    positions = process_stream_positions(micro_step, accelerator.process_index, accelerator.num_processes, config.train_batch_size)
    batch = assemble_batch(run.pairs, positions, config.seed, run.timestep_range, config.caption_dropout, run.kind, config.resolution,
                           config.needs_losers, micro_step_timestep(config, micro_step, run.timestep_range),
                           with_winner_prompts=config.needs_winner_prompts)
    input_dtype = WEIGHT_DTYPES[config.mixed_precision]
    with accelerator.accumulate(*run.trained_models):
        reference_batch = batch
        if run.text is not None:  # the trained text encoders embed the captions: the policy's with adapters, the reference's without
            captions = batch
            with accelerator.autocast():
                batch = reference_batch = with_embedded_captions(captions, run.text, accelerator.device)
            if run.reference is not None:
                with torch.no_grad(), accelerator.autocast(), run.reference_text() as reference_text:
                    reference_batch = with_embedded_captions(captions, reference_text, accelerator.device)
        latents, noise, timesteps, condition, objective_samples = unet_inputs(run, batch, micro_step)
        reference_condition = condition if reference_batch is batch else unet_inputs(run, reference_batch, micro_step)[3]
        predictions = lambda predict, count, on: denoising_prediction(predict, latents[:count], noise[:count], timesteps[:count],  # noqa: E731
                                                                      on.map(lambda tensor: tensor[:count]), run.kind,
                                                                      run.alphas_cumprod, input_dtype)
        targets = denoising_target(run.prediction_type, run.alphas_cumprod, latents, noise, timesteps)
        # Prior preservation towards the reference: its predictions on the appended samples are their targets.
        reference_rows = latents.shape[0] if config.preserves_towards_reference else objective_samples
        reference_errors, reference_predictions = None, None
        if run.reference is not None:
            with torch.no_grad(), accelerator.autocast():
                reference_predictions = predictions(run.reference, reference_rows, reference_condition)
            if config.objective.uses_reference:
                reference_errors = per_sample_denoising_error(reference_predictions[:objective_samples], targets[:objective_samples])
        with accelerator.autocast():
            policy_predictions = predictions(run.unet, latents.shape[0], condition)  # one pass, the prior-preservation samples included
        policy_errors = per_sample_denoising_error(policy_predictions[:objective_samples], targets[:objective_samples])
        loss, statistics = config.objective.compute(policy_errors, reference_errors, config, reduce_mean)
        if config.needs_winner_prompts:
            preservation_targets = reference_predictions[objective_samples:] if config.preserves_towards_reference \
                else targets[objective_samples:]
            identity_errors = per_sample_denoising_error(policy_predictions[objective_samples:], preservation_targets)
            loss, statistics = with_prior_preservation(loss, statistics, identity_errors, config.prior_preservation_weight)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.trainable, config.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
    return statistics


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; the message names the step and the last checkpoint written before it."""


def optimizer_step(run: PreparedRun, reduce_mean: Callable) -> dict[str, float]:
    """One optimizer step: its micro-steps (data -> objective -> backward -> optimizer), EMA, schedule; its statistics."""
    accumulation = run.config.gradient_accumulation_steps
    collected = [train_micro_step(run, run.global_step * accumulation + index, reduce_mean) for index in range(accumulation)]
    if not run.accelerator.sync_gradients:
        raise RuntimeError("gradient accumulation fell out of step with the optimizer steps")
    if run.ema is not None:
        run.ema.step(run.accelerator.unwrap_model(run.unet).parameters())
    learning_rate = run.lr_scheduler.get_last_lr()[0]  # the rate this step used
    run.lr_scheduler.step()
    run.global_step += 1
    return {**_mean_statistics(run.accelerator, collected), "lr": learning_rate}


def log_step(run: PreparedRun, logged: dict[str, float]) -> None:
    """The step's statistics to the tracker and metrics.jsonl; TrainingDiverged when the loss is not finite."""
    accelerator, output_dir = run.accelerator, Path(run.config.output_dir)
    accelerator.log({f"train/{name}": value for name, value in logged.items()}, step=run.global_step)
    if accelerator.is_main_process:
        with write_faults_named(output_dir / METRICS_NAME), open_for_append(output_dir / METRICS_NAME) as stream:
            stream.write(json.dumps({"step": run.global_step, **logged}) + "\n")
    if not math.isfinite(logged["loss"]):
        # Before any checkpoint of this step: the last one written is from before the weights went bad.
        written = list_checkpoints(output_dir)
        last = f"the last checkpoint is {written[-1][1]}" if written else "no checkpoint was written"
        raise TrainingDiverged(f"the loss is {logged['loss']} at step {run.global_step}; training stopped, {last} "
                               "(lower --learning_rate or --beta, or clip gradients harder with --max_grad_norm)")


def validate_if_due(run: PreparedRun) -> None:
    """Population metrics of the current weights at step 0 and every --validation_steps (popalign.training.validation)."""
    if run.validation is not None and run.validation.due(run.global_step):
        text_encoders = [run.accelerator.unwrap_model(encoder) for encoder in run.text.encoders] if run.text is not None else []
        record = run.validation.run(run.accelerator.unwrap_model(run.unet), run.global_step, text_encoders)
        if record is not None:
            shown = ", ".join(f"{name} {value:.3f}" for name, value in record.items()
                              if name.startswith(("discrepancy_", "identity_accuracy", "quality")) and not name.endswith(("_low", "_high")))
            tqdm.write(f"validation at step {run.global_step}: {shown}")


def run_training(run: PreparedRun) -> TrainResult:
    """The loop from the run's current step to max_train_steps (or --stop_after_steps), then the final weights."""
    config, accelerator = run.config, run.accelerator
    say = accelerator.print
    output_dir = Path(config.output_dir)
    tracker_config = {name: (value if isinstance(value, (int, float, str, bool)) else str(value)) for name, value in config.to_dict().items()}
    accelerator.init_trackers(config.tracker_project, config=tracker_config)
    per_process, processes, accumulation = config.train_batch_size, accelerator.num_processes, config.gradient_accumulation_steps
    say(f"effective batch: {per_process} pairs/process x {processes} processes x {accumulation} accumulation = "
        f"{per_process * processes * accumulation} pairs per optimizer step; {config.max_train_steps} steps; loss {config.loss}")

    reduce_mean = lambda tensor: accelerator.reduce(tensor, reduction="mean")  # noqa: E731
    progress = tqdm(total=config.max_train_steps, initial=run.global_step, desc="training", disable=not accelerator.is_local_main_process)
    steps_this_run = 0
    finished = run.global_step >= config.max_train_steps
    validate_if_due(run)
    while not finished:
        logged = optimizer_step(run, reduce_mean)
        steps_this_run += 1
        try:
            log_step(run, logged)
        except TrainingDiverged:
            progress.close()  # the bar's line ends before the error is printed
            raise
        progress.update(1)
        progress.set_postfix({name: f"{logged[name]:.4g}" for name in ("loss", "implicit_accuracy") if name in logged})
        if config.checkpointing_steps and run.global_step % config.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, run.global_step, config, run.ema, run.sharded)
        validate_if_due(run)
        finished = run.global_step >= config.max_train_steps
        if not finished and config.stop_after_steps and steps_this_run >= config.stop_after_steps:
            say(f"stopping after {steps_this_run} steps of this run at step {run.global_step}; resume with --resume_from_checkpoint latest")
            break
    progress.close()

    if finished:
        saved = save_final_weights(accelerator, run, output_dir)
        if run.ema is not None and accelerator.is_main_process:
            # The EMA weights become <output_dir>/unet (what evaluation and the model card load); the raw ones stay beside.
            refuse_symlink(output_dir / "unet_raw")
            shutil.rmtree(output_dir / "unet_raw", ignore_errors=True)
            os.replace(output_dir / "unet", output_dir / "unet_raw")
            with write_faults_named(output_dir / "unet"), fresh_folder(output_dir / "unet") as folder:
                run.ema.save_pretrained(str(folder))
        if accelerator.is_main_process:
            from popalign.training.model_card import write_model_card

            card = write_model_card(output_dir, config.to_dict(), saved, run.global_step, run.kind)
            best = best_checkpoint(config, final_step=run.global_step)
            mark_finished(output_dir, training_fingerprint(config.to_dict(), config.pairs_file, config.pretrained_model),
                          saved, run.global_step, best)
            if best is not None:
                say(f"best checkpoint (validation): {best['weights'] or 'none eligible'} at step {best['step']}")
            say(f"model card: {card}")
            if config.push_to_hub:
                from huggingface_hub import create_repo, upload_folder

                repo_id = create_repo(config.hub_model_id or output_dir.name, exist_ok=True).repo_id
                upload_folder(repo_id=repo_id, folder_path=str(output_dir), ignore_patterns=["checkpoint-*", "logs/*", "*.partial", ".*.lock"])
                say(f"pushed {output_dir} to the Hub as {repo_id}")
        say(f"saved {saved}")
    accelerator.end_training()
    return TrainResult(global_step=run.global_step, finished=finished, output_dir=output_dir)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run as configured; return where it ended.

    When the output folder already holds the final weights of this same training (checkpoints.py:
    same settings, pairs file content and base U-Net files), nothing is trained again.
    """
    # Flags, pairs, model and output folder checked first, also when the folder holds this run finished.
    checked_inputs = check_run_inputs(config, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if config.validate_only:
        check_not_locked(config.output_dir, "training")  # 4_train.sh stops before the launch, not on rank 0 after it
        print(f"{config.output_dir}: the run can start", flush=True)
        return TrainResult(global_step=0, finished=False, output_dir=Path(config.output_dir))
    done = finished_weights(config.output_dir, training_fingerprint(config.to_dict(), config.pairs_file, config.pretrained_model))
    if done is not None:
        weights, global_step = done
        if global_rank() == 0:
            print(f"{weights} is already trained with these settings and pairs; nothing to do "
                  f"(delete {Path(config.output_dir) / FINISHED_NAME} to train again)", flush=True)
        return TrainResult(global_step=global_step, finished=True, output_dir=Path(config.output_dir))
    if config.fsdp and launched_processes() < 2:  # before the run folder is made
        raise InputError("--fsdp shards over the launched processes, but this launch runs 1 process: launch 2 or more (NUM_PROCESSES=N)")
    # One run per folder (two at once would interleave metrics.jsonl and race on the checkpoints). Under a launch the
    # global main process holds it; the others write only through it or their own parts of a checkpoint.
    with output_lock(config.output_dir, "training", take=global_rank() == 0):
        return run_training(prepare_run(config, checked_inputs))
