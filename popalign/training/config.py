"""Every hyperparameter of a training run, in one dataclass that is also the command line.

Defaults are the values of the original PopAlign SDXL run (full U-Net, beta 5000, lr 5e-7 with
200 warmup steps, 750 steps, one pair per process, bf16, gradient checkpointing, 8-bit AdamW, the
fp16-fixed SDXL VAE for encoding an SDXL base, caption dropout 0.2), so `train_popalign.py --pairs_file P
--output_dir O` reproduces it; 4_train.sh has the same defaults (tests/test_defaults.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from popalign.attributes import DEFAULT_ATTRIBUTES_PATH
from popalign.io import ArgumentParser, InputError, parse_seed
from popalign.losses import ANCHORS
from popalign.training.objectives import objective_named, objective_names
TIMESTEP_SHARING = ("pair", "batch")
PRIOR_PRESERVATION_TARGETS = ("noise", "reference")
LR_SCHEDULERS = ("constant", "cosine", "linear")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
TRACKERS = ("tensorboard", "wandb", "none")


# Flags spelled as in the diffusers training examples (train_dreambooth_lora_sdxl.py and the like).
DIFFUSERS_FLAG_NAMES = {"pretrained_model": "pretrained_model_name_or_path", "vae": "pretrained_vae_model_name_or_path",
                        "lora_rank": "rank"}


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    # data: what is trained on and how it is encoded
    pairs_file: str = field(default="",
        metadata=_help("pairs CSV (winner_path, loser_path, caption); paths are relative to its folder unless absolute"))
    output_dir: str = field(default="", metadata=_help("run folder: checkpoints, logs, config and the final weights"))
    cache_dir: str = field(default="",
        metadata=_help("encoding cache folder (content-keyed, shareable between runs); default: <pairs folder>/encoding_cache"))
    resolution: int = field(default=1024,
        metadata=_help("images are resized (shorter side) and center-cropped to this square size"))
    caption_dropout: float = field(default=0.2,
        metadata=_help("probability that a pair's caption is replaced by the empty prompt (on in the original run)"))
    max_memory_cache_gb: float = field(default=4.0,
        metadata=_help("hold all cached encodings in memory when they fit in this many GiB, else read them from disk each step"))
    vae_encode_batch_size: int = field(default=8, metadata=_help("images per VAE call while filling the cache"))

    # model: what is fine-tuned
    pretrained_model: str = field(default="stabilityai/stable-diffusion-xl-base-1.0",
        metadata=_help("diffusers pipeline folder or hub id"))
    vae: str = field(default="auto",
        metadata=_help("VAE folder or hub id used to encode images; 'auto' = for an SDXL base SDXL's VAE fixed to run in fp16 "
                       "(madebyollin/sdxl-vae-fp16-fix, the original's), for any other base its own VAE; empty = the base model's own VAE"))
    variant: str = field(default="", metadata=_help("weight variant to load (e.g. fp16); empty = default weights"))
    lora_rank: int = field(default=0,
        metadata=_help("0 = full U-Net fine-tuning; R > 0 = LoRA of rank R on the attention projections"))
    lora_alpha: int = field(default=0, metadata=_help("LoRA scaling alpha; 0 = equal to the rank"))
    train_text_encoder: bool = field(default=False,
        metadata=_help("also train the text encoder(s) (both for SDXL) with LoRA of rank --rank, at --text_encoder_lr; captions are then "
                       "embedded at every step instead of cached. The output's pytorch_lora_weights.safetensors holds their layers "
                       "(pipeline.load_lora_weights). Needs --rank R > 0"))
    text_encoder_lr: float = field(default=5e-6, metadata=_help("peak learning rate of the text encoders' LoRA (--train_text_encoder)"))
    train_unet: bool = field(default=True,
        metadata=_help("train the U-Net; off (--no_train_unet) with --train_text_encoder trains the text encoder(s) alone, the U-Net "
                       "frozen and its own reference"))

    # objective
    loss: str = field(default="popalign", metadata=_help("objective (popalign/training/objectives.py)", choices=objective_names))
    beta: float = field(default=5000.0, metadata=_help("inverse temperature of the preference losses"))
    popalign_alpha: float = field(default=0.5, metadata=_help("weight of the winners' mean in the pooled PopAlign anchor"))
    popalign_anchor: str = field(default="pooled",
        metadata=_help("PopAlign's anchor: 'pooled' over the global batch (the original), 'per_pair' (each pair's own "
                       "point: Diffusion-DPO's comparison, isolating what pooling adds) or 'none' (z = 0)", choices=ANCHORS))
    lambda_winner: float = field(default=1.0, metadata=_help("PopAlign weight of the winner terms"))
    lambda_loser: float = field(default=1.0, metadata=_help("PopAlign weight of the loser terms"))
    prior_preservation_weight: float = field(default=0.0,
        metadata=_help("weight w of a denoising term on each winner under its own identity-specific prompt (the pairs' "
                       "winner_prompt column), added to the objective: loss + w * mean m(winner | winner_prompt). Keeps "
                       "identity-specific prompts drawing what they name while the neutral caption is tuned; 0 = off (the original)"))
    prior_preservation_target: str = field(default="noise",
        metadata=_help("what the prior-preservation term denoises towards: 'noise', the denoising target (fits the winners "
                       "under their prompts), or 'reference', the frozen reference U-Net's prediction for the same input "
                       "(keeps the base model's identity-specific behaviour)", choices=PRIOR_PRESERVATION_TARGETS))
    min_timestep: int = field(default=0, metadata=_help("smallest training timestep t (t ~ U{min..max})"))
    max_timestep: int = field(default=-1, metadata=_help("largest training timestep t; -1 = the scheduler's last (T-1)"))
    timestep_sharing: str = field(default="pair",
        metadata=_help("'pair': each pair draws its own t (the original); 'batch': one t per micro-step, shared by every "
                       "pair of the global batch, so the pooled PopAlign anchor compares errors at one noise level",
                       choices=TIMESTEP_SHARING))

    # optimisation
    learning_rate: float = field(default=5e-7, metadata=_help("peak learning rate"))
    lr_scheduler: str = field(default="constant",
        metadata=_help("learning-rate shape after the linear warmup", choices=LR_SCHEDULERS))
    lr_warmup_steps: int = field(default=200, metadata=_help("optimizer steps of linear warmup from 0"))
    max_train_steps: int = field(default=750, metadata=_help("optimizer steps of the whole run"))
    train_batch_size: int = field(default=1, metadata=_help("pairs per process per micro-step"))
    gradient_accumulation_steps: int = field(default=1,
        metadata=_help("micro-steps per optimizer step (the PopAlign anchor is pooled per micro-step)"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient-norm clipping; 0 = off"))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1"))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2"))
    adam_weight_decay: float = field(default=1e-2, metadata=_help("AdamW weight decay"))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon"))
    use_8bit_adam: bool = field(default=True,
        metadata=_help("bitsandbytes 8-bit AdamW, as in the original (needs CUDA and bitsandbytes; without them the run is refused: pass --use_8bit_adam off)"))
    use_ema: bool = field(default=False,
        metadata=_help("keep an exponential moving average of the U-Net's weights (diffusers' EMAModel, full fine-tuning only); the final "
                       "<output_dir>/unet then holds the EMA weights, what evaluation reads, and <output_dir>/unet_raw the last raw ones"))
    ema_decay: float = field(default=0.9999, metadata=_help("EMA decay (EMAModel's warm-up (1 + n) / (10 + n) applies below it); 0 = the raw weights"))
    mixed_precision: str = field(default="bf16",
        metadata=_help("autocast precision; the frozen reference U-Net is stored in it", choices=MIXED_PRECISIONS))
    gradient_checkpointing: bool = field(default=True,
        metadata=_help("recompute U-Net activations in the backward pass (less memory, ~30%% slower)"))
    seed: int = field(default=0, metadata=_help("seed of data order, noise, timesteps, caption dropout and LoRA init (0 <= seed < 2**32)", type=parse_seed))
    fsdp: bool = field(default=False,
        metadata=_help("shard the trained U-Net's weights, gradients and AdamW state over the launched processes with torch FSDP2 "
                       "(popalign/training/sharding.py; the frozen reference stays whole in --mixed_precision on every process): full "
                       "fine-tuning with 2 or more processes, without --use_ema or validation. Same numerics as plain data-parallel"))
    torch_threads: int = field(default=1,
        metadata=_help("CPU threads per process (1 keeps several processes from oversubscribing the cores)"))

    # checkpointing
    checkpointing_steps: int = field(default=250,
        metadata=_help("save a resumable checkpoint every this many optimizer steps; 0 = never"))
    checkpoints_total_limit: int = field(default=0,
        metadata=_help("keep at most this many checkpoints (oldest deleted); 0 = keep all"))
    resume_from_checkpoint: str = field(default="latest",
        metadata=_help("'latest' (start fresh if there is none), a checkpoint folder, or '' to ignore checkpoints and start over"))
    allow_setting_change: bool = field(default=False,
        metadata=_help("resume a checkpoint whose training settings differ from these (refused otherwise); the changes are recorded in settings_changes.jsonl"))
    validate_only: bool = field(default=False,
        metadata=_help("check the flags, the pairs file, the model location and the checkpoint to resume, then exit (0: the run can start; "
                       "2: one line saying what is wrong); 4_train.sh runs it before launching"))
    stop_after_steps: int = field(default=0,
        metadata=_help("end this process after this many optimizer steps of this run (for time-limited jobs); 0 = run to max_train_steps"))

    # sharing
    push_to_hub: bool = field(default=False,
        metadata=_help("upload the finished run (weights, model card, config; not checkpoints or logs) to the Hugging Face Hub"))
    hub_model_id: str = field(default="", metadata=_help("Hub repository for --push_to_hub; default: the output folder's name"))

    # validation during training (popalign/training/validation.py): population metrics of the current weights
    validation_prompts_file: str = field(default="",
        metadata=_help("step-1 prompts file (neutral and identity-specific prompts, occupations kept out of training) drawn at step 0 "
                       "and every --validation_steps steps; its metrics go to validation.jsonl and the tracker; empty = no validation"))
    validation_steps: int = field(default=250,
        metadata=_help("validate every this many optimizer steps (and at step 0 and the last step); a multiple of --checkpointing_steps "
                       "lets each validation's weights be kept as the best"))
    num_validation_images: int = field(default=16, metadata=_help("images drawn per neutral validation prompt"))
    num_validation_identity_images: int = field(default=4, metadata=_help("images drawn per identity-specific validation prompt"))
    validation_seed: int = field(default=0, metadata=_help("base seed of the validation images (the same images at every validation)", type=parse_seed))
    validation_classifier: str = field(default="deepface", metadata=_help("classifier of the validation images (as step 2: deepface, clip, toy)"))
    validation_attributes: str = field(default=str(DEFAULT_ATTRIBUTES_PATH), metadata=_help("attribute definition JSON of the validation prompts"))
    validation_scorer: str = field(default="clip", metadata=_help("quality scorer of the validation images (as eval.sh's; empty = none)"))
    validation_num_inference_steps: int = field(default=25, metadata=_help("sampler steps of a validation image"))
    validation_guidance_scale: float = field(default=5.0, metadata=_help("classifier-free guidance of a validation image"))
    validation_resolution: int = field(default=0, metadata=_help("validation image size; 0 = --resolution"))
    validation_batch_size: int = field(default=4, metadata=_help("validation images per pipeline call, per process"))
    best_checkpoint_accuracy_margin: float = field(default=0.02,
        metadata=_help("the best checkpoint (finished.json) has the lowest mean validation discrepancy among the validations at saved "
                       "steps whose identity accuracy is at least step 0's minus this"))
    best_checkpoint_quality_margin: float = field(default=0.05,
        metadata=_help("... and whose validation quality is at least step 0's minus this share of its size (|step 0's|)"))

    # logging
    report_to: str = field(default="tensorboard", metadata=_help("experiment tracker", choices=TRACKERS))
    tracker_project: str = field(default="popalign", metadata=_help("tracker project / run name"))

    def validate(self) -> None:
        """Raise InputError naming the flag for any value the trainer cannot run with."""
        if not self.pairs_file:
            raise InputError("--pairs_file is required")
        if not self.output_dir:
            raise InputError("--output_dir is required")
        for name in ("resolution", "max_train_steps", "train_batch_size", "gradient_accumulation_steps", "vae_encode_batch_size", "torch_threads",
                     "validation_steps", "num_validation_images", "validation_num_inference_steps", "validation_batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("num_validation_identity_images", "validation_resolution", "lora_rank", "lora_alpha", "lr_warmup_steps", "checkpointing_steps", "checkpoints_total_limit", "stop_after_steps"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name} must be >= 0 (got {getattr(self, name)})")
        if self.min_timestep < 0 or self.max_timestep < -1 or (self.max_timestep >= 0 and self.min_timestep > self.max_timestep):
            raise InputError(f"--min_timestep {self.min_timestep} / --max_timestep {self.max_timestep}: need 0 <= min <= max (max -1 = the last)")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise InputError(f"--caption_dropout must be in [0, 1] (got {self.caption_dropout})")
        if self.prior_preservation_weight < 0:
            raise InputError(f"--prior_preservation_weight must be >= 0 (got {self.prior_preservation_weight})")
        if not 0.0 <= self.popalign_alpha <= 1.0:
            raise InputError(f"--popalign_alpha must be in [0, 1] (got {self.popalign_alpha})")
        if self.resolution % 8:
            raise InputError(f"--resolution must be a multiple of 8 (got {self.resolution})")
        if self.validation_resolution % 8:
            raise InputError(f"--validation_resolution must be a multiple of 8 (got {self.validation_resolution})")
        for name in ("best_checkpoint_accuracy_margin", "best_checkpoint_quality_margin"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("seed", "validation_seed"):  # the command line's parse_seed; a config built in code is checked here
            if not 0 <= getattr(self, name) < 2**32:
                raise InputError(f"--{name} must be in [0, 2**32) (got {getattr(self, name)})")
        if self.validation_guidance_scale < 0:
            raise InputError(f"--validation_guidance_scale must be >= 0 (got {self.validation_guidance_scale})")
        objective_named(self.loss)  # an unknown --loss is an error naming the known ones
        choices = {"popalign_anchor": ANCHORS, "prior_preservation_target": PRIOR_PRESERVATION_TARGETS, "timestep_sharing": TIMESTEP_SHARING, "lr_scheduler": LR_SCHEDULERS, "mixed_precision": MIXED_PRECISIONS, "report_to": TRACKERS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"--{name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")
        for name in ("beta", "learning_rate", "lambda_winner", "lambda_loser", "max_grad_norm", "adam_beta1", "adam_beta2",
                     "adam_weight_decay", "adam_epsilon", "max_memory_cache_gb", "prior_preservation_weight", "caption_dropout",
                     "validation_guidance_scale", "best_checkpoint_accuracy_margin", "best_checkpoint_quality_margin"):
            if not math.isfinite(getattr(self, name)):
                raise InputError(f"--{name} must be a finite number (got {getattr(self, name)})")
        if self.learning_rate <= 0:
            raise InputError(f"--learning_rate must be > 0 (got {self.learning_rate})")
        for name in ("lambda_winner", "lambda_loser", "max_grad_norm", "adam_weight_decay", "max_memory_cache_gb"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise InputError(f"--{name} must be in [0, 1) (got {getattr(self, name)})")
        if self.adam_epsilon <= 0:
            raise InputError(f"--adam_epsilon must be > 0 (got {self.adam_epsilon})")
        if not (math.isfinite(self.ema_decay) and 0.0 <= self.ema_decay <= 1.0):
            raise InputError(f"--ema_decay must be in [0, 1] (got {self.ema_decay})")
        if self.train_text_encoder and self.lora_rank <= 0:
            raise InputError("--train_text_encoder trains LoRA adapters of rank --rank on the text encoder(s): pass --rank R > 0 "
                             "(with --no_train_unet for the text encoder alone)")
        if not self.train_unet and not self.train_text_encoder:
            raise InputError("--no_train_unet leaves nothing to train: add --train_text_encoder")
        if not (math.isfinite(self.text_encoder_lr) and self.text_encoder_lr > 0):
            raise InputError(f"--text_encoder_lr must be a finite number > 0 (got {self.text_encoder_lr})")
        if self.use_ema and self.lora_rank > 0:
            raise InputError("--use_ema averages the full U-Net's weights: it does not combine with --rank (LoRA)")
        if self.fsdp:
            for flag, on in (("--rank", self.lora_rank > 0), ("--train_text_encoder", self.train_text_encoder), ("--use_ema", self.use_ema),
                             ("--validation_prompts_file", bool(self.validation_prompts_file)), ("--mixed_precision fp16", self.mixed_precision == "fp16")):
                if on:
                    raise InputError(f"--fsdp shards the full U-Net's training: it does not combine with {flag} "
                                     "(use plain data-parallel for it: no --fsdp)")
            if self.use_8bit_adam:
                raise InputError("--fsdp steps torch's AdamW on each process's shard (sharding already divides its state): pass --use_8bit_adam off")
        if self.push_to_hub and os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
            raise InputError("--push_to_hub needs the network, but HF_HUB_OFFLINE is set")
        if self.objective.check is not None:
            self.objective.check(self)

    @property
    def objective(self):
        """The objectives table's entry for --loss (popalign.training.objectives)."""
        return objective_named(self.loss)

    @property
    def unet_lora(self) -> bool:
        """The U-Net trains through LoRA adapters (--rank R with the U-Net trained)."""
        return self.lora_rank > 0 and self.train_unet

    @property
    def needs_losers(self) -> bool:
        """Only the pairwise objectives read the loser images of the pairs file."""
        return self.objective.reads_losers

    @property
    def needs_winner_prompts(self) -> bool:
        """The prior-preservation term reads each winner's identity-specific prompt."""
        return self.prior_preservation_weight > 0

    @property
    def preserves_towards_reference(self) -> bool:
        """The prior-preservation term is on and pulls towards the reference U-Net's predictions."""
        return self.needs_winner_prompts and self.prior_preservation_target == "reference"

    @property
    def needs_reference(self) -> bool:
        """The preference objectives compare with the reference; prior preservation towards it reads it too."""
        return self.objective.uses_reference or self.preserves_towards_reference

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        return Path(self.pairs_file).resolve().parent / "encoding_cache"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def parse_bool(text: str) -> bool:
    """Command-line booleans: `--flag`, `--flag on`, `--flag false`."""
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, true/false or 1/0, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field, with the field's default, type and help text."""
    parser = ArgumentParser(description="Fine-tune a diffusion U-Net on preference pairs (PopAlign, Diffusion-DPO, SFT, SUDO).")
    defaults = TrainConfig()
    for item in dataclasses.fields(TrainConfig):
        default = getattr(defaults, item.name)
        kwargs = {"default": default, "help": item.metadata["help"]}
        if "choices" in item.metadata:  # a tuple, or a function giving it when the parser is built (the objectives table)
            choices = item.metadata["choices"]
            kwargs["choices"] = choices() if callable(choices) else choices
        if isinstance(default, bool):
            kwargs.update(type=parse_bool, nargs="?", const=True, metavar="on|off")
        else:
            kwargs["type"] = item.metadata.get("type", type(default))
        if item.name in ("pairs_file", "output_dir"):
            kwargs["required"] = True
        names = [f"--{item.name}"]
        if item.name in DIFFUSERS_FLAG_NAMES:  # the diffusers training examples' name first; ours stays as an alias
            names.insert(0, f"--{DIFFUSERS_FLAG_NAMES[item.name]}")
        if isinstance(default, bool):
            names.append(f"--no_{item.name}")
            parser.add_argument(names.pop(), dest=item.name, action="store_false", default=default, help=f"same as --{item.name} off")
        parser.add_argument(*names, dest=item.name, **kwargs)
    return parser


def config_from_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Parse the command line into a validated TrainConfig (InputError on a bad value)."""
    namespace = build_parser().parse_args(argv)
    config = TrainConfig(**vars(namespace))
    config.validate()
    return config


def config_from_json(path: str | Path) -> TrainConfig:
    """Read a config saved with a run or checkpoint (unknown keys are an error)."""
    values = json.loads(Path(path).read_text(encoding="utf-8"))
    known = {item.name for item in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"{path}: unknown config key(s) {', '.join(unknown)}")
    return TrainConfig(**values)
