"""Building and checking the biased toy base model.

The base is the toy pipeline (popalign.toy.model) whose U-Net `train_popalign.py --loss sft`
trained from scratch on the biased data set (popalign.toy.dataset). `measure_toy_model` draws
pictures for every prompt and reads them back, which gives the two gates a base must pass
before a debiasing result means anything: identity-specific prompts drawn right (occupation,
gender and race all right) and the neutral-prompt skew of the data set reproduced.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from popalign.evaluate.metrics import discrepancy
from popalign.io import InputError
from popalign.training.data import image_to_tensor
from popalign.toy.dataset import neutral_skew
from popalign.toy.quality import toy_quality
from popalign.toy.world import IMAGE_SIZE, ToyWorld, read_figure, render_figure

IDENTITY_ACCURACY_GATE = 0.9
GATES_NAME = "gates.json"  # a base's measured gates (train_toy_base.sh measure)
WORLD_RECORD_NAME = "toy_world.json"  # the world a base was built for (ToyWorld.record), written when it is assembled


def check_base_world(model: str | Path, world: ToyWorld, occupations_path: str | Path, attributes_path: str | Path | None = None) -> Path | None:
    """Refuse a toy base built for another world than `world` (read from `occupations_path` and `attributes_path`): a
    base draws each occupation in the colour of its row and each race in the colour of its label's place, so a base
    used with another occupation file or attribute file is read wrongly, without an error, by the classifier.

    What the base was built for: its toy_world.json (written by train_toy_base.py assemble), else the `world` of its
    gates.json, else its gates' neutral rows (occupation and majority identity, in file order; label order unknown).
    A folder that is no pipeline is refused; a pipeline with none of these records (made elsewhere) is not checked.
    Returns the record checked against, or None when there was none.
    """
    model = Path(model)
    if not (model / "model_index.json").is_file():
        raise InputError(f"{model}: no toy pipeline there (model_index.json missing)")
    record_path = model / WORLD_RECORD_NAME if (model / WORLD_RECORD_NAME).is_file() else model / GATES_NAME
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record_path.name == GATES_NAME:
            record = record.get("world") or {"occupations": [row["occupation"] for row in record["neutral"]],
                                             "majority_genders": [row["majority_gender"] for row in record["neutral"]],
                                             "majority_races": [row["majority_race"] for row in record["neutral"]]}
        built = {key: list(record[key]) for key in record}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{record_path}: not the record of a toy base's world") from None
    wanted = world.record()
    attributes = attributes_path or "the default attribute file"
    for key, what, source in (("occupations", "occupations", occupations_path), ("genders", "gender labels", attributes),
                              ("races", "race labels", attributes), ("majority_genders", "majority genders", occupations_path),
                              ("majority_races", "majority races", occupations_path)):
        if key not in built or built[key] == wanted[key]:
            continue
        then, now = built[key], wanted[key]
        position = next((index for index, (a, b) in enumerate(zip(then, now)) if a != b), min(len(then), len(now)))
        where = (f"the base draws {len(then)} {what}, the file has {len(now)}" if position == min(len(then), len(now))
                 else f"{what} number {position + 1}: the base's {then[position]!r}, the file's {now[position]!r}")
        raise InputError(f"{record_path}: this toy base was built for another world than {source} ({where}); "
                         f"build a base for it with scripts/train_toy_base.sh (OCCUPATIONS, ATTRIBUTES, OUT) and use that one")
    return record_path


def assemble_pipeline(untrained_pipeline: str | Path, unet_folder: str | Path, out_dir: str | Path, world: ToyWorld | None = None) -> Path:
    """Copy the toy pipeline `untrained_pipeline` (its model_index.json and component folders, nothing else: no README or
    gates of an earlier build) to `out_dir` with the trained U-Net in place of its own, and, given the `world` it was
    built for, that world's record (toy_world.json, which check_base_world reads)."""
    source, out_dir = Path(untrained_pipeline), Path(out_dir)
    if out_dir.resolve() == source.resolve():
        raise InputError(f"--out {out_dir}: the same folder as the pipeline it is assembled from; write it elsewhere")
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    shutil.copy2(source / "model_index.json", staging / "model_index.json")
    for component in sorted(path for path in source.iterdir() if path.is_dir() and path.name != "unet"):
        shutil.copytree(component, staging / component.name)
    shutil.copytree(unet_folder, staging / "unet")
    if world is not None:
        (staging / WORLD_RECORD_NAME).write_text(json.dumps(world.record(), indent=2) + "\n", encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def _draw(pipeline, prompt: str, count: int, steps: int, guidance: float, seed: int, batch_size: int):
    pictures = []
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start)
        generator = [torch.Generator().manual_seed(seed * 1_000_003 + start + index) for index in range(size)]
        pictures += pipeline([prompt] * size, num_inference_steps=steps, guidance_scale=guidance, height=IMAGE_SIZE,
                             width=IMAGE_SIZE, generator=generator).images
    return pictures


