"""The biased toy training set: neutral prompts draw skewed identities, identity prompts exact ones.

Skew of a neutral prompt of occupation i, whose majority identity is (G_i, R_i) (world.majority_genders and
majority_races: the occupation file's majority_gender / majority_race columns, or else G_i = genders[i % 2] and
R_i = races[i % R] with i its row from 0):
    gender: G_i with probability gender_majority, the other gender otherwise;
    race:   R_i with probability race_majority, each other race (1 - race_majority) / (R - 1);
drawn independently. So the majority identity differs between occupations (the toy default:
doctor male/white, nurse female/asian, engineer male/black, teacher female/white).
An identity-specific prompt always shows exactly the identity it names.

Output: `<out_dir>/images/<index>.png` and `<out_dir>/train.csv` in the pairs format of step 3
(`winner_path` relative to the CSV's folder, `loser_path` empty, `caption` = the prompt), which
`train_popalign.py --loss sft` reads, plus the drawn identity of every picture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from popalign.io import atomic_save_image, atomic_write_csv
from popalign.toy.world import ToyWorld, render_figure

TRAIN_COLUMNS = ["winner_path", "loser_path", "caption", "kind", "occupation", "gender", "race"]


def neutral_skew(world: ToyWorld, occupation: str, gender_majority: float, race_majority: float) -> tuple[dict, dict]:
    """The (gender -> probability, race -> probability) a neutral prompt of `occupation` is drawn with."""
    if not (0.0 <= gender_majority <= 1.0 and 0.0 <= race_majority <= 1.0):
        raise ValueError(f"majority shares must be in [0, 1], got {gender_majority}, {race_majority}")
    index = world.occupations.index(occupation)
    majority_gender = world.majority_genders[index]
    majority_race = world.majority_races[index]
    gender_probabilities = {gender: gender_majority if gender == majority_gender else
                            (1.0 - gender_majority) / (len(world.genders) - 1) for gender in world.genders}
    race_probabilities = {race: race_majority if race == majority_race else
                          (1.0 - race_majority) / (len(world.races) - 1) for race in world.races}
    return gender_probabilities, race_probabilities


def build_biased_dataset(world: ToyWorld, prompts: pd.DataFrame, out_dir: str | Path, images_per_neutral_prompt: int,
                         images_per_identity_prompt: int, gender_majority: float = 0.85, race_majority: float = 0.8,
                         seed: int = 0) -> pd.DataFrame:
    """Render the biased training pictures for the step-1 `prompts` (kind, prompt, occupation, gender, race)."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    rows = []
    for prompt in tqdm(prompts.itertuples(index=False), total=len(prompts), desc="toy data set"):
        if prompt.kind == "neutral":
            gender_probabilities, race_probabilities = neutral_skew(world, prompt.occupation, gender_majority, race_majority)
            count = images_per_neutral_prompt
            genders = rng.choice(list(gender_probabilities), size=count, p=list(gender_probabilities.values()))
            races = rng.choice(list(race_probabilities), size=count, p=list(race_probabilities.values()))
        elif prompt.kind == "identity":
            count = images_per_identity_prompt
            genders, races = [prompt.gender] * count, [prompt.race] * count
        else:
            raise ValueError(f"prompt kind {prompt.kind!r}: expected neutral or identity")
        for gender, race in zip(genders, races):
            image_path = f"images/{len(rows):06d}.png"
            atomic_save_image(render_figure(world, prompt.occupation, str(gender), str(race), rng), out_dir / image_path)
            rows.append({"winner_path": image_path, "loser_path": "", "caption": prompt.prompt, "kind": prompt.kind,
                         "occupation": prompt.occupation, "gender": str(gender), "race": str(race)})
    frame = pd.DataFrame(rows, columns=TRAIN_COLUMNS)
    atomic_write_csv(out_dir / "train.csv", frame)
    return frame
