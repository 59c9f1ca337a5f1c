"""Every stage against its compute floor, on the real SD 1.5 architecture (U-Net, VAE, CLIP ViT-L/14 text encoder)
and a CLIP ViT-L/14 scorer and classifier, all with random weights (popalign.tiny_models), at a reduced resolution.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_floor.py --work_dir outputs/bench_floor

Prints a markdown section for BENCHMARKS.md. Each ratio is taken within this one run:

- generation: step 2 (popalign.generate.generate_images, which plans, checks, writes PNGs, manifest and config)
  against the same pipeline calls on the same prompts, seeds and batches timed bare, the pipeline loaded once in
  this process for both; the host-side milliseconds per image that remain, and a 1024x1024 PNG write timed alone;
- training: the trainer's steps (popalign.training.trainer.run_training) against the floor: a policy forward and
  backward, a reference forward and an optimizer step on the same cached encodings;
- scoring and classification: a folder scored (classified) in batches with the model loaded once against a loop
  that loads the model for every image, as hpsv2's score() does;
- resume: a finished stage run again, against its first run;
- scaling: generation of 1x, 2x, 4x the images (seconds per image), and 2 processes against 1
  (`accelerate launch --multi_gpu --num_processes 2` on the CPU, gloo, one thread each);
- memory: peak resident memory of a training process, LoRA (rank 8) against full fine-tuning;
- png_overlap: step 2 at 1024x1024 (the tiny SDXL-shaped pipeline with a VAE that scales by 8, enough sampler steps that drawing a batch takes
  longer than writing it, as on a GPU) against the same pipeline calls bare, and those images' PNG writes timed in
  line: how much of a 1024x1024 write the background writer leaves visible. Not in the default sections.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("generation", "training", "scoring", "classification", "resume", "scaling", "memory")
OPTIONAL_SECTIONS = ("png_overlap",)


def models(work: Path) -> tuple[Path, Path]:
    """The random-weight SD 1.5 pipeline and CLIP ViT-L/14, built once in `work`."""
    from popalign.tiny_models import build_random_clip_vit_l14, build_random_sd15_pipeline

    sd15, clip = work / "sd15_random", work / "clip_vit_l14_random"
    if not (sd15 / "model_index.json").is_file():
        build_random_sd15_pipeline(sd15)
    if not (clip / "config.json").is_file():
        build_random_clip_vit_l14(clip)
    return sd15, clip


def write_prompts(path: Path, count: int) -> Path:
    import pandas as pd

    from popalign.prompts import prompt_id

    prompts = [f"a photo of a worker number {index}" for index in range(count)]
    pd.DataFrame({"prompt_id": [prompt_id(text) for text in prompts], "kind": "neutral", "prompt": prompts,
                  "neutral_prompt": prompts}).to_csv(path, index=False)
    return path


def timed(function, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


# ----- generation ------------------------------------------------------------------------------------------------------

def bench_generation(sd15: Path, work: Path, args) -> dict:
    import torch
    from PIL import Image

    from popalign.generate import GenerationSettings, generate_images, render_batch
    from popalign.io import atomic_save_image
    from popalign.pipelines import load_text_to_image_pipeline

    settings = GenerationSettings(model=str(sd15), steps=args.steps, width=args.resolution, height=args.resolution, precision="fp32")
    prompts_csv = write_prompts(work / "prompts.csv", args.images // 2)
    load_seconds, pipeline = timed(load_text_to_image_pipeline, str(sd15), torch.float32, torch.device("cpu"))
    plan = generate_images(prompts_csv, work / "plan", settings, 2, 0, args.batch_size, kinds=("neutral",), validate_only=True)
    batches = [plan.iloc[start:start + args.batch_size] for start in range(0, len(plan), args.batch_size)]

    def bare() -> None:
        for batch in batches:
            render_batch(pipeline, list(batch["prompt"]), [int(seed) for seed in batch["seed"]], settings)

    def step_2(name: str) -> None:
        generate_images(prompts_csv, work / name, settings, 2, 0, args.batch_size, kinds=("neutral",), pipeline=pipeline)

    render_batch(pipeline, list(batches[0]["prompt"]), [int(seed) for seed in batches[0]["seed"]], settings)  # warm-up
    bare_seconds, step_seconds = [], []
    for repeat in range(2):  # interleaved, so that drift in the machine's speed hits both
        step_seconds.append(timed(step_2, f"images_{repeat}")[0])
        bare_seconds.append(timed(bare)[0])
    bare_total, step_total = sum(bare_seconds), sum(step_seconds)
    bare_first, bare_second = bare_seconds
    images = 2 * len(plan)
    # A 1024x1024 natural picture (scikit-image's astronaut, scaled) written as the pipeline writes each image.
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((1024, 1024))
    png_seconds = min(timed(atomic_save_image, photo, work / "png_timing" / f"{index}.png")[0] for index in range(5))
    return {"images": images, "batch_size": args.batch_size, "steps": args.steps, "resolution": args.resolution,
            "load_seconds": load_seconds, "bare_seconds": bare_total, "step_2_seconds": step_total,
            "ratio": step_total / bare_total, "host_ms_per_image": 1000 * (step_total - bare_total) / images,
            "bare_first": bare_first, "bare_second": bare_second,
            "seconds_per_image": bare_total / images, "png_1024_ms": 1000 * png_seconds, "pipeline": pipeline,
            "settings": settings, "prompts_csv": prompts_csv}


# ----- the background PNG writer at 1024x1024 ------------------------------------------------------------------------

def bench_png_overlap(work: Path, images: int, batch_size: int, steps: int) -> dict:
    """Step 2 (generate_images, whose writer thread encodes and writes a batch while the next is drawn) against the same
    pipeline calls bare, at 1024x1024, interleaved twice; then the drawn images written in line, one after another."""
    import torch
    from diffusers import AutoencoderKL

    from popalign.generate import GenerationSettings, generate_images, render_batch
    from popalign.io import atomic_save_image
    from popalign.pipelines import load_text_to_image_pipeline
    from popalign.tiny_models import build_tiny_sdxl_pipeline

    model = work / "tiny_sdxl_1024"
    if not (model / "model_index.json").is_file():
        build_tiny_sdxl_pipeline(model)
        # The test suite's tiny VAE scales by 2; one of 4 blocks scales by 8 as SDXL's does, so 1024x1024 images come
        # from 128x128 latents (narrow channels keep the decode short).
        AutoencoderKL(block_out_channels=[32, 32, 64, 64], in_channels=3, out_channels=3, latent_channels=4,
                      down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                      layers_per_block=1, sample_size=1024).save_pretrained(model / "vae")
    settings = GenerationSettings(model=str(model), steps=steps, width=1024, height=1024, precision="fp32")
    prompts_csv = write_prompts(work / "png_prompts.csv", images // 2)
    pipeline = load_text_to_image_pipeline(str(model), torch.float32, torch.device("cpu"))
    plan = generate_images(prompts_csv, work / "png_plan", settings, 2, 0, batch_size, kinds=("neutral",), validate_only=True)
    batches = [plan.iloc[start:start + batch_size] for start in range(0, len(plan), batch_size)]
    drawn: list = []

    def bare() -> None:
        drawn.clear()
        for batch in batches:
            drawn.extend(render_batch(pipeline, list(batch["prompt"]), [int(seed) for seed in batch["seed"]], settings))

    def step_2(name: str) -> None:
        generate_images(prompts_csv, work / name, settings, 2, 0, batch_size, kinds=("neutral",), pipeline=pipeline)

    render_batch(pipeline, list(batches[0]["prompt"]), [int(seed) for seed in batches[0]["seed"]], settings)  # warm-up
    bare_seconds, step_seconds = [], []
    for repeat in range(2):  # interleaved, so that drift in the machine's speed hits both
        step_seconds.append(timed(step_2, f"png_images_{repeat}")[0])
        bare_seconds.append(timed(bare)[0])
    write_seconds = timed(lambda: [atomic_save_image(image, work / "png_inline" / f"{index}.png") for index, image in enumerate(drawn)])[0]
    count = len(drawn)
    bare_total, step_total = sum(bare_seconds), sum(step_seconds)
    return {"images": count, "batch_size": batch_size, "steps": steps, "bare_seconds": bare_total, "step_2_seconds": step_total,
            "ratio": step_total / bare_total, "bare_ms_per_image": 1000 * bare_total / (2 * count),
            "write_ms_per_image": 1000 * write_seconds / count,
            "visible_ms_per_image": 1000 * (step_total - bare_total) / (2 * count),
            "bare_noise_ms_per_image": 1000 * abs(bare_seconds[0] - bare_seconds[1]) / count}


# ----- training --------------------------------------------------------------------------------------------------------

def write_pairs(work: Path, resolution: int, count: int) -> Path:
    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    (work / "pair_images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        for side in ("winner", "loser"):
            Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(work / "pair_images" / f"{side}{index}.png")
        rows.append({"winner_path": f"pair_images/winner{index}.png", "loser_path": f"pair_images/loser{index}.png",
                     "caption": f"a photo of a worker {index}"})
    pd.DataFrame(rows).to_csv(work / "pairs.csv", index=False)
    return work / "pairs.csv"


def training_config(sd15: Path, work: Path, output: str, resolution: int, lora_rank: int, steps: int):
    from popalign.training.config import config_from_args

    return config_from_args(["--pairs_file", str(work / "pairs.csv"), "--output_dir", str(work / output),
                             "--pretrained_model_name_or_path", str(sd15), "--pretrained_vae_model_name_or_path", "",
                             "--resolution", str(resolution), "--max_train_steps", str(steps), "--lr_warmup_steps", "0",
                             "--mixed_precision", "no", "--no_gradient_checkpointing", "--checkpointing_steps", "0",
                             "--report_to", "none", "--train_batch_size", "1", "--caption_dropout", "0", "--no_use_8bit_adam",
                             "--rank", str(lora_rank), "--resume_from_checkpoint", ""])


def training_measurement(sd15: str, work: str, resolution: int, lora_rank: int, steps: int) -> dict:
    """In a process of its own: the trainer's steps and the floor's, and this process's peak memory."""
    import torch

    from popalign.training.encodings import assemble_batch
    from popalign.training.trainer import denoising_prediction, model_inputs, prepare_run, run_training

    sd15, work = Path(sd15), Path(work)
    config = training_config(sd15, work, f"run_rank{lora_rank}", resolution, lora_rank, steps=10_000)
    run = prepare_run(config)
    run.config.stop_after_steps = 1
    run_training(run)  # warm-up step
    run.config.stop_after_steps = steps
    trainer_seconds, _ = timed(run_training, run)

    # The floor: the same encodings, models and optimizer, nothing but the model work.
    batch = assemble_batch(run.pairs, range(0, 1), config.seed, run.timestep_range, 0.0, run.kind, config.resolution, True, None)
    latents, noise, timesteps, condition = model_inputs(batch, config.objective.layout, torch.Generator().manual_seed(0))

    def floor_step() -> None:
        predict = lambda model: denoising_prediction(model, latents, noise, timesteps, condition, run.kind,  # noqa: E731
                                                     run.alphas_cumprod, torch.float32)
        with torch.no_grad():
            reference = predict(run.reference)
        loss = (predict(run.unet) - reference).pow(2).mean()
        loss.backward()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)

    floor_step()  # warm-up
    floor_seconds = timed(lambda: [floor_step() for _ in range(steps)])[0]
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"lora_rank": lora_rank, "steps": steps, "trainer_seconds": trainer_seconds, "floor_seconds": floor_seconds,
            "ratio": trainer_seconds / floor_seconds, "peak_gib": peak_gib,
            "trainable_parameters": sum(parameter.numel() for parameter in run.trainable)}


