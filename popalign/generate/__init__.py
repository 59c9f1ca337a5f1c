"""Step 2: generate N images per prompt, sharded over processes, batched, reproducible and resumable.

Reproducibility: every image has its own seed, a pure function of (base seed, prompt, image
index), and its own CPU generator, so an image never depends on the process that made it, the
images that shared its batch, or the GPU model (initial noise is drawn on the CPU). Only
floating-point reduction order changes with the batch size (about 1e-6 before 8-bit
quantisation).

Resumability: an image is written to a temporary file and renamed, so a file under its final
name is always complete; a re-run generates only the missing files. The manifest is written
once all images exist.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from popalign.image_folder import ATTRIBUTE_COLUMNS, MANIFEST_COLUMNS, MANIFEST_NAME, PROMPT_KINDS  # noqa: F401
from popalign.locks import check_not_locked, output_lock
from popalign.prompts import read_prompt_table
from popalign.io import (InputError, atomic_save_image, atomic_write_csv, atomic_write_json, check_model_location, check_output_location,
                         file_sha256, refuse_symlink, remove_orphaned_temporary_files)

CONFIG_FILE = "generation_config.json"


def image_seed(base_seed: int, prompt: str, image_index: int) -> int:
    """seed = int(sha256(f"{base_seed}|{prompt}|{image_index}")[:15 hex digits]), in [0, 2**60)."""
    digest = hashlib.sha256(f"{base_seed}|{prompt}|{image_index}".encode("utf-8")).hexdigest()
    return int(digest[:15], 16)


def image_relative_path(prompt_id: str, image_index: int) -> str:
    """Image path inside the output folder; never built from prompt text."""
    return f"images/{prompt_id}/{image_index:05d}.png"


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that determines the pixels of an image, saved as generation_config.json."""

    model: str
    unet: str = ""
    lora: str = ""
    vae: str = ""  # --pretrained_vae_model_name_or_path: '' = the model's own VAE
    scheduler: str = "default"
    steps: int = 50
    guidance: float = 5.0
    width: int = 1024
    height: int = 1024
    negative_prompt: str = ""
    precision: str = "auto"
    seed: int = 0


WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".json")
# The flag of each setting where it is not --<setting> (named in the errors of check_or_write_config).
SETTING_FLAGS = {"vae": "pretrained_vae_model_name_or_path"}


def fine_tuned_weights_sha256(unet: str = "", lora: str = "") -> str:
    """sha256 over the fine-tuned weights that `--unet` and `--lora` point at; '' when neither is a local path.

    A folder contributes its top-level .safetensors / .bin / .json files (not checkpoint subfolders), a file
    itself; each file's name, size and sha256 enter the digest, in name order. A training run saves its weights at
    the same path every time, so the path alone cannot tell a retrained model from the one a folder of
    images was drawn with.
    """
    digest = hashlib.sha256()
    hashed_any = False
    for flag, location in (("unet", unet), ("lora", lora)):
        path = Path(location) if location else None
        if path is None or not path.exists():
            continue
        files = [path] if path.is_file() else sorted(child for child in path.iterdir()
                                                       if child.is_file() and child.suffix in WEIGHT_FILE_SUFFIXES)
        for file in files:
            digest.update(f"{flag}|{file.name}|{file.stat().st_size}|{file_sha256(file)}|".encode("utf-8"))
            hashed_any = True
    return digest.hexdigest() if hashed_any else ""


def plan_images(prompts: pd.DataFrame, images_per_neutral_prompt: int, images_per_identity_prompt: int,
                settings: GenerationSettings, images_per_prompt: dict[str, int] | None = None) -> pd.DataFrame:
    """The manifest of every image to make: one row per (prompt, image index), in prompt order.

    Identity-specific prompts get `images_per_identity_prompt` images; neutral and generic
    prompts get `images_per_neutral_prompt`; a prompt listed in `images_per_prompt` ({prompt_id: count},
    popalign.evaluate.precision's rounds) gets its own count.
    """
    images_per_prompt = images_per_prompt or {}
    rows = []
    for prompt in prompts.to_dict("records"):
        count = images_per_identity_prompt if prompt["kind"] == "identity" else images_per_neutral_prompt
        count = images_per_prompt.get(prompt["prompt_id"], count)
        for image_index in range(count):
            rows.append({**prompt, **asdict(settings), "base_seed": settings.seed,
                         "image_path": image_relative_path(prompt["prompt_id"], image_index),
                         "image_index": image_index, "seed": image_seed(settings.seed, prompt["prompt"], image_index)})
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def effective_guidance(guidance: float) -> float:
    """The guidance scale as the pipeline applies it: diffusers runs classifier-free guidance only above 1, so every
    value <= 1 draws the same images (no guidance) and is recorded as one setting, 1.0."""
    return guidance if guidance > 1.0 else 1.0


