"""The shipped toy base model: loads as a stock diffusers pipeline, draws what identity prompts ask for,
and its neutral prompts reproduce the skew of its training data (measured here, not assumed)."""

from pathlib import Path

import pandas as pd
import pytest

from popalign.attributes import load_attributes
from popalign.prompts import expand_prompts, read_neutral_prompts
from popalign.toy.base import measure_toy_model
from popalign.toy.world import load_world

pytestmark = pytest.mark.slow  # end to end: skipped by `pytest -m "not slow"`

BASE = Path(__file__).resolve().parent.parent / "models" / "toy_base"


@pytest.fixture(scope="module")
def measurement():
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(BASE)
    pipeline.set_progress_bar_config(disable=True)
    assert type(pipeline).__name__ == "StableDiffusionPipeline"
    prompts = expand_prompts(read_neutral_prompts("data/toy/occupations.csv"), load_attributes("data/toy/attributes.json"),
                             ["gender", "race"])
    return measure_toy_model(pipeline, load_world(), prompts, images_per_identity_prompt=2, images_per_neutral_prompt=40,
                             steps=20, guidance=1.0, seed=123, keep_readings=True)


def test_base_draws_identity_prompts_right(measurement):
    # 144 pictures; the full gate (>= 90% over 1,440 pictures) is measured by scripts/train_toy_base.sh.
    assert measurement["identity_accuracy"] >= 0.8


def test_base_reproduces_the_neutral_skew(measurement):
    neutral = pd.DataFrame(measurement["neutral"])
    assert len(neutral) == 12  # every occupation of the toy world, the held-out ones too
    assert (neutral["clean_rate"] >= 0.7).all()
    # The data set's majority identity (85% gender, 80% race) stays the clear majority of each
    # neutral prompt; a fair model would sit at 50% and 33%.
    assert (neutral["model_gender_share"] >= 0.7).all()
    assert (neutral["model_race_share"] >= 0.6).all()


def test_measurement_reports_neutral_discrepancy_and_quality(measurement):
    neutral = pd.DataFrame(measurement["neutral"])
    # Discrepancy over clean figures: a fair gender split gives 0, one gender only 0.707; uniform
    # race (3 classes) 0, one race only 0.816. The base sits well inside, skewed.
    assert neutral["gender_discrepancy"].between(0.2, 0.7072).all()
    assert neutral["race_discrepancy"].between(0.2, 0.8165).all()
    assert measurement["neutral_gender_discrepancy"] == pytest.approx(neutral["gender_discrepancy"].mean())
    assert 0.8 <= measurement["neutral_toy_quality"] <= 1.0


def test_kept_readings_give_the_same_figures(measurement):
    """The per-picture readings kept for pairing seeds count up to the measurement's own figures."""
    prompts = expand_prompts(read_neutral_prompts("data/toy/occupations.csv"), load_attributes("data/toy/attributes.json"),
                             ["gender", "race"])
    readings = measurement["readings"]
    assert [len(pictures) for pictures in readings] == [2 if kind == "identity" else 40 for kind in prompts["kind"]]
    right = sum(clean and (occupation, gender, race) == (prompt.occupation, prompt.gender, prompt.race)
                for prompt, pictures in zip(prompts.itertuples(), readings) if prompt.kind == "identity"
                for clean, occupation, gender, race in pictures)
    assert right / measurement["identity_images"] == measurement["identity_accuracy"]
    neutral = [pictures for kind, pictures in zip(prompts["kind"], readings) if kind == "neutral"]
    assert [sum(clean for clean, *_ in pictures) / 40 for pictures in neutral] == [row["clean_rate"] for row in measurement["neutral"]]