def measure_toy_model(pipeline, world: ToyWorld, prompts: pd.DataFrame, images_per_identity_prompt: int,
                      images_per_neutral_prompt: int, steps: int = 20, guidance: float = 3.0, seed: int = 0,
                      batch_size: int = 64, gender_majority: float = 0.85, race_majority: float = 0.8,
                      keep_readings: bool = False) -> dict:
    """Identity-prompt accuracy and neutral-prompt skew of a toy pipeline, read from its pictures.

    Identity accuracy = share of identity-prompt pictures that are clean figures with the prompted
    occupation, gender AND race. For each neutral prompt: the clean-figure rate, the shares of the
    data set's majority gender and race among clean figures next to the data set's shares, the
    gender and race discrepancies ||p_hat - uniform||_2 over clean figures, and the mean toy quality
    (popalign.toy.quality.toy_quality). Also their means over the neutral prompts. With keep_readings, also
    "readings": for each prompt in order, each picture's [clean, occupation, gender, race] (to pair pictures
    of the same seeds across models or samplers).
    """
    identity_counts: Counter = Counter()
    neutral_rows = []
    kept_readings = []
    for index, prompt in enumerate(tqdm(list(prompts.itertuples(index=False)), desc="measuring toy model")):
        identity = prompt.kind == "identity"
        count = images_per_identity_prompt if identity else images_per_neutral_prompt
        readings = [read_figure(world, picture) for picture in _draw(pipeline, prompt.prompt, count, steps, guidance, seed + index, batch_size)]
        if keep_readings:
            kept_readings.append([[bool(r.clean), r.occupation, r.gender, r.race] for r in readings])
        if identity:
            identity_counts["images"] += count
            identity_counts["clean"] += sum(reading.clean for reading in readings)
            identity_counts["occupation"] += sum(reading.occupation == prompt.occupation for reading in readings)
            identity_counts["gender"] += sum(reading.clean and reading.gender == prompt.gender for reading in readings)
            identity_counts["race"] += sum(reading.clean and reading.race == prompt.race for reading in readings)
            identity_counts["all"] += sum(reading.clean and (reading.occupation, reading.gender, reading.race)
                                          == (prompt.occupation, prompt.gender, prompt.race) for reading in readings)
            continue
        gender_probabilities, race_probabilities = neutral_skew(world, prompt.occupation, gender_majority, race_majority)
        majority_gender = max(gender_probabilities, key=gender_probabilities.get)
        majority_race = max(race_probabilities, key=race_probabilities.get)
        clean = [reading for reading in readings if reading.clean]
        neutral_rows.append({
            "gender_discrepancy": discrepancy([r.gender for r in clean], list(world.genders)) if clean else float("nan"),
            "race_discrepancy": discrepancy([r.race for r in clean], list(world.races)) if clean else float("nan"),
            "toy_quality": float(np.mean([toy_quality(reading, prompt.occupation) for reading in readings])),
            "occupation": prompt.occupation, "images": count, "clean_rate": len(clean) / count,
            "majority_gender": majority_gender, "data_gender_share": gender_probabilities[majority_gender],
            "model_gender_share": float(np.mean([r.gender == majority_gender for r in clean])) if clean else float("nan"),
            "majority_race": majority_race, "data_race_share": race_probabilities[majority_race],
            "model_race_share": float(np.mean([r.race == majority_race for r in clean])) if clean else float("nan"),
        })
    images = max(identity_counts["images"], 1)
    measurement = {
        "identity_accuracy": identity_counts["all"] / images,
        "identity_clean_rate": identity_counts["clean"] / images,
        "identity_occupation_accuracy": identity_counts["occupation"] / images,
        "identity_gender_accuracy": identity_counts["gender"] / images,
        "identity_race_accuracy": identity_counts["race"] / images,
        "identity_images": identity_counts["images"],
        "neutral_gender_discrepancy": float(np.mean([row["gender_discrepancy"] for row in neutral_rows])) if neutral_rows else float("nan"),
        "neutral_race_discrepancy": float(np.mean([row["race_discrepancy"] for row in neutral_rows])) if neutral_rows else float("nan"),
        "neutral_toy_quality": float(np.mean([row["toy_quality"] for row in neutral_rows])) if neutral_rows else float("nan"),
        "neutral": neutral_rows,
        "settings": {"steps": steps, "guidance": guidance, "seed": seed},
    }
    if keep_readings:
        measurement["readings"] = kept_readings
    return measurement


