"""What BENCHMARKS.md would carry from one GPU: generation speed with and without each speed option, and a training
step's time and peak memory, on random-weight models of the real SDXL architecture built from their configurations
(popalign.architectures; nothing is downloaded, no hub access is needed).

    bash benchmarks/gpu_check.sh [OUTPUT_FOLDER]            # one GPU, under 10 minutes
    GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh FOLDER   # CPU, tiny models, seconds: checks the script itself

Generation: StableDiffusionXLPipeline at 1024x1024 in fp16 (SDXL's VAE upcast to fp32 for decoding, as step 2's
PRECISION=auto does), GPU_CHECK_STEPS sampler steps with guidance (fewer than the recipe's 50 to fit the time; the
images per second of a 50-step run are about steps/50 of these, the decode aside), batch 1, 4 and 8; every speed option
of popalign.generate alone (popalign.pipelines.apply_speed_options), each timed after one warm-up call.
Training: the PopAlign step's floor on one GPU, 1 pair (winner and loser) at 128x128 latents: the fp32 policy U-Net
under bf16 autocast with gradient checkpointing (4_train.sh's defaults), the frozen reference in bf16, torch AdamW
(8-bit Adam, the recipe's optimizer, needs bitsandbytes and holds 5 GB of states instead of 20).

Writes gpu_check.md (the table) and gpu_check.json to the output folder and prints the table. The smoke mode runs
the same code with tiny configurations on the CPU (torch.compile is left out there); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

OPTIONS = ("channels_last", "vae_slicing", "vae_tiling", "compile_unet")
COMPILE_SECONDS = 180  # time kept for one torch.compile measurement (compiling and timing); a guess for an H100


def build_pipeline(smoke: bool, device, dtype, work: Path):
    """A random-weight StableDiffusionXLPipeline: the published SDXL configurations, or the test suite's tiny ones."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from popalign.architectures import CLIP_TEXT_BIGG, CLIP_TEXT_L, MODELS, VAE
    from popalign.tiny_models import build_tiny_clip_tokenizer, build_tiny_sdxl_pipeline

    if smoke:
        pipeline = StableDiffusionXLPipeline.from_pretrained(build_tiny_sdxl_pipeline(work / "tiny_sdxl"), torch_dtype=dtype)
        return pipeline.to(device)
    tokenizer = build_tiny_clip_tokenizer(work / "tokenizer", num_merges=1000)  # the ids are CLIP's first ones
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the GPU: seconds instead of minutes on the CPU
        unet = UNet2DConditionModel(**MODELS["sdxl"]["unet"])
        vae = AutoencoderKL(**VAE, sample_size=MODELS["sdxl"]["resolution"], scaling_factor=0.13025, force_upcast=True)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT_L, projection_dim=768))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TEXT_BIGG, projection_dim=1280))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading", prediction_type="epsilon")
    pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    return pipeline.to(device, dtype)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # the process's, in KiB on Linux


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def time_generation(pipeline, device, batch: int, steps: int, resolution: int, repeats: int) -> float:
    """Images per second of `repeats` pipeline calls of `batch` images, after one warm-up call."""
    import torch

    def call() -> None:
        generators = [torch.Generator(device="cpu").manual_seed(index) for index in range(batch)]
        pipeline(prompt=["a photo of a doctor"] * batch, num_inference_steps=steps, guidance_scale=5.0, width=resolution,
                 height=resolution, generator=generators, output_type="np")

    call()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    synchronize(device)
    return repeats * batch / (time.perf_counter() - start)


def with_option(pipeline, option: str | None):
    """The pipeline with one speed option on (popalign.pipelines' own code), and how to undo it."""
    import torch

    from popalign.pipelines import SpeedOptions, apply_speed_options

    unet = pipeline.unet
    if option is not None:
        apply_speed_options(pipeline, SpeedOptions(**{option: True}))

    def undo() -> None:
        pipeline.unet = unet
        pipeline.unet.to(memory_format=torch.contiguous_format)
        pipeline.vae.to(memory_format=torch.contiguous_format)
        pipeline.vae.disable_slicing()
        pipeline.vae.disable_tiling()

    return undo