def generation_record(settings: GenerationSettings) -> dict:
    """What generation_config.json holds: the settings plus `weights_sha256`, the digest of the fine-tuned
    weights they point at (fine_tuned_weights_sha256), derived here because the path alone cannot tell
    a retrained model from the one a folder of images was drawn with."""
    record = json.loads(json.dumps(asdict(settings)))
    record["weights_sha256"] = fine_tuned_weights_sha256(settings.unet, settings.lora)
    return record


def validate_generation_settings(settings: GenerationSettings) -> None:
    """Every setting checked before a model is loaded or a file written, each error naming its flag."""
    import math

    from popalign.pipelines import PRECISIONS, SCHEDULER_NAMES

    if settings.scheduler != "default" and settings.scheduler not in SCHEDULER_NAMES:
        raise InputError(f"--scheduler {settings.scheduler!r}: expected default, {', '.join(SCHEDULER_NAMES)}")
    if settings.precision != "auto" and settings.precision not in PRECISIONS:
        raise InputError(f"--precision {settings.precision!r}: expected auto, {', '.join(PRECISIONS)}")
    if settings.steps < 1:
        raise InputError(f"--steps must be >= 1 (got {settings.steps})")
    if not math.isfinite(settings.guidance) or settings.guidance < 0:
        raise InputError(f"--guidance must be a finite number >= 0 (got {settings.guidance})")
    for name in ("width", "height"):
        value = getattr(settings, name)
        if value < 8 or value % 8:
            raise InputError(f"--{name} must be a positive multiple of 8 (got {value})")
    check_model_location("model", settings.model)
    check_model_location("unet", settings.unet, hub_allowed=False)
    check_model_location("lora", settings.lora, hub_allowed=False)
    check_model_location(SETTING_FLAGS["vae"], settings.vae)
    from popalign.pipelines import check_unet_folder, check_vae_folder

    if (Path(settings.model) / "unet").is_dir():  # a local pipeline's own U-Net, checked as a fine-tuned one is
        check_unet_folder("--pretrained_model_name_or_path", Path(settings.model) / "unet")
    if settings.unet:
        check_unet_folder("--unet", settings.unet, settings.model)
    if settings.vae and Path(settings.vae).exists():  # a hub id is left to the loader
        check_vae_folder(f"--{SETTING_FLAGS['vae']}", settings.vae, settings.model)


