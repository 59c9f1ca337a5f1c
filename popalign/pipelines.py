"""Loading text-to-image pipelines: model id or local path, precision, scheduler, tuned U-Net or LoRA.

The same code loads `stabilityai/stable-diffusion-xl-base-1.0` from the hub and a tiny test
pipeline from a folder; the pipeline class comes from the checkpoint's own model_index.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from popalign.io import InputError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCHEDULER_NAMES = ("ddim", "ddpm", "dpmsolver++", "euler", "euler_ancestral", "pndm", "unipc")


def scheduler_classes() -> dict[str, type]:
    """Scheduler names accepted by --scheduler ('default' keeps the checkpoint's own scheduler)."""
    import diffusers

    classes = (diffusers.DDIMScheduler, diffusers.DDPMScheduler, diffusers.DPMSolverMultistepScheduler, diffusers.EulerDiscreteScheduler,
               diffusers.EulerAncestralDiscreteScheduler, diffusers.PNDMScheduler, diffusers.UniPCMultistepScheduler)
    return dict(zip(SCHEDULER_NAMES, classes))


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on CUDA (as the original ran SDXL) and fp32 elsewhere (half precision is slow or
    unsupported on CPU)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


@dataclass(frozen=True)
class SpeedOptions:
    """How a pipeline runs, not what it draws (so not part of generation_config.json). Each off by default
    except SDPA attention, diffusers' own default in torch 2.

    channels_last: U-Net and VAE in channels-last memory format (faster convolutions on tensor cores);
    vae_slicing: decode a batch one image at a time (less memory at large batches);
    vae_tiling: decode in overlapping tiles (less memory at high resolution; seams are blended);
    compile_unet: torch.compile the U-Net (minutes to compile, then faster steps; same numbers up to float rounding).
    """

    channels_last: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    compile_unet: bool = False


def apply_speed_options(pipeline, options: SpeedOptions):
    if options.channels_last:
        pipeline.unet.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)
    if options.vae_slicing:
        pipeline.vae.enable_slicing()
    if options.vae_tiling:
        pipeline.vae.enable_tiling()
    if options.compile_unet:
        pipeline.unet = torch.compile(pipeline.unet)
    return pipeline


def load_text_to_image_pipeline(model: str, dtype: torch.dtype, device: torch.device, scheduler: str = "default",
                                unet_path: str | None = None, lora_path: str | None = None, speed: SpeedOptions = SpeedOptions(),
                                vae_path: str | None = None):
    """Load a diffusers text-to-image pipeline, optionally with a fine-tuned U-Net folder or LoRA weights, and another
    VAE (a folder or hub id of an AutoencoderKL) in place of the pipeline's own.

    LoRA weights are fused into the layers they adapt and the LoRA layers then removed (fuse_lora, then
    unload_lora_weights, which keeps the fused weights): the pipeline draws with plain layers, without the extra
    low-rank products at every step, and the same images up to float rounding."""
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

    components = {}
    if unet_path:
        components["unet"] = UNet2DConditionModel.from_pretrained(unet_path, dtype=dtype)
    if vae_path:
        components["vae"] = AutoencoderKL.from_pretrained(vae_path, dtype=dtype)
    pipeline = DiffusionPipeline.from_pretrained(model, dtype=dtype, **components)
    if scheduler != "default":
        classes = scheduler_classes()
        if scheduler not in classes:
            raise ValueError(f"--scheduler {scheduler!r}: expected default, {', '.join(classes)}")
        pipeline.scheduler = classes[scheduler].from_config(pipeline.scheduler.config)
    if lora_path:
        pipeline.load_lora_weights(lora_path)
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()
    pipeline.set_progress_bar_config(disable=True)
    return apply_speed_options(pipeline.to(device), speed)


def read_model_config(flag: str, folder: str | Path, expected_class: str) -> dict:
    """The config.json of a local model folder that must hold a diffusers `expected_class`; InputError naming the flag
    and path otherwise (a VAE folder given as a U-Net fails here, in one line, instead of deep inside the loader)."""
    import json

    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise InputError(f"{flag} {folder}: no config.json (expected a diffusers {expected_class} folder)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{flag} {config_path}: not a readable JSON file ({error})") from None
    found = (config.get("_class_name") or (config.get("architectures") or [None])[0]) if isinstance(config, dict) else None
    if found != expected_class:
        raise InputError(f"{flag} {folder}: holds a model of class {found or '(none named)'}, not of class {expected_class}")
    return config