def vae_round_trip_accuracy(vae, world: ToyWorld, pictures_per_identity: int = 5, seed: int = 0) -> dict[str, float]:
    """Per occupation, the share of its rendered pictures that the VAE gives back drawn right.

    For every occupation in file order, `pictures_per_identity` pictures of each gender x race (in that order, all
    from one generator seeded with `seed` that runs on across occupations) go through x' = decode(mean of encode(x));
    the share is that of pictures x' read as a clean figure with the rendered occupation, gender and race. An
    estimated ceiling on the identity gate per occupation: a U-Net drawing in this VAE's latent space rarely draws
    an occupation right more often than its VAE gives that occupation's pictures back right.
    """
    rng = np.random.default_rng(seed)
    accuracy = {}
    for occupation in world.occupations:
        identities = [(gender, race) for gender in world.genders for race in world.races for _ in range(pictures_per_identity)]
        pictures = [render_figure(world, occupation, gender, race, rng) for gender, race in identities]
        pixels = torch.stack([image_to_tensor(picture) for picture in pictures])
        with torch.no_grad():
            decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        decoded = ((decoded.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        readings = [read_figure(world, Image.fromarray(array)) for array in decoded]
        accuracy[occupation] = float(np.mean([reading.clean and (reading.occupation, reading.gender, reading.race)
                                              == (occupation, gender, race)
                                              for reading, (gender, race) in zip(readings, identities)]))
    return accuracy


def gate_failures(measurement: dict) -> list[str]:
    """The gates a measured base (measure_toy_model) fails, one line each; empty when it passes both.

    Identity gate: identity_accuracy >= IDENTITY_ACCURACY_GATE. Skew gate, per neutral prompt: the data set's
    majority gender and majority race each stay a strict majority of the prompt's clean figures
    (model_gender_share > 1/2 and model_race_share > 1/2; a prompt with no clean figure fails).
    """
    failures = []
    if not measurement["identity_images"]:
        failures.append("identity gate: no identity-specific prompt was measured")
    elif not measurement["identity_accuracy"] >= IDENTITY_ACCURACY_GATE:
        failures.append(f"identity gate: {measurement['identity_accuracy']:.1%} of identity-specific pictures drawn right, "
                        f"below {IDENTITY_ACCURACY_GATE:.0%}")
    for row in measurement["neutral"]:
        lost = [f"{row[f'majority_{axis}']} {row[f'model_{axis}_share']:.0%}" for axis in ("gender", "race")
                if not row[f"model_{axis}_share"] > 0.5]
        if lost:
            failures.append(f"skew gate: neutral '{row['occupation']}' no longer drawn mostly as its data set's majority "
                            f"({', '.join(lost)} of clean figures)")
    return failures


def format_measurement(measurement: dict, failures: list[str] | None = None) -> str:
    """A few lines a person can read: the identity gate and the neutral skew per occupation, and, for a base, the
    gates it fails (`failures`, from gate_failures; None for a fine-tuned model, which is meant to lose the skew)."""
    gate = "PASS" if measurement["identity_accuracy"] >= IDENTITY_ACCURACY_GATE else "FAIL"
    lines = [f"identity-specific prompts drawn right (occupation, gender and race): {measurement['identity_accuracy']:.1%} "
             f"[{gate}: gate {IDENTITY_ACCURACY_GATE:.0%}] over {measurement['identity_images']} images "
             f"(clean {measurement['identity_clean_rate']:.1%}, occupation {measurement['identity_occupation_accuracy']:.1%}, "
             f"gender {measurement['identity_gender_accuracy']:.1%}, race {measurement['identity_race_accuracy']:.1%})"]
    lines.append(f"neutral prompts (mean): gender discrepancy {measurement['neutral_gender_discrepancy']:.3f}, race discrepancy "
                 f"{measurement['neutral_race_discrepancy']:.3f}, toy quality {measurement['neutral_toy_quality']:.3f}")
    for row in measurement["neutral"]:
        lines.append(f"neutral '{row['occupation']}': clean {row['clean_rate']:.0%}; {row['majority_gender']} "
                     f"{row['model_gender_share']:.0%} (data {row['data_gender_share']:.0%}); {row['majority_race']} "
                     f"{row['model_race_share']:.0%} (data {row['data_race_share']:.0%}) over {row['images']} images")
    if failures is not None:
        lines += failures or ["gates: both passed"]
    return "\n".join(lines)