def image_decodes(path: Path) -> bool:
    """The PNG's chunks are all there and intact (PIL's verify: no pixel decoding, cheap enough to run on resume)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # any decoding failure means: generate it again
        return False


def holds_images(out_dir: Path) -> bool:
    return any((out_dir / "images").glob("*/*.png"))


def check_or_write_config(out_dir: Path, settings: GenerationSettings, write: bool = True) -> None:
    """Refuse to mix images made with other settings (or other weights at the same path) into an existing folder;
    with `write`, record the settings of a new folder.

    Call it on one process: it reads the fine-tuned weight files in full to hash them.
    """
    config_path = out_dir / CONFIG_FILE
    current = generation_record(settings)
    if config_path.exists():
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        # A key an older folder lacks reads as its default: adding a setting does not orphan old folders.
        defaults = {**json.loads(json.dumps(asdict(GenerationSettings(model="")))), "weights_sha256": ""}
        saved = {key: saved.get(key, defaults[key]) for key in current}
        if isinstance(saved["guidance"], (int, float)):  # a folder recorded before guidance <= 1 was written as 1.0
            saved["guidance"] = effective_guidance(saved["guidance"])
        changed = [key for key in current if saved[key] != current[key]]
        if changed and not holds_images(out_dir):
            if write:
                atomic_write_json(config_path, current)  # a run that failed before its first image binds nothing
        elif changed:
            details = ", ".join(f"the weights at --unet / --lora changed (sha256 {saved[key][:12]!r} -> {current[key][:12]!r})"
                                if key == "weights_sha256" else f"--{SETTING_FLAGS.get(key, key)} {saved[key]!r} -> {current[key]!r}"
                                for key in changed)
            raise InputError(f"{config_path}: folder holds images made with other settings ({details}); use a new --output_dir")
    elif write:
        atomic_write_json(config_path, current)


def remove_partial_files(out_dir: Path) -> int:
    """Delete temporary files left by an interrupted run (images and the folder's own files); they never carry a
    final name."""
    return remove_orphaned_temporary_files(out_dir, (".*.tmp", "images/*/.*.tmp"))


def render_batch(pipeline, prompts: list[str], seeds: list[int], settings: GenerationSettings):
    """Run the pipeline on one batch; each image gets a CPU generator seeded with its own seed. Returns PIL images;
    InputError when the model draws nothing (blank_batch_problem), before any of the batch is written."""
    import torch

    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    negative = [settings.negative_prompt] * len(prompts) if settings.negative_prompt else None
    # As arrays first: a model that drew NaN is seen before the conversion to 8 bits hides it as black.
    result = pipeline(prompt=prompts, negative_prompt=negative, num_inference_steps=settings.steps,
                      guidance_scale=settings.guidance, width=settings.width, height=settings.height,
                      generator=generators, output_type="np")
    problem = blank_batch_problem(result.images)
    if problem is not None:
        weights = "".join(f" --{flag} {value}" for flag, value in (("unet", settings.unet), ("lora", settings.lora),
                                                                    (SETTING_FLAGS["vae"], settings.vae)) if value)
        raise InputError(f"the model draws nothing: every image of a batch is {problem} (prompt {prompts[0]!r}); check the "
                         f"weights of --pretrained_model_name_or_path {settings.model}{weights} (a training that diverged?)")
    return to_pil_images(result.images)


def blank_batch_problem(pixels) -> str | None:
    """What is wrong with a batch of drawn images (N, H, W, C floats in [0, 1]) in which nothing is drawn: 'not finite'
    when every image holds NaN or infinity, 'one colour' when every image is a single flat colour; None when any image
    of the batch shows something."""
    import numpy as np

    pixels = np.asarray(pixels)
    finite = np.isfinite(pixels).reshape(len(pixels), -1).all(axis=1)
    if not finite.any():
        return "not finite (NaN or infinity)"
    flat = np.array([np.ptp(image.reshape(-1, image.shape[-1]), axis=0).max() < 1 / 255 if ok else True
                     for image, ok in zip(pixels, finite)])
    if flat.all():
        return "one flat colour"
    return None


def to_pil_images(pixels) -> list:
    """The pipeline's own conversion of [0, 1] arrays to 8-bit PIL images (what output_type='pil' returns)."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.numpy_to_pil(pixels)


def generate_images(prompts_csv, out_dir, settings: GenerationSettings, images_per_neutral_prompt: int,
                    images_per_identity_prompt: int, batch_size: int, kinds=PROMPT_KINDS, validate_only: bool = False,
                    speed=None, pipeline=None, images_per_prompt: dict[str, int] | None = None) -> pd.DataFrame:
    """Generate every missing image of the plan over all processes of this accelerate launch; return the manifest.
    With `validate_only`, check settings, prompts and output folder, write nothing, and return the plan.
    `pipeline`: one already loaded with these settings (the benchmarks time it), instead of loading it here.

    Each batch's PNGs are encoded and written on a background thread while the next batch is drawn, so the
    accelerator does not wait for the host; at most one batch is being written at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from popalign.distributed import make_accelerator

    from popalign.pipelines import load_text_to_image_pipeline, resolve_dtype

    if batch_size < 1:
        raise InputError(f"--batch_size must be >= 1, got {batch_size}")
    if images_per_neutral_prompt < 0 or images_per_identity_prompt < 0:
        raise InputError("--images_per_neutral_prompt and --images_per_identity_prompt must be >= 0")
    validate_generation_settings(settings)
    settings = replace(settings, guidance=effective_guidance(settings.guidance))
    out_dir = Path(out_dir)
    check_output_location(out_dir, "--output_dir", folder=True)
    if (out_dir / MANIFEST_NAME).is_dir() or (out_dir / CONFIG_FILE).is_dir():
        raise InputError(f"--output_dir {out_dir}: a folder is in the way of {MANIFEST_NAME} or {CONFIG_FILE}")
    for name in (MANIFEST_NAME, CONFIG_FILE):  # before any image is drawn, not when the manifest is written at the end
        refuse_symlink(out_dir / name)
    prompts = read_prompt_table(prompts_csv)
    prompts = prompts[prompts["kind"].isin(kinds)].reset_index(drop=True)
    unknown = sorted(set(images_per_prompt or {}) - set(prompts["prompt_id"]))
    if unknown:
        raise InputError(f"--images_per_prompt_csv: prompt_id {unknown[0]} is not a prompt of {prompts_csv} (of the kinds generated)")
    manifest = plan_images(prompts, images_per_neutral_prompt, images_per_identity_prompt, settings, images_per_prompt)
    if manifest.empty:
        raise InputError(f"{prompts_csv}: no images to generate (no prompt of kind {', '.join(kinds)}, or 0 images per prompt asked)")
    if validate_only:
        if out_dir.is_dir():
            check_or_write_config(out_dir, settings, write=False)
            check_not_locked(out_dir, "generation")
        return manifest
    accelerator = make_accelerator()
    # One run per folder: a second generation into it would draw the same images twice and race on its files.
    with output_lock(out_dir, "generation", take=accelerator.is_main_process):
        if accelerator.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_files(out_dir)
            check_or_write_config(out_dir, settings)
            # An image under its final name that does not decode (a disk fault, a copy cut short) is made again.
            broken = [out_dir / path for path in manifest["image_path"] if (out_dir / path).exists() and not image_decodes(out_dir / path)]
            for path in broken:
                path.unlink()
            if broken:
                print(f"{len(broken)} existing image(s) did not decode and will be generated again, e.g. {broken[0]}")
        accelerator.wait_for_everyone()

        missing = manifest[[not (out_dir / path).exists() for path in manifest["image_path"]]]
        # Round-robin over the missing images: any process count gives the same images.
        my_share = missing.iloc[accelerator.process_index :: accelerator.num_processes]
        if accelerator.is_main_process:
            print(f"{len(manifest)} images planned, {len(manifest) - len(missing)} already exist, "
                  f"{len(missing)} to generate on {accelerator.num_processes} process(es)")
        if len(my_share):
            if pipeline is None:
                dtype = resolve_dtype(settings.precision, accelerator.device)
                pipeline = load_text_to_image_pipeline(settings.model, dtype, accelerator.device, settings.scheduler,
                                                       settings.unet or None, settings.lora or None, **({"speed": speed} if speed else {}),
                                                       vae_path=settings.vae or None)

            def write_batch(images, relative_paths) -> None:
                for image, relative_path in zip(images, relative_paths):
                    atomic_save_image(image, out_dir / relative_path)

            with tqdm(total=len(my_share), desc="generating", unit="img", disable=not accelerator.is_local_main_process) as progress, \
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="png-writer") as writer:
                writing = None  # (the previous batch's write, its image count): under way while this batch is drawn

                def wait_for_write() -> None:
                    if writing is not None:
                        future, count = writing
                        future.result()  # on disk (the write's error, if any, is raised here)
                        progress.update(count)

                for start in range(0, len(my_share), batch_size):
                    batch = my_share.iloc[start : start + batch_size]
                    images = render_batch(pipeline, list(batch["prompt"]), [int(seed) for seed in batch["seed"]], settings)
                    wait_for_write()
                    writing = (writer.submit(write_batch, images, list(batch["image_path"])), len(batch))
                wait_for_write()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_csv(out_dir / MANIFEST_NAME, manifest)
            print(f"wrote {out_dir / MANIFEST_NAME} ({len(manifest)} images)")
    return manifest
