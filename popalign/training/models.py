"""Loading the diffusion components, the frozen encoders, and the U-Net's conditioning.

The model family is read from the loaded U-Net's config (SDXL-shaped U-Nets take a pooled text
embedding and six "time ids" through `addition_embed_type == "text_time"`; SD-1.5/2.x-shaped ones
take nothing extra), never from the model's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from popalign.io import InputError

SDXL = "sdxl"
SD = "sd"
PREDICTION_TYPES = ("epsilon", "v_prediction")
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")  # diffusers' names of the text encoders, in the pipeline's order


def model_kind(unet_config) -> str:
    """'sdxl' for U-Nets conditioned on text_time (two encoders, pooled embedding, time ids), 'sd' for plain cross-attention ones."""
    addition = unet_config.get("addition_embed_type") if hasattr(unet_config, "get") else getattr(unet_config, "addition_embed_type", None)
    if addition == "text_time":
        return SDXL
    if addition is None:
        return SD
    raise ValueError(f"unsupported U-Net addition_embed_type {addition!r} (supported: 'text_time' for SDXL, none for SD)")


def _variant(variant: str) -> Optional[str]:
    return variant or None


def _load(what: str, source: str, load):
    """Run a from_pretrained call, turning "not found / not downloadable" into a one-line InputError."""
    try:
        return load()
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot load the {what} from {source!r}: {first_line}") from None


def load_unet(pretrained_model: str, variant: str = "", dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    return _load("U-Net", pretrained_model, lambda: UNet2DConditionModel.from_pretrained(
        pretrained_model, subfolder="unet", variant=_variant(variant), torch_dtype=dtype))


def load_noise_scheduler(pretrained_model: str):
    """The training noise schedule (DDPM forward process) from the pipeline's scheduler config."""
    from diffusers import DDPMScheduler

    scheduler = _load("noise scheduler", pretrained_model, lambda: DDPMScheduler.from_pretrained(pretrained_model, subfolder="scheduler"))
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {prediction_type!r} in the scheduler config (supported: {', '.join(PREDICTION_TYPES)})")
    return scheduler