def in_subprocess(function: str, **kwargs) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(REPO_ROOT / 'benchmarks')!r}); import bench_floor; "
            f"print('RESULT ' + json.dumps(bench_floor.{function}(**{kwargs!r})))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    if completed.returncode != 0:
        return {"error": completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else f"exit {completed.returncode}"}
    [line] = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


# ----- scoring and classification ----------------------------------------------------------------------------------------

def image_folder(work: Path, count: int) -> Path:
    """A folder in the generation format, `count` natural pictures (crops of scikit-image's photos)."""
    import pandas as pd
    from PIL import Image
    from skimage import data

    from popalign.prompts import prompt_id

    folder = work / "score_folder"
    if folder.exists():
        shutil.rmtree(folder)
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rows = []
    for index in range(count):
        prompt = f"a photo of a worker number {index}"
        path = f"images/{prompt_id(prompt)}/00000.png"
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photos[index % len(photos)]).resize((512, 512)).save(folder / path)
        rows.append({"image_path": path, "prompt_id": prompt_id(prompt), "kind": "neutral", "prompt": prompt, "neutral_prompt": prompt})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder


def bench_scoring(clip: Path, work: Path, count: int, batch_size: int) -> dict:
    import pandas as pd
    from PIL import Image

    from popalign.score import build_scorer
    from popalign.score.run import score_image_folder

    folder = image_folder(work, count)
    batched_seconds, _ = timed(score_image_folder, folder, ["clip"], batch_size, {"clip": {"model": str(clip)}}, device="cpu")
    manifest = pd.read_csv(folder / "manifest.csv")

    def reload_per_image() -> list[float]:
        scores = []
        for image_path, prompt in zip(manifest["image_path"], manifest["prompt"]):
            scorer = build_scorer("clip", model=str(clip), device="cpu", batch_size=1)
            scores += scorer.score([Image.open(folder / image_path).convert("RGB")], [prompt])
        return scores

    per_image_seconds, _ = timed(reload_per_image)
    rerun_seconds, _ = timed(score_image_folder, folder, ["clip"], batch_size, {"clip": {"model": str(clip)}}, device="cpu")
    return {"images": count, "batched_seconds": batched_seconds, "per_image_reload_seconds": per_image_seconds,
            "speedup": per_image_seconds / batched_seconds, "rerun_seconds": rerun_seconds}


