"""What runs during training besides the step: population metrics of the current weights on held-out prompts.

Every `--validation_steps` optimizer steps, and at step 0, the current U-Net draws the populations of
`--validation_prompts_file` (step 1's format: neutral and identity-specific prompts, on occupations kept out of
training) with fixed seeds, sharded over the processes like step 2; the classifier reads them (`--validation_classifier`,
as step 2 offers) and a quality scorer scores them (`--validation_scorer`). The main process then writes

    <output_dir>/validation.jsonl             one JSON line per validation (validation_metrics below)
    <output_dir>/validation/step_NNNNNN.png   a sample grid: one row per neutral prompt, the same seeds at every step

and logs the numbers through accelerator.log (`validation/...`, tensorboard with --report_to tensorboard).
The trainer uses `TrainingValidation(config, accelerator)`, `.due(step)` and `.run(unet, step, text_encoders)`, and for
the best checkpoint `select_best_step` over `read_validations`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from popalign.io import InputError, atomic_save_image, atomic_write_text, open_for_append, write_faults_named
from popalign.training.models import TEXT_ENCODER_NAMES

VALIDATION_NAME = "validation.jsonl"
VALIDATION_FOLDER = "validation"
GRID_IMAGES_PER_PROMPT = 4
GRID_PROMPTS = 8


def validation_metrics(images: pd.DataFrame, attributes, axes: Sequence[str], confidence: float = 0.95) -> dict[str, float]:
    """The numbers of one validation, from one row per drawn image.

    `images` columns: prompt_id, kind ("neutral" / "identity"), one column per axis holding the prompted label
    (empty on neutral prompts), face_detected, predicted_<axis>, and quality (NaN when not scored).

    Per axis a, over the neutral prompts p, on the images with a face (popalign.evaluate.metrics):
        discrepancy_<a>        mean_p || p_hat_p - uniform ||_2, with its interval over prompts (bootstrap_mean_ci)
                               as discrepancy_<a>_low / _high, cut to [0, sqrt(1 - 1/K)] (clip_interval)
        discrepancy_<a>_floor  mean_p discrepancy_floor(faces_p): what fair populations of the same sizes read
    On identity-specific prompts:
        identity_accuracy      share of the faces whose every prompted axis was read as prompted (pooled)
    And: face_rate (all images), quality (mean over the neutral prompts' images, when scored), prompts per kind.
    """
    from popalign.evaluate.metrics import bootstrap_mean_ci, clip_interval, discrepancy, discrepancy_floor, discrepancy_range

    result: dict[str, float] = {}
    neutral = images[images["kind"] == "neutral"]
    faces = neutral[neutral["face_detected"]]
    result["neutral_prompts"] = float(neutral["prompt_id"].nunique())
    for axis in axes:
        classes = attributes[axis].labels
        per_prompt, floors = [], []
        for _, group in faces.groupby("prompt_id", sort=True):
            per_prompt.append(discrepancy(list(group[f"predicted_{axis}"]), classes))
            floors.append(discrepancy_floor(len(group), classes))
        mean, low, high = bootstrap_mean_ci(per_prompt, confidence=confidence) if per_prompt else (math.nan,) * 3
        low, high, _ = clip_interval(low, high, discrepancy_range(classes))
        result[f"discrepancy_{axis}"] = mean
        result[f"discrepancy_{axis}_low"] = low
        result[f"discrepancy_{axis}_high"] = high
        result[f"discrepancy_{axis}_floor"] = float(np.mean(floors)) if floors else math.nan
    identity = images[(images["kind"] == "identity") & images["face_detected"]]
    result["identity_prompts"] = float(images.loc[images["kind"] == "identity", "prompt_id"].nunique())
    if len(identity):
        right = pd.Series(True, index=identity.index)
        for axis in axes:
            prompted = identity[axis].astype(str) != ""
            right &= ~prompted | (identity[f"predicted_{axis}"] == identity[axis])
        result["identity_accuracy"] = float(right.mean())
    else:
        result["identity_accuracy"] = math.nan
    result["face_rate"] = float(images["face_detected"].mean()) if len(images) else math.nan
    result["quality"] = float(neutral["quality"].mean()) if neutral["quality"].notna().any() else math.nan
    return result


def _number(value) -> float:
    """A recorded number; null (what validation.jsonl holds for an undefined value, e.g. an interval of one prompt) is NaN."""
    return math.nan if value is None else float(value)


def mean_discrepancy(record: dict) -> float:
    """The selection's score of one validation: the mean of its per-axis mean discrepancies."""
    values = [_number(value) for name, value in record.items()
              if name.startswith("discrepancy_") and not name.endswith(("_low", "_high", "_floor"))]
    return float(np.mean(values)) if values else math.nan


def select_best_step(records: Sequence[dict], candidate_steps: set[int], accuracy_margin: float, quality_margin: float) -> Optional[int]:
    """The best checkpoint by the rule declared before training (--best_checkpoint_accuracy_margin / _quality_margin).

    Reference: the step-0 validation (the base weights), r. A validation v at a step with saved weights is eligible when
        identity_accuracy(v) >= identity_accuracy(r) - accuracy_margin        (skipped where either is NaN)
        quality(v)           >= quality(r) - quality_margin * |quality(r)|    (skipped where either is NaN; a share of
                                                                              the base's quality, whatever its sign)
    and the best is the eligible one with the lowest mean_discrepancy, the earliest on a tie; None when no validation
    is eligible or there is no step-0 validation.
    """
    by_step = {record["step"]: record for record in records}
    if 0 not in by_step:
        return None
    reference = by_step[0]

    def eligible(record: dict) -> bool:
        for name, allowed in (("identity_accuracy", _number(reference.get("identity_accuracy")) - accuracy_margin),
                              ("quality", _number(reference.get("quality")) - quality_margin * abs(_number(reference.get("quality"))))):
            value = _number(record.get(name))
            if math.isfinite(value) and math.isfinite(allowed) and value < allowed:
                return False
        return math.isfinite(mean_discrepancy(record))

    scored = [(mean_discrepancy(record), step) for step, record in by_step.items()
              if step in candidate_steps and step > 0 and eligible(record)]
    return min(scored)[1] if scored else None


def validation_fingerprint(config) -> str:
    """What decides a validation's numbers besides the weights: the validation settings, the base model, and the
    prompts file's content. Each record carries it; records of other settings are not this run's."""
    import hashlib

    from popalign.io import file_sha256

    settings = {name: value for name, value in sorted(config.to_dict().items())
                if name.startswith(("validation_", "num_validation_")) or name in ("pretrained_model", "vae", "resolution")}
    settings["validation_prompts_sha256"] = file_sha256(Path(config.validation_prompts_file))
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def read_validations(output_dir: str | Path, fingerprint: Optional[str] = None) -> list[dict]:
    """The validations of a run folder, oldest first (a line cut short by a kill is skipped); with `fingerprint`, only
    those made with these validation settings (validation_fingerprint)."""
    path = Path(output_dir) / VALIDATION_NAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [record for record in records if isinstance(record, dict) and isinstance(record.get("step"), int)
            and (fingerprint is None or record.get("settings") == fingerprint)]


def trim_validations(output_dir: str | Path, global_step: int, fingerprint: str) -> None:
    """Keep only the validations of steps <= `global_step` (the step a run resumes from) made with these settings: one
    line per step, and no step-0 reference left from a run with another validation set."""
    kept = [record for record in read_validations(output_dir, fingerprint) if record["step"] <= global_step]
    path = Path(output_dir) / VALIDATION_NAME
    if path.is_file() and len(kept) != len(path.read_text(encoding="utf-8").splitlines()):
        atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


class TrainingValidation:
    """Draws, reads and measures the validation populations of the current weights (see the module docstring)."""

    def __init__(self, config, accelerator):
        from popalign.attributes import load_attributes
        from popalign.generate import image_seed
        from popalign.prompts import read_prompt_table

        self.config, self.accelerator = config, accelerator
        self.output_dir = Path(config.output_dir)
        self.attributes = load_attributes(config.validation_attributes)
        prompts = read_prompt_table(config.validation_prompts_file)
        prompts = prompts[prompts["kind"].isin(["neutral", "identity"])]
        self.axes = [axis for axis in ("gender", "race", "age") if axis in self.attributes.names and axis in prompts.columns
                     and (prompts[axis].astype(str) != "").any()] or [axis for axis in ("gender", "race") if axis in self.attributes.names]
        rows = []
        for prompt in prompts.to_dict("records"):
            count = config.num_validation_images if prompt["kind"] == "neutral" else config.num_validation_identity_images
            for index in range(count):
                rows.append({"prompt_id": prompt["prompt_id"], "kind": prompt["kind"], "prompt": prompt["prompt"], "image_index": index,
                             "seed": image_seed(config.validation_seed, prompt["prompt"], index),
                             **{axis: str(prompt.get(axis, "") or "") for axis in self.axes}})
        self.plan = pd.DataFrame(rows)
        self.fingerprint = validation_fingerprint(config)
        self.done_steps = {record["step"] for record in read_validations(self.output_dir, self.fingerprint)}
        self._pipeline = self._classifier = self._scorer = None

    def due(self, step: int) -> bool:
        """Step 0, every validation_steps steps and the last step (its weights are saved), unless this step's validation
        is already in validation.jsonl."""
        last = step == self.config.max_train_steps
        return (step % self.config.validation_steps == 0 or last) and step not in self.done_steps

    def _components(self, unet, text_encoders: Sequence):
        """The pipeline, classifier and scorer, built at the first use on this process's device. The pipeline is built
        around the modules being trained (no second copy of the U-Net is loaded), with the base's other components and
        the training's --pretrained_vae_model_name_or_path when one is given (SDXL's VAE overflows in fp16)."""
        if self._pipeline is None:
            import torch
            from diffusers import AutoencoderKL, DiffusionPipeline

            from popalign.classify import build_classifier
            from popalign.classify.run import classifier_options
            from popalign.score import build_scorer

            device = self.accelerator.device
            components = {"unet": unet, **dict(zip(TEXT_ENCODER_NAMES, text_encoders))}
            if self.config.vae:
                components["vae"] = AutoencoderKL.from_pretrained(self.config.vae, torch_dtype=torch.float32)
            pipeline = DiffusionPipeline.from_pretrained(self.config.pretrained_model, torch_dtype=torch.float32, **components)
            pipeline.set_progress_bar_config(disable=True)
            for name, module in pipeline.components.items():
                if isinstance(module, torch.nn.Module) and name not in components or name == "vae":
                    module.to(device)
            self._pipeline = pipeline
            # each process's own GPU; on the CPU the backends' defaults (as steps 2 and 5 place them)
            placement = {"device": str(device)} if device.type != "cpu" else {}
            self._classifier = build_classifier(self.config.validation_classifier,
                                                **classifier_options(self.config.validation_classifier, **placement))
            self._scorer = build_scorer(self.config.validation_scorer, **placement) if self.config.validation_scorer else None
        return self._pipeline, self._classifier, self._scorer

    def _draw_and_read(self, unet, text_encoders: Sequence) -> tuple[list[dict], list]:
        """This process's share of the plan (every num_processes-th image), drawn with the current U-Net (and text encoders,
        when they train), read and scored."""
        import torch

        from popalign.generate import GenerationSettings, render_batch

        pipeline, classifier, scorer = self._components(unet, text_encoders)
        config = self.config
        resolution = config.validation_resolution or config.resolution
        settings = GenerationSettings(model=config.pretrained_model, steps=config.validation_num_inference_steps,
                                      guidance=config.validation_guidance_scale, width=resolution, height=resolution)
        share = self.plan.iloc[self.accelerator.process_index::self.accelerator.num_processes]
        rows, grid = [], []
        trained = {"unet": unet, **dict(zip(TEXT_ENCODER_NAMES, text_encoders))}
        originals = {name: getattr(pipeline, name) for name in trained}
        modes = {name: module.training for name, module in trained.items()}
        for name, module in trained.items():
            setattr(pipeline, name, module)
            module.eval()
        try:
            for start in range(0, len(share), config.validation_batch_size):
                batch = share.iloc[start:start + config.validation_batch_size]
                with torch.no_grad(), self.accelerator.autocast():
                    images = render_batch(pipeline, list(batch["prompt"]), [int(seed) for seed in batch["seed"]], settings)
                readings = classifier.classify(images)
                scores = scorer.score(images, list(batch["prompt"])) if scorer is not None else [math.nan] * len(images)
                for row, image, reading, score in zip(batch.to_dict("records"), images, readings, scores):
                    rows.append({**row, "face_detected": bool(reading.face_detected), "quality": float(score),
                                 **{f"predicted_{axis}": getattr(reading, axis, None) for axis in self.axes}})
                    if row["kind"] == "neutral" and row["image_index"] < GRID_IMAGES_PER_PROMPT:
                        grid.append((row["prompt_id"], row["image_index"], image))
        finally:
            for name, module in trained.items():
                setattr(pipeline, name, originals[name])
                module.train(modes[name])
        return rows, grid

    def run(self, unet, step: int, text_encoders: Sequence = ()) -> Optional[dict]:
        """Validate the weights of `unet` and, when they train, `text_encoders` (all unwrapped) at `step`; the main process
        returns and records the metrics."""
        from accelerate.utils import gather_object

        rows, grid = self._draw_and_read(unet, text_encoders)
        rows, grid = gather_object(rows), gather_object(grid)
        self.done_steps.add(step)
        if not self.accelerator.is_main_process:
            return None
        images = pd.DataFrame(rows).sort_values(["prompt_id", "image_index"], kind="stable")
        record = {"step": step, **validation_metrics(images, self.attributes, self.axes), "images": len(images),
                  "settings": self.fingerprint}
        self.accelerator.log({f"validation/{name}": value for name, value in record.items()
                              if name != "step" and isinstance(value, float) and math.isfinite(value)}, step=step)
        written = {name: (None if isinstance(value, float) and not math.isfinite(value) else value) for name, value in record.items()}
        with write_faults_named(self.output_dir / VALIDATION_NAME), open_for_append(self.output_dir / VALIDATION_NAME) as stream:
            stream.write(json.dumps(written, allow_nan=False) + "\n")
        self._write_grid(grid, step)
        return record

    def _write_grid(self, grid: list, step: int) -> None:
        from PIL import Image

        prompts = sorted({prompt_id for prompt_id, _, _ in grid})[:GRID_PROMPTS]
        if not prompts:
            return
        cells = {(prompt_id, index): image for prompt_id, index, image in grid}
        width, height = grid[0][2].size
        sheet = Image.new("RGB", (width * GRID_IMAGES_PER_PROMPT, height * len(prompts)), "white")
        for row, prompt_id in enumerate(prompts):
            for column in range(GRID_IMAGES_PER_PROMPT):
                if (prompt_id, column) in cells:
                    sheet.paste(cells[(prompt_id, column)].convert("RGB"), (column * width, row * height))
        atomic_save_image(sheet, self.output_dir / VALIDATION_FOLDER / f"step_{step:06d}.png")


def check_validation_inputs(config, training_captions: set[str] = frozenset()) -> None:
    """Before anything is written: the validation prompts file (a neutral prompt, none trained on), attribute file,
    classifier and scorer names. InputError."""
    if not config.validation_prompts_file:
        return
    from popalign.attributes import load_attributes
    from popalign.classify import CLASSIFIERS
    from popalign.prompts import read_prompt_table
    from popalign.score import SCORERS

    prompts = read_prompt_table(config.validation_prompts_file)
    if not (prompts["kind"] == "neutral").any():
        raise InputError(f"--validation_prompts_file {config.validation_prompts_file}: holds no neutral prompt")
    trained = prompts[(prompts["kind"] == "neutral") & prompts["prompt"].isin(training_captions)]
    if len(trained):
        raise InputError(f"--validation_prompts_file {config.validation_prompts_file}: the neutral prompt {trained['prompt'].iloc[0]!r} "
                         "is a caption of the pairs file; validate on prompts kept out of training")
    load_attributes(config.validation_attributes)
    if config.validation_classifier not in CLASSIFIERS:
        raise InputError(f"--validation_classifier must be one of {', '.join(CLASSIFIERS)} (got {config.validation_classifier!r})")
    if config.validation_scorer and config.validation_scorer not in SCORERS:
        raise InputError(f"--validation_scorer must be one of {', '.join(SCORERS)} or empty (got {config.validation_scorer!r})")