def test_the_larger_base_draws_its_held_out_occupations_with_their_skew():
    """models/toy_base_36 (36 two-tone occupations): for 6 of its 12 held-out occupations (one per majority identity),
    identity-specific prompts drawn with their occupation and mostly right, neutral prompts skewed towards their
    data set's majority."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(BASE.parent / "toy_base_36")
    pipeline.set_progress_bar_config(disable=True)
    occupations = "data/toy/occupations_36.csv"
    prompts = expand_prompts(read_neutral_prompts(occupations, "heldout"), load_attributes("data/toy/attributes.json"),
                             ["gender", "race"])
    world = load_world(occupations)
    assert world.two_tone and len(set(prompts["occupation"])) == 12
    # one held-out occupation per majority identity, among those the base draws with clean outlines (>= 80% in gates.json)
    chosen = prompts[prompts["occupation"].isin(["doctor", "teacher", "farmer", "gardener", "mechanic", "carpenter"])]
    identity = measure_toy_model(pipeline, world, chosen[chosen["kind"] == "identity"], images_per_identity_prompt=1,
                                 images_per_neutral_prompt=0, steps=20, guidance=1.0, seed=7)
    # the base fails the 90% gate (85.3% over 4,320 pictures, its README): an unclean outline on some colour pairs
    assert identity["identity_images"] == 36 and identity["identity_accuracy"] >= 0.6
    assert identity["identity_occupation_accuracy"] >= 0.95
    neutral = pd.DataFrame(measure_toy_model(pipeline, world, chosen[chosen["kind"] == "neutral"], images_per_identity_prompt=0,
                                             images_per_neutral_prompt=16, steps=20, guidance=1.0, seed=7)["neutral"])
    assert len(neutral) == 6 and len(set(zip(neutral["majority_gender"], neutral["majority_race"]))) == 6
    assert (neutral["clean_rate"] >= 0.5).all()
    # pooled over the 6 prompts (96 pictures): a fair model would draw 50% and 33% of each majority
    assert neutral["model_gender_share"].mean() >= 0.7 and neutral["model_race_share"].mean() >= 0.6


def test_the_rebuilt_larger_base_draws_the_occupations_the_first_one_drew_worst():
    """models/toy_base_36_v2 (its VAE weights figures against each background half): the six occupations whose
    outlines models/toy_base_36 drew least cleanly are drawn right on identity-specific prompts (its gate: 90%)."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(BASE.parent / "toy_base_36_v2")
    pipeline.set_progress_bar_config(disable=True)
    occupations = "data/toy/occupations_36.csv"
    prompts = expand_prompts(read_neutral_prompts(occupations), load_attributes("data/toy/attributes.json"), ["gender", "race"])
    worst = ["journalist", "scientist", "firefighter", "musician", "librarian", "janitor"]
    chosen = prompts[prompts["occupation"].isin(worst) & (prompts["kind"] == "identity")]
    identity = measure_toy_model(pipeline, load_world(occupations), chosen, images_per_identity_prompt=1, images_per_neutral_prompt=0,
                                 steps=20, guidance=1.0, seed=7)
    # 36 pictures; models/toy_base_36 drew these six occupations' outlines clean in 9-66% of neutral-prompt pictures
    assert identity["identity_images"] == 36 and identity["identity_accuracy"] >= 0.85


def test_the_vae_check_reads_the_base_vae_right_and_a_broken_decoder_wrong(tmp_path, capsys):
    """`vae_round_trip_accuracy`: the 12-occupation base's VAE gives back nearly every rendered picture right; the
    same VAE with its last decoder layer zeroed (every picture a flat grey) gives back none; the stage's command line
    refuses a folder without a VAE in one line."""
    import importlib.util

    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from popalign.toy.base import vae_round_trip_accuracy

    world = load_world()
    vae = AutoencoderKL.from_pretrained(BASE, subfolder="vae").eval()
    accuracy = vae_round_trip_accuracy(vae, world, pictures_per_identity=1, seed=0)
    assert list(accuracy) == list(world.occupations)
    assert min(accuracy.values()) >= 0.5 and np.mean(list(accuracy.values())) >= 0.9
    with torch.no_grad():
        vae.decoder.conv_out.weight.zero_()
        vae.decoder.conv_out.bias.zero_()
    assert max(vae_round_trip_accuracy(vae, world, pictures_per_identity=1, seed=0).values()) == 0.0
    spec = importlib.util.spec_from_file_location("train_toy_base", BASE.parent.parent / "scripts" / "train_toy_base.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    assert script.main(["vae_check", "--model", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.strip().count("\n") == 0 and str(tmp_path) in error


def test_assemble_copies_the_pipeline_components_only_and_refuses_its_own_folder(tmp_path):
    """A continued base (START_MODEL in train_toy_base.sh) is assembled from a built base: its components come along,
    its README and gates of the earlier build do not, the U-Net is the trained one, and assembling into the folder
    it reads from is refused before anything is written."""
    from popalign.io import InputError
    from popalign.toy.base import assemble_pipeline

    source = tmp_path / "built"
    for component in ("vae", "unet", "text_encoder"):
        (source / component).mkdir(parents=True)
        (source / component / "weights").write_text(f"old {component}")
    (source / "model_index.json").write_text("{}")
    (source / "README.md").write_text("earlier build")
    (source / "gates.json").write_text("{}")
    trained = tmp_path / "trained_unet"
    trained.mkdir()
    (trained / "weights").write_text("trained unet")
    out = assemble_pipeline(source, trained, tmp_path / "continued")
    assert sorted(path.name for path in out.iterdir()) == ["model_index.json", "text_encoder", "unet", "vae"]
    assert (out / "unet" / "weights").read_text() == "trained unet" and (out / "vae" / "weights").read_text() == "old vae"
    with pytest.raises(InputError, match="same folder"):
        assemble_pipeline(source, trained, tmp_path / "built" / ".." / "built")
    assert (source / "unet" / "weights").read_text() == "old unet" and (source / "README.md").exists()