def denoising_target(prediction_type: str, alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net is trained to output at x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps.

    epsilon:       target = eps
    v_prediction:  target = sqrt(a_t) eps - sqrt(1 - a_t) x0     (Salimans & Ho 2022)

    latents, noise: (B, C, h, w); timesteps: (B,) int; alphas_cumprod: (T,).
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        alpha_bar = alphas_cumprod.to(device=latents.device, dtype=torch.float32)[timesteps].view(-1, *([1] * (latents.dim() - 1)))
        return (alpha_bar.sqrt() * noise.float() - (1.0 - alpha_bar).sqrt() * latents.float()).to(noise.dtype)
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (supported: {', '.join(PREDICTION_TYPES)})")


def add_noise(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Forward diffusion x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, shapes as in denoising_target."""
    alpha_bar = alphas_cumprod.to(device=latents.device, dtype=torch.float32)[timesteps].view(-1, *([1] * (latents.dim() - 1)))
    return (alpha_bar.sqrt() * latents.float() + (1.0 - alpha_bar).sqrt() * noise.float()).to(latents.dtype)


def sdxl_time_ids(original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, resolution: int) -> torch.Tensor:
    """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per image.

    original_sizes, crop_top_lefts: (B, 2) integer tensors; returns (B, 6) float32.
    """
    target = torch.tensor([resolution, resolution], dtype=torch.float32).expand(original_sizes.shape[0], 2)
    return torch.cat([original_sizes.float(), crop_top_lefts.float(), target.to(original_sizes.device)], dim=1)


def module_fingerprint(source: str, module: torch.nn.Module) -> str:
    """A short content hash of a model: its source, its config and samples of its first and last weights.

    Used in encoding-cache keys, so a cache entry is never reused for a different encoder.
    """
    digest = hashlib.sha256(source.encode("utf-8"))
    config = getattr(module, "config", None)
    if config is not None:
        config_dict = dict(config) if hasattr(config, "items") else config.to_dict()
        digest.update(json.dumps(config_dict, sort_keys=True, default=str).encode("utf-8"))
    parameters = list(module.parameters())
    for parameter in (parameters[0], parameters[-1]):
        sample = parameter.detach().flatten()[:65536].to("cpu", torch.float32).contiguous()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


@dataclass
class TextEncoderStack:
    """The text side: one (SD) or two (SDXL) tokenizer/encoder pairs; frozen, or with LoRA adapters being trained."""

    kind: str
    tokenizers: list
    encoders: list
    fingerprint: str

    @torch.no_grad()
    def encode(self, captions: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Captions -> {'prompt_embeds': (B, L, D)} (+ 'pooled_prompt_embeds': (B, P) for SDXL), float32 on CPU."""
        return {name: tensor.float().cpu() for name, tensor in self.embed(captions, device).items()}

    def embed(self, captions: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        """encode() on the device, in the encoders' dtype, and with the gradient of trained encoders (--train_text_encoder).

        SD: the last hidden state of the encoder. SDXL: both encoders' penultimate hidden states
        concatenated on the feature axis, and the second encoder's projected pooled output.
        """
        hidden_states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            tokens = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids.to(device)
            output = encoder(tokens, output_hidden_states=True)
            if self.kind == SDXL:
                hidden_states.append(output.hidden_states[-2])
                pooled = output[0]  # the projection model's text_embeds; the last encoder's wins
            elif self.kind == SD:
                hidden_states.append(output[0])
            else:
                raise ValueError(f"unknown model kind {self.kind!r}")
        result = {"prompt_embeds": torch.cat(hidden_states, dim=-1)}
        if self.kind == SDXL:
            result["pooled_prompt_embeds"] = pooled
        return result

    @contextlib.contextmanager
    def adapters_disabled(self):
        """The base encoders for the duration (the reference's text side with --train_text_encoder)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [module for encoder in self.encoders for module in encoder.modules() if isinstance(module, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield self
        finally:
            for layer in layers:
                layer.enable_adapters(True)


def load_text_encoders(pretrained_model: str, kind: str, variant: str, device: torch.device) -> TextEncoderStack:
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    if kind == SDXL:
        parts = [("tokenizer", "text_encoder", CLIPTextModel), ("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection)]
    elif kind == SD:
        parts = [("tokenizer", "text_encoder", CLIPTextModel)]
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    tokenizers, encoders, fingerprints = [], [], []
    for tokenizer_folder, encoder_folder, encoder_class in parts:
        tokenizers.append(_load(tokenizer_folder, pretrained_model, lambda: AutoTokenizer.from_pretrained(pretrained_model, subfolder=tokenizer_folder)))
        encoder = _load(encoder_folder, pretrained_model, lambda: encoder_class.from_pretrained(
            pretrained_model, subfolder=encoder_folder, variant=_variant(variant)))
        encoder.requires_grad_(False).eval().to(device, dtype=torch.float32)
        encoders.append(encoder)
        fingerprints.append(module_fingerprint(f"{pretrained_model}/{encoder_folder}|max_length={tokenizers[-1].model_max_length}", encoder))
    return TextEncoderStack(kind=kind, tokenizers=tokenizers, encoders=encoders, fingerprint="+".join(fingerprints))


SDXL_FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"  # SDXL's VAE fine-tuned not to overflow in fp16 (the original's)
AUTO_VAE = "auto"


def _model_config(what: str, source: str, model_class: str, subfolder: str | None = None) -> dict:
    """A model's config.json, read alone (no weights): from a local folder, checked to hold `model_class`, or from the
    hub's cache. InputError naming the source when it cannot be read."""
    import diffusers

    local = Path(source) / subfolder if subfolder else Path(source)
    if local.is_dir():
        from popalign.pipelines import read_model_config

        return read_model_config(what, local, model_class)
    return dict(_load(what, source, lambda: getattr(diffusers, model_class).load_config(source, subfolder=subfolder)))


def resolve_vae(pretrained_model: str, vae: str) -> str:
    """--pretrained_vae_model_name_or_path as the run uses it: 'auto' is the fp16-fixed SDXL VAE for an SDXL base and
    the base model's own VAE ('') for any other; any other value stays as given."""
    if vae != AUTO_VAE:
        return vae
    unet_config = _model_config("--pretrained_model_name_or_path", pretrained_model, "UNet2DConditionModel", "unet")
    return SDXL_FP16_FIX_VAE if model_kind(unet_config) == SDXL else ""


def check_vae_fits_unet(pretrained_model: str, vae: str) -> None:
    """The encoding VAE makes the latents the U-Net is trained on: its latent channels must be the U-Net's input
    channels, and a VAE other than the base model's own must scale its latents as the base model's does (SDXL's 0.13025
    is not SD 1.5's 0.18215). InputError naming --pretrained_vae_model_name_or_path otherwise."""
    flag = "--pretrained_vae_model_name_or_path"
    unet_config = _model_config("--pretrained_model_name_or_path", pretrained_model, "UNet2DConditionModel", "unet")
    own_vae_path = Path(pretrained_model) / "vae" / "config.json"
    if vae:
        vae_config = _model_config(flag, vae, "AutoencoderKL")
        own = None
        if own_vae_path.is_file() or not Path(pretrained_model).exists():
            try:
                own = _model_config("--pretrained_model_name_or_path", pretrained_model, "AutoencoderKL", "vae")
            except InputError:  # a hub pipeline cached without its VAE: nothing to compare with
                own = None
    else:
        vae_config, own = _model_config("--pretrained_model_name_or_path", pretrained_model, "AutoencoderKL", "vae"), None
    channels, expected = vae_config.get("latent_channels", 4), unet_config.get("in_channels", 4)
    source = vae or f"{pretrained_model}/vae"
    if channels != expected:
        raise InputError(f"{flag} {source}: a VAE of {channels} latent channels, but the U-Net of {pretrained_model} takes {expected}")
    if own is not None and own.get("scaling_factor") != vae_config.get("scaling_factor"):
        raise InputError(f"{flag} {source}: scales its latents by {vae_config.get('scaling_factor')}, but the base model's own VAE "
                         f"by {own.get('scaling_factor')}: the U-Net of {pretrained_model} was trained on the latter (use the "
                         "base model's VAE, '' or auto)")


def load_vae(pretrained_model: str, vae: str, variant: str, device: torch.device):
    """The image encoder: `vae` (a folder or hub id) when given, else the pipeline's own; fp32, frozen."""
    from diffusers import AutoencoderKL

    if vae:
        model = _load("VAE", vae, lambda: AutoencoderKL.from_pretrained(vae, torch_dtype=torch.float32))
    else:
        model = _load("VAE", pretrained_model, lambda: AutoencoderKL.from_pretrained(
            pretrained_model, subfolder="vae", variant=_variant(variant), torch_dtype=torch.float32))
    # Encoding runs once per image, so full precision costs little and avoids the SDXL VAE's fp16 overflow.
    return model.requires_grad_(False).eval().to(device)


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f), float32 on CPU.

    The posterior mean is cached rather than a sample: the VAE posterior's standard deviation is
    tiny next to the diffusion noise, and a fixed latent keeps the cache deterministic.
    """
    latents = vae.encode(pixels.to(vae.device, dtype=vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return (latents * vae.config.scaling_factor).float().cpu()


def add_text_encoder_lora_adapters(text: TextEncoderStack, rank: int, alpha: int, seed: int) -> None:
    """A LoRA adapter of the given rank on the attention projections of every text encoder (both for SDXL), as
    diffusers' DreamBooth LoRA examples do; zero-initialised up-projections, so the encoders start as the base ones."""
    from peft import LoraConfig, inject_adapter_in_model

    for index, encoder in enumerate(text.encoders):
        encoder.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=TEXT_ENCODER_LORA_TARGET_MODULES)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1 + index)
            inject_adapter_in_model(config, encoder)  # peft's own call: transformers' add_adapter asks for a newer peft
        for parameter in encoder.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()


def add_lora_adapter(unet, rank: int, alpha: int, seed: int) -> None:
    """Attach a LoRA adapter of the given rank to the attention projections (peft).

    The up-projections start at zero, so the adapted U-Net equals the base one (the reference)
    at step 0; the down-projections are drawn from a generator seeded by `seed` so every process
    starts from the same adapter.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)