def bench_classification(clip: Path, work: Path, count: int, batch_size: int) -> dict:
    import pandas as pd
    from PIL import Image

    from popalign.classify import build_classifier
    from popalign.classify.run import run_classification

    folder = image_folder(work, count)
    options = {"model": str(clip), "device": "cpu"}
    batched_seconds, _ = timed(run_classification, folder, "clip", options, batch_size)
    manifest = pd.read_csv(folder / "manifest.csv")

    def reload_per_image() -> None:
        for image_path in manifest["image_path"]:
            build_classifier("clip", **options).classify([Image.open(folder / image_path).convert("RGB")])

    per_image_seconds, _ = timed(reload_per_image)
    rerun_seconds, _ = timed(run_classification, folder, "clip", options, batch_size)
    return {"images": count, "batched_seconds": batched_seconds, "per_image_reload_seconds": per_image_seconds,
            "speedup": per_image_seconds / batched_seconds, "rerun_seconds": rerun_seconds}


# ----- scaling ---------------------------------------------------------------------------------------------------------

def bench_image_counts(generation: dict, work: Path, args) -> dict[int, float]:
    from popalign.generate import generate_images

    seconds_per_image = {}
    for factor in (1, 2, 4):
        prompts_csv = write_prompts(work / f"prompts_x{factor}.csv", factor * args.images // 2)
        seconds, manifest = timed(generate_images, prompts_csv, work / f"images_x{factor}", generation["settings"], 2, 0,
                                  args.batch_size, kinds=("neutral",), pipeline=generation["pipeline"])
        seconds_per_image[factor] = seconds / len(manifest)
    return seconds_per_image


def bench_processes(sd15: Path, work: Path, args) -> dict[int, float]:
    """Wall seconds of `accelerate launch -m popalign.generate` with 1 and 2 processes (start-up and loading included)."""
    prompts_csv = write_prompts(work / "prompts_processes.csv", 2 * args.images)
    seconds = {}
    for processes in (1, 2):
        launch = ["accelerate", "launch", "--quiet", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", *(["--multi_gpu"] if processes > 1 else [])]
        command = [*launch, "-m", "popalign.generate", "--pretrained_model_name_or_path", str(sd15), "--prompts_csv", str(prompts_csv),
                   "--output_dir", str(work / f"images_{processes}_processes"), "--kinds", "neutral", "--images_per_neutral_prompt", "1",
                   "--steps", str(args.steps), "--width", str(args.resolution), "--height", str(args.resolution), "--precision", "fp32",
                   "--batch_size", str(args.batch_size)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        seconds[processes], completed = timed(subprocess.run, command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(completed.stderr[-2000:])
    return seconds


# ----- the report ------------------------------------------------------------------------------------------------------

def gpu_seconds_per_sdxl_image() -> float:
    from popalign.cost import GPU_PEAK_FLOPS, UTILISATION, generated_image_flops

    return generated_image_flops("sdxl", 50, True) / (GPU_PEAK_FLOPS["H100"] * UTILISATION)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/bench_floor")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--resolution", type=int, default=128,
                        help="generation and training resolution (SD 1.5 draws 512; at 64 this CPU is bound by reading the weights, not by compute)")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps")
    parser.add_argument("--images", type=int, default=4, help="images per generation measurement")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--train_steps", type=int, default=3)
    parser.add_argument("--score_images", type=int, default=16)
    parser.add_argument("--png_images", type=int, default=8, help="png_overlap: images at 1024x1024")
    parser.add_argument("--png_steps", type=int, default=20, help="png_overlap: sampler steps (drawing must outlast writing)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.work_dir).resolve()
    sections = [section.strip() for section in args.sections.split(",") if section.strip()]
    for name in ("png_plan", "png_images_0", "png_images_1", "png_inline", "plan", "images_0", "images_1", "images_x1", "images_x2", "images_x4", "images_1_processes", "images_2_processes",
                 "run_rank0", "run_rank8", "pair_images"):
        shutil.rmtree(work / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    needs_models = any(section in sections for section in SECTIONS)
    sd15, clip = models(work) if needs_models else (None, None)
    results: dict = {}
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s) per process, no GPU; {time.strftime('%Y-%m-%d')}. Models: "
             + ("the real SD 1.5 U-Net / VAE / CLIP-L text encoder and CLIP ViT-L/14, random weights." if needs_models
                else "the tiny SDXL-shaped pipeline (random weights)."), ""]

    if any(section in sections for section in ("generation", "resume", "scaling")):
        generation = bench_generation(sd15, work, args)
        results["generation"] = {key: value for key, value in generation.items() if key not in ("pipeline", "settings", "prompts_csv")}
        sdxl_gpu_seconds = gpu_seconds_per_sdxl_image()
        lines += ["### Generation against the bare pipeline", "",
                  f"{generation['images']} images at {args.resolution}x{args.resolution}, {args.steps} steps with guidance, batch "
                  f"{args.batch_size}, each measured twice, interleaved.", "",
                  "| | seconds | ratio |", "|---|---|---|",
                  f"| pipeline calls alone (the floor) | {generation['bare_seconds']:.1f} | 1.000 |",
                  f"| step 2 (plan, checks, PNG writes, manifest) | {generation['step_2_seconds']:.1f} | {generation['ratio']:.3f} |", "",
                  f"Host-side time left per image: {generation['host_ms_per_image']:.1f} ms "
                  f"({'below zero: ' if generation['host_ms_per_image'] < 0 else ''}within the run-to-run noise of the two bare passes, "
                  f"{1000 * abs(generation['bare_first'] - generation['bare_second']) / (generation['images'] / 2):.0f} ms per image); "
                  f"if none of it overlapped a GPU's work it would be {generation['host_ms_per_image'] / 10 / sdxl_gpu_seconds:.1f}% of "
                  f"an SDXL image's {sdxl_gpu_seconds:.2f} s of H100 time. Writing a 1024x1024 photograph as PNG takes {generation['png_1024_ms']:.0f} ms on this CPU; an SDXL "
                  f"image costs {sdxl_gpu_seconds:.2f} s of an H100 at 40% of peak (docs/cost.md), so that write, done in line, "
                  f"would add {generation['png_1024_ms'] / 10 / sdxl_gpu_seconds:.1f}% to each image; step 2 writes each batch on a "
                  f"background thread while the next batch is drawn, so it overlaps instead.", ""]
        if "resume" in sections:
            from popalign.generate import generate_images

            rerun_seconds, _ = timed(generate_images, generation["prompts_csv"], work / "images_0", generation["settings"], 2, 0,
                                     args.batch_size, kinds=("neutral",))
            first = generation["step_2_seconds"] / 2 + generation["load_seconds"]
            results["resume_generation"] = {"first_seconds": first, "rerun_seconds": rerun_seconds}
        if "scaling" in sections:
            results["image_counts"] = bench_image_counts(generation, work, args)
            results["processes"] = bench_processes(sd15, work, args)
            counts, processes = results["image_counts"], results["processes"]
            lines += ["### Scaling", "",
                      "| images | seconds per image | vs 1x |", "|---|---|---|",
                      *[f"| {factor * args.images} | {seconds:.2f} | {seconds / counts[1]:.2f} |" for factor, seconds in counts.items()], "",
                      f"{2 * args.images} images through `accelerate launch` (start-up and model loading included): 1 process "
                      f"{processes[1]:.0f} s, 2 processes {processes[2]:.0f} s, {processes[1] / processes[2]:.2f}x.", ""]
        del generation

    if "training" in sections or "memory" in sections:
        write_pairs(work, args.resolution, 4)
        full = in_subprocess("training_measurement", sd15=str(sd15), work=str(work), resolution=args.resolution, lora_rank=0, steps=args.train_steps)
        lora = in_subprocess("training_measurement", sd15=str(sd15), work=str(work), resolution=args.resolution, lora_rank=8, steps=args.train_steps)
        results["training"] = {"full": full, "lora": lora}
        rows = []
        for name, measured in (("full fine-tuning", full), ("LoRA rank 8", lora)):
            if "error" in measured:
                rows.append(f"| {name} | failed: {measured['error']} | | | | |")
            else:
                rows.append(f"| {name} | {measured['trainable_parameters'] / 1e6:.1f} M | {measured['trainer_seconds'] / measured['steps']:.2f} | "
                            f"{measured['floor_seconds'] / measured['steps']:.2f} | {measured['ratio']:.3f} | {measured['peak_gib']:.1f} |")
        lines += ["### Training against its floor, and memory", "",
                  f"PopAlign, 1 pair per step at {args.resolution}x{args.resolution}, fp32, {args.train_steps} steps after one warm-up "
                  "step; the floor is a policy forward and backward, a reference forward and the optimizer step on the same cached "
                  "encodings. Peak memory: the process's maximum resident set.", "",
                  "| run | trainable | trainer s/step | floor s/step | ratio | peak GiB |", "|---|---|---|---|---|---|", *rows]
        if "error" not in full and "error" not in lora:
            lines += ["", f"LoRA's peak memory is {lora['peak_gib'] / full['peak_gib']:.2f}x full fine-tuning's."]
        lines.append("")

    for section, bench in (("scoring", bench_scoring), ("classification", bench_classification)):
        if section in sections:
            measured = bench(clip, work, args.score_images, 8)
            results[section] = measured
            from popalign.cost import GPU_PEAK_FLOPS, UTILISATION, reader_flops

            forward = measured["batched_seconds"] / measured["images"]
            reload = (measured["per_image_reload_seconds"] - measured["batched_seconds"]) / measured["images"]
            gpu_forward = reader_flops()["scorer clip" if section == "scoring" else "classifier clip"] / (GPU_PEAK_FLOPS["H100"] * UTILISATION)
            lines += [f"### {section.capitalize()}: batched, model loaded once, against a model load per image", "",
                      f"{measured['images']} images, CLIP ViT-L/14 ({'CLIP score' if section == 'scoring' else 'zero-shot classifier'}), "
                      f"batch 8: {measured['batched_seconds']:.1f} s; loading the model for each image: "
                      f"{measured['per_image_reload_seconds']:.1f} s; **{measured['speedup']:.1f}x**. Here the forward pass "
                      f"({forward:.2f} s per image on one CPU thread) outweighs a reload from the page cache ({reload:.2f} s). On an "
                      f"H100 at 40% of peak the forward is {1000 * gpu_forward:.2f} ms (the cost model's FLOPs), so the same reload "
                      f"would make a per-image loop about {(reload + gpu_forward) / gpu_forward:,.0f}x slower: an estimate, not measured here.", ""]

    if "png_overlap" in sections:
        measured = bench_png_overlap(work, args.png_images, args.batch_size, args.png_steps)
        results["png_overlap"] = measured
        sdxl_gpu_seconds = gpu_seconds_per_sdxl_image()
        lines += ["### A 1024x1024 PNG write overlapped with drawing", "",
                  f"{measured['images']} images at 1024x1024 (the tiny SDXL-shaped pipeline, {measured['steps']} steps with guidance, "
                  f"batch {measured['batch_size']}), each measured twice, interleaved.", "",
                  "| | seconds | ratio |", "|---|---|---|",
                  f"| pipeline calls alone (the floor) | {measured['bare_seconds']:.1f} | 1.000 |",
                  f"| step 2 (PNG writes on the background thread) | {measured['step_2_seconds']:.1f} | {measured['ratio']:.3f} |", "",
                  f"Drawing: {measured['bare_ms_per_image']:.0f} ms per image; writing the same images in line: "
                  f"{measured['write_ms_per_image']:.0f} ms per image; left visible by the background writer: "
                  f"{measured['visible_ms_per_image']:.0f} ms per image (run-to-run noise of the bare passes: "
                  f"{measured['bare_noise_ms_per_image']:.0f} ms per image), "
                  f"{100 * measured['visible_ms_per_image'] / 1000 / sdxl_gpu_seconds:.1f}% of an SDXL image's {sdxl_gpu_seconds:.2f} s "
                  f"of H100 time, against {100 * measured['write_ms_per_image'] / 1000 / sdxl_gpu_seconds:.1f}% written in line.", ""]

    if "resume" in sections:
        resume_rows = []
        if "resume_generation" in results:
            first, rerun = results["resume_generation"]["first_seconds"], results["resume_generation"]["rerun_seconds"]
            resume_rows.append(f"| generation | {first:.1f} | {rerun:.2f} | {100 * rerun / first:.2f}% |")
        for section in ("scoring", "classification"):
            if section in results:
                first, rerun = results[section]["batched_seconds"], results[section]["rerun_seconds"]
                resume_rows.append(f"| {section} | {first:.1f} | {rerun:.2f} | {100 * rerun / first:.2f}% |")
        lines += ["### Resume: a finished stage run again", "", "In this process (the interpreter's start-up is not counted).", "",
                  "| stage | first run s | re-run s | share |", "|---|---|---|---|", *resume_rows, ""]

    (work / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