def check_weight_shapes(flag: str, folder: str | Path, model_class, config: dict) -> None:
    """Every tensor of the folder's safetensors weights exists in a `model_class` built from its config, with that
    model's shape, and none is missing: a wrongly shaped tensor is one line naming it instead of a loader's traceback.
    Folders holding only other formats (.bin) are left to the loader. The model is built on the meta device (no memory)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return
    with torch.device("meta"):
        expected = {name: tuple(tensor.shape) for name, tensor in model_class.from_config(config).state_dict().items()}
    found = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as weights:
                for name in weights.keys():
                    found[name] = (tuple(weights.get_slice(name).get_shape()), file)
        except Exception as error:  # safetensors raises its own error types for a damaged header
            raise InputError(f"{flag} {file}: not a readable safetensors file ({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    for name, (shape, file) in found.items():
        if name not in expected:
            raise InputError(f"{flag} {file}: tensor {name!r} is not a weight of the {model_class.__name__} its config.json describes")
        if shape != expected[name]:
            raise InputError(f"{flag} {file}: tensor {name!r} has shape {list(shape)}, but its config.json gives {list(expected[name])}")
    missing = sorted(set(expected) - set(found))
    if len(files) == 1 and missing:  # a variant beside the default weights would hold the same names: only one file is checked whole
        raise InputError(f"{flag} {files[0]}: {len(missing)} weight(s) missing, e.g. {missing[0]!r}")


def check_unet_folder(flag: str, folder: str | Path, base_model: str = "") -> None:
    """A fine-tuned U-Net folder (`--unet`): a UNet2DConditionModel with weights of its config's shapes, and of the
    base pipeline's architecture where that is a local folder (same input channels, text width and conditioning)."""
    from diffusers import UNet2DConditionModel

    config = read_model_config(flag, folder, "UNet2DConditionModel")
    check_weight_shapes(flag, folder, UNet2DConditionModel, config)
    base_config_path = Path(base_model) / "unet" / "config.json" if base_model else None
    if base_config_path is not None and base_config_path.is_file():
        import json

        base = json.loads(base_config_path.read_text(encoding="utf-8"))
        for key in ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type", "block_out_channels"):
            if config.get(key) != base.get(key):
                raise InputError(f"{flag} {folder}: a U-Net with {key} {config.get(key)!r}, but the one of --pretrained_model_name_or_path "
                                 f"{base_model} has {base.get(key)!r}: it was not trained from this model")


def check_vae_folder(flag: str, folder: str | Path, base_model: str = "") -> None:
    """A VAE folder (`--pretrained_vae_model_name_or_path`): an AutoencoderKL with weights of its config's shapes and,
    where the base pipeline is a local folder, latents its U-Net takes (as many channels, scaled by the same factor as
    its own VAE's: the U-Net draws latents in its own VAE's scale)."""
    import json

    from diffusers import AutoencoderKL

    config = read_model_config(flag, folder, "AutoencoderKL")
    check_weight_shapes(flag, folder, AutoencoderKL, config)
    base = Path(base_model) if base_model else None
    if base is not None and (base / "unet" / "config.json").is_file():
        unet = json.loads((base / "unet" / "config.json").read_text(encoding="utf-8"))
        if config.get("latent_channels", 4) != unet.get("in_channels", 4):
            raise InputError(f"{flag} {folder}: a VAE of {config.get('latent_channels', 4)} latent channels, but the U-Net of "
                             f"--pretrained_model_name_or_path {base_model} draws {unet.get('in_channels', 4)}")
    if base is not None and (base / "vae" / "config.json").is_file():
        own = json.loads((base / "vae" / "config.json").read_text(encoding="utf-8"))
        if own.get("scaling_factor") != config.get("scaling_factor"):
            raise InputError(f"{flag} {folder}: scales its latents by {config.get('scaling_factor')}, but the own VAE of "
                             f"--pretrained_model_name_or_path {base_model} by {own.get('scaling_factor')}")
