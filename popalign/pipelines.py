"""Loading text-to-image pipelines: model id or local path, precision, scheduler, tuned U-Net or LoRA.

The same code loads `stabilityai/stable-diffusion-xl-base-1.0` from the hub and a tiny test
pipeline from a folder; the pipeline class comes from the checkpoint's own model_index.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
                                unet_path: str | None = None, lora_path: str | None = None, speed: SpeedOptions = SpeedOptions()):
    """Load a diffusers text-to-image pipeline, optionally with a fine-tuned U-Net folder or LoRA weights."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    components = {}
    if unet_path:
        components["unet"] = UNet2DConditionModel.from_pretrained(unet_path, dtype=dtype)
    pipeline = DiffusionPipeline.from_pretrained(model, dtype=dtype, **components)
    if scheduler != "default":
        classes = scheduler_classes()
        if scheduler not in classes:
            raise ValueError(f"--scheduler {scheduler!r}: expected default, {', '.join(classes)}")
        pipeline.scheduler = classes[scheduler].from_config(pipeline.scheduler.config)
    if lora_path:
        pipeline.load_lora_weights(lora_path)
    pipeline.set_progress_bar_config(disable=True)
    return apply_speed_options(pipeline.to(device), speed)