def training_step(unet_config: dict, latent: int, text_tokens: int, text_dim: int, pooled_dim: int, device, steps: int) -> dict:
    """Seconds per PopAlign step (1 pair) and peak memory: fp32 policy with gradient checkpointing under bf16 autocast,
    bf16 reference, AdamW; the loss is popalign.losses.popalign_loss on per-sample errors."""
    import torch
    from diffusers import UNet2DConditionModel

    from popalign.losses import per_sample_denoising_error, popalign_loss

    torch.manual_seed(0)
    with torch.device(device):
        policy = UNet2DConditionModel(**unet_config)
        reference = UNet2DConditionModel(**unet_config).to(torch.bfloat16).requires_grad_(False)
    policy.enable_gradient_checkpointing()
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-8)
    noisy = torch.randn(2, 4, latent, latent, device=device)
    noise = torch.randn_like(noisy)
    timesteps = torch.tensor([500, 500], device=device)
    text = torch.randn(2, text_tokens, text_dim, device=device)
    added = {"text_embeds": torch.randn(2, pooled_dim, device=device), "time_ids": torch.randn(2, 6, device=device)}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step() -> None:
        with autocast:
            policy_prediction = policy(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=added).sample
            with torch.no_grad():
                reference_prediction = reference(noisy.bfloat16(), timesteps, encoder_hidden_states=text.bfloat16(),
                                                 added_cond_kwargs={key: value.bfloat16() for key, value in added.items()}).sample
        model_error = per_sample_denoising_error(policy_prediction.float(), noise)
        reference_error = per_sample_denoising_error(reference_prediction.float(), noise)
        loss, _ = popalign_loss(model_error[:1], model_error[1:], reference_error[:1], reference_error[1:], beta=5000.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: the optimizer's states are allocated here
    synchronize(device)
    reset_peak(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    result = {"seconds_per_step": seconds, "peak_gib": peak_gib(device),
              "trainable_parameters": sum(parameter.numel() for parameter in policy.parameters())}
    return result  # the models and the optimizer's states are freed on return


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny configurations on the CPU (checks the script, measures nothing)")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps per image")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (after one warm-up call)")
    parser.add_argument("--train_steps", type=int, default=3)
    parser.add_argument("--budget_s", type=float, default=480, help="seconds for generation: a measurement that would not end within them is skipped (and listed)")
    args = parser.parse_args(argv)
    import torch

    from popalign.architectures import MODELS

    started = time.perf_counter()
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU (GPU_CHECK_SMOKE=1 runs the tiny CPU check)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.float16
    resolution = 64 if args.smoke else MODELS["sdxl"]["resolution"]
    batches = [int(batch) for batch in args.batches.split(",")]
    options = [None, *(option for option in OPTIONS if not (args.smoke and option == "compile_unet"))]
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    rows, skipped, plain_seconds = [], [], {}
    with tempfile.TemporaryDirectory() as scratch:
        pipeline = build_pipeline(args.smoke, device, dtype, Path(scratch))
        pipeline.set_progress_bar_config(disable=True)
        for option in options:
            undo = with_option(pipeline, option)
            for batch in batches:
                name = option or "none"
                # torch.compile compiles again for every batch size: a few minutes, so it must fit in what is left
                expected = COMPILE_SECONDS if option == "compile_unet" else 1.5 * plain_seconds.get(batch, 0.0)
                if time.perf_counter() - started + expected > args.budget_s:
                    skipped.append(f"{name} at batch {batch}")
                    continue
                reset_peak(device)
                begun = time.perf_counter()
                images_per_second = time_generation(pipeline, device, batch, args.steps, resolution, args.repeats)
                rows.append({"option": name, "batch": batch, "images_per_second": images_per_second, "peak_gib": peak_gib(device),
                             "seconds_with_warm_up": time.perf_counter() - begun})
                if option is None:
                    plain_seconds[batch] = time.perf_counter() - begun
                print(f"generation {name} batch {batch}: {images_per_second:.3f} images/s", file=sys.stderr, flush=True)
            undo()
        del pipeline, undo  # the closure holds the U-Net: the training step needs the memory
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.smoke:
        from popalign.tiny_models import TINY_TEXT_HIDDEN

        unet_config = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                           attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                           addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + TINY_TEXT_HIDDEN,
                           cross_attention_dim=2 * TINY_TEXT_HIDDEN, norm_num_groups=32)
        training = training_step(unet_config, 8, 77, 2 * TINY_TEXT_HIDDEN, TINY_TEXT_HIDDEN, device, args.train_steps)
    else:
        spec = MODELS["sdxl"]
        training = training_step(spec["unet"], spec["resolution"] // 8, spec["text_tokens"], spec["text_dim"], spec["pooled_dim"],
                                 device, args.train_steps)

    base = {row["batch"]: row["images_per_second"] for row in rows if row["option"] == "none"}
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()}, smoke mode: tiny models)"
    lines = [f"Device: {device_name}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; command: `bash benchmarks/gpu_check.sh`"
             f"{' (GPU_CHECK_SMOKE=1)' if args.smoke else ''}; {time.perf_counter() - started:.0f} s in all.", "",
             f"Generation at {resolution}x{resolution}, {args.steps} steps with guidance, {'fp32' if args.smoke else 'fp16'}; images per "
             f"second over {args.repeats} calls after a warm-up; the ratio against no option at the same batch, in this run.", "",
             "| speed option | batch | images/s | vs no option | peak GiB |", "|---|---|---|---|---|"]
    for row in rows:
        ratio = row["images_per_second"] / base[row["batch"]] if row["batch"] in base else float("nan")
        lines.append(f"| {row['option']} | {row['batch']} | {row['images_per_second']:.3f} | {ratio:.2f}x | {row['peak_gib']:.1f} |")
    if skipped:
        lines += ["", f"Skipped (past the {args.budget_s:.0f} s budget): {', '.join(skipped)}."]
    lines += ["", f"Training (PopAlign, 1 pair at {resolution}x{resolution}, fp32 policy with gradient checkpointing under bf16 "
                  f"autocast, bf16 reference, AdamW; {args.train_steps} steps after a warm-up): "
                  f"{training['seconds_per_step']:.3f} s per step, peak {training['peak_gib']:.1f} GiB, "
                  f"{training['trainable_parameters'] / 1e9:.3f} B trainable parameters."]
    table = "\n".join(lines) + "\n"
    (output / "gpu_check.md").write_text(table, encoding="utf-8")
    (output / "gpu_check.json").write_text(json.dumps({"device": device_name, "smoke": args.smoke, "steps": args.steps,
                                                       "resolution": resolution, "generation": rows, "skipped": skipped,
                                                       "training": training}, indent=2) + "\n", encoding="utf-8")
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
